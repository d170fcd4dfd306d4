"""Peak dense FLOP/s by accelerator, for an honest MFU (model FLOPs utilisation).

Values are the vendors' dense (no 2:4 sparsity) tensor-core figures for bf16, the dtype we train in;
torchtitan's `tools/utils.py` keeps the same table. MFU = achieved model FLOP/s / peak, where achieved
FLOP/s = tokens/s × `Transformer.flops_per_token(seq_len)` (PaLM appendix B).
"""

from __future__ import annotations

import torch

# Ordered: the first substring found in the device name wins, so more specific names come first
# ("H100 PCIe" before "H100", "A10G" before "A10").
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),  # same SXM compute as H100; more/faster HBM only
    ("GH200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5
    ("H800", 989e12),
    ("H20", 148e12),
    ("B200", 2250e12),
    ("B100", 1750e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("A6000", 154.8e12),  # RTX A6000, 4th-gen tensor core dense bf16 with fp32 accumulate
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of `device` (default: the current CUDA device), or None when unknown / CPU.

    A string is matched as a device *name* (e.g. "NVIDIA H100 80GB HBM3") unless it names a torch device
    type ("cpu", "cuda", "cuda:1").
    """
    name: str | None
    if isinstance(device, str) and device.split(":")[0] not in ("cpu", "cuda", "mps", "xpu", "meta"):
        name = device
    else:
        dev = torch.device(device) if device is not None else None
        if dev is None:
            if not torch.cuda.is_available():
                return None
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type != "cuda" or not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(dev)
    for key, value in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return value
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1], or None when the peak is unknown (CPU, unlisted GPU)."""
    if not peak:
        return None
    return tokens_per_second * flops_per_token / peak
