"""The `refinery` command line: errors are one line with exit code 2; export/import/generate work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from training.checkpoint import load_model_file, write_model_checkpoint
from training.model import ModelConfig, Transformer


def test_unknown_config_key_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("steps:\n  - extract: {timout_s: 3}\n")
    code = main(["-q", "curate", str(cfg), "--input", str(cfg), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "timout_s" in err and "timeout_s" in err


def test_missing_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    web = Path(__file__).resolve().parents[1] / "pipelines" / "configs" / "web.yaml"
    code = main(["-q", "curate", str(web), "--input", str(tmp_path / "nope*.warc.gz"), "--output", str(tmp_path)])
    assert code == 2 and "nope" in capsys.readouterr().err


def test_export_import_generate_round_trip(shared_data: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    from curation.tokenizer import train_tokenizer

    tok = train_tokenizer([str(shared_data / "text" / "tinyshakespeare" / "input.txt")], 512, tmp_path / "tok.json")
    cfg = ModelConfig.named("1m", vocab_size=512)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    ckpt = write_model_checkpoint(tmp_path / "ckpt", model.state_dict(), cfg.to_dict())

    assert main(["export", str(ckpt), "-o", str(tmp_path / "hf"), "--tokenizer", str(tok)]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file() and (tmp_path / "hf" / "tokenizer.json").is_file()
    assert main(["import", str(tmp_path / "hf"), "-o", str(tmp_path / "back")]) == 0
    back = load_model_file(tmp_path / "back")["model"]
    for name, tensor in model.state_dict().items():
        if name in back:
            assert torch.equal(back[name], tensor), name
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "ROMEO:", "--greedy", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_tokenizer_train_and_tokenize_commands(shared_data: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    import json

    from curation.document import Document
    from curation.writer import write_parquet_docs

    lines = (shared_data / "text" / "tinyshakespeare" / "input.txt").read_text().split("\n\n")[:300]
    docs = [Document(id=str(i), text=t, source="books") for i, t in enumerate(lines) if t.strip()]
    write_parquet_docs(docs, tmp_path / "corpus" / "books" / "00000.parquet")
    tok = tmp_path / "tok.json"
    assert main(["-q", "tokenizer", "train", "--input", str(tmp_path / "corpus"), "--vocab-size", "400",
                 "--output", str(tok)]) == 0
    assert main(["-q", "tokenize", "--corpus", str(tmp_path / "corpus"), "--tokenizer", str(tok),
                 "--output", str(tmp_path / "tokens")]) == 0
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    assert manifest["total_documents"] == len(docs) and manifest["dtype"] == "uint16"
    assert "tokens in 1 shards" in capsys.readouterr().out
