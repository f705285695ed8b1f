"""The fast training path for top-k style SAEs: exact selection without sorting B×F values, a sparse
decoder, and an encoder backward that touches only the selected entries.

Codes are kept as (values, rows, cols) sorted by row, so `embedding_bag` can decode them: B·k·d work
instead of B·F·d. The dense path in model.py computes the same function; tests compare the two.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_vlm.sae.groups import group_bounds


class SparseCodes(NamedTuple):
    values_M: torch.Tensor  # code values of the M selected entries
    rows_M: torch.Tensor  # int64, sorted ascending
    cols_M: torch.Tensor  # int64 latent ids
    n_rows: int

    def dense(self, d_sae: int) -> torch.Tensor:
        out = self.values_M.new_zeros(self.n_rows, d_sae)
        out[self.rows_M, self.cols_M] = self.values_M
        return out


def _from_flat(flat_idx: torch.Tensor, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat_idx = flat_idx.sort().values
    return flat_idx // d_sae, flat_idx % d_sae


@torch.no_grad()
def topk_indices(h_NF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of each row's k largest entries, row-sorted."""
    n, f = h_NF.shape
    cols = h_NF.topk(k, dim=1, sorted=False).indices
    rows = torch.arange(n, device=h_NF.device).repeat_interleave(k)
    return _from_flat(rows * f + cols.flatten(), f)


@torch.no_grad()
def batch_topk_indices(h_NF: torch.Tensor, k: int, m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of the k·N largest entries of the batch, exactly, without a top-k over all N·F values.

    Take each row's top-m candidates and the global top-k·N among them, with threshold t (the smallest
    kept candidate). An entry left out of the candidates is ≤ its row's m-th candidate; if that m-th value
    is < t in every row, no left-out entry could have been kept, so the result is exact. Otherwise (some
    row holds more than m of the winners, or ties at t) fall back to the full top-k.
    """
    n, f = h_NF.shape
    m = min(f, m or 4 * k)
    total = k * n
    if m == f:
        return _from_flat(h_NF.flatten().topk(total, sorted=False).indices, f)
    cand_vals, cand_cols = h_NF.topk(m, dim=1, sorted=True)
    vals, pos = cand_vals.flatten().topk(total, sorted=False)
    t = vals.min()
    if bool((cand_vals[:, -1] >= t).any()):
        return _from_flat(h_NF.flatten().topk(total, sorted=False).indices, f)
    rows = pos // m
    return _from_flat(rows * f + cand_cols.flatten()[pos], f)


def latent_side_sum(rows_M, cols_M, weights_M, A_ND: torch.Tensor, d_sae: int) -> torch.Tensor:
    """Gᵀ·A for the sparse [N, F] matrix G of the entries: row c sums weight·A[row] over the entries at latent c.

    An embedding_bag with one bag per latent, so no dense [N, F] tensor and no zero-filled accumulator.
    """
    order = torch.argsort(cols_M, stable=True)
    counts = torch.bincount(cols_M, minlength=d_sae)
    return F.embedding_bag(rows_M[order], A_ND, torch.cumsum(counts, 0) - counts, mode="sum",
                           per_sample_weights=weights_M[order].to(A_ND.dtype))


class _SelectedPreActs(torch.autograd.Function):
    """relu(pre) at the selected entries, with gradients for W_enc, b_enc and b_dec touching only them."""

    @staticmethod
    def forward(ctx, values_M, x_ND, W_enc_FD, b_enc_F, b_dec_D, rows_M, cols_M):
        ctx.save_for_backward(x_ND, W_enc_FD, b_dec_D, rows_M, cols_M, values_M > 0)
        return values_M.clone()

    @staticmethod
    def backward(ctx, g_M):
        x_ND, W_enc_FD, b_dec_D, rows_M, cols_M, alive_M = ctx.saved_tensors
        g_M = (g_M * alive_M).to(W_enc_FD.dtype)  # relu: no gradient where the pre-activation was ≤ 0
        d_sae = W_enc_FD.shape[0]
        # ∂L/∂W_enc = (x − b_dec)ᵀ·G with G the sparse [N, F] code gradient: one sparse product, latent-major.
        grad_W_FD = latent_side_sum(rows_M, cols_M, g_M, x_ND - b_dec_D, d_sae)
        grad_b_enc_F = torch.zeros(d_sae, dtype=g_M.dtype, device=g_M.device).index_add_(0, cols_M, g_M)
        grad_b_dec_D = -(grad_b_enc_F @ W_enc_FD)
        return None, None, grad_W_FD, grad_b_enc_F, grad_b_dec_D, None, None


def selected_values(sae, x_ND: torch.Tensor, h_NF: torch.Tensor, rows_M, cols_M) -> torch.Tensor:
    """Code values at (rows, cols): taken from the already computed h, differentiable through the SAE."""
    values_M = h_NF[rows_M, cols_M]
    return _SelectedPreActs.apply(values_M, x_ND, sae.W_enc_FD, sae.b_enc, sae.b_dec, rows_M, cols_M)


def _offsets(rows_M: torch.Tensor, n_rows: int) -> torch.Tensor:
    counts = torch.bincount(rows_M, minlength=n_rows)
    return torch.cumsum(counts, 0) - counts


class _Decode(torch.autograd.Function):
    """Σ value·W_dec[col] per row. Backward: value grads by a sampled product (SDDMM), W_dec's by Gᵀ·grad."""

    @staticmethod
    def forward(ctx, values_M, W_dec_FD, rows_M, cols_M, n_rows: int):
        ctx.save_for_backward(values_M, W_dec_FD, rows_M, cols_M)
        ctx.n_rows = n_rows
        return F.embedding_bag(cols_M, W_dec_FD, _offsets(rows_M, n_rows), mode="sum", per_sample_weights=values_M)

    @staticmethod
    def backward(ctx, g_ND):
        values_M, W_dec_FD, rows_M, cols_M = ctx.saved_tensors
        n, d_sae = ctx.n_rows, W_dec_FD.shape[0]
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            crow = torch.zeros(n + 1, dtype=torch.long, device=rows_M.device)
            crow[1:] = torch.bincount(rows_M, minlength=n).cumsum(0)
            # entries are sorted by row, then column (see _from_flat), as a CSR pattern needs
            with warnings.catch_warnings():  # "CSR support is in beta": only here, not process-wide
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                pattern = torch.sparse_csr_tensor(crow, cols_M, torch.zeros_like(values_M), (n, d_sae),
                                                  check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, g_ND.contiguous(), W_dec_FD.T, beta=0).values()
        if ctx.needs_input_grad[1]:
            grad_W = latent_side_sum(rows_M, cols_M, values_M, g_ND.contiguous(), d_sae)
        return grad_values, grad_W, None, None, None


def decode(codes: SparseCodes, W_dec_FD: torch.Tensor, weights_M: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_entries value·W_dec[col] per row (no bias); `weights_M` replaces the values (e.g. masked per group)."""
    w = codes.values_M if weights_M is None else weights_M
    return _Decode.apply(w.to(W_dec_FD.dtype), W_dec_FD, codes.rows_M, codes.cols_M, codes.n_rows)


def decode_groups(codes: SparseCodes, W_dec_FD: torch.Tensor, group_sizes) -> list[torch.Tensor]:
    """Each contiguous latent group's decode, in one pass: entries of group g go to output row g·N + row."""
    ends = torch.tensor(group_bounds(group_sizes)[1:], device=codes.cols_M.device)
    group_M = torch.bucketize(codes.cols_M, ends, right=True)
    key_M = (group_M * codes.n_rows + codes.rows_M) * W_dec_FD.shape[0] + codes.cols_M
    order = key_M.argsort()
    stacked = SparseCodes(codes.values_M[order], (group_M * codes.n_rows + codes.rows_M)[order], codes.cols_M[order],
                          len(group_sizes) * codes.n_rows)
    return list(decode(stacked, W_dec_FD).view(len(group_sizes), codes.n_rows, -1).unbind(0))
