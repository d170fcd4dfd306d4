"""Training objectives: one file per stage, each supplying its batches, its loss and its metrics to the
one loop in ``training/engine.py`` (the interface is ``training/objectives/base.py``).

The tables below are import strings, so reading them (the config loader does, to know the stage names
and sections) imports no torch and no objective module; a module is imported when its stage runs.
"""

from __future__ import annotations

import importlib
from typing import Any

# stage name -> the Objective class that trains it
STAGE_OBJECTIVES: dict[str, str] = {
    "pretrain": "training.objectives.lm:LMObjective",
    "midtrain": "training.objectives.lm:LMObjective",
    "sft": "training.objectives.sft:SFTObjective",
    "reward": "training.objectives.reward:RewardObjective",
    "dpo": "training.objectives.dpo:DPOObjective",
    "grpo": "training.objectives.grpo:GRPOObjective",  # RL stages (helper "rl-algos")
    "ppo": "training.objectives.ppo:PPOObjective",
    "prm": "training.objectives.prm:PRMObjective",
}

# config section name -> its dataclass (beside model/data/optim/train, which training/config.py defines)
STAGE_SECTIONS: dict[str, str] = {
    "sft": "training.objectives.sft:SFTSection",
    "reward": "training.objectives.reward:RewardSection",
    "dpo": "training.objectives.dpo:DPOSection",
    "lora": "training.adapters:LoRASection",
    "grpo": "training.objectives.grpo:GRPOSection",
    "ppo": "training.objectives.ppo:PPOSection",
    "prm": "training.objectives.prm:PRMSection",
}

# sections the engine reads whatever the stage (the adapters of LoRA / QLoRA)
ENGINE_SECTIONS = ("lora",)


def resolve(spec: str) -> Any:
    """``"package.module:Name"`` -> the object; ImportError names what is missing."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a missing dependency inside the module: report it as it is
            raise
        raise ImportError(f"{module_name} is not part of this installation") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ImportError(f"{module_name} has no {attr}") from None


def objective_class(stage: str) -> Any:
    if stage not in STAGE_OBJECTIVES:
        raise KeyError(f"unknown stage {stage!r}; known: {', '.join(STAGE_OBJECTIVES)}")
    return resolve(STAGE_OBJECTIVES[stage])


__all__ = ["STAGE_OBJECTIVES", "STAGE_SECTIONS", "ENGINE_SECTIONS", "resolve", "objective_class"]
