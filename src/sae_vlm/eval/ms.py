"""Monosemanticity score (MS), exact and in closed form (paper.md §4).

For latent k with activations a over N images, min–max normalised to ã ∈ [0, 1], and unit embeddings ê_n:

    MS_k = Σ_{n≠m} ã_n ã_m cos(e_n, e_m) / Σ_{n≠m} ã_n ã_m
         = (‖Êᵀã‖² − ‖ã‖²) / ((Σ ã)² − ‖ã‖²)

so every latent costs one pass over the rows (ÊᵀA, accumulated in float64) instead of N² pairs.
A constant latent (max = min) gives 0/0 = NaN (`MSResult.dead`). A latent that is non-zero after normalisation
on a single image only has no weighted pair either and also gets NaN; `summarize_ms` counts every NaN as dead.

Inputs: dense activations [N, F] (tensor, ndarray, `.npy`, ActivationSource) or a sparse code store (any object
with `indices` int [N, k], `values` [N, k] and `d_sae`): a latent that is not listed in a row is 0 there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.data.source import as_source
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
    def dead(self) -> torch.Tensor:
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
    """MS plus support, max/min activation; see `monosemanticity_score`."""
    dev = resolve_device(device)
    if is_sparse_codes(activations):
        return _ms_sparse(activations, embeddings, dev, chunk_rows, quiet)
    src = as_source(activations)
    if src.rows == 0:
        raise ValueError("evaluation set is empty: activations have 0 rows, expected at least 2")
    return _ms_dense(src, unit_embeddings(embeddings, src.rows), dev, chunk_rows, chunk_latents, quiet)


def _row_chunks(n: int, size: int, quiet: bool, desc: str):
    return tqdm(range(0, n, size), desc=desc, disable=quiet, leave=False)


def _finish(num_F, den_F) -> torch.Tensor:
    ms_F = num_F / den_F
    # den = 0 exactly when no pair carries weight (constant latent, or one image only): undefined.
    return torch.where(den_F > 0, ms_F, torch.full_like(ms_F, float("nan"))).cpu()


class _Accumulator:
    """Running ÊᵀÃ [F, D], Σã and Σã² in float64; ã enters either as a dense chunk or as sparse entries."""

    def __init__(self, k: int, d: int, dev):
        self.etA_FD = torch.zeros(k, d, dtype=F64, device=dev)
        self.sum_F = torch.zeros(k, dtype=F64, device=dev)
        self.sq_F = torch.zeros(k, dtype=F64, device=dev)

    def add_dense(self, at_RC: torch.Tensor, e_RD: torch.Tensor, c0: int) -> None:
        c1 = c0 + at_RC.shape[1]
        self.etA_FD[c0:c1] += at_RC.T @ e_RD
        self.sum_F[c0:c1] += at_RC.sum(0)
        self.sq_F[c0:c1] += (at_RC * at_RC).sum(0)

    def add_sparse(self, row: torch.Tensor, col: torch.Tensor, val: torch.Tensor, e_RD: torch.Tensor) -> None:
        """Entries ã[row, col] = val (zero elsewhere); a sparse product avoids an [nnz, D] temporary."""
        k = self.sum_F.shape[0]
        m_FR = torch.sparse_coo_tensor(torch.stack([col, row]), val, (k, e_RD.shape[0]), check_invariants=False)
        self.etA_FD += torch.sparse.mm(m_FR, e_RD)
        self.sum_F.index_add_(0, col, val)
        self.sq_F.index_add_(0, col, val * val)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        num_F = (self.etA_FD * self.etA_FD).sum(1) - self.sq_F
        den_F = self.sum_F * self.sum_F - self.sq_F
        return num_F, den_F


SPARSE_BELOW = 0.05  # a chunk with fewer non-minimal entries than this goes through the sparse product


def _ms_dense(src, e_ND, dev, chunk_rows, chunk_latents, quiet) -> MSResult:
    n, k = src.rows, src.d_in
    lo_F = torch.full((k,), float("inf"), dtype=F64, device=dev)
    hi_F = torch.full((k,), float("-inf"), dtype=F64, device=dev)
    support_F = torch.zeros(k, dtype=torch.int64, device=dev)
    for r0 in _row_chunks(n, chunk_rows, quiet, "MS pass 1/2 (min/max)"):
        a_RF = src.get(torch.arange(r0, min(r0 + chunk_rows, n))).to(dev)
        lo_F = torch.minimum(lo_F, a_RF.amin(0).double())
        hi_F = torch.maximum(hi_F, a_RF.amax(0).double())
        support_F += (a_RF > 0).sum(0)
    scale_F = torch.where(hi_F > lo_F, 1.0 / (hi_F - lo_F), torch.zeros_like(hi_F))

    acc = _Accumulator(k, e_ND.shape[1], dev)
    for r0 in _row_chunks(n, chunk_rows, quiet, "MS pass 2/2 (ÊᵀÃ)"):
        rows = torch.arange(r0, min(r0 + chunk_rows, n))
        a_RF = src.get(rows).to(dev)
        e_RD = e_ND[rows].to(dev)
        for c0 in range(0, k, chunk_latents):
            c1 = min(c0 + chunk_latents, k)
            a_RC = a_RF[:, c0:c1]
            # SAE codes are mostly at their minimum (0), where ã = 0: only the other entries matter
            row, col = (a_RC.double() != lo_F[c0:c1]).nonzero(as_tuple=True)
            if row.numel() < SPARSE_BELOW * a_RC.numel():
                val = (a_RC[row, col].double() - lo_F[c0 + col]) * scale_F[c0 + col]
                acc.add_sparse(row, col + c0, val, e_RD)
            else:
                acc.add_dense((a_RC.double() - lo_F[c0:c1]) * scale_F[c0:c1], e_RD, c0)
    return MSResult(_finish(*acc.result()), support_F.cpu(), hi_F.cpu(), lo_F.cpu(), n)


def _ms_sparse(codes, embeddings, dev, chunk_rows, quiet) -> MSResult:
    """Sparse codes: ã = c + (listed corrections), c = −min/(max−min) is ã at an unlisted (zero) entry."""
    idx_all, val_all = codes.indices, codes.values
    n, k = int(idx_all.shape[0]), int(codes.d_sae)
    if n == 0:
        raise ValueError("evaluation set is empty: code store has 0 rows, expected at least 2")
    e_ND = unit_embeddings(embeddings, n)

    def chunk(r0):
        r1 = min(r0 + chunk_rows, n)
        idx = torch.as_tensor(np.asarray(idx_all[r0:r1]), device=dev).long()
        val = torch.as_tensor(np.asarray(val_all[r0:r1]), device=dev).double()
        if idx.shape != val.shape or idx.ndim != 2:
            raise ValueError(f"code store indices {tuple(idx.shape)} and values {tuple(val.shape)} "
                             "must both be [rows, k]")
        return r1, idx.reshape(-1), val.reshape(-1)

    listed_F = torch.zeros(k, dtype=torch.int64, device=dev)
    support_F = torch.zeros(k, dtype=torch.int64, device=dev)
    lo_F = torch.full((k,), float("inf"), dtype=F64, device=dev)
    hi_F = torch.full((k,), float("-inf"), dtype=F64, device=dev)
    for r0 in _row_chunks(n, chunk_rows, quiet, "MS pass 1/2 (min/max)"):
        _, idx, val = chunk(r0)
        listed_F.index_add_(0, idx, torch.ones_like(idx))
        support_F.index_add_(0, idx, (val > 0).long())
        lo_F.scatter_reduce_(0, idx, val, reduce="amin")
        hi_F.scatter_reduce_(0, idx, val, reduce="amax")
    if int(listed_F.max()) > n:
        raise ValueError(f"code store lists some latent {int(listed_F.max())} times in {n} rows; "
                         "expected each latent at most once per row")
    has_zero_F = listed_F < n  # some row does not list the latent: its activation there is 0
    lo_F = torch.where(has_zero_F, lo_F.clamp(max=0.0), lo_F)
    hi_F = torch.where(has_zero_F, hi_F.clamp(min=0.0), hi_F)
    scale_F = torch.where(hi_F > lo_F, 1.0 / (hi_F - lo_F), torch.zeros_like(hi_F))
    c_F = -lo_F * scale_F  # normalised value of a 0 activation

    # accumulate the listed corrections (ã − c); the constant c over all N rows is added in closed form after
    acc = _Accumulator(k, e_ND.shape[1], dev)
    corr_sq_F = torch.zeros(k, dtype=F64, device=dev)
    esum_D = torch.zeros(e_ND.shape[1], dtype=F64, device=dev)
    for r0 in _row_chunks(n, chunk_rows, quiet, "MS pass 2/2 (ÊᵀÃ)"):
        r1, idx, val = chunk(r0)
        e_RD = e_ND[r0:r1].to(dev)
        esum_D += e_RD.sum(0)
        at = (val - lo_F[idx]) * scale_F[idx]
        row = torch.arange(r1 - r0, device=dev).repeat_interleave(idx.numel() // (r1 - r0))  # row of each entry
        acc.add_sparse(row, idx, at - c_F[idx], e_RD)
        corr_sq_F.index_add_(0, idx, at * at - c_F[idx] ** 2)
    etA_FD = c_F[:, None] * esum_D[None, :] + acc.etA_FD
    sum_F = c_F * n + acc.sum_F
    sq_F = c_F * c_F * n + corr_sq_F
    num_F = (etA_FD * etA_FD).sum(1) - sq_F
    den_F = sum_F * sum_F - sq_F
    return MSResult(_finish(num_F, den_F), support_F.cpu(), hi_F.cpu(), lo_F.cpu(), n)


def random_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """A seeded Haar-random orthogonal matrix [d, d] (QR of a Gaussian with the sign fix)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return (q * torch.sign(torch.diagonal(r))).float()


class RotatedSource:
    """Raw neurons seen in a random orthonormal basis: the "rotated neurons" baseline."""

    def __init__(self, source, seed: int = 0):
        self.src = as_source(source)
        self.rows, self.d_in = self.src.rows, self.src.d_in
        self.Q_DD = random_rotation(self.d_in, seed)

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        x = self.src.get(idx_N)
        return x @ self.Q_DD.to(x.device)


def summarize_ms(ms_F: torch.Tensor, chance: float | None = None, top: int = 10) -> dict:
    """Mean ± std (unbiased) over scored latents, best/worst, dead count, and the margin over chance."""
    ms = ms_F.double()
    ok = ~torch.isnan(ms)
    vals = ms[ok]
    out: dict[str, Any] = {"latents": int(ms.numel()), "dead": int((~ok).sum()), "scored": int(ok.sum())}
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
