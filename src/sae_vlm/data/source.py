"""One small interface the trainer and evaluators read activations through.

An `ActivationSource` is a table of `rows` vectors of width `d_in`, readable by row index, in consecutive runs
(`read_rows`) or all at once (`all`). Three kinds exist: an in-memory tensor, a numpy array or memmap (`.npy`),
and the on-disk store (`data/store.py`); only a store has `meta`: where it is and which image each row came from.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from sae_vlm.data.loader import FileRows, RowFile, npy_layout


@dataclass(frozen=True)
class StoreMeta:
    """What a store subdir knows beyond its rows. The per-image records (`images`) are read from rows.jsonl only
    when first asked for, so a damaged one fails the command that needs it, not every command."""

    path: Path
    manifest: dict
    rows_per_image: int
    images: Callable[[], list[dict]]  # one dict per kept image: id, path, label, row (first row), n (rows)

    def image_index(self) -> np.ndarray:
        """For each row, the index of its image in `images()`."""
        return np.repeat(np.arange(len(self.images())), self.rows_per_image)

    def _per_row(self, key: str) -> list:
        ims = self.images()
        return [ims[i][key] for i in self.image_index()]

    def image_ids(self) -> list[str]:
        return self._per_row("id")

    def labels(self) -> list[str | None]:
        return self._per_row("label")

    def paths(self, resolve: bool = True) -> list[str]:
        """Image path per row. Stores record absolute paths; older ones recorded them relative to the folder
        extract ran in, which is taken to be the nearest folder above the store holding its first image (never
        the working directory). `resolve=False` gives the paths as recorded (names only: nothing is opened)."""
        paths = self._per_row("path")
        rel = next((p for p in paths if not os.path.isabs(p)), None)
        if not resolve or rel is None:
            return paths
        here = self.path.resolve()
        base = next((d for d in (here, *here.parents) if (d / rel).exists()), None)
        if base is None:
            raise ValueError(f"{self.path}: image paths are relative to the folder extract ran in (a store from "
                             f"before paths were stored absolute), and {rel!r} is under no folder above the store; "
                             "re-run extract, or move the store back below that folder")
        return [p if os.path.isabs(p) else str(base / p) for p in paths]


@runtime_checkable
class ActivationSource(Protocol):
    """Rows of activations. A class that declares it (`class X(ActivationSource)`) needs only `rows`, `d_in` and
    `get`: rows are read in runs through `get`, no positioned reads (`files`) and no store (`meta`)."""

    rows: int
    d_in: int
    files: FileRows | None = None  # the rows' files, for positioned reads and the streaming loader
    meta: StoreMeta | None = None

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        """Rows `idx_N` (int64, any order) as a float32 CPU tensor [N, d_in]."""
        ...

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) as float32."""
        return self.get(torch.arange(r0, r1))

    def all(self) -> torch.Tensor:
        """Every row as float32."""
        return self.read_rows(0, self.rows)


class TensorSource(ActivationSource):
    """Activations already in memory (CPU or any device)."""

    def __init__(self, acts_ND: torch.Tensor):
        if acts_ND.ndim != 2:
            raise ValueError(f"activations must be 2-D [rows, d_in], got shape {tuple(acts_ND.shape)}")
        self.acts_ND = acts_ND
        self.rows, self.d_in = acts_ND.shape

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        return self.acts_ND[idx_N.to(self.acts_ND.device)].float()

    def all(self) -> torch.Tensor:
        return self.acts_ND.float()


class NumpySource(ActivationSource):
    """A numpy array or memmap, e.g. `np.load(path, mmap_mode="r")`; rows are read on demand. Opened from a .npy
    `path`, it also reads rows with positioned reads (`files`), which the streaming loader uses."""

    def __init__(self, arr_ND: np.ndarray, path: Path | None = None):
        if arr_ND.ndim != 2:
            raise ValueError(f"activations must be 2-D [rows, d_in], got shape {arr_ND.shape}")
        self.arr_ND = arr_ND
        self.rows, self.d_in = arr_ND.shape
        if path is not None:
            offset, _, dtype = npy_layout(path)
            self.files = FileRows([RowFile(path, offset, self.rows, 0)], self.d_in, dtype)

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        if self.files is None:
            return torch.from_numpy(np.array(self.arr_ND[r0:r1], dtype=np.float32))
        return self.files.read_float(r0, r1)

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        idx = idx_N.cpu().numpy()
        order = np.argsort(idx, kind="stable")  # sorted reads are far faster on a memmap
        out = np.empty((len(idx), self.d_in), dtype=np.float32)
        out[order] = self.arr_ND[idx[order]]
        return torch.from_numpy(out)

    def all(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arr_ND, dtype=np.float32))  # a writable copy


def fingerprint(source: ActivationSource, n: int = 64) -> str:
    """A content fingerprint: shape and the bytes of the first, middle, last and n spread-out rows (cheap on any
    size; different activations all but surely differ in them)."""
    rows = source.rows
    picks = [range(min(n, rows)), range(rows // 2, min(rows, rows // 2 + n)), range(max(0, rows - n), rows),
             np.linspace(0, rows - 1, min(n, rows)).astype(int).tolist()]
    idx = torch.tensor(sorted({int(i) for r in picks for i in r}), dtype=torch.int64)
    h = hashlib.sha256(f"{rows}x{source.d_in}".encode())
    h.update(source.get(idx).float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def sequential_chunks(source: ActivationSource, chunk_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 rows [R, d_in]) of consecutive chunks, in order, the next one read while this one is used."""
    read = source.read_rows
    starts = range(0, source.rows, chunk_rows)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(read, 0, min(chunk_rows, source.rows)) if source.rows else None
        for r0 in starts:
            assert pending is not None
            x_RD = pending.result()
            r1 = min(r0 + chunk_rows, source.rows)
            pending = pool.submit(read, r1, min(r1 + chunk_rows, source.rows)) if r1 < source.rows else None
            yield r0, x_RD
