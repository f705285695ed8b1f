"""Where and in what precision tensors live, and which processes share the work: one reading of the `--device`
and `--dtype` flags, and one process-group set-up, for every command."""

from __future__ import annotations

import ctypes
import functools
import os
import platform
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


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu",
                  flag: str = "dtype") -> torch.dtype:
    """A torch dtype from 'fp32' | 'fp16' | 'bf16' (or their long names) or a dtype; None / 'auto': fp16 on
    CUDA, fp32 elsewhere. Anything else is a ValueError naming the choices; bf16 on a CPU without native bf16
    is refused (`check_bf16`)."""
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    elif dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not understood; expected auto or one of {sorted(DTYPES)}")
    else:
        out = DTYPES[dtype]
    if out == torch.bfloat16:
        check_bf16(device, f"{flag} {dtype}")
    return out


CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


@functools.cache
def cpu_flags() -> dict[str, bool]:
    """The CPU features that decide which kernels run: AVX2, AVX-512, AVX512-BF16, AMX (bf16 tiles)."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    if not caps:  # older torch: read the kernel's list
        try:
            with open("/proc/cpuinfo") as f:
                words = set(next((ln for ln in f if ln.startswith("flags")), "").split())
        except OSError:
            words = set()
        caps = {"avx2": "avx2" in words, "avx512_f": "avx512f" in words, "avx512_bf16": "avx512_bf16" in words,
                "amx_bf16": "amx_bf16" in words}
    return {"AVX2": bool(caps.get("avx2")), "AVX-512": bool(caps.get("avx512_f")),
            "AVX512-BF16": bool(caps.get("avx512_bf16")), "AMX": bool(caps.get("amx_bf16"))}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        name = ""
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def cpu_summary() -> str:
    """One line naming the CPU and its flags, for timings: 'Intel(R) Xeon(R) …, 2 cores; AVX2 yes, AVX-512 yes, …',
    and any cap on the instructions torch, MKL or oneDNN use (which is how one machine stands in for another)."""
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu_flags().items())
    caps = [f"{k}={os.environ[k]}" for k in CAP_VARIABLES if os.environ.get(k)]
    capped = f"; capped: {' '.join(caps)} (torch kernels {torch.backends.cpu.get_cpu_capability()})" if caps else ""
    return f"{cpu_name()}; {flags}{capped}"


def native_bf16() -> bool:
    """Whether bf16 matrix products run in hardware here: AVX512-BF16 or AMX, and torch/oneDNN not capped below
    them (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA). Without it torch emulates bf16, over 10× slower than fp32."""
    flags = cpu_flags()
    if not (flags["AVX512-BF16"] or flags["AMX"]):
        return False
    if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    return cap == "ALL" or "BF16" in cap or "AMX" in cap or cap.startswith("AVX10")


@functools.cache
def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse (on Linux with glibc; True if set).

    A CPU training step frees and allocates several tensors of F·d floats. glibc hands blocks that large back to
    the kernel at once, and the next step faults them in again page by page: ~30,000 page faults a step at ×8,
    more when another large workload shares the process. Serving them from the heap instead makes the faults go
    away; the cost is that the process keeps its peak memory until it ends."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def check_bf16(device: str | torch.device, what: str) -> None:
    """Refuse bf16 compute on a CPU that would emulate it, in one line saying why and what to use."""
    if torch.device(device).type == "cpu" and not native_bf16():
        flags = cpu_flags()
        why = ("has no native bf16 (neither AVX512-BF16 nor AMX)" if not (flags["AVX512-BF16"] or flags["AMX"])
               else "runs torch capped below AVX-512 (ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA)")
        raise ValueError(f"{what}: this CPU ({cpu_name()}) {why}, so bf16 would be emulated, over 10x slower than "
                         "fp32; use fp32 here (drop the bf16 option)")


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
