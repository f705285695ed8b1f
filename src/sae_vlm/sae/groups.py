"""Matryoshka groups: contiguous latent ranges, level 0 first. Every module that needs their bounds asks here."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def group_sizes_from_fractions(fractions, d_sae: int) -> tuple[int, ...]:
    """int(f·F) for every group but the last, which takes the remainder (as the paper's trainer does)."""
    fractions = [float(f) for f in fractions]
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"group fractions {fractions} must be positive and sum to 1 "
                         f"(they sum to {sum(fractions):.6g})")
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    sizes.append(d_sae - sum(sizes))
    if min(sizes) <= 0:
        raise ValueError(f"group fractions {fractions} give an empty group at d_sae={d_sae}: sizes {sizes}")
    return tuple(sizes)


def group_bounds(group_sizes: Sequence[int]) -> list[int]:
    """[0, end of group 0, end of group 1, ..., d_sae]."""
    return [0, *np.cumsum([int(g) for g in group_sizes]).tolist()]


def level_slices(group_sizes: Sequence[int] | None, d_sae: int) -> list[slice]:
    """Latent ranges of the levels; one level for an SAE without groups."""
    if not group_sizes:
        return [slice(0, d_sae)]
    if sum(group_sizes) != d_sae:
        raise ValueError(f"group sizes {tuple(group_sizes)} sum to {sum(group_sizes)}, expected d_sae={d_sae}")
    bounds = group_bounds(group_sizes)
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def latent_levels(group_sizes: Sequence[int] | None, d_sae: int) -> np.ndarray:
    """The level of each latent [d_sae] (int64); all 0 without groups."""
    out = np.zeros(d_sae, np.int64)
    for lvl, sl in enumerate(level_slices(group_sizes, d_sae)):
        out[sl] = lvl
    return out
