"""Sparse code store: SAE latents kept as per-row top-k (int32 indices, fp16 values), never dense on disk.

  OUT/indices.npy  [N, k] int32   latent ids, by decreasing value
  OUT/values.npy   [N, k] fp16    their values (0 where a row has fewer than k active latents)
  OUT/codes.json   rows, d_sae, k, rows_per_group, truncated_rows (rows with more than k active latents,
                   where the smallest were dropped), source; removed first and written last, so its
                   presence means the arrays beside it are complete and belong to it.
With rows_per_group = g > 1, each output row is the mean of g consecutive input rows' dense codes (e.g.
token-level codes mean-pooled per image when the store holds g tokens per image).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.data.store import FP16_MAX
from sae_vlm.io import atomic_write_json, read_json


def _d_sae(sae) -> int:
    cfg = getattr(sae, "cfg", None)
    if cfg is not None and getattr(cfg, "d_sae", None):
        return int(cfg.d_sae)
    return int(sae.W_dec.shape[0])


@torch.inference_mode()
def write_codes(sae, source, out_dir: str | Path, k: int | None = None, batch_size: int = 4096,
                rows_per_group: int = 1, device: str | torch.device = "cpu", quiet: bool = False) -> "CodeStore":
    """Encode every row of an ActivationSource with `sae.encode` and keep each row's top-k latents."""
    from sae_vlm.data.store import as_source

    source = as_source(source)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    d_sae = _d_sae(sae)
    k = int(k or getattr(getattr(sae, "cfg", None), "k", None) or 64)
    k = min(k, d_sae)
    g = int(rows_per_group)
    if g < 1 or source.rows % g:
        raise ValueError(f"rows_per_group={g} does not divide the source's {source.rows} rows")
    n_out = source.rows // g
    step = max(g, batch_size - batch_size % g)
    # A rerun into the same directory: drop the old marker first, so new arrays never sit under old metadata.
    (out / "codes.json").unlink(missing_ok=True)
    tmp_i, tmp_v = out / f".indices.npy.tmp{os.getpid()}", out / f".values.npy.tmp{os.getpid()}"
    try:
        ind = np.lib.format.open_memmap(tmp_i, mode="w+", dtype=np.int32, shape=(n_out, k))
        val = np.lib.format.open_memmap(tmp_v, mode="w+", dtype=np.float16, shape=(n_out, k))
        truncated = 0
        sae_device = next(sae.parameters()).device if any(True for _ in sae.parameters()) else torch.device(device)
        for start in tqdm(range(0, source.rows, step), disable=quiet, desc="codes", unit="batch"):
            idx = torch.arange(start, min(start + step, source.rows))
            codes_NF = sae.encode(source.get(idx).to(sae_device)).float()
            if g > 1:
                codes_NF = codes_NF.reshape(-1, g, codes_NF.shape[1]).mean(1)
            truncated += int(((codes_NF != 0).sum(1) > k).sum())
            v, i = codes_NF.topk(k, dim=1)
            if v.numel() and v.abs().max() > FP16_MAX:
                raise ValueError(f"an SAE code reaches {v.abs().max().item():.6g}, beyond fp16's max 65504")
            lo = start // g
            ind[lo : lo + len(i)] = i.cpu().numpy().astype(np.int32)
            val[lo : lo + len(v)] = v.cpu().numpy().astype(np.float16)
        ind.flush()
        val.flush()
        del ind, val
        os.replace(tmp_i, out / "indices.npy")
        os.replace(tmp_v, out / "values.npy")
    finally:
        tmp_i.unlink(missing_ok=True)
        tmp_v.unlink(missing_ok=True)
    atomic_write_json(out / "codes.json", {"format": "sae-vlm-codes/1", "rows": n_out, "d_sae": d_sae, "k": k,
                                           "rows_per_group": g, "truncated_rows": truncated,
                                           "source": str(source.meta.path if source.meta else type(source).__name__)},
                      indent=1)
    return CodeStore(out)


class CodeStore:
    """Reader: `indices` / `values` memmaps [rows, k]; `dense(start, stop)` and `get(idx)` give float32 codes."""

    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir)
        meta_path = self.path / "codes.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.path} is not a complete code store (no codes.json)")
        self.meta = read_json(meta_path)
        bad = next((key for key in ("rows", "d_sae", "k") if not isinstance(self.meta, dict) or
                    not isinstance(self.meta.get(key), int) or isinstance(self.meta[key], bool) or self.meta[key] < 0),
                   None)
        if bad is not None:
            raise ValueError(f"{meta_path}: field {bad!r} is missing or not a whole number")
        self.rows, self.d_sae, self.k = self.meta["rows"], self.meta["d_sae"], self.meta["k"]
        self.d_in = self.d_sae  # so it can stand in as an ActivationSource of codes
        self.indices = self._array("indices.npy", np.int32)
        self.values = self._array("values.npy", np.float16)

    def _array(self, name: str, dtype) -> np.ndarray:
        path = self.path / name
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npy array ({str(e).splitlines()[0]})") from None
        if arr.shape != (self.rows, self.k) or arr.dtype != dtype:
            raise ValueError(f"{path} holds {arr.dtype} {list(arr.shape)}; codes.json says "
                             f"{np.dtype(dtype)} {[self.rows, self.k]}")
        return arr

    def topk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices int64 [n, k], values float32 [n, k]) of rows start:stop."""
        return (torch.from_numpy(np.asarray(self.indices[start:stop], dtype=np.int64)),
                torch.from_numpy(np.asarray(self.values[start:stop], dtype=np.float32)))

    def _scatter(self, i: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(i), self.d_sae)
        return out.scatter_(1, i, v)

    def dense(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        return self._scatter(*self.topk(start, self.rows if stop is None else stop))

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        idx = idx_N.cpu().numpy()
        i = torch.from_numpy(np.asarray(self.indices[idx], dtype=np.int64))
        v = torch.from_numpy(np.asarray(self.values[idx], dtype=np.float32))
        return self._scatter(i, v)

    def all(self) -> torch.Tensor:
        return self.dense()
