"""What extraction's writer thread spends per GB of rows to checksum a shard: the block crc32s it computes now,
against the whole-file sha256 it also computed before (2026-12-03), on the same bytes, side by side.

  python benchmarks/shard_write.py --rows 2308 --d 1024 --repeats 20   # 4 images x 577 patch tokens a shard
"""

from __future__ import annotations

import argparse
import hashlib
import time

import numpy as np

from sae_vlm.data.store import shard_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    arr = np.random.default_rng(0).standard_normal((args.rows, args.d), dtype=np.float32).astype(np.float16)
    gb = arr.nbytes / 1e9
    now, sha = [], []
    for _ in range(args.repeats):  # interleaved, so both see the same machine
        t0 = time.perf_counter()
        data, _ = shard_bytes(arr)
        t1 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        sha.append(time.perf_counter() - t1)
        now.append(t1 - t0)
    a, b = np.median(now) / gb, np.median(sha) / gb
    print(f"shard of {args.rows} x {args.d} fp16 ({gb * 1e3:.1f} MB): bytes + block crc32s {a:.3f} s/GB; the sha256 "
          f"dropped {b:.3f} s/GB; the writer's checksum work before/after {(a + b) / a:.1f}x")


if __name__ == "__main__":
    main()
