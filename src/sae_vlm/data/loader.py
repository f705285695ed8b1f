"""Training batches from activations larger than memory, at disk speed.

Reading rows one by one from a memory map costs one page fault, and often megabytes of readahead, per row. This
loader reads instead large contiguous pieces with `os.preadv` (a seek and a read on Windows) on several threads, and
shuffles in two stages:

* epoch e cuts the rows into chunks of `chunk_rows` consecutive rows and draws a random order of the chunks;
  under --ddp the chunks are dealt round-robin to the ranks, so a rank reads only its own rows;
* the chunks, in that order, form windows of `window_chunks`; a window is read whole into memory (the next one
  is read in the background while this one trains), and its rows are drawn in a random order;
* this rank's row stream is the windows one after the other, and batch i is rows [i·b, (i+1)·b) of it.

Every order is drawn from (seed, epoch, window), so batch `step` is the same whenever it is asked for: a resumed
run replays the same batches bit for bit. `benchmarks/loader_throughput.py` measures the speed and the label
mixing of the default sizes.

Copies: a window's chunks are read straight from the disk into its buffer (`O_DIRECT` where the filesystem takes
it, so no copy out of the page cache), a batch is one indexed copy out of the window (into pinned memory when it
goes to a GPU), and fp16/bf16 become fp32 once, on the device. A store with block checksums has each block's crc32
checked as it is read, before its rows reach a step; an older store's shards are hashed whole, in the background.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from zlib_ng.zlib_ng import crc32  # zlib's crc32 with SIMD: ~20 GB/s a core against zlib's 2.5

from sae_vlm.device import free_memory_bytes

# Measured on a cloud disk (benchmarks/RESULTS.md): random reads of 512 KiB and more on 16 threads come close to a
# sequential read, 64 KiB reads reach half of it. A class-sorted store needs ~2048 chunks per window to mix within
# 5% of a full permutation (1000 classes, batch 4096); smaller windows get smaller chunks to keep that many.
CHUNK_BYTES = 1 << 20
WINDOW_CHUNKS = 2048
WINDOW_CAP_BYTES = 1 << 30  # bigger mixes little better, delays the first batch and competes with training for CPU
IO_THREADS = 16
ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length in multiples of the disk's block (<= 4096)
REREAD = "re-extract it (delete it and its parts/ file, rerun extract)"


@dataclass(frozen=True)
class RowFile:
    """Rows [start, start + rows) of the source live in `path`, from byte `offset`, `row_bytes` per row.
    `crc32_K`: the crc32 of each block of `FileRows.block_rows` rows, checked on every read (None: no blocks)."""

    path: Path
    offset: int
    rows: int
    start: int
    crc32_K: np.ndarray | None = field(default=None, compare=False)


def aligned_bytes(nbytes: int) -> np.ndarray:
    """Uninitialised bytes whose first one is ALIGN-aligned (a destination for O_DIRECT reads). Large ones are
    anonymous memory that asks for huge pages where the OS has them: 512x fewer page faults to fill a window."""
    if nbytes >= 1 << 21 and hasattr(mmap, "MADV_HUGEPAGE"):
        block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # page-aligned
        block.madvise(mmap.MADV_HUGEPAGE)
        return np.frombuffer(block, dtype=np.uint8)
    raw = np.empty(nbytes + ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes]


def aligned_empty(rows: int, d: int, dtype: np.dtype) -> np.ndarray:
    """An uninitialised, ALIGN-aligned [rows, d] array."""
    return aligned_bytes(rows * d * np.dtype(dtype).itemsize).view(dtype).reshape(rows, d)


def unshared(t: torch.Tensor) -> bool:
    """Whether nothing but `t` holds its memory: no view of it handed out is still alive. False where torch lacks
    the use count (a private function): buffers are then never reused."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    global _ALONE
    if _ALONE is None:  # the count of a tensor nobody else holds, the query's own reference included
        alone = torch.empty(1)
        _ALONE = count(alone.untyped_storage()._cdata)
    return count(t.untyped_storage()._cdata) == _ALONE


_ALONE: int | None = None


class FileRows:
    """Raw rows (storage dtype) of one or more files read with positioned reads. `check(j)` runs before file j is
    first read (an older store hashes the shard whole there); files with `crc32_K` have each block of `block_rows`
    rows checked as it is read instead. `bf16`: the uint16 words are bfloat16 values."""

    def __init__(self, files: list[RowFile], d_in: int, storage: np.dtype, check: Callable[[int], None] | None = None,
                 bf16: bool = False, block_rows: int = 0):
        self.files, self.d_in, self.storage, self.bf16 = files, d_in, np.dtype(storage), bf16
        self.row_bytes = d_in * self.storage.itemsize
        self.rows = files[-1].start + files[-1].rows if files else 0
        self.block_rows = block_rows
        self._starts = np.array([f.start for f in files], dtype=np.int64)
        self._check = check
        self._checked: set[int] = set()
        self._good_K = [np.zeros(0 if f.crc32_K is None else len(f.crc32_K), dtype=bool) for f in files]
        self._check_locks = [threading.Lock() for _ in files]
        self._fds: dict[int, tuple[int, int | None]] = {}  # file -> (buffered fd, O_DIRECT fd or None)
        self._lock = threading.Lock()
        self._closed = False
        self.direct = hasattr(os, "O_DIRECT")
        self.bytes_read = 0

    def ensure_checked(self, j: int) -> None:
        """Run `check(j)` once (a second caller waits for the first)."""
        if self._check is None:
            return
        with self._check_locks[j]:
            if j not in self._checked:
                self._check(j)
                self._checked.add(j)

    def check_in_background(self) -> None:
        """Hash the files that need it on a background thread, in order, so that reads rarely wait for it; a read
        of a file not yet checked still checks it first."""
        if self._check is None:
            return

        def run():
            for j in range(len(self.files)):
                if self._closed:
                    return
                try:
                    self.ensure_checked(j)
                except (OSError, ValueError):  # raised again by the read that needs the file
                    pass

        threading.Thread(target=run, daemon=True, name="sae-vlm-verify").start()

    def _fd(self, j: int) -> tuple[int, int | None]:
        self.ensure_checked(j)
        with self._lock:
            if j not in self._fds:
                path = self.files[j].path
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
                if hasattr(os, "posix_fadvise"):  # not on macOS or Windows: there the OS's readahead stays
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # we read whole pieces; readahead is waste
                direct = None
                if self.direct:
                    try:
                        direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    except OSError:  # tmpfs and some network filesystems refuse it: the page cache then
                        direct = None
                self._fds[j] = (fd, direct)
            return self._fds[j]

    def offset_of(self, r: int) -> int:
        """Byte offset of source row r in its file."""
        f = self.files[int(np.searchsorted(self._starts, r, side="right")) - 1]
        return f.offset + (r - f.start) * self.row_bytes

    def read_into(self, r0: int, r1: int, out: np.ndarray) -> None:
        """Rows [r0, r1) into `out` (shape [r1 - r0, d_in], storage dtype, C-contiguous)."""
        j = int(np.searchsorted(self._starts, r0, side="right")) - 1
        pos = r0
        while pos < r1:
            f = self.files[j]
            stop = min(r1, f.start + f.rows)
            part = out[pos - r0 : stop - r0]
            view = memoryview(part.data).cast("B")  # type: ignore[arg-type]
            got = self._read_span(j, view, f.offset + (pos - f.start) * self.row_bytes, part.ctypes.data)
            if got < len(view):
                gone = pos + got // self.row_bytes
                raise ValueError(f"{f.path} ends early: rows {gone - f.start}..{stop - f.start} of the file (rows "
                                 f"{gone}..{stop} of the source) are missing; the file was truncated")
            if f.crc32_K is not None:
                self._check_blocks(j, pos - f.start, stop - f.start, view)
            self.bytes_read += len(view)
            pos, j = stop, j + 1

    def _read_span(self, j: int, view: memoryview, offset: int, address: int) -> int:
        """Fill `view` from `offset` of file j; returns the bytes read (fewer: the file ended). The ALIGN-aligned
        middle goes straight from the disk when the buffer's address is aligned like the file offset."""
        fd, direct = self._fd(j)
        lo = -offset % ALIGN
        hi = (offset + len(view)) // ALIGN * ALIGN - offset
        if direct is None or (address + lo) % ALIGN or hi - lo < ALIGN:
            return self._fill(fd, view, offset)
        got = self._fill(fd, view[:lo], offset)
        if got < lo:
            return got
        try:
            mid = self._fill(direct, view[lo:hi], offset + lo)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            with self._lock:  # the filesystem opened it but refuses the reads: the page cache from now on
                self._fds[j] = (fd, None)
            mid = self._fill(fd, view[lo:hi], offset + lo)
        if mid < hi - lo:
            return lo + mid
        return hi + self._fill(fd, view[hi:], offset + hi)

    def _fill(self, fd: int, view: memoryview, offset: int) -> int:
        got = 0
        while got < len(view):
            n = self._read_at(fd, view[got:], offset + got)
            if n == 0:
                break
            got += n
        return got

    def _check_blocks(self, j: int, a: int, b: int, view: memoryview) -> None:
        """Check the crc32 of every block holding rows [a, b) of file j (`view`: their bytes) the first time this
        reader reads it; the rest of a block cut by the read is read too (none when the read is block-aligned)."""
        f, br, rb, good_K = self.files[j], self.block_rows, self.row_bytes, self._good_K[j]
        assert f.crc32_K is not None
        for k in range(a // br, -(-b // br)):
            if good_K[k]:  # checked by an earlier read: later epochs cost no CPU
                continue
            lo, hi = k * br, min((k + 1) * br, f.rows)
            crc = crc32(self.read_raw(j, lo, a)) if lo < a else 0
            crc = crc32(view[(max(lo, a) - a) * rb : (min(hi, b) - a) * rb], crc)
            if hi > b:
                crc = crc32(self.read_raw(j, b, hi), crc)
            if crc != int(f.crc32_K[k]):
                raise ValueError(f"shard {f.path} (rows {f.start + lo}..{f.start + hi}) is corrupt: the crc32 of its "
                                 f"rows {lo}..{hi} differs from the manifest's; {REREAD}")
            good_K[k] = True

    def read_raw(self, j: int, lo: int, hi: int) -> bytes:
        """Rows [lo, hi) of file j as bytes, through the page cache (a block's edge: small, unchecked)."""
        f = self.files[j]
        buf = bytearray((hi - lo) * self.row_bytes)
        if self._fill(self._fd(j)[0], memoryview(buf), f.offset + lo * self.row_bytes) < len(buf):
            raise ValueError(f"{f.path} ends early: rows {lo}..{hi} of the file are missing; the file was truncated")
        return bytes(buf)

    def check_file(self, j: int, force: bool = False, piece_bytes: int = 8 << 20) -> None:
        """Read file j whole, checking every block (`force`: those checked before too), or its whole-file hash."""
        f, rows = self.files[j], max(1, piece_bytes // self.row_bytes)
        if force:
            self._good_K[j][:] = False
        if f.crc32_K is None:
            self.ensure_checked(j)
            return
        buf = np.empty((min(rows, f.rows), self.d_in), dtype=self.storage)
        for r in range(f.start, f.start + f.rows, rows):
            r1 = min(r + rows, f.start + f.rows)
            self.read_into(r, r1, buf[: r1 - r])

    def slots(self, spans: list[tuple[int, int]]) -> tuple[list[int], int]:
        """Where each span of rows goes in one aligned buffer, and the buffer's rows: each span starts at a row whose
        address is aligned like its file offset, so its reads go straight from the disk; spans stay packed where
        that would waste more than an eighth of them (or where there is no O_DIRECT)."""
        g = math.gcd(self.row_bytes, ALIGN)
        period = ALIGN // g  # buffer rows after which the address alignment repeats
        inv = pow(self.row_bytes // g, -1, period) if period > 1 else 0
        q, out = 0, []
        for a, b in spans:
            off = self.offset_of(a)
            if self.direct and period <= (b - a) // 8 and off % g == 0:
                q += ((off // g) * inv - q) % period
            out.append(q)
            q += b - a
        return out, q

    def slots_bound(self, span_rows: int, spans: int) -> int:
        """The most buffer rows `slots` can ask for `spans` spans of at most `span_rows` rows."""
        period = ALIGN // math.gcd(self.row_bytes, ALIGN)
        return spans * (span_rows + (period - 1 if self.direct and period <= span_rows // 8 else 0))

    def _read_at(self, fd: int, view: memoryview, offset: int) -> int:
        """Bytes read into `view` from `offset`. Without positioned reads (Windows) a seek and a read, which the
        threads take in turn on the shared descriptor."""
        if hasattr(os, "preadv"):
            return os.preadv(fd, [view], offset)
        with self._lock:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, r0: int, r1: int) -> np.ndarray:
        out = np.empty((r1 - r0, self.d_in), dtype=self.storage)
        self.read_into(r0, r1, out)
        return out

    def as_torch(self, raw: np.ndarray) -> torch.Tensor:
        """Raw rows as a tensor of their true dtype, sharing memory; `.float()` then converts with torch's
        vectorised kernels (numpy's float16 conversion is several times slower)."""
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16) if self.bf16 else torch.from_numpy(raw)

    def read_float(self, r0: int, r1: int) -> torch.Tensor:
        return self.as_torch(self.read(r0, r1)).float()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for fd, direct in self._fds.values():
                os.close(fd)
                if direct is not None:
                    os.close(direct)
            self._fds.clear()


def npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(byte offset of the data, shape, dtype) of a C-order .npy file, read from its header."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except ValueError as e:
        raise ValueError(f"{path} is not a readable .npy file ({e})") from None
    if fortran or dtype.hasobject:
        raise ValueError(f"{path} must hold a C-order numeric array")
    size = os.path.getsize(path)
    need = offset + int(np.prod(shape)) * dtype.itemsize
    if size < need:
        raise ValueError(f"{path} is truncated: {size} bytes, its header promises {need}")
    return offset, tuple(shape), dtype


@dataclass(frozen=True)
class Layout:
    """Chunk and window sizes, in rows and chunks; recorded with a run so that a resume reads the same order."""

    chunk_rows: int
    window_chunks: int

    @staticmethod
    def for_budget(rows: int, row_bytes: int, budget_bytes: int, block_rows: int = 1) -> Layout:
        """Two windows (the one training and the one being read) fit in `budget_bytes` and in half of the host's
        available memory (windows live on the host whatever the device). Chunks are whole checksum blocks where
        they can be, so that a read checks its own bytes and no more."""
        host = free_memory_bytes(torch.device("cpu")) // 2
        window_rows = max(1, min(budget_bytes // 2, host // 2, WINDOW_CAP_BYTES) // row_bytes)
        chunk_rows = max(1, min(CHUNK_BYTES // row_bytes, window_rows // WINDOW_CHUNKS, rows // WINDOW_CHUNKS))
        if 0 < block_rows <= chunk_rows:
            chunk_rows -= chunk_rows % block_rows
        return Layout(chunk_rows, max(1, window_rows // chunk_rows))


class Schedule:
    """The row order of every epoch, for one rank: which windows, and which rows of them each batch takes."""

    def __init__(self, rows: int, layout: Layout, seed: int, batch_size: int, rank: int = 0, world: int = 1):
        self.rows, self.layout, self.seed, self.rank, self.world = rows, layout, seed, rank, world
        self.b = batch_size // world
        n_chunks = -(-rows // layout.chunk_rows)
        sizes = np.full(n_chunks, layout.chunk_rows, dtype=np.int64)
        sizes[-1] = rows - (n_chunks - 1) * layout.chunk_rows
        self._sizes = sizes
        # the epoch's length is the same for every epoch and every rank: the shortest rank stream
        self.per_epoch = min(self._stream_rows(0, r) for r in range(world)) // self.b
        if self.per_epoch == 0:
            raise ValueError(f"{rows} rows make no batch of {batch_size} in this layout; use a smaller --batch-size")
        self._plans: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}  # the last two epochs' windows
        self._lock = threading.Lock()

    def _chunk_order(self, epoch: int, rank: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self._sizes))
        return order[rank :: self.world]

    def _stream_rows(self, epoch: int, rank: int) -> int:
        return int(self._sizes[self._chunk_order(epoch, rank)].sum())

    def _plan(self, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        """This rank's windows of `epoch` (arrays of chunk numbers) and the stream position each one ends at."""
        with self._lock:  # the background reader asks for the next epoch while the trainer reads this one
            if epoch not in self._plans:
                order, w = self._chunk_order(epoch, self.rank), self.layout.window_chunks
                windows = [order[i : i + w] for i in range(0, len(order), w)]
                self._plans[epoch] = (windows, np.cumsum([self._sizes[c].sum() for c in windows]))
                for old in [e for e in self._plans if e < epoch - 1]:
                    del self._plans[old]
            return self._plans[epoch]

    def windows(self, epoch: int) -> list[np.ndarray]:
        return self._plan(epoch)[0]

    def window_rows(self, chunks: np.ndarray) -> list[tuple[int, int]]:
        return [(int(c) * self.layout.chunk_rows, int(c) * self.layout.chunk_rows + int(self._sizes[c]))
                for c in chunks]

    def permutation(self, epoch: int, w: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, w, self.rank, 1]).permutation(n)

    def pieces(self, step: int) -> list[tuple[int, int, int, int]]:
        """Batch `step` as (epoch, window, first, last) runs of positions within permuted windows."""
        epoch, i = divmod(step, self.per_epoch)
        ends = self._plan(epoch)[1]
        lo, hi, out = i * self.b, (i + 1) * self.b, []
        w = int(np.searchsorted(ends, lo, side="right"))
        while lo < hi:
            start = int(ends[w - 1]) if w else 0
            stop = min(hi, int(ends[w]))
            out.append((epoch, w, lo - start, stop - start))
            lo, w = stop, w + 1
        return out

    def source_rows(self, epoch: int, w: int, local_R: np.ndarray) -> np.ndarray:
        """The source row of each position of window w (positions in the window as read, before permuting)."""
        spans = self.window_rows(self.windows(epoch)[w])
        firsts = np.cumsum([0] + [b - a for a, b in spans])
        k = np.searchsorted(firsts, local_R, side="right") - 1
        return np.array([spans[j][0] for j in k], dtype=np.int64) + local_R - firsts[k]


class StreamingBatches:
    """Batch `step` of a file-backed source as float32 on `device`, read window by window (see module doc).

    Memory is reused: a fresh 1 GB window costs a page fault per 4 KB, which 16 reading threads then contend for
    (on this project's 2-core machine that made a window 6x slower to fill), and a fresh batch costs the same per
    batch. So dropped windows' buffers are refilled, and host batches are views of a few buffers that are refilled
    once nothing holds a view of them any more."""

    def __init__(self, files: FileRows, schedule: Schedule, device: torch.device):
        self.files, self.schedule, self.device = files, schedule, device
        self.per_epoch = schedule.per_epoch
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="sae-vlm-read")
        self._windows: dict[tuple[int, int], Future] = {}
        self._lock = threading.Lock()
        lay = schedule.layout
        self._window_bytes = files.slots_bound(lay.chunk_rows, lay.window_chunks) * files.row_bytes
        self._spare: list[np.ndarray] = []  # buffers of dropped windows
        self._gathered: torch.Tensor | None = None  # a host batch in the storage dtype, before conversion
        self._batches: list[torch.Tensor] = []  # float32 host batch buffers
        self.read_seconds = 0.0  # time the trainer waited on the disk
        self.rows_served = 0
        files.check_in_background()

    def _load(self, epoch: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
        """Window w of `epoch` as read (storage dtype, chunks at their `slots`), the order its positions are served
        in, the buffer row of each position, and the bytes under it (reused once the window is dropped)."""
        spans = self.schedule.window_rows(self.schedule.windows(epoch)[w])
        starts, n_buf = self.files.slots(spans)
        with self._lock:
            raw = self._spare.pop() if self._spare else aligned_bytes(self._window_bytes)
        buf = raw[: n_buf * self.files.row_bytes].view(self.files.storage).reshape(n_buf, self.files.d_in)
        reads = [self._io.submit(self.files.read_into, a, b, buf[q : q + b - a]) for (a, b), q in zip(spans, starts)]
        buf_row = np.concatenate([np.arange(q, q + b - a) for (a, b), q in zip(spans, starts)])
        for r in reads:
            r.result()
        perm = torch.from_numpy(self.schedule.permutation(epoch, w, len(buf_row)))
        return self.files.as_torch(buf), perm, torch.from_numpy(buf_row), raw

    def _window(self, epoch: int, w: int) -> Future:
        with self._lock:
            key = (epoch, w)
            if key not in self._windows:
                self._windows[key] = threading_future(self._load, epoch, w)
            return self._windows[key]

    def _next(self, epoch: int, w: int) -> tuple[int, int]:
        return (epoch, w + 1) if w + 1 < len(self.schedule.windows(epoch)) else (epoch + 1, 0)

    def __call__(self, step: int) -> torch.Tensor:
        t0 = time.perf_counter()
        pieces = self.schedule.pieces(step)
        ahead = [self._next(*pieces[0][:2])] if len(pieces) == 1 else []
        self._keep(pieces, ahead)
        windows = [self._window(epoch, w).result() for epoch, w, _, _ in pieces]
        for key in ahead:
            self._window(*key)  # starts reading the next window
        x, x_ND = self._destinations(sum(b - a for _, _, a, b in pieces), windows[0][0].dtype)
        at = 0
        for (buf, perm, buf_row, _), (_, _, a, b) in zip(windows, pieces):
            # sorted: a gather that walks memory forwards; one indexed copy straight into the batch
            torch.index_select(buf, 0, buf_row[perm[a:b].sort().values], out=x[at : at + b - a])
            at += b - a
        if x_ND is None:
            x_ND = x.to(self.device, non_blocking=True).float()  # converted after the copy: half the bytes move
        elif x_ND is not x:
            x_ND.copy_(x)
        self.read_seconds += time.perf_counter() - t0
        self.rows_served += len(x_ND)
        if not torch.isfinite(x_ND.sum()):  # NaN and inf survive a sum; the full check only runs then
            check_finite(x_ND, self.rows_of(pieces))
        return x_ND

    def _destinations(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where the gather writes, and the float32 batch handed out (None: made on the device from the gather).
        A GPU gets a pinned batch (torch's pinned-memory cache reuses it safely). On the host the batch is a view
        of a buffer nobody else holds now; an fp32 store is gathered straight into it."""
        if self.device.type != "cpu":
            return torch.empty(n, self.files.d_in, dtype=dtype, pin_memory=self.device.type == "cuda"), None
        out = next((b for b in self._batches if unshared(b)), None)  # every batch has the schedule's n rows
        if out is None:
            out = torch.empty(n, self.files.d_in)
            if len(self._batches) < 4:  # more only while a caller keeps several batches; those are not kept
                self._batches.append(out)
        batch = out[:]  # a view: while the caller holds it, `unshared` says the buffer is taken
        if dtype == torch.float32:
            return batch, batch
        if self._gathered is None:
            self._gathered = torch.empty(n, self.files.d_in, dtype=dtype)
        return self._gathered, batch

    def rows_of(self, pieces) -> torch.Tensor:
        """Source row of each batch row, in batch order."""
        rows = [self.schedule.source_rows(e, w, self._window(e, w).result()[1][a:b].sort().values.numpy())
                for e, w, a, b in pieces]
        return torch.from_numpy(np.concatenate(rows))

    def _keep(self, pieces, ahead: list[tuple[int, int]]) -> None:
        """Drop the windows that neither this batch nor `ahead` needs, keeping the buffers of those read. Only a
        batch within one window reads ahead: one that spans two leaves the next window to the next call, once the
        older one is dropped. So two windows live at a time, as `Layout.for_budget` sized them (more only for a
        batch larger than a window)."""
        keep = {(e, w) for e, w, _, _ in pieces} | set(ahead)
        with self._lock:
            for key in [k for k in self._windows if k not in keep]:
                fut = self._windows.pop(key)
                if fut.done() and fut.exception() is None:
                    self._spare.append(fut.result()[3])

    def close(self) -> None:
        self._io.shutdown(wait=True, cancel_futures=True)
        self.files.close()
        self._windows.clear()
        self._spare.clear()


def check_finite(x_ND: torch.Tensor, rows_N: torch.Tensor) -> None:
    """Raise naming the first source row (rows_N maps batch rows to source rows) that holds NaN or inf."""
    bad = ~torch.isfinite(x_ND)
    if bad.any():
        row = int(rows_N[int(bad.any(dim=1).nonzero()[0])])
        value = x_ND[bad][0].item()
        raise ValueError(f"activations contain {value} at row {row}; expected finite values (NaN/inf in the source)")


def threading_future(fn, *args) -> Future:
    """Run fn(*args) on its own thread; the window reader fans out to the io pool, so it must not wait inside it."""
    fut: Future = Future()

    def run():
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # handed to whoever waits on the window
            fut.set_exception(e)

    threading.Thread(target=run, daemon=True, name="sae-vlm-window").start()
    return fut
