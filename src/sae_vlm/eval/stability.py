"""Dictionary stability: how far two SAEs (two seeds, two widths, two libraries) learned the same latents.

Latents are matched one to one by decoder cosine, maximising the summed cosine of the matched pairs (the
assignment problem). Up to `DENSE_MAX` latents a side, scipy's Hungarian solver runs on the full cosine matrix.
Measured on one core of a shared 2-core Xeon, d=256, from a planted permutation to two half-unrelated
dictionaries: 2,048 latents 0.06-0.2 s, 4,096 0.2-1.7 s (128 MiB), 8,192 1.3-7 s, 16,384 6-32 s (2 GiB); 65,536
would need 32 GiB. Above the bound the cosines are streamed once in row chunks (on the given device), keeping
each latent's `top_m` most similar latents of the other SAE (both directions), and
`min_weight_full_bipartite_matching` solves the assignment over those candidate pairs: 16,384 latents in 12 s,
65,536 in 4.5 min (3 of them the cosines on that one core). Its answer is the dense solver's whenever the dense
optimum's pairs are all candidates, which holds for latents with a counterpart; latents without one (cosines all
small and alike) may pair differently at a near-equal total (16,384 half-unrelated: 99.4% of pairs identical, the
same total to 4 digits). Latents the candidates leave unmatched are matched among themselves in further rounds
with `top_m` doubled (so the candidates end up complete), finished by the dense solver once few enough.

With different widths the smaller side is matched in full and the larger side's extra latents get no partner
(index -1, cosine NaN). Matched pairs can also be compared by activation: the Pearson correlation, over the rows
of a store, of the two latents' codes in each SAE's inference mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from sae_vlm.data.source import sequential_chunks

DENSE_MAX = 4096  # latents a side up to which the dense Hungarian solver runs (see the module docstring)
TOP_M = 32  # candidate partners kept per latent above it
STABLE_COS = 0.9  # a latent is stable when its matched cosine reaches this in every other seed
CHUNK = 2048  # rows of a cosine block


def require_scipy():
    """scipy's two solvers; without scipy a one-line error that names the extra."""
    try:
        from scipy.optimize import linear_sum_assignment
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import min_weight_full_bipartite_matching
    except ImportError:
        raise ValueError("matching SAE latents needs scipy: pip install 'sae-vlm[stability]'") from None
    return linear_sum_assignment, csr_matrix, min_weight_full_bipartite_matching


@dataclasses.dataclass(frozen=True)
class Match:
    """A one-to-one matching of A's F latents with B's G latents."""

    b_of_a: np.ndarray  # [F] int64: the B latent matched to each A latent, -1 for none
    cos_a: np.ndarray  # [F] float64: its decoder cosine, NaN for none
    a_of_b: np.ndarray  # [G] int64: the inverse
    cos_b: np.ndarray  # [G] float64
    method: str  # "dense" or "sparse"


def unit_rows(W_FD, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decoder rows scaled to unit norm, float32 on `device` (a zero row stays zero)."""
    W = torch.as_tensor(W_FD).detach().to(device=device, dtype=torch.float32)
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _blocks(A_FD: torch.Tensor, B_GD: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, cosines of A's rows r0.. with every B row [R, G]), one block at a time."""
    for r0 in range(0, A_FD.shape[0], chunk):
        yield r0, A_FD[r0 : r0 + chunk] @ B_GD.T


def dense_cosines(A_FD: torch.Tensor, B_GD: torch.Tensor, chunk: int = CHUNK) -> np.ndarray:
    """The full [F, G] cosine matrix in float64 (what the Hungarian solver reads), filled block by block."""
    out = np.empty((A_FD.shape[0], B_GD.shape[0]), np.float64)
    for r0, c in _blocks(A_FD, B_GD, chunk):
        out[r0 : r0 + c.shape[0]] = c.cpu().numpy()
    return out


def candidate_pairs(A_FD: torch.Tensor, B_GD: torch.Tensor, m: int, chunk: int = CHUNK):
    """(rows, cols, cosines) of the pairs where either latent is among the other's `m` most similar, from one
    streamed pass over the cosines; each pair once."""
    F, G = A_FD.shape[0], B_GD.shape[0]
    mr, mc = min(m, G), min(m, F)
    rows, cols, vals = [], [], []
    col_val = torch.full((0, G), -torch.inf, device=A_FD.device)
    col_idx = torch.zeros((0, G), dtype=torch.int64, device=A_FD.device)
    for r0, c in _blocks(A_FD, B_GD, chunk):
        v, j = c.topk(mr, dim=1)
        rows.append(torch.arange(r0, r0 + c.shape[0], device=c.device).repeat_interleave(mr))
        cols.append(j.reshape(-1))
        vals.append(v.reshape(-1))
        bv, bi = c.topk(min(mc, c.shape[0]), dim=0)  # each B latent's best rows of this block, then merged
        col_val, keep = torch.cat([col_val, bv]).topk(min(mc, col_val.shape[0] + bv.shape[0]), dim=0)
        col_idx = torch.cat([col_idx, bi + r0]).gather(0, keep)
    rows.append(col_idx.reshape(-1))
    cols.append(torch.arange(G, device=A_FD.device).repeat(col_idx.shape[0]))
    vals.append(col_val.reshape(-1))
    r, c_, v = (torch.cat(t).cpu().numpy() for t in (rows, cols, vals))
    _, first = np.unique(r.astype(np.int64) * G + c_, return_index=True)
    return r[first].astype(np.int64), c_[first].astype(np.int64), v[first].astype(np.float64)


def _sparse_assignment(rows, cols, cos, F: int, G: int) -> tuple[np.ndarray, np.ndarray]:
    """A maximum-cardinality, then maximum-cosine, matching over the candidate pairs: (A ids, B ids).

    The graph gets a stand-in partner per latent, so a full matching always exists: A_i–A'_i and B'_j–B_j cost
    `skip`, and every candidate pair (i, j) adds B'_j–A'_i at cost 1, which pairs the stand-ins of a matched
    pair. A real pair costs 2 − cos ∈ [1, 3]; `skip` > min(F, G) + 2 makes one more matched pair always pay,
    so the candidates' largest matching is found first."""
    _, csr_matrix, full_matching = require_scipy()
    skip = float(min(F, G) + 3)
    n = len(rows)
    a_ids, b_ids = np.arange(F), np.arange(G)
    # node order: rows = A (F) then B' (G); columns = B (G) then A' (F)
    r = np.concatenate([rows, a_ids, F + b_ids, F + cols])
    c = np.concatenate([cols, G + a_ids, b_ids, G + rows])
    w = np.concatenate([2.0 - cos, np.full(F + G, skip), np.ones(n)])
    graph = csr_matrix((w, (r, c)), shape=(F + G, F + G))
    row_ind, col_ind = full_matching(graph)
    real = (row_ind < F) & (col_ind < G)
    return row_ind[real], col_ind[real]


def _assign(A_FD: torch.Tensor, B_GD: torch.Tensor, dense_max: int, top_m: int):
    """(A ids, B ids, "dense" | "sparse") of a maximum-cosine one-to-one matching of min(F, G) pairs."""
    F, G = A_FD.shape[0], B_GD.shape[0]
    if max(F, G) <= dense_max:
        lsa, _, _ = require_scipy()
        ai, bi = lsa(dense_cosines(A_FD, B_GD), maximize=True)
        return np.asarray(ai), np.asarray(bi), "dense"
    ai_all, bi_all, dev = [], [], A_FD.device
    left_a, left_b, m = np.arange(F), np.arange(G), top_m
    while min(len(left_a), len(left_b)) > 0:
        sub_a, sub_b = A_FD[torch.as_tensor(left_a, device=dev)], B_GD[torch.as_tensor(left_b, device=dev)]
        if max(len(left_a), len(left_b)) <= dense_max:  # the leftovers are few: finish them exactly
            ai, bi, _ = _assign(sub_a, sub_b, dense_max, top_m)
        else:
            ai, bi = _sparse_assignment(*candidate_pairs(sub_a, sub_b, m), len(left_a), len(left_b))
        ai_all.append(left_a[ai])
        bi_all.append(left_b[bi])
        left_a, left_b, m = np.setdiff1d(left_a, left_a[ai]), np.setdiff1d(left_b, left_b[bi]), 2 * m
    return np.concatenate(ai_all), np.concatenate(bi_all), "sparse"


@torch.no_grad()
def match_latents(W_a_FD, W_b_GD, *, device: str | torch.device = "cpu", dense_max: int = DENSE_MAX,
                  top_m: int = TOP_M) -> Match:
    """Match A's latents one to one with B's by decoder cosine (the rows of `W_dec`, any scale), maximising the
    summed cosine: dense Hungarian up to `dense_max` latents a side, candidate pairs above (module docstring)."""
    A, B = unit_rows(W_a_FD, device), unit_rows(W_b_GD, device)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"decoders have widths {A.shape[1]} and {B.shape[1]}; expected SAEs of the same d_in")
    ai, bi, method = _assign(A, B, dense_max, top_m)
    cos = (A[torch.as_tensor(ai, device=A.device)] * B[torch.as_tensor(bi, device=B.device)]).sum(1).double().cpu()
    F, G = A.shape[0], B.shape[0]
    b_of_a, a_of_b = np.full(F, -1, np.int64), np.full(G, -1, np.int64)
    cos_a, cos_b = np.full(F, np.nan), np.full(G, np.nan)
    b_of_a[ai], a_of_b[bi] = bi, ai
    cos_a[ai] = cos_b[bi] = cos.numpy()
    return Match(b_of_a, cos_a, a_of_b, cos_b, method)


def row_chunks(source, chunk_rows: int, rows: int | None = None) -> Iterator[torch.Tensor]:
    """Chunks of a source's rows: all of them in order, or `rows` evenly spaced ones (a store is often ordered by
    class, so its first rows would not stand for it)."""
    if rows is None or rows >= source.rows:
        for _, x_RD in sequential_chunks(source, chunk_rows):
            yield x_RD
        return
    idx = np.unique(np.linspace(0, source.rows - 1, rows).round().astype(np.int64))
    for r0 in range(0, len(idx), chunk_rows):
        yield source.get(torch.as_tensor(idx[r0 : r0 + chunk_rows]))


@torch.no_grad()
def matched_correlation(sae_a, sae_b, match: Match, source, *, rows: int | None = None, chunk_rows: int = 1024,
                        device: str | torch.device = "cpu") -> np.ndarray:
    """[F] Pearson correlation over the source's rows (all, or `rows` evenly spaced) of each A latent's codes
    with its matched B latent's, both in their SAE's inference mode; NaN for unmatched or constant latents."""
    a_ids = np.flatnonzero(match.b_of_a >= 0)
    ia = torch.as_tensor(a_ids, device=device)
    ib = torch.as_tensor(match.b_of_a[a_ids], device=device)
    sums = torch.zeros(5, len(a_ids), dtype=torch.float64, device=device)  # Σx Σy Σx² Σy² Σxy
    n = 0
    for x_RD in row_chunks(source, chunk_rows, rows):
        x_RD = x_RD.to(device)
        xa = sae_a.encode(x_RD)[:, ia].double()
        xb = sae_b.encode(x_RD)[:, ib].double()
        sums += torch.stack([xa.sum(0), xb.sum(0), (xa * xa).sum(0), (xb * xb).sum(0), (xa * xb).sum(0)])
        n += x_RD.shape[0]
    sx, sy, sxx, syy, sxy = sums.cpu().numpy()
    cov, vx, vy = n * sxy - sx * sy, n * sxx - sx * sx, n * syy - sy * sy
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where((vx > 0) & (vy > 0), cov / np.sqrt(np.maximum(vx, 0) * np.maximum(vy, 0)), np.nan)
    out = np.full(len(match.b_of_a), np.nan)
    out[a_ids] = np.clip(r, -1.0, 1.0)
    return out


def stable_per_latent(decoders: list, *, device: str | torch.device = "cpu", dense_max: int = DENSE_MAX,
                      top_m: int = TOP_M) -> list[np.ndarray]:
    """For SAEs trained with different seeds (their `W_dec` [F, D]): each latent's minimum, over the other seeds,
    of its matched decoder cosine (NaN where some seed leaves it unmatched). Each pair of seeds is matched once."""
    stable = [np.full(len(W), np.inf) for W in decoders]
    for a in range(len(decoders)):
        for b in range(a + 1, len(decoders)):
            m = match_latents(decoders[a], decoders[b], device=device, dense_max=dense_max, top_m=top_m)
            stable[a] = np.minimum(stable[a], m.cos_a)
            stable[b] = np.minimum(stable[b], m.cos_b)
    return [np.where(np.isinf(s), np.nan, s) for s in stable]


def stable_share(stable_F: np.ndarray, threshold: float = STABLE_COS) -> float:
    """Share of all latents (dead ones included) whose matched cosine reaches `threshold` in every other seed."""
    s = np.asarray(stable_F, np.float64)
    return float(np.mean(np.nan_to_num(s, nan=-np.inf) >= threshold)) if s.size else float("nan")
