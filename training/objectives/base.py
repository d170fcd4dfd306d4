"""The contract between the engine (``training/engine.py``) and a stage's objective.

An objective supplies this rank's micro-batches, the loss of one micro-batch as a SUM over its units
(target tokens, examples or pairs) with the number of units known before the forward (``Batch.weight``),
its metrics as sums over the same units, its evaluation, and the state a resumed run needs. The engine
owns everything else: the step, accumulation, clipping, schedule, precision, parallelism, checkpoints.

Exact accumulation: the engine divides by the step's global weight W (all micro-batches, all ranks), so
the update is that of ``sum(loss sums) / W`` however the batch is split. Batches are a pure function of
(seed, step) on every rank: each rank computes the same global batch and keeps its rows
``rank::world_size`` (``ExampleOrder`` is the shared helper), so 2 ranks train like 1 process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from training.config import TrainConfig
from training.distributed import DistInfo
from training.model import ModelConfig, Transformer


@dataclass
class Batch:
    """One rank's micro-batch. Tensors are on the CPU; the engine moves them to the device."""

    tensors: dict[str, torch.Tensor]
    weight: int  # units the loss sums over (the engine's divisor, summed over the step)
    tokens: int  # input tokens processed: the `tokens` counter, throughput and MFU


@dataclass
class LossOutput:
    loss: torch.Tensor  # fp32 scalar: SUM over the batch's `weight` units
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # detached sums over the same units


@dataclass
class DataInfo:
    vocab_size: int | None  # the data's tokenizer size (the model must cover it)
    tokenizer: Path | None  # tokenizer.json copied into the export
    special_ids: dict[str, int | None] = field(default_factory=dict)  # bos_id, eos_id, pad_id


class RunContext:
    """What the engine lends an objective: the config, the process group, the device and precision,
    and the start weights (for reference models)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, precision: str,
                 initial_model: Callable[[], nn.Module]) -> None:
        self.cfg = cfg
        self.info = info
        self.device = info.device
        self.precision = precision
        self.model_config: ModelConfig | None = None  # set by the engine before Objective.setup
        self._initial_model = initial_model

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def initial_model(self) -> nn.Module:
        """A new, unwrapped, frozen model (eval mode) holding the run's START weights: train.init_from's,
        or the seed init; the same when resuming. Collective under torchrun: call it on every rank."""
        model = self._initial_model()
        model.requires_grad_(False)
        return model.eval()


class Objective:
    """Base class of a stage's objective; see the module docstring and /docs/decisions.md."""

    sections: ClassVar[tuple[str, ...]] = ()  # config sections it reads (besides model/data/optim/train)
    requires_init_from: ClassVar[bool] = False

    def __init__(self, cfg: TrainConfig, run: RunContext) -> None:
        self.cfg = cfg
        self.run = run

    @classmethod
    def validate_config(cls, cfg: TrainConfig) -> None:
        """Raise ConfigError for a value of this stage's sections that cannot work."""

    def data_info(self) -> DataInfo:
        raise NotImplementedError

    def build_model(self, mcfg: ModelConfig) -> nn.Module:
        return Transformer(mcfg)

    def adapt_init_state(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """train.init_from's weights -> (the state to load, strict)."""
        return state, True

    def setup(self, model: nn.Module) -> None:
        """Build loaders, eval batches and reference models; weights are in place, the model wrapped."""

    def next_batch(self) -> Batch:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {}

    def after_step(self, step: int, model: nn.Module) -> None:
        """Called after each optimizer step (``step`` = steps done)."""

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position: plain data (it is saved with weights_only-loadable types)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        """State saved once (rank 0's), e.g. a policy snapshot; tensors and plain data."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def export(self, state: dict[str, torch.Tensor], mcfg: ModelConfig, out_dir: Path) -> str | None:
        """Rank 0, full CPU state: a Hugging Face Llama folder with the data's tokenizer."""
        from training.export import export_hf

        info = self.data_info()
        export_hf((state, mcfg), out_dir / "hf", tokenizer_path=info.tokenizer, **info.special_ids)
        return str(out_dir / "hf")


class ExampleOrder:
    """An endless stream of example indices: each epoch a fresh permutation seeded by (seed, epoch).

    Every rank holds the same stream, takes the global batch with ``take`` and keeps its own rows, so the
    order never depends on the number of ranks; ``state_dict`` (epoch, position) resumes it exactly.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError("no examples to train on")
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._perm: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._perm is None:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return self._perm

    def peek(self) -> int:
        return int(self._permutation()[self.pos])

    def next(self) -> int:
        index = self.peek()
        self.pos += 1
        if self.pos == self.n:
            self.epoch, self.pos, self._perm = self.epoch + 1, 0, None
        return index

    def take(self, k: int) -> list[int]:
        return [self.next() for _ in range(k)]

    @property
    def epochs(self) -> float:
        return self.epoch + self.pos / self.n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("n", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the checkpoint's data has {key}={state[key]}, this run's "
                                 f"{getattr(self, key)}; resume with the same data and train.seed")
        self.epoch, self.pos, self._perm = int(state["epoch"]), int(state["pos"]), None
