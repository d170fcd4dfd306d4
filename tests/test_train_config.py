"""Training config: strict keys with suggestions, typed overrides, and the learning-rate schedules."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from training.config import ConfigError, load_config
from training.schedule import cosine_lr, linear_lr, lr_at, wsd_lr

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_misspelled_yaml_key_is_an_error_that_names_it_and_suggests_the_closest(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: {size: 1m}\ndata: {mix: x}\noptim:\n  weight_decy: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.weight_decy'; did you mean 'weight_decay'"):
        load_config(path)


def test_unrelated_unknown_key_lists_the_valid_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: {size: 1m}\ndata: {mix: x}\noptim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"'optim.learning_rate'; valid keys: .*\blr\b"):
        load_config(path)


def test_misspelled_override_suggests_the_dotted_key() -> None:
    with pytest.raises(ConfigError, match=r"'train.step'.*did you mean 'train.steps'"):
        load_config(None, ["model.size=1m", "data.mix=x", "train.step=5"])


def test_unknown_section_suggests_the_closest_section(tmp_path: Path) -> None:
    path = _write(tmp_path, "optimizer: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"section 'optimizer'.*did you mean 'optim'"):
        load_config(path)


def test_override_strings_are_coerced_to_the_field_types() -> None:
    cfg = load_config(None, [
        "model.size=1m", "data.mix=tokens", "optim.lr=3e-4", "train.steps=300", "optim.betas=0.8,0.9",
        "train.compile=true", "model.rope_scaling={rope_type: linear, factor: 4}", "data.eval=none",
        "model.rope_theta=5e5", "train.eval_every=1e3",
    ])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.train.steps == 300 and isinstance(cfg.train.steps, int)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.compile is True
    assert cfg.model.rope_scaling == {"rope_type": "linear", "factor": 4}
    assert cfg.data.eval is None
    assert cfg.model.rope_theta == 5e5
    assert cfg.train.eval_every == 1000


@pytest.mark.parametrize(("override", "message"), [
    ("train.steps=ten", "train.steps must be an integer"),
    ("train.steps=2.5", "train.steps must be an integer"),
    ("optim.lr=fast", "optim.lr must be a number"),
    ("optim.schedule=cosin", r"optim.schedule must be one of \['cosine', 'wsd', 'linear', 'constant'\]"),
    ("train.compile=maybe", "train.compile must be a boolean"),
    ("optim.betas=0.9", "optim.betas must be a list of 2 values"),
    ("train.steps", "must look like section.key=value"),
    ("train.steps=0", "train.steps must be > 0"),
    ("train.eval_batch_size=-4", "train.eval_batch_size must be > 0 or null"),
    ("train.stop_after=0", "train.stop_after must be > 0 or null"),
    ("train.steps=50", r"optim.warmup=100 leaves no decay in train.steps=50"),
])
def test_invalid_override_values_are_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.size=1m", "data.mix=x", override])


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("optim.min_lr_ratio=nan", "optim.min_lr_ratio must be a finite number"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be > 0, or 0 to disable"),
    ("optim.grad_clip=inf", "optim.grad_clip must be a finite number"),
    ("optim.eps=0", "optim.eps must be > 0"),
    ("optim.betas=[0.9,1.0]", r"optim.betas must both be in \[0, 1\)"),
    ("optim.betas=[0.9,nan]", r"optim.betas\[1\] must be a finite number"),
])
def test_optimizer_numbers_must_be_finite_and_in_range(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.size=1m", "data.mix=x", override])


def test_a_config_built_in_code_with_a_nan_learning_rate_is_refused() -> None:
    cfg = load_config(None, ["model.size=1m", "data.mix=x"])
    cfg.optim.lr = float("nan")  # bypasses the coercion of YAML and overrides
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        cfg.validate()


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "model: {size: 1m}\ndata: {mix: x}\noptim:\n  betas: [0.9, 0.95\n")
    with pytest.raises(ConfigError, match=rf"{path}: invalid YAML at line \d+, column \d+: expected ',' or ']'"):
        load_config(path)


@pytest.mark.parametrize("override", ["optim.betas=[0.9,0.95", "model.rope_scaling={rope_type: linear"])
def test_an_override_with_broken_yaml_names_the_override(override: str) -> None:
    with pytest.raises(ConfigError, match=rf"override '{re.escape(override)}': invalid YAML"):
        load_config(None, ["model.size=1m", "data.mix=x", override])


def test_midtrain_without_init_from_is_an_error() -> None:
    with pytest.raises(ConfigError, match="requires train.init_from"):
        load_config(None, ["data.mix=x"], stage="midtrain")


def test_stage_of_the_command_must_match_the_configs_stage() -> None:
    with pytest.raises(ConfigError, match="is a 'midtrain' config but the command asked for 'pretrain'"):
        load_config(CONFIGS / "midtrain_tiny.yaml", stage="pretrain")


def test_shipped_configs_load_with_their_stage() -> None:
    pre = load_config(CONFIGS / "pretrain_tiny.yaml", stage="pretrain")
    mid = load_config(CONFIGS / "midtrain_tiny.yaml", ["train.steps=70"], stage="midtrain")
    assert pre.model.size == "1m" and pre.optim.schedule == "wsd"
    assert mid.train.init_from and mid.optim.schedule == "linear" and mid.optim.min_lr_ratio == 0.0
    assert mid.train.steps == 70
    assert mid.data.seq_len > pre.data.seq_len  # context extension


# ------------------------------------------------------------------------------------------ schedules


def test_warmup_ramps_linearly_to_the_peak_on_its_last_step() -> None:
    lrs = [cosine_lr(s, peak=1.0, warmup=4, total=20) for s in range(4)]
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0])


def test_cosine_decays_monotonically_to_the_floor_on_the_last_step() -> None:
    lrs = [cosine_lr(s, peak=1.0, warmup=2, total=50, min_ratio=0.1) for s in range(50)]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)
    # Halfway through the decay the cosine is at the midpoint between peak and floor.
    assert cosine_lr(2 + 23, peak=1.0, warmup=2, total=50, min_ratio=0.1) == pytest.approx(0.55 + 0.45 * math.cos(
        math.pi * 24 / 48), rel=1e-9)


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction() -> None:
    total, warmup = 100, 10
    lrs = [wsd_lr(s, peak=2.0, warmup=warmup, total=total, min_ratio=0.0, decay_fraction=0.2) for s in range(total)]
    assert lrs[warmup:80] == [2.0] * 70  # stable phase
    assert lrs[80] < 2.0 and lrs[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:], strict=False))
    sqrt_shape = wsd_lr(89, peak=2.0, warmup=warmup, total=total, decay_fraction=0.2, decay_shape="1-sqrt")
    assert sqrt_shape == pytest.approx(2.0 * (1 - math.sqrt(0.5)))


def test_linear_anneal_reaches_zero_on_the_last_step() -> None:
    lrs = [linear_lr(s, peak=1.0, warmup=0, total=4) for s in range(4)]
    assert lrs == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_unknown_schedule_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_at(0, schedule="step", peak=1.0, warmup=0, total=10, min_ratio=0.0)
