"""One small interface the trainer and evaluators read activations through.

An `ActivationSource` is a table of `rows` vectors of width `d_in`, readable by row index. Three kinds
exist: an in-memory tensor, a numpy array or memmap (`.npy`), and the on-disk store (`data/store.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ActivationSource(Protocol):
    rows: int
    d_in: int

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        """Rows `idx_N` (int64, any order) as a float32 CPU tensor [N, d_in]."""
        ...


class TensorSource:
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


class NumpySource:
    """A numpy array or memmap, e.g. `np.load(path, mmap_mode="r")`; rows are read on demand."""

    def __init__(self, arr_ND: np.ndarray):
        if arr_ND.ndim != 2:
            raise ValueError(f"activations must be 2-D [rows, d_in], got shape {arr_ND.shape}")
        self.arr_ND = arr_ND
        self.rows, self.d_in = arr_ND.shape

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        idx = idx_N.cpu().numpy()
        order = np.argsort(idx, kind="stable")  # sorted reads are far faster on a memmap
        out = np.empty((len(idx), self.d_in), dtype=np.float32)
        out[order] = self.arr_ND[idx[order]]
        return torch.from_numpy(out)

    def all(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.arr_ND, dtype=np.float32))  # a writable copy


def as_source(data, layer: str | None = None) -> ActivationSource:
    """Turn a tensor, numpy array, `.npy` path or store directory into an ActivationSource."""
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if isinstance(data, np.ndarray):
        return NumpySource(data)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.suffix == ".npy":
            if not path.is_file():
                raise FileNotFoundError(f"activation file {path} does not exist")
            return NumpySource(np.load(path, mmap_mode="r"))
        if path.is_dir():
            from sae_vlm.data.store import open_store

            return open_store(path, layer=layer)
        raise FileNotFoundError(f"activation source {path} is neither a .npy file nor a store directory")
    if isinstance(data, ActivationSource):
        return data
    raise TypeError(f"cannot read activations from {type(data).__name__}; expected a tensor, array, .npy or store dir")
