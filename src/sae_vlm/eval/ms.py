"""Monosemanticity score (MS), exact and in closed form (paper.md §4).

For latent k with activations a over N images, min–max normalised to ã ∈ [0, 1], and unit embeddings ê_n:

    MS_k = Σ_{n≠m} ã_n ã_m cos(e_n, e_m) / Σ_{n≠m} ã_n ã_m
         = (‖Êᵀã‖² − ‖ã‖²) / ((Σ ã)² − ‖ã‖²)

so all latents cost one pass over the rows instead of N² pairs: `MSAccumulator` sums the raw ÊᵀA, Σa and Σa²
(float64) and applies the min–max normalisation to those sums once the min and max are known.
A constant latent (max = min) gives 0/0 = NaN (`MSResult.constant`). A latent that is non-zero after normalisation
on a single image only has no weighted pair either and also gets NaN; `summarize_ms` counts every NaN as
'unscored' (not 'dead': that word is kept for latents that never fire, as evaluate's recon metrics count them).

Inputs: dense activations [N, F] (tensor, ndarray, `.npy`, ActivationSource) or a sparse code store (any object
with `indices` int [N, k], `values` [N, k] and `d_sae`): a latent that is not listed in a row is 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.data.source import ActivationSource, sequential_chunks
from sae_vlm.data.store import as_source
from sae_vlm.device import resolve_device

F64 = torch.float64


@dataclass(frozen=True)
class MSResult:
    """Per-latent MS and the statistics that say how much to trust it (all [F], CPU)."""

    ms: torch.Tensor  # float64, NaN for dead / undefined latents
    support: torch.Tensor  # int64, #images with activation > 0
    max_act: torch.Tensor  # float64
    min_act: torch.Tensor  # float64
    rows: int

    @property
    def freq(self) -> torch.Tensor:
        """Firing frequency: support / rows."""
        return self.support.double() / self.rows

    @property
    def constant(self) -> torch.Tensor:
        """Constant latents (max == min): no pair carries weight."""
        return self.max_act == self.min_act


def is_sparse_codes(obj) -> bool:
    has_fields = all(hasattr(obj, a) for a in ("indices", "values", "d_sae"))
    return has_fields and not isinstance(obj, (torch.Tensor, np.ndarray))




def unit_embeddings(embeddings, rows: int | None = None) -> torch.Tensor:
    """Embeddings [N, D] as a float64 CPU tensor of unit rows; checks the row count against the activations."""
    if isinstance(embeddings, torch.Tensor):
        emb_ND = embeddings
    else:  # a copy: memmaps are read-only, and we need float64 anyway
        emb_ND = torch.from_numpy(np.array(embeddings, dtype=np.float64))
    if emb_ND.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [rows, dim], got shape {tuple(emb_ND.shape)}")
    if rows is not None and emb_ND.shape[0] != rows:
        raise ValueError(f"embeddings have {emb_ND.shape[0]} rows but activations have {rows}; "
                         "they must describe the same images")
    if emb_ND.shape[0] == 0:
        raise ValueError("evaluation set is empty: embeddings have 0 rows, expected at least 2")
    emb_ND = emb_ND.detach().to("cpu", F64)
    norms_N = emb_ND.norm(dim=1, keepdim=True)
    if (norms_N == 0).any():
        bad = int((norms_N[:, 0] == 0).nonzero()[0])
        raise ValueError(f"embedding row {bad} is all zeros; cosine similarity needs non-zero embeddings")
    return emb_ND / norms_N


def chance_similarity(embeddings) -> float:
    """Mean off-diagonal cosine similarity of the dataset, (‖Σê‖² − N) / (N(N−1)): the MS of a random latent."""
    e_ND = unit_embeddings(embeddings)
    n = e_ND.shape[0]
    if n < 2:
        raise ValueError(f"evaluation set has {n} rows; chance similarity needs at least 2")
    s_D = e_ND.sum(0)
    return float((s_D @ s_D - (e_ND * e_ND).sum()) / (n * (n - 1)))


def monosemanticity_score(
    activations, embeddings, *, device=None, chunk_rows: int = 4096, chunk_latents: int = 16384, quiet: bool = True
) -> torch.Tensor:
    """MS per latent [F] (float64, CPU); NaN for a constant latent. See module doc for accepted inputs."""
    return ms_stats(activations, embeddings, device=device, chunk_rows=chunk_rows, chunk_latents=chunk_latents,
                    quiet=quiet).ms


def ms_stats(activations, embeddings, *, device=None, chunk_rows=4096, chunk_latents=16384, quiet=True) -> MSResult:
    """MS plus support, max/min activation, in one pass over the rows; see `monosemanticity_score`."""
    dev = resolve_device(device)
    if is_sparse_codes(activations):
        return _ms_sparse(activations, embeddings, dev, chunk_rows, quiet)
    src = as_source(activations)
    if src.rows == 0:
        raise ValueError("evaluation set is empty: activations have 0 rows, expected at least 2")
    e_ND = unit_embeddings(embeddings, src.rows)
    acc = MSAccumulator(src.d_in, e_ND.shape[1], dev, chunk_latents)
    chunks = tqdm(sequential_chunks(src, chunk_rows), desc="MS", total=-(-src.rows // chunk_rows), disable=quiet,
                  leave=False)
    for r0, a_RF in chunks:
        acc.add(a_RF, e_ND[r0 : r0 + a_RF.shape[0]])
    return acc.result()


def _finish(num_F, den_F, paired_F) -> torch.Tensor:
    ms_F = num_F / den_F
    # no pair carries weight (constant latent, or one image above the minimum only): undefined
    return torch.where((den_F > 0) & paired_F, ms_F, torch.full_like(ms_F, float("nan"))).cpu()


SPARSE_BELOW = 0.05  # a chunk with fewer non-zero entries than this goes through the sparse product


class MSAccumulator:
    """MS of F latents in one pass over consecutive chunks of rows.

    Accumulates the raw ΣaE [F, D], Σa, Σa², min, max, the count of entries at the running min and the support
    per latent, and ΣE and N, all float64; `result` applies the min–max normalisation ã = (a − lo)·scale in
    closed form: Σã e = scale·(Σa e − lo·Σe), Σã = scale·(Σa − N·lo), Σã² = scale²·(Σa² − 2·lo·Σa + N·lo²).
    """

    def __init__(self, width: int, dim: int, device=None, chunk_latents: int = 16384):
        dev = resolve_device(device)
        self.chunk_latents, self.n = chunk_latents, 0
        self.S_FD = torch.zeros(width, dim, dtype=F64, device=dev)
        self.esum_D = torch.zeros(dim, dtype=F64, device=dev)
        self.sum_F = torch.zeros(width, dtype=F64, device=dev)
        self.sq_F = torch.zeros(width, dtype=F64, device=dev)
        self.lo_F = torch.full((width,), float("inf"), dtype=F64, device=dev)
        self.hi_F = torch.full((width,), float("-inf"), dtype=F64, device=dev)
        self.at_lo_F = torch.zeros(width, dtype=torch.int64, device=dev)
        self.support_F = torch.zeros(width, dtype=torch.int64, device=dev)

    def add(self, a_RF: torch.Tensor, e_RD: torch.Tensor) -> None:
        """Dense activations [R, F] of consecutive rows and those rows' unit embeddings [R, D]."""
        dev = self.S_FD.device
        a_RF, e_RD = a_RF.to(dev), e_RD.to(dev, F64)
        lo_F = a_RF.amin(0)
        self._merge(lo_F.double(), a_RF.amax(0).double(), (a_RF == lo_F).sum(0), e_RD)
        self.support_F += (a_RF > 0).sum(0)
        k = a_RF.shape[1]
        for c0 in range(0, k, self.chunk_latents):
            c1 = min(c0 + self.chunk_latents, k)
            a_RC = a_RF[:, c0:c1].double()
            # zeros add nothing to any sum, and SAE codes are mostly 0: only the other entries matter
            row, col = a_RC.nonzero(as_tuple=True)
            if row.numel() < SPARSE_BELOW * a_RC.numel():
                self._add_entries(row, col + c0, a_RC[row, col], e_RD)
            else:
                self.S_FD[c0:c1] += a_RC.T @ e_RD
                self.sum_F[c0:c1] += a_RC.sum(0)
                self.sq_F[c0:c1] += (a_RC * a_RC).sum(0)

    def add_entries(self, rows_M, cols_M, values_M, n_rows: int, e_RD: torch.Tensor) -> None:
        """`n_rows` consecutive rows given as entries a[row, col] = value, each latent at most once per row; an
        entry not listed is 0."""
        dev, k = self.S_FD.device, self.sum_F.shape[0]
        rows_M, cols_M, values_M, e_RD = rows_M.to(dev), cols_M.to(dev), values_M.to(dev, F64), e_RD.to(dev, F64)
        listed_F = torch.bincount(cols_M, minlength=k)
        if int(listed_F.max()) > n_rows:
            raise ValueError(f"code store lists some latent {int(listed_F.max())} times in {n_rows} rows; "
                             "expected each latent at most once per row")
        zeros_F = n_rows - listed_F
        lo_F = self.lo_F.new_full((k,), float("inf")).scatter_reduce_(0, cols_M, values_M, reduce="amin")
        hi_F = self.hi_F.new_full((k,), float("-inf")).scatter_reduce_(0, cols_M, values_M, reduce="amax")
        lo_F = torch.where(zeros_F > 0, lo_F.clamp(max=0.0), lo_F)
        hi_F = torch.where(zeros_F > 0, hi_F.clamp(min=0.0), hi_F)
        at_lo_F = torch.zeros_like(listed_F).index_add_(0, cols_M, (values_M == lo_F[cols_M]).long())
        self._merge(lo_F, hi_F, at_lo_F + torch.where(lo_F == 0, zeros_F, 0), e_RD)
        self.support_F.index_add_(0, cols_M, (values_M > 0).long())
        self._add_entries(rows_M, cols_M, values_M, e_RD)

    def _merge(self, lo_F, hi_F, at_lo_F, e_RD) -> None:
        """Merge a chunk's min (and how many entries sit at it), max, rows and ΣE into the running ones."""
        lower, same = lo_F < self.lo_F, lo_F == self.lo_F
        self.at_lo_F = torch.where(lower, at_lo_F, self.at_lo_F + torch.where(same, at_lo_F, 0))
        self.lo_F, self.hi_F = torch.minimum(self.lo_F, lo_F), torch.maximum(self.hi_F, hi_F)
        self.n += e_RD.shape[0]
        self.esum_D += e_RD.sum(0)

    def _add_entries(self, row, col, val, e_RD) -> None:
        """Entries a[row, col] = val (zero elsewhere); a sparse product avoids an [nnz, D] temporary."""
        k = self.sum_F.shape[0]
        m_FR = torch.sparse_coo_tensor(torch.stack([col, row]), val, (k, e_RD.shape[0]), check_invariants=False)
        self.S_FD += torch.sparse.mm(m_FR, e_RD)
        self.sum_F.index_add_(0, col, val)
        self.sq_F.index_add_(0, col, val * val)

    def result(self) -> MSResult:
        if self.n == 0:
            raise ValueError("evaluation set is empty: activations have 0 rows, expected at least 2")
        n, lo_F, hi_F = self.n, self.lo_F, self.hi_F
        scale_F = torch.where(hi_F > lo_F, 1.0 / (hi_F - lo_F), torch.zeros_like(hi_F))
        etA_FD = scale_F[:, None] * (self.S_FD - lo_F[:, None] * self.esum_D[None, :])
        sum_F = scale_F * (self.sum_F - n * lo_F)
        sq_F = scale_F * scale_F * (self.sq_F - 2 * lo_F * self.sum_F + n * lo_F * lo_F)
        num_F = (etA_FD * etA_FD).sum(1) - sq_F
        den_F = sum_F * sum_F - sq_F
        # the closed form's rounding leaves den slightly off 0 where no pair exists: count the images instead
        paired_F = n - self.at_lo_F >= 2
        return MSResult(_finish(num_F, den_F, paired_F), self.support_F.cpu(), hi_F.cpu(), lo_F.cpu(), n)


def _ms_sparse(codes, embeddings, dev, chunk_rows, quiet) -> MSResult:
    """Sparse codes: the listed entries of each chunk go to `MSAccumulator.add_entries`."""
    idx_all, val_all = codes.indices, codes.values
    n, k = int(idx_all.shape[0]), int(codes.d_sae)
    if n == 0:
        raise ValueError("evaluation set is empty: code store has 0 rows, expected at least 2")
    e_ND = unit_embeddings(embeddings, n)
    acc = MSAccumulator(k, e_ND.shape[1], dev)
    for r0 in tqdm(range(0, n, chunk_rows), desc="MS", disable=quiet, leave=False):
        r1 = min(r0 + chunk_rows, n)
        idx = torch.as_tensor(np.asarray(idx_all[r0:r1]), device=dev).long()
        val = torch.as_tensor(np.asarray(val_all[r0:r1]), device=dev).double()
        if idx.shape != val.shape or idx.ndim != 2:
            raise ValueError(f"code store indices {tuple(idx.shape)} and values {tuple(val.shape)} "
                             "must both be [rows, k]")
        rows_M = torch.arange(r1 - r0, device=dev).repeat_interleave(idx.shape[1])  # row of each entry
        acc.add_entries(rows_M, idx.reshape(-1), val.reshape(-1), r1 - r0, e_ND[r0:r1])
    return acc.result()


def random_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix [d, d] (QR of a Gaussian with the sign fix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).float()


class RotatedSource(ActivationSource):
    """Raw neurons seen in a random orthonormal basis: the "rotated neurons" baseline."""

    def __init__(self, source, seed: int = 0):
        self.src = as_source(source)
        self.rows, self.d_in = self.src.rows, self.src.d_in
        self.Q_DD = random_rotation(self.d_in, seed)

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        return self.rotate(self.src.get(idx_N))

    def rotate(self, x_RD: torch.Tensor) -> torch.Tensor:
        """Rows of the source (on any device) in the rotated basis."""
        if self.Q_DD.device != x_RD.device:
            self.Q_DD = self.Q_DD.to(x_RD.device)
        return x_RD @ self.Q_DD


def summarize_ms(ms_F: torch.Tensor, chance: float | None = None, top: int = 10) -> dict:
    """Mean ± std (unbiased) over scored latents, best/worst, the unscored (NaN) count, and the margin over chance."""
    ms = ms_F.double()
    ok = ~torch.isnan(ms)
    vals = ms[ok]
    out: dict[str, Any] = {"latents": int(ms.numel()), "unscored": int((~ok).sum()), "scored": int(ok.sum())}
    if vals.numel():
        order = torch.argsort(ms.nan_to_num(float("-inf")), descending=True)[: min(top, vals.numel())]
        worst = torch.argsort(ms.nan_to_num(float("inf")))[: min(top, vals.numel())]
        out |= {
            "mean": float(vals.mean()),
            "std": float(vals.std()) if vals.numel() > 1 else float("nan"),  # unbiased, as metric.py prints it
            "max": float(vals.max()),
            "min": float(vals.min()),
            "best": [[int(i), float(ms[i])] for i in order],
            "worst": [[int(i), float(ms[i])] for i in worst],
        }
        if chance is not None:
            out |= {"chance": chance, "mean_minus_chance": out["mean"] - chance}
    return out
