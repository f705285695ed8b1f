"""Latent selection rules. Each maps post-ReLU pre-activations h [N, F] to sparse codes [N, F]."""

from __future__ import annotations

import torch


def topk(h_NF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row."""
    vals, idx = h_NF.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h_NF).scatter_(-1, idx, vals)


def batch_topk(h_NF: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k·N largest entries of the whole batch: rows average k active latents, each its own count."""
    flat = h_NF.flatten()
    vals, idx = flat.topk(k * h_NF.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(h_NF)


def threshold(h_NF: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """JumpReLU-style gate h·1[h > θ]; θ is a scalar or one value per latent."""
    return h_NF * (h_NF > theta)


class _JumpReLU(torch.autograd.Function):
    """h·1[h > θ] with a straight-through (rectangle-kernel) gradient for θ, as in JumpReLU SAEs."""

    @staticmethod
    def forward(ctx, h_NF, theta_F, bandwidth: float):
        ctx.save_for_backward(h_NF, theta_F)
        ctx.bandwidth = bandwidth
        return h_NF * (h_NF > theta_F)

    @staticmethod
    def backward(ctx, grad_NF):
        h_NF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_h = grad_NF * (h_NF > theta_F)
        near = ((h_NF - theta_F).abs() < eps / 2).to(grad_NF.dtype)
        grad_theta = (-(theta_F / eps) * near * grad_NF).sum(0)
        return grad_h, grad_theta, None


class _Step(torch.autograd.Function):
    """1[h > θ] with the straight-through gradient −(1/ε)·K((h−θ)/ε) for θ; used by the L0 penalty."""

    @staticmethod
    def forward(ctx, h_NF, theta_F, bandwidth: float):
        ctx.save_for_backward(h_NF, theta_F)
        ctx.bandwidth = bandwidth
        return (h_NF > theta_F).to(h_NF.dtype)

    @staticmethod
    def backward(ctx, grad_NF):
        h_NF, theta_F = ctx.saved_tensors
        eps = ctx.bandwidth
        near = ((h_NF - theta_F).abs() < eps / 2).to(grad_NF.dtype)
        return torch.zeros_like(h_NF), (-(1.0 / eps) * near * grad_NF).sum(0), None


def check_bandwidth(bandwidth: float) -> None:
    """The straight-through gradients divide by the bandwidth: it must be a positive, finite width."""
    if not 0 < bandwidth < float("inf"):
        raise ValueError(f"jumprelu_bandwidth={bandwidth}: expected a positive width (the straight-through "
                         "gradient divides by it)")


def jumprelu(h_NF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    check_bandwidth(bandwidth)
    return _JumpReLU.apply(h_NF, theta_F, bandwidth)


def step(h_NF: torch.Tensor, theta_F: torch.Tensor, bandwidth: float) -> torch.Tensor:
    check_bandwidth(bandwidth)
    return _Step.apply(h_NF, theta_F, bandwidth)
