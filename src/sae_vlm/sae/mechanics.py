"""Mechanisms every architecture shares, written once: decoder norm, idle latents (AuxK), θ, init, LR schedule."""

from __future__ import annotations

import math

import torch

from sae_vlm.sae.sparse import SparseCodes


@torch.no_grad()
def remove_parallel_grads_(W_dec_FD: torch.nn.Parameter) -> None:
    """Drop the gradient component along each (unit) decoder row, so a step can't change its norm to first order."""
    if W_dec_FD.grad is None:
        return
    # g − (g·ŵ)ŵ = g − ((g·w)/‖w‖²)·w, in two reductions and one fused in-place update
    dots_F = row_dots(W_dec_FD.grad, W_dec_FD)
    norms_sq_F = torch.linalg.vector_norm(W_dec_FD, dim=1).square().clamp_min(1e-24)
    W_dec_FD.grad.addcmul_(W_dec_FD, (-dots_F / norms_sq_F)[:, None])


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float | None) -> None:
    """torch's clip_grad_norm_, except that on the CPU a step already within the bound skips the rescale (a pass
    over every gradient, by a factor of 1). A GPU would have to wait for the norm to know, so it always rescales.
    None or 0: no clipping. A negative bound would flip every gradient (ascent): refused."""
    if max_norm is None or max_norm == 0:
        return
    if not max_norm > 0:
        raise ValueError(f"grad_clip={max_norm}: expected a positive gradient-norm bound, or 0 for none")
    total = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if total.device.type == "cpu" and float(total) + 1e-6 <= max_norm:  # torch's factor: max / (total + 1e-6) ≥ 1
        return
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)


def row_dots(a_FD: torch.Tensor, b_FD: torch.Tensor, block_bytes: int = 1 << 20) -> torch.Tensor:
    """Σ_d a·b per row. On the CPU in blocks of rows that stay in cache: there an einsum becomes F tiny matrix
    products, 3x slower; on a GPU one einsum."""
    if a_FD.device.type != "cpu":
        return torch.einsum("fd,fd->f", a_FD, b_FD)
    rows = max(1, block_bytes // (a_FD.shape[1] * a_FD.element_size()))
    return torch.cat([(a * b).sum(1) for a, b in zip(a_FD.split(rows), b_FD.split(rows))])


@torch.no_grad()
def normalize_decoder_(W_dec_FD: torch.nn.Parameter, eps: float = 1e-8) -> None:
    W_dec_FD.div_(W_dec_FD.norm(dim=1, keepdim=True) + eps)


def fired_latents(codes, d_sae: int) -> tuple[torch.Tensor, int]:
    """(which latents fired in the batch [F] bool, the batch's row count); `codes` dense [N, F] or SparseCodes."""
    if isinstance(codes, SparseCodes):
        fired_F = torch.zeros(d_sae, dtype=torch.bool, device=codes.cols_M.device)
        fired_F[codes.cols_M[codes.values_M > 0]] = True
        return fired_F, codes.n_rows
    return (codes > 0).any(dim=0), codes.shape[0]


class IdleLatents:
    """Counts, per latent, the training samples seen since it last fired; idle once that reaches `window`.

    The paper calls these latents dead; here 'dead' is kept for latents that never fire on the evaluation set."""

    def __init__(self, d_sae: int, window: int, device):
        self.window = window
        self.since_fired_F = torch.zeros(d_sae, dtype=torch.long, device=device)

    def update(self, codes, sync=None) -> None:
        """`sync(fired_F, n)` widens the batch to all ranks' shards (data-parallel training)."""
        fired_F, n = fired_latents(codes, len(self.since_fired_F))
        if sync is not None:
            fired_F, n = sync(fired_F, n)
        self.since_fired_F += n
        self.since_fired_F[fired_F] = 0

    def mask(self) -> torch.Tensor:
        return self.since_fired_F >= self.window


@torch.no_grad()
def update_threshold_(theta: torch.Tensor, codes, beta: float = 0.999, sync=None) -> None:
    """θ ← β·θ + (1−β)·(smallest positive kept activation); the first update sets θ directly (θ < 0 = unset).

    `sync` takes the batch minimum to the minimum over all ranks (data-parallel training). β outside [0, 1) would
    extrapolate instead of average, and θ would diverge.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"threshold_beta={beta}: expected 0 <= β < 1 (an average of θ and the batch's value)")
    values = codes.values_M if isinstance(codes, SparseCodes) else codes
    kept = values[values > 0].to(theta.dtype)
    smallest = kept.min() if kept.numel() else torch.full((), torch.inf, dtype=theta.dtype, device=theta.device)
    if sync is not None:
        smallest = sync(smallest)
    smallest = torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest)  # nothing kept: pull to 0
    theta.copy_(torch.where(theta < 0, smallest, beta * theta + (1 - beta) * smallest))


@torch.no_grad()
def geometric_median(x_ND: torch.Tensor, max_iter: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld iteration, started from the mean; stops when the point moves less than `tol`."""
    x = x_ND.double()
    y = x.mean(0)
    for _ in range(max_iter):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-12)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_next - y).norm()
        y = y_next
        if moved < tol:
            break
    return y.to(x_ND.dtype)


def default_lr(d_sae: int) -> float:
    """2e-4 / sqrt(F / 2^14): the paper's trainer default, used because no script sets an LR."""
    return 2e-4 / math.sqrt(d_sae / 2**14)


def lr_factor(step: int, warmup_steps: int, total_steps: int, decay_start: int | None) -> float:
    """Linear warmup from 0, constant, then optional linear decay to 0 from `decay_start`."""
    if warmup_steps > 0 and step < warmup_steps:
        return step / warmup_steps
    if decay_start is not None and step >= decay_start:
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return 1.0
