"""Training throughput: activations per second through `trainer.train_step`, per architecture and width.

    python benchmarks/train_throughput.py                          # GPU if present: d=1024, k=20, x8 and x64
    python benchmarks/train_throughput.py --device cpu --widths 8 --steps 5
    python benchmarks/train_throughput.py --archs batchtopk,matryoshka --bf16 --dense
    python benchmarks/train_throughput.py --vs dictionary-learning,sparsify   # peers side by side, with ratios
    python benchmarks/train_throughput.py --device cpu --isa avx2 --vs dictionary-learning  # as on an AVX2-only CPU

Each SAE is timed alone on random in-memory batches (already normalised, as the trainer feeds them) after
a few untimed warmup steps; θ updates are on from the first step. With few steps no latent goes dead, so
the AuxK term costs nothing here (pass --dead-window 1 to time it with every latent dead).
The paper trains at batch 4096 for 110k steps, so at R activations/s one SAE takes 4096·110000/R seconds.

`--isa avx2` reruns the script with torch's kernels, MKL and oneDNN all capped at AVX2 (ATEN_CPU_CAPABILITY,
MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA), which is how an AVX-512 machine stands in for an AVX2-only one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from sae_vlm.config import SAESpec, TrainConfig
from sae_vlm.device import cpu_summary, keep_freed_memory
from sae_vlm.sae import trainer
from sae_vlm.sae.model import ARCHS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(spec: SAESpec, args, device: torch.device):
    cfg = TrainConfig(data="random", out="unused", archs=(spec.arch,), expansions=(spec.expansion,), ks=(spec.k,),
                      batch_size=args.batch_size, steps=10**9, warmup_steps=0, threshold_start_step=0,
                      dead_window=args.dead_window, bf16=args.bf16, fast=not args.dense, device=str(device))
    if device.type == "cpu":
        keep_freed_memory()  # as `sae-vlm train` does on a CPU; process-wide, so the peers get it too
    member = trainer.build_member(spec, args.d_in, cfg, device, {})
    return lambda step, x: trainer.train_step(member, x, step, cfg, metrics=False)  # as between log steps


def rate(step_fn, args, device: torch.device) -> float:
    """Activations/s of `step_fn(step, x)` over `args.steps` timed steps after `args.warmup` untimed ones."""
    g = torch.Generator(device).manual_seed(0)
    # A few distinct batches, so nothing is cached across steps; normalised to E‖x‖² = 1 like the trainer's input.
    xs = [torch.randn(args.batch_size, args.d_in, generator=g, device=device) / args.d_in**0.5 for _ in range(4)]
    for step in range(args.warmup):
        step_fn(step, xs[step % 4])
    sync(device)
    start = time.perf_counter()
    for step in range(args.warmup, args.warmup + args.steps):
        step_fn(step, xs[step % 4])
    sync(device)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return args.batch_size * args.steps / seconds


def profile(step_fn, args, device: torch.device, name: str, top: int = 15) -> None:
    """The ops of `args.steps` steps by self time, with their share of the total (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    xs = [torch.randn(args.batch_size, args.d_in, device=device) / args.d_in**0.5 for _ in range(2)]
    for step in range(args.warmup):
        step_fn(step, xs[step % 2])
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(args.warmup, args.warmup + args.steps):
            step_fn(step, xs[step % 2])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profile of {name}: {total / 1e3 / args.steps:.1f} ms/step")
    for e in events[:top]:
        ms, share = e.self_cpu_time_total / 1e3 / args.steps, 100 * e.self_cpu_time_total / total
        print(f"  {e.key:<44} {ms:8.2f} ms/step {share:5.1f}%  x{e.count // args.steps}")


def peer_steps(width: int, args, device: torch.device) -> dict:
    """name -> step callable for each requested peer at this width."""
    import peers

    peers.ensure_installed()
    out = {}
    vs = args.vs.split(",") if args.vs else []
    archs = [a for a in args.archs.split(",") if a in ("batchtopk", "matryoshka")]
    if "dictionary-learning" in vs:
        for arch in archs:
            out[f"dl:{arch}_x{width}"] = (arch, lambda a=arch: peers.dictionary_learning_step(
                a, args.d_in, width, args.k, device, 10**9))
    if "sparsify" in vs:
        out[f"sparsify:topk_x{width}"] = ("topk", lambda: peers.sparsify_step(args.d_in, width, args.k, device,
                                                                              args.bf16 or device.type == "cuda"))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default 4096 on GPU, 1024 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on GPU, 1 on CPU)")
    p.add_argument("--widths", default="8,64", help="comma list of expansion factors")
    p.add_argument("--archs", default=",".join(ARCHS), help="comma list of architectures")
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast forward")
    p.add_argument("--dense", action="store_true", help="force the dense path for top-k archs (cfg.fast=False)")
    p.add_argument("--dead-window", type=int, default=10_000_000, help="samples before a latent counts as dead")
    p.add_argument("--vs", default="", help="peers to run side by side: dictionary-learning,sparsify")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; medians are reported")
    p.add_argument("--profile", action="store_true", help="print each SAE's top ops (torch.profiler) instead")
    p.add_argument("--isa", choices=("native", "avx2"), default="native",
                   help="avx2: cap torch, MKL and oneDNN at AVX2, as on a CPU without AVX-512")
    args = p.parse_args()
    if args.isa == "avx2" and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":  # must be set before torch starts
        env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (4096 if gpu else 1024)
    args.steps = args.steps or (50 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    name = torch.cuda.get_device_name(device) if gpu else f"{cpu_summary()}; {torch.get_num_threads()} threads"
    print(f"device: {name} | d_in={args.d_in} k={args.k} batch={args.batch_size} steps={args.steps} "
          f"warmup={args.warmup} bf16={args.bf16} path={'dense' if args.dense else 'fast'} torch {torch.__version__}")
    print(f"{'sae':<24} {'d_sae':>7} {'acts/s':>12} {'ms/step':>9} {'paper run (h)':>14}")
    for width in [int(w) for w in args.widths.split(",")]:
        fns = {}
        for arch in args.archs.split(","):
            spec = SAESpec(arch.strip(), width, args.k)
            if args.profile:
                profile(ours(spec, args, device), args, device, spec.name)
            else:
                fns[spec.name] = (spec.arch, ours(spec, args, device))
        if args.profile:
            continue
        fns |= {name: (arch, make()) for name, (arch, make) in peer_steps(width, args, device).items()}
        # rounds interleave the SAEs, so a machine that slows down for a while slows all of them alike
        rates = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, (_, fn) in fns.items():
                rates[name].append(rate(fn, args, device))
        for name in fns:
            report(name, width, statistics.median(rates[name]), args)
        ours_by_arch = {arch: name for name, (arch, _) in fns.items() if ":" not in name}
        for name, (arch, _) in fns.items():
            if ":" in name and arch in ours_by_arch:
                ratios = sorted(a / b for a, b in zip(rates[ours_by_arch[arch]], rates[name]))
                print(f"  -> sae-vlm {arch} / {name}: {statistics.median(ratios):.2f}x (median of {len(ratios)} "
                      f"interleaved rounds; range {ratios[0]:.2f}-{ratios[-1]:.2f})", flush=True)


def report(name: str, width: int, r: float, args) -> float:
    hours = 4096 * 110_000 / r / 3600
    ms_per_batch = 1000 * args.batch_size / r
    print(f"{name:<24} {width * args.d_in:>7} {r:>12,.0f} {ms_per_batch:>9.1f} {hours:>14.1f}", flush=True)
    return r


if __name__ == "__main__":
    main()
