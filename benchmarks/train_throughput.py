"""Training throughput: activations per second through `trainer.train_step`, per architecture and width.

    python benchmarks/train_throughput.py                          # GPU if present: d=1024, k=20, x8 and x64
    python benchmarks/train_throughput.py --device cpu --widths 8 --steps 5
    python benchmarks/train_throughput.py --archs batchtopk,matryoshka --bf16 --dense
    python benchmarks/train_throughput.py --vs dictionary-learning,sparsify   # peers side by side, with ratios

Each SAE is timed alone on random in-memory batches (already normalised, as the trainer feeds them) after
a few untimed warmup steps; θ updates are on from the first step. With few steps no latent goes dead, so
the AuxK term costs nothing here (pass --dead-window 1 to time it with every latent dead).
The paper trains at batch 4096 for 110k steps, so at R activations/s one SAE takes 4096·110000/R seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_vlm.config import SAESpec, TrainConfig
from sae_vlm.sae import trainer
from sae_vlm.sae.model import ARCHS


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ours(spec: SAESpec, args, device: torch.device):
    cfg = TrainConfig(data="random", out="unused", archs=(spec.arch,), expansions=(spec.expansion,), ks=(spec.k,),
                      batch_size=args.batch_size, steps=10**9, warmup_steps=0, threshold_start_step=0,
                      dead_window=args.dead_window, bf16=args.bf16, fast=not args.dense, device=str(device))
    member = trainer.build_member(spec, args.d_in, cfg, device, {})
    return lambda step, x: trainer.train_step(member, x, step, cfg)


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
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (4096 if gpu else 1024)
    args.steps = args.steps or (50 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)

    name = torch.cuda.get_device_name(device) if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} | d_in={args.d_in} k={args.k} batch={args.batch_size} steps={args.steps} "
          f"warmup={args.warmup} bf16={args.bf16} path={'dense' if args.dense else 'fast'} torch {torch.__version__}")
    print(f"{'sae':<24} {'d_sae':>7} {'acts/s':>12} {'ms/step':>9} {'paper run (h)':>14}")
    for width in [int(w) for w in args.widths.split(",")]:
        rates = {}
        for arch in args.archs.split(","):
            spec = SAESpec(arch.strip(), width, args.k)
            rates[spec.arch] = report(spec.name, width, rate(ours(spec, args, device), args, device), args)
        for name, (arch, make) in peer_steps(width, args, device).items():
            r = report(name, width, rate(make(), args, device), args)
            if arch in rates:
                print(f"  -> sae-vlm {arch} / {name}: {rates[arch] / r:.2f}x", flush=True)


def report(name: str, width: int, r: float, args) -> float:
    hours = 4096 * 110_000 / r / 3600
    ms_per_batch = 1000 * args.batch_size / r
    print(f"{name:<24} {width * args.d_in:>7} {r:>12,.0f} {ms_per_batch:>9.1f} {hours:>14.1f}", flush=True)
    return r


if __name__ == "__main__":
    main()
