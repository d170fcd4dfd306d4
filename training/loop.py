"""Pretraining and mid-training entry points, kept for existing callers: the loop itself is
``training/engine.py`` and the language-modelling objective ``training/objectives/lm.py``.

``python -m training.loop STAGE CONFIG [overrides]`` is the same as ``python -m training.engine``.
"""

from __future__ import annotations

from training.engine import build_model_config, build_optimizer, main, param_groups, train, train_from_cli
from training.objectives.lm import data_vocab, evaluate

if __name__ == "__main__":
    raise SystemExit(main(prog="training.loop"))


__all__ = ["train", "train_from_cli", "evaluate", "build_model_config", "build_optimizer", "param_groups",
           "data_vocab", "main"]
