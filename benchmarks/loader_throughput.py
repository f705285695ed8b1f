"""The streaming loader on a cold store: its rows/s against a plain sequential read of the same files, training on
a store above --max-memory against the same SAE with the data in memory, and the label mixing of the layout.

Cold means evicted from the page cache (posix_fadvise DONTNEED per file, after fsync; no root needed) right before
each timed read, so the disk, not RAM, answers.

  read:   sequential = each shard file read front to back in 16 MB reads (the disk's best case);
          loader     = one epoch of `StreamingBatches` at the default layout (chunks in random order, windows
                       prefetched on 16 threads, fp16 -> fp32 batches of --batch-size), then a second one, the
                       store evicted again; --rounds times, each against the mean of the sequential reads just
                       before and after it;
          reads      = the disk alone, read in the loader's order on its threads (no checks, no batches);
          consumer   = the loader with the disk taken away: batches served from a window already in memory;
          random     = the old streaming path, `StoreReader.get` on a random permutation (memory-mapped rows),
                       for --random-seconds only.
  train:  `sae-vlm train` steady acts/s (the steps after the 4th of one run) streamed from the cold store at
          --train-max-memory (1 GB) against the same run with the data in memory.
  mixing: per-batch label entropy on an ImageNet-like class-sorted order (1000 classes, 1.28M rows, batch 4096)
          for several chunk and window sizes, against a full permutation; indices only, no data read.
  profile: the loader's hot loop taken apart on one window of the default layout, each part timed alone in this
          process, into buffers used before: read (cold, O_DIRECT and through the page cache), copy out of the page
          cache (a warm buffered read), the page faults of a fresh buffer, crc32 of the blocks, the batch gather,
          fp16 -> fp32, and memcpy of the same bytes (the CPU's bound).

  python benchmarks/loader_throughput.py --rows 1000000 --d 1024 --out /tmp/loader-bench
  python benchmarks/loader_throughput.py --rows 400000 --d 768 --rows-per-image 577 --widths 2,8  # patch tokens
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from zlib_ng.zlib_ng import crc32

from sae_vlm.config import TrainConfig
from sae_vlm.data import store as S
from sae_vlm.data.loader import IO_THREADS, Layout, Schedule, StreamingBatches, aligned_empty
from sae_vlm.sae import trainer


def write_store(root: Path, rows: int, d: int, shard_rows: int) -> S.StoreReader:
    if (root / "acts" / "manifest.json").is_file():
        return S.open_store(root)
    sub = {"acts": {"hook_point": "layer.0", "tokens": "cls", "rows_per_image": 1, "width": d, "note": ""}}
    w = S.StoreWriter(root, {"dtype": "fp16"}, sub)
    w.prepare()
    rng = np.random.default_rng(0)
    n_shards = -(-rows // shard_rows)
    for s in range(n_shards):
        n = min(shard_rows, rows - s * shard_rows)
        x = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
        ims = [{"id": str(i), "path": f"{i}.png", "label": None} for i in range(s * shard_rows, s * shard_rows + n)]
        w.write_shard(s, {"acts": S.to_storage(x, "fp16", "layer.0")}, {"acts": np.full(n, -1, np.int32)}, ims, [])
    w.finalize(n_shards, {"model_id": "random"})
    return S.open_store(root)


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_rows_per_s(paths: list[Path], row_bytes: int) -> float:
    evict(paths)
    buf, total, t0 = bytearray(16 << 20), 0, time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / row_bytes / (time.perf_counter() - t0)


def loader_rows_per_s(src: S.StoreReader, paths: list[Path], batch: int, budget: int
                      ) -> tuple[float, float, float, Layout]:
    """Rows/s of one cold epoch, of the same after its first window is in, and of a second epoch, the store evicted
    again (no fresh buffers, blocks already checked: what the epochs of a long run see), and the layout."""
    src = S.open_store(src.path)  # fresh reader: no open file, nothing cached
    layout = Layout.for_budget(src.rows, src.files.row_bytes, budget, src.files.block_rows)
    stream = StreamingBatches(src.files, Schedule(src.rows, layout, 0, batch), torch.device("cpu"))
    evict(paths)
    t0, rows = time.perf_counter(), 0
    rows += len(stream(0))
    t1, first = time.perf_counter(), rows
    for step in range(1, stream.per_epoch):
        rows += len(stream(step))
    t2 = time.perf_counter()
    evict(paths)
    for step in range(stream.per_epoch, 2 * stream.per_epoch):
        len(stream(step))
    t3 = time.perf_counter()
    stream.close()
    return rows / (t2 - t0), (rows - first) / (t2 - t1), rows / (t3 - t2), layout


def pattern_rows_per_s(src: S.StoreReader, paths: list[Path], batch: int, budget: int) -> float:
    """The disk alone, read as the loader reads it: every window's chunks, in the epoch's order, on the loader's
    threads, into one buffer, with no checks and no batches."""
    files = S.open_store(src.path).files
    layout = Layout.for_budget(src.rows, files.row_bytes, budget, files.block_rows)
    sched = Schedule(src.rows, layout, 0, batch)
    files.files = [dataclasses.replace(f, crc32_K=None) for f in files.files]  # reads only, no checks
    buf = aligned_empty(files.slots_bound(layout.chunk_rows, layout.window_chunks), files.d_in, files.storage)
    evict(paths)
    t0, rows = time.perf_counter(), 0
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for w in sched.windows(0):
            spans = sched.window_rows(w)
            starts, _ = files.slots(spans)
            for r in [pool.submit(files.read_into, a, b, buf[q : q + b - a]) for (a, b), q in zip(spans, starts)]:
                r.result()
            rows += sum(b - a for a, b in spans)
    files.close()
    return rows / (time.perf_counter() - t0)


def random_rows_per_s(src: S.StoreReader, paths: list[Path], batch: int, seconds: float) -> float:
    src = S.open_store(src.path)
    perm = torch.from_numpy(np.random.default_rng(0).permutation(src.rows))
    evict(paths)
    t0, rows = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        rows += len(src.get(perm[rows : rows + batch]))
    return rows / (time.perf_counter() - t0)


def train_acts_per_s(src: S.StoreReader, paths: list[Path], out: Path, max_memory: float | None, steps: int,
                     width: float, k: int, batch: int) -> float:
    """Steady rate of one run from a cold store: the steps after the 4th, timed at the end of each trainer step
    (loading the data or filling the first window is left out, so the rate is not a difference of two noisy runs)."""
    stamps: dict[int, float] = {}
    real = trainer.train_step

    def stamped(m, x_ND, step, *args, **kwargs):
        out = real(m, x_ND, step, *args, **kwargs)
        stamps[step] = time.perf_counter()
        return out

    shutil.rmtree(out, ignore_errors=True)
    evict(paths)
    cfg = TrainConfig(data=str(src.path), out=str(out), expansions=(width,), ks=(k,), batch_size=batch, steps=steps,
                      norm_batches=2, warmup_steps=1, checkpoint_every=10**9, log_every=10**9, quiet=True,
                      device="cpu", max_memory=max_memory)
    trainer.train_step = stamped
    try:
        trainer.train(cfg)
    finally:
        trainer.train_step = real
    last = steps - 1
    return (last - 4) * batch / (stamps[last] - stamps[4])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def read_window(src: S.StoreReader, spans, direct: bool, buf: np.ndarray | None) -> np.ndarray:
    """Read a window's spans into `buf` (None: a fresh buffer) as the loader does, on one thread."""
    files = S.open_store(src.path).files
    files.direct = direct
    starts, n = files.slots(spans)
    buf = aligned_empty(n, files.d_in, files.storage) if buf is None else buf
    for (a, b), q in zip(spans, starts):
        files.read_into(a, b, buf[q : q + b - a])
    files.close()
    return buf


def profile(src: S.StoreReader, paths: list[Path], batch: int, budget: int) -> dict[str, float]:
    """Seconds per GB of rows for each part of the hot loop, on the first window of the default layout, into
    buffers used before (as the loader's are, after its first windows), plus what a fresh buffer costs once."""
    layout = Layout.for_budget(src.rows, src.files.row_bytes, budget, src.files.block_rows)
    sched = Schedule(src.rows, layout, 0, batch)
    spans = sched.window_rows(sched.windows(0)[0])
    gb = sum(b - a for a, b in spans) * src.files.row_bytes / 1e9
    out = {}
    for name, direct in (("read cold, O_DIRECT", True), ("read cold, page cache", False)):
        buf = read_window(src, spans, direct, None)  # warms the buffer (and, for the second, the page cache)
        evict(paths)
        out[name] = timed(lambda: read_window(src, spans, direct, buf)) / gb
    out["copy out of the page cache"] = timed(lambda: read_window(src, spans, False, buf)) / gb
    out["page faults of a fresh window buffer (once each)"] = timed(lambda: read_window(src, spans, False, None)) / gb \
        - out["copy out of the page cache"]
    raw = memoryview(buf.reshape(-1).view(np.uint8).data)
    blocks = range(0, len(raw), 1 << 16)
    out["crc32 of the blocks (once per block)"] = timed(lambda: [crc32(raw[i : i + (1 << 16)]) for i in blocks]) / gb
    x = src.files.as_torch(buf)
    perm = torch.randperm(len(x))
    idx = [perm[i : i + batch].sort().values for i in range(0, len(x) - batch + 1, batch)]
    rows = len(idx) * batch * src.files.row_bytes / 1e9
    part, full = torch.empty(batch, x.shape[1], dtype=x.dtype), torch.empty(batch, x.shape[1])
    gather = [lambda i=i: torch.index_select(x, 0, i, out=part) for i in idx]
    out["gather (one indexed copy a batch)"] = timed(lambda: [g() for g in gather]) / rows
    out["fp16 -> fp32"] = timed(lambda: [full.copy_(part) for _ in idx]) / rows
    copy = np.empty_like(buf)
    np.copyto(copy, buf)  # pages touched once: what is timed is the copy
    out["memcpy (the CPU's bound)"] = timed(lambda: np.copyto(copy, buf)) / gb
    return out


def consumer_rows_per_s(src: S.StoreReader, batch: int, budget: int, steps: int = 60) -> float:
    """The loader with the disk taken away: batches served from a window already in memory (gather, conversion,
    the finite check), i.e. the most rows/s its consumer side gives on this CPU."""
    layout = Layout.for_budget(src.rows, src.files.row_bytes, budget, src.files.block_rows)
    sched = Schedule(src.rows, layout, 0, batch)
    stream = StreamingBatches(S.open_store(src.path).files, sched, torch.device("cpu"))
    steps = min(steps, sum(b - a for a, b in sched.window_rows(sched.windows(0)[0])) // batch - 1)
    stream(0)
    stream._window(*stream._next(0, 0)).result()  # the next window's read is over too: nothing runs beside
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        stream(step)
    rate = steps * batch / (time.perf_counter() - t0)
    stream.close()
    return rate


def entropy(labels_N: np.ndarray) -> float:
    p = np.bincount(labels_N) / len(labels_N)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mixing(layouts: list[Layout], rows=1_281_024, classes=1000, batch=4096, every=97) -> list[tuple[Layout, float]]:
    labels = np.arange(rows) * classes // rows
    perm = np.random.default_rng(0).permutation(rows)
    full = np.mean([entropy(labels[perm[i * batch : (i + 1) * batch]]) for i in range(0, rows // batch, every)])
    out = []
    for lay in layouts:
        sched = Schedule(rows, lay, 0, batch)
        ents = []
        for step in range(0, sched.per_epoch, every):
            idx = []
            for e, w, a, b in sched.pieces(step):
                spans = sched.window_rows(sched.windows(e)[w])
                n = sum(y - x for x, y in spans)
                idx.append(sched.source_rows(e, w, sched.permutation(e, w, n)[a:b]))
            ents.append(entropy(labels[np.concatenate(idx)]))
        out.append((lay, float(np.mean(ents) / full)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--shard-rows", type=int, default=65536)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--budget-gb", type=float, default=8.0, help="--max-memory the loader's layout is sized for")
    ap.add_argument("--rounds", type=int, default=3, help="sequential read and loader epoch, side by side, this often")
    ap.add_argument("--random-seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=24, help="training steps per timed run (0: skip training)")
    ap.add_argument("--train-max-memory", type=float, default=1.0, help="--max-memory of the streamed training run")
    ap.add_argument("--widths", default="2,8", help="comma list of SAE widths trained side by side")
    ap.add_argument("--rows-per-image", type=int, default=1, help="e.g. 197 or 577 for patch-token stores: mixing "
                    "is then also measured over images (contiguous rows of one image)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--out", default="/tmp/loader-bench")
    args = ap.parse_args()

    root = Path(args.out)
    src = write_store(root / "store", args.rows, args.d, args.shard_rows)
    t0 = time.perf_counter()
    S.open_store(src.path)  # what a run waits for before its first step: the header checks, no whole-store hash
    print(f"open (checks before the first step): {time.perf_counter() - t0:.2f} s")
    paths = [f.path for f in src.files.files]
    gb = sum(p.stat().st_size for p in paths) / 1e9
    print(f"store: {src.rows:,} rows x {args.d} fp16 = {gb:.2f} GB in {len(paths)} shards")
    budget = int(args.budget_gb * 1e9)
    # side by side: this disk's own rate moves by 2x within minutes, so each epoch is set against the mean of the
    # sequential reads just before and just after it
    seqs = [sequential_rows_per_s(paths, src.files.row_bytes)]
    ratios = []
    for r in range(args.rounds):
        pattern = pattern_rows_per_s(src, paths, args.batch_size, budget)
        rate, steady, second, layout = loader_rows_per_s(src, paths, args.batch_size, budget)
        seqs.append(sequential_rows_per_s(paths, src.files.row_bytes))
        seq = (seqs[-2] + seqs[-1]) / 2
        ratios.append((rate / seq, steady / seq, rate / pattern, second / pattern))
        print(f"round {r}: cold sequential read {seq:,.0f} rows/s ({seq * src.files.row_bytes / 1e6:,.0f} MB/s, "
              f"{seqs[-2]:,.0f} before, {seqs[-1]:,.0f} after); the loader's reads alone {pattern:,.0f} rows/s "
              f"= {pattern / seq:.1%}; cold loader epoch {rate:,.0f} rows/s = {rate / seq:.1%} of sequential, "
              f"{rate / pattern:.1%} of its reads alone, after the first window {steady:,.0f} rows/s = "
              f"{steady / seq:.1%}; second epoch {second:,.0f} rows/s = {second / pattern:.1%} of its reads alone "
              f"({layout})")
    whole, after, own, own2 = (float(np.median(v)) for v in zip(*ratios))
    print(f"loader epoch, median of {args.rounds} rounds: {whole:.1%} of a cold sequential read, {after:.1%} after "
          f"the first window; {own:.1%} of its own reads alone, the second epoch {own2:.1%}")
    seq = float(np.median(seqs))
    consumer = consumer_rows_per_s(src, args.batch_size, budget)
    print(f"consumer side alone (windows in memory): {consumer:,.0f} rows/s = "
          f"{consumer * src.files.row_bytes / 1e9:.2f} GB/s of stored rows")
    prof = profile(src, paths, args.batch_size, budget)
    loop = sum(v for k, v in prof.items() if not k.startswith(("read cold, page", "page faults", "memcpy")))
    for name, sec in prof.items():
        print(f"  profile {name:36s} {sec:7.3f} s/GB = {1 / sec:6.2f} GB/s  ({sec / loop:.0%} of the loop)")
    if args.random_seconds:
        rnd = random_rows_per_s(src, paths, args.batch_size, args.random_seconds)
        print(f"cold random get:      {rnd:,.0f} rows/s = {rnd / seq:.2%} of sequential")
    for width in (float(w) for w in args.widths.split(",") if args.steps):
        kw = dict(steps=args.steps, width=width, k=args.k, batch=args.batch_size)
        mem = train_acts_per_s(src, paths, root / "run", None, **kw)
        streamed = train_acts_per_s(src, paths, root / "run", args.train_max_memory, **kw)
        bound = min(mem, seq)
        print(f"train x{width:g} k={args.k} batch {args.batch_size}: in memory {mem:,.0f} acts/s, streamed "
              f"(--max-memory {args.train_max_memory:g}) {streamed:,.0f} acts/s = {streamed / bound:.1%} of "
              f"min(disk, in memory); the loader {'is' if seq < mem else 'is not'} the bound")
    row_bytes = args.d * 2
    layouts = [Layout.for_budget(1_281_024, row_bytes, int(b * 1e9)) for b in (0.25, 1.0, 8.0)]
    layouts += [Layout(c, max(1, (1 << 30) // (c * row_bytes))) for c in (128, 1024)]
    for lay, ratio in mixing(layouts):
        print(f"mixing {lay}: per-batch label entropy {ratio:.1%} of a full permutation")
    if args.rows_per_image > 1:  # images as labels: how many images a batch draws from, against a full permutation
        lay = Layout.for_budget(src.rows, row_bytes, budget, src.files.block_rows)
        for lay, ratio in mixing([lay], rows=src.rows // args.rows_per_image * args.rows_per_image,
                                 classes=src.rows // args.rows_per_image, batch=args.batch_size, every=7):
            print(f"mixing over images of {args.rows_per_image} rows {lay}: per-batch image entropy {ratio:.1%} of a "
                  "full permutation")


if __name__ == "__main__":
    main()
