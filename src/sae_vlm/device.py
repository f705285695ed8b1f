"""Where and in what precision tensors live, and which processes share the work: one reading of the `--device`
and `--dtype` flags, and one process-group set-up, for every command."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' or None: cuda when available, else cpu; anything else as `torch.device` reads it."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not understood; expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch sees no CUDA GPU (a CPU build, or no driver); use --device cpu "
                         "or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from 'fp32' | 'fp16' | 'bf16' (or their long names) or a dtype; None / 'auto': fp16 on
    CUDA, fp32 elsewhere. Anything else is a ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not understood; expected auto or one of {sorted(DTYPES)}")
    return DTYPES[dtype]


# Generous: in extraction a rank waits at the final barrier until the slowest rank has finished its shards.
PROCESS_GROUP_TIMEOUT = timedelta(hours=12)


def join_process_group(device: torch.device) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, this rank's device, whether this call created the group).

    WORLD_SIZE > 1 means torchrun launched us: nccl on CUDA (one GPU per local rank, whatever index was asked
    for), gloo elsewhere. Without a launch and without a group: (0, 1, device, False)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return 0, 1, device, False
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device, created


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError):  # not Linux
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(max_memory_gb: float | None, device: torch.device) -> int:
    """Bytes the training data may hold in memory: --max-memory, or half the device's free memory."""
    if max_memory_gb is not None:
        return int(max_memory_gb * 1e9)
    return free_memory_bytes(device) // 2
