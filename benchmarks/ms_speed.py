"""Monosemanticity score: closed form vs the direct pair computation, and absolute time at scale.

    python benchmarks/ms_speed.py            # CPU: speed-up at N=5k, then N=10k x K=16k x D=768
    python benchmarks/ms_speed.py --gpu      # adds the paper scale N=50k x K=65,536 on CUDA

"Direct" is the paper's pair computation (metric.py style, vectorised over batches of latents): the N x N
relevance matrix ã ãᵀ times the N x N cosine matrix, summed off the diagonal, in float64. It is timed on a
few latents and scaled linearly to K (its cost is exactly linear in K); the output says so.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from sae_vlm.eval.ms import ms_stats, unit_embeddings


def synthetic(n, k, d, l0, device, seed=0):
    """SAE-like codes: l0 positive entries per row; embeddings with a shared offset (chance level ~0.5)."""
    g = torch.Generator(device=device).manual_seed(seed)
    idx_NL = torch.randint(0, k, (n, l0), generator=g, device=device, dtype=torch.int64)
    val_NL = torch.rand(n, l0, generator=g, device=device) * 5
    acts_NK = torch.zeros(n, k, device=device)
    acts_NK.scatter_(1, idx_NL, val_NL)
    emb_ND = torch.randn(n, d, generator=g, device=device) + 1.0
    # top-k store form of the same codes (duplicates in idx collapse to one entry in acts)
    vals, inds = acts_NK.topk(l0, dim=1)
    store = SimpleNamespace(rows=n, d_sae=k, indices=inds.int(), values=vals.half())
    return acts_NK, emb_ND, store


def direct_ms(acts_NK, emb_ND, latents, batch=4):
    e = unit_embeddings(emb_ND.cpu()).to(acts_NK.device)
    s_NN = e @ e.T
    s_NN.fill_diagonal_(0.0)  # n ≠ m
    out = []
    for b0 in range(0, len(latents), batch):
        a = acts_NK[:, latents[b0 : b0 + batch]].double()
        lo, hi = a.amin(0), a.amax(0)
        at = (a - lo) / (hi - lo)
        for j in range(at.shape[1]):
            r_NN = torch.outer(at[:, j], at[:, j])
            den = r_NN.sum() - (at[:, j] ** 2).sum()
            out.append(float((r_NN * s_NN).sum() / den))
    return torch.tensor(out, dtype=torch.float64)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def speedup(device, n=5000, k=16384, d=768, l0=20, n_direct=8):
    acts, emb, _ = synthetic(n, k, d, l0, device)
    res, t_fast = timed(lambda: ms_stats(acts, emb, device=device), device)
    fired = torch.nonzero(res.support > 1)[:, 0][:n_direct].tolist()
    ref, t_dir = timed(lambda: direct_ms(acts, emb, fired), device)
    err = float((res.ms[fired] - ref).abs().max())
    t_dir_all = t_dir / len(fired) * k
    print(f"[speed-up] N={n} K={k} D={d} on {device}: closed form {t_fast:.2f} s for all {k} latents; direct pair "
          f"sum {t_dir:.2f} s for {len(fired)} latents, scaled linearly to {k} latents = {t_dir_all:.0f} s "
          f"-> speed-up {t_dir_all / t_fast:.0f}x (max |diff| on the timed latents {err:.1e})")


def scale(device, n, k, d, l0=20):
    acts, emb, store = synthetic(n, k, d, l0, device)
    _, t_dense = timed(lambda: ms_stats(acts, emb, device=device), device)
    acts = None  # free the dense codes before the sparse run
    _, t_sparse = timed(lambda: ms_stats(store, emb, device=device), device)
    neurons = torch.randn(n, 1024, device=device) + 0.3  # raw layer neurons: dense, the matmul path
    _, t_neur = timed(lambda: ms_stats(neurons, emb, device=device), device)
    print(f"[scale] N={n} K={k} D={d} on {device}: dense SAE codes {t_dense:.2f} s, sparse top-{l0} code store "
          f"{t_sparse:.2f} s; raw neurons N={n} x 1024 (No SAE baseline) {t_neur:.2f} s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="also run the paper scale N=50k x K=65,536 on CUDA")
    p.add_argument("--skip-cpu", action="store_true")
    args = p.parse_args()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.skip_cpu:
        speedup(cpu)
        scale(cpu, 10_000, 16_384, 768)
    if args.gpu:
        gpu = torch.device("cuda")
        print(f"GPU: {torch.cuda.get_device_name(0)}")
        speedup(gpu, n=5000, k=65_536, n_direct=64)
        scale(gpu, 50_000, 65_536, 768)


if __name__ == "__main__":
    main()
