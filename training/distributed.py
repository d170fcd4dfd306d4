"""Process group setup and the three composable model transforms (activation checkpointing,
compile, FSDP2), applied per transformer block as in torchtitan's ``parallelize.py``.

Under ``torchrun`` (or Ray Train, which sets the same variables) the environment carries RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the run is a single process and
no process group is created. NCCL on CUDA, gloo on CPU, so the same code is tested on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment (or reuse one that Ray Train or
    a test already created) and pick this rank's device."""
    already = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if already else int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if already else int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    created = False
    if world > 1 and not already:
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU eagerly, avoids a wrong-device hang
        dist.init_process_group(**kwargs)
        created = True
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev, initialized_here=created)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def all_reduce_mean(value: float, info: DistInfo) -> float:
    """Mean of a scalar over ranks (every rank must call)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if not info.distributed:
        return [obj]
    out: list[Any] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def scatter_objects(objs: list[Any] | None, info: DistInfo) -> Any:
    """Rank 0's ``objs[r]`` delivered to rank r."""
    if not info.distributed:
        assert objs is not None
        return objs[0]
    box: list[Any] = [None]
    dist.scatter_object_list(box, objs if info.is_main else None, src=0)
    return box[0]


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no `layers` ModuleList of transformer blocks")
    return layers


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in backward: memory O(layers) smaller for ~1/3 more compute.
    ``checkpoint_wrapper`` inserts ``_checkpoint_wrapped_module`` in parameter names; the state-dict
    helpers of torch.distributed.checkpoint strip it, which is why checkpoint.py uses them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = _blocks(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """Compile each block on its own: every block has the same graph, so one compilation is reused and
    FSDP2's per-block hooks stay outside the compiled regions (torchtitan does the same).
    ``Module.compile`` compiles in place, keeping parameter names unchanged."""
    for block in _blocks(model):
        block.compile()
    return model


def apply_fsdp(model: nn.Module, device: torch.device, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard each block, then the root (embeddings, final norm, head). With ``param_dtype`` the
    all-gathered parameters are cast (e.g. bf16) while gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kwargs: dict[str, Any] = {"mesh": mesh}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = _blocks(model)
    for i, block in enumerate(layers):
        # The last block's parameters are needed again at once by backward; keeping them gathered
        # after forward saves one all-gather (torchtitan's reshard_after_forward choice).
        fully_shard(block, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def parallelize(model: nn.Module, info: DistInfo, *, parallel: str, compile: bool,
                activation_checkpointing: bool, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Compose the transforms in the order that works: checkpoint wrapping, then compile, then the
    data-parallel wrapper. Returns the module to call in training (DDP wraps; FSDP2 is in place)."""
    if parallel != "none" and not info.distributed:
        parallel = "none"  # a single process: DDP/FSDP would add nothing, and need a process group
    if parallel == "none" and info.distributed:
        raise ValueError(f"running on {info.world_size} ranks needs train.parallel=ddp or fsdp")
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        apply_compile(model)
    if parallel == "fsdp":
        return apply_fsdp(model, info.device, param_dtype)
    if parallel == "ddp":
        return apply_ddp(model, info.device)
    return model


def no_grad_sync(model: nn.Module, sync: bool) -> Any:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    import contextlib

    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
