"""Latent edits: {latent id: (op, value)} checked once, then applied to SAE codes.

ops: clamp (set to α), add (+α), scale (×α), zero (set to 0; value ignored).
An item's edits may be None ("leave this item untouched, even in replace mode") or a dict (possibly empty).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from sae_vlm.config import EDIT_OPS

OPS = EDIT_OPS  # clamp, add, scale, zero


def check_edits(edits: Mapping | None, d_sae: int) -> dict[int, tuple[str, float]] | None:
    """Validated copy {latent: (op, value)}; ("zero",), "zero" and ("zero", None) are all accepted."""
    if edits is None:
        return None
    if not isinstance(edits, Mapping):
        raise ValueError(f"edits must be a dict {{latent: (op, value)}} or None, got {type(edits).__name__}")
    out: dict[int, tuple[str, float]] = {}
    for latent, spec in edits.items():
        if isinstance(latent, bool) or not isinstance(latent, int) and not (hasattr(latent, "__index__")):
            raise ValueError(f"latent id {latent!r} is not an integer; expected 0 <= id < {d_sae}")
        j = int(latent)
        if not 0 <= j < d_sae:
            raise ValueError(f"latent id {j} is out of range; the SAE has latents 0..{d_sae - 1}")
        if isinstance(spec, str):
            spec = (spec,)
        if not isinstance(spec, Sequence) or not 1 <= len(spec) <= 2:
            raise ValueError(f"edit for latent {j} is {spec!r}; expected (op, value) with op in {OPS}")
        op = spec[0]
        if op not in OPS:
            raise ValueError(f"unknown edit op {op!r} for latent {j}; expected one of {', '.join(OPS)}")
        if op == "zero":
            out[j] = ("zero", 0.0)
            continue
        if len(spec) != 2 or spec[1] is None:
            raise ValueError(f"edit op {op!r} for latent {j} needs a value, got {spec!r}")
        try:
            v = float(spec[1])
        except (TypeError, ValueError):
            raise ValueError(f"edit value {spec[1]!r} for latent {j} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"edit value {v} for latent {j} is not finite")
        out[j] = (op, v)
    return out


def check_batch_edits(edits, d_sae: int):
    """A dict (same edits for every item) or a list with one entry (dict or None) per batch item."""
    if edits is None or isinstance(edits, Mapping):
        return check_edits(edits, d_sae)
    if isinstance(edits, Sequence) and not isinstance(edits, str):
        return [check_edits(e, d_sae) for e in edits]
    raise ValueError(f"edits must be a dict, None or a list of them (one per batch item), got {type(edits).__name__}")


def apply_edits(codes_TF: torch.Tensor, edits: Mapping[int, tuple[str, float]],
                col_of: Mapping[int, int] | None = None) -> torch.Tensor:
    """A copy of `codes_TF` ([..., F]) with every edit applied; `col_of` maps latent ids to columns of a subset."""
    out = codes_TF.clone()
    for j, (op, v) in edits.items():
        c = j if col_of is None else col_of[j]
        if op == "clamp":
            out[..., c] = v
        elif op == "add":
            out[..., c] += v
        elif op == "scale":
            out[..., c] *= v
        else:
            out[..., c] = 0.0
    return out
