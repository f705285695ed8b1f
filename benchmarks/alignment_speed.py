"""Concept alignment at size: SAE-like sparse codes (N rows, F latents, L0 entries a row) and C classes, the 1-D
and k-sparse probes of one SAE; and the baselines of one hook point at width d.

    OMP_NUM_THREADS=1 python benchmarks/alignment_speed.py [N F L0 C D]
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
import torch

from sae_vlm.eval import alignment as A


def main(n=10_000, f=16_384, l0=64, c=100, d=256) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    Y = torch.from_numpy(rng.random((n, c)) < 0.02).float()
    rows = np.repeat(np.arange(n), l0)
    cols = rng.integers(0, f, n * l0)
    rows, cols = np.unique(np.stack([rows, cols]), axis=1)
    codes = A.SparseCodes(rows, cols, rng.random(len(rows)), n, f)
    t = time.time()
    eff = A.effect_sizes(codes, Y)
    A.best_single(codes, Y, eff, signed=False)
    t1 = time.time()
    A.ksparse(codes, Y, codes, Y, eff)
    t2 = time.time()
    X = torch.from_numpy(rng.normal(size=(n, d)))
    A.baselines(X, X, min(f, 4 * d), 0)
    t3 = time.time()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"N={n} F={f} L0={l0} C={c} d={d}: 1-D probe {t1 - t:.1f} s, k-sparse {t2 - t1:.1f} s, "
          f"baselines {t3 - t2:.1f} s, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
