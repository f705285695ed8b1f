"""A running top-k over chunks of codes, and the saved top lists: shared by the top images of `sae-vlm evaluate`
and the steering score's top images, so it sits below both.

`TopAccumulator` lives on the chunks' device: per chunk, `torch.topk` over the concatenation of the running values
and the chunk's codes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sae_vlm.io import atomic_save_npy


class TopAccumulator:
    """The running top-k merge on the chunks' device: per chunk, `torch.topk` over the running values [F, top]
    concatenated with the chunk's codes. Slots never filled keep value `fill` and index -1. The state is created
    from the first chunk, or up front when `width` (F) is given."""

    def __init__(self, top: int, *, fill: float = float("-inf"), width: int | None = None, device=None):
        self.top, self.fill, self.seen = top, fill, 0
        self.state = self._start(width, device) if width is not None else None

    def _start(self, f: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.full((f, self.top), self.fill, device=dev),
                torch.full((f, self.top), -1, dtype=torch.int64, device=dev))

    def add(self, c_RF: torch.Tensor, ids_R: torch.Tensor | None = None) -> None:
        """Codes [R, F] of rows `ids_R`; None numbers the rows consecutively from 0."""
        ids = torch.arange(self.seen, self.seen + c_RF.shape[0], device=c_RF.device) if ids_R is None else ids_R
        self.seen += c_RF.shape[0]
        vals_FT, idx_FT = self.state if self.state is not None else self._start(c_RF.shape[1], c_RF.device)
        cand_v = torch.cat([vals_FT, c_RF.T], 1)
        cand_i = torch.cat([idx_FT, ids[None, :].expand(c_RF.shape[1], -1)], 1)
        vals_FT, pos = cand_v.topk(self.top, dim=1)
        self.state = (vals_FT, cand_i.gather(1, pos))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [F, top], indices [F, top] int64), best first."""
        if self.state is None:
            raise ValueError("evaluation set is empty: no code rows to rank, expected at least 1")
        return self.state


def running_top(stream, top: int, *, fill: float = float("-inf"), width: int | None = None, device=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`TopAccumulator` over `stream`, which yields (ids [R] or None, codes [R, F]); without `width`, an empty
    stream is a ValueError, with it the filled state comes back."""
    acc = TopAccumulator(top, fill=fill, width=width, device=device)
    for ids, c_RF in stream:
        acc.add(c_RF, ids)
    return acc.result()


def save_top(directory: str | Path, values_FT, indices_FT, prefix: str = "top") -> None:
    """`<prefix>_values.npy` and `<prefix>_indices.npy` beside the codes, each written atomically."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(d / f"{prefix}_values.npy", np.asarray(values_FT, dtype=np.float32))
    atomic_save_npy(d / f"{prefix}_indices.npy", np.asarray(indices_FT, dtype=np.int64))


def load_top(directory: str | Path, prefix: str = "top") -> tuple[np.ndarray, np.ndarray]:
    d = Path(directory)
    return np.load(d / f"{prefix}_values.npy"), np.load(d / f"{prefix}_indices.npy")
