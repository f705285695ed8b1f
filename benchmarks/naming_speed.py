"""Time `sae-vlm name`'s steps after the codes (concepts, names, name scores) on synthetic data, and its peak memory.

    python benchmarks/naming_speed.py --images 20000 --latents 16384 --vocab 1200 --dim 512 --l0 64

Codes are random sparse rows with `--l0` firing latents each (what an SAE's pass over the store leaves: the fired
pairs); the pass itself costs what evaluate's encoding costs and is not timed here. Each step's cost grows as
noted in RESULTS.md, which scales these timings to the paper's sizes.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from sae_vlm.eval import naming as N


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20000)
    p.add_argument("--latents", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=1200)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--l0", type=int, default=64)
    p.add_argument("--top", type=int, default=16)
    a = p.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    e, t = N.unit(torch.randn(a.images, a.dim)), N.unit(torch.randn(a.vocab, a.dim))
    acc = N.FiredImages(a.latents)
    for r0 in range(0, a.images, 1024):
        r = min(1024, a.images - r0)
        cols = torch.as_tensor(rng.integers(0, a.latents, size=(r, a.l0)))
        acc.add(torch.zeros(r, a.latents).scatter_(1, cols, torch.rand(r, a.l0) + 0.1))
    fired = acc.result()
    top_idx = rng.integers(0, a.images, size=(a.latents, a.top))
    top_val = rng.random((a.latents, a.top)) + 0.1
    t0 = time.perf_counter()
    arrays, seconds = N.name_latents(e, t, [f"w{i}" for i in range(a.vocab)], top_idx, top_val, fired, 3)
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"images {a.images}, latents {a.latents}, vocabulary {a.vocab}, dim {a.dim}, L0 {a.l0}, "
          f"{torch.get_num_threads()} threads: concepts+names {seconds['names']:.1f}s, scores "
          f"{seconds['scores']:.1f}s, total {total:.1f}s; fired pairs {len(fired[0]):,}; peak RSS {peak:.2f} GiB; "
          f"median score {np.nanmedian(arrays['name_score'][:, 0]):.3f} (random data: about 0.5)")


if __name__ == "__main__":
    main()
