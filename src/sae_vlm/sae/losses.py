"""Loss terms. Every one has the same signature: (x, x̂, encoder output, sae, idle-latent mask) -> scalar.

Which terms an architecture trains with, and their weights, is in its record (arch.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sae_vlm.sae import activations as act
from sae_vlm.sae import sparse
from sae_vlm.sae.sparse import SparseCodes

if TYPE_CHECKING:  # the model imports the architecture records, which import these losses
    from sae_vlm.sae.model import SAE, EncoderOutput


def mse(x_ND, x_hat_ND, enc: EncoderOutput, sae: SAE, idle_F=None) -> torch.Tensor:
    """Squared error summed over dimensions, averaged over the batch."""
    return (x_ND - x_hat_ND).pow(2).sum(-1).mean()


def matryoshka_mse(x_ND, x_hat_ND, enc: EncoderOutput, sae: SAE, idle_F=None) -> torch.Tensor:
    """Mean over groups g of (1/G)·mse(x, b_dec + codes of groups ≤ g): the paper's nested-prefix loss."""
    parts = sae.decode_groups(enc.codes)
    G = len(parts)
    x_hat = sae.b_dec.expand_as(x_ND)
    total = x_ND.new_zeros(())
    for part in parts:
        x_hat = x_hat + part
        total = total + (x_ND - x_hat).pow(2).sum(-1).mean() / G
    return total / G


def l1(x_ND, x_hat_ND, enc: EncoderOutput, sae: SAE, idle_F=None) -> torch.Tensor:
    """Σ|f_j|·‖W_dec,j‖ averaged over the batch (decoder rows are unit norm, so this is Σ|f_j|)."""
    norms_F, codes = sae.W_dec.norm(dim=1), enc.codes
    if isinstance(codes, SparseCodes):
        return (codes.values_M.abs() * norms_F[codes.cols_M]).sum() / codes.n_rows
    return (codes.abs() * norms_F).sum(-1).mean()


def l0_deviation(x_ND, x_hat_ND, enc: EncoderOutput, sae: SAE, idle_F=None, bandwidth: float = 1e-3):
    """JumpReLU sparsity: (L0 / k − 1)², with L0 differentiable in θ through the straight-through step."""
    if sae.cfg.k is None:
        raise ValueError("the L0 penalty needs k, the target L0")
    l0 = act.step(enc.h_NF, sae.threshold, bandwidth).sum(-1).mean()
    return (l0 / sae.cfg.k - 1).pow(2)


def aux_k(x_ND, x_hat_ND, enc: EncoderOutput, sae: SAE, idle_F=None) -> torch.Tensor:
    """AuxK (OpenAI normalisation): explain the detached residual with the top-k_aux idle latents, no b_dec."""
    if idle_F is None or not idle_F.any():
        return x_ND.new_zeros(())
    k_aux = min(sae.cfg.d_in // 2, int(idle_F.sum()))
    h_idle = torch.where(idle_F, enc.h_NF.detach(), -torch.inf)
    rows, cols = sparse.topk_indices(h_idle, k_aux)  # only idle latents can win: k_aux <= #idle
    codes = SparseCodes(sae.values_at(x_ND, enc.h_NF, rows, cols), rows, cols, x_ND.shape[0])
    e_ND = (x_ND - x_hat_ND).detach()
    e_hat_ND = sparse.decode(codes, sae.W_dec)
    num = (e_ND - e_hat_ND).pow(2).sum(-1).mean()
    den = (e_ND - e_ND.mean(0)).pow(2).sum(-1).mean()
    return torch.nan_to_num(num / den, nan=0.0)
