"""One record per SAE architecture: everything the model, trainer, losses and steering need to know about it.

Adding an architecture is one `register(ArchSpec(...))`: a selection rule for training, an inference mode, loss
terms, and which shared mechanisms apply (θ tracking, a learned per-latent θ, the sparse fast path, Matryoshka
groups). Nothing outside this module compares architecture names.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from sae_vlm.names import add_arch_name
from sae_vlm.sae import losses

TRAIN_SELECTS = ("relu", "topk", "batchtopk", "jumprelu")
INFERENCE_MODES = ("relu", "topk", "threshold")


@dataclasses.dataclass(frozen=True)
class Term:
    """A loss term: `fn(x, x̂, enc, sae, idle_F, **options)`, scaled by the TrainConfig field `weight` (None: 1)."""

    fn: Callable
    weight: str | None = None
    options: tuple[tuple[str, str], ...] = ()  # (keyword of fn, TrainConfig field that supplies it)


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    name: str
    train_select: str  # selection rule in training: relu | topk (per row) | batchtopk | jumprelu (STE)
    inference: str  # default encode mode: relu | topk | threshold
    terms: dict[str, Term]  # by log name, in the order they are summed
    tracks_threshold: bool = False  # θ ← EMA of the smallest kept activation (a global scalar)
    learned_threshold: bool = False  # θ is a trained per-latent parameter, kept ≥ 0
    fast_path: bool = False  # sparse selection and decoder on TrainConfig.fast
    needs_k: bool = True  # k is part of the selection rule (JumpReLU: only its training target L0, optional)
    nested_groups: bool = False  # Matryoshka: latents in contiguous groups, each prefix trained to reconstruct

    def __post_init__(self):
        if self.train_select not in TRAIN_SELECTS or self.inference not in INFERENCE_MODES:
            raise ValueError(f"architecture {self.name!r}: train_select must be one of {TRAIN_SELECTS} and inference "
                             f"one of {INFERENCE_MODES}, got {self.train_select!r} and {self.inference!r}")
        if self.fast_path and self.train_select not in ("topk", "batchtopk"):
            raise ValueError(f"architecture {self.name!r}: the fast path needs a top-k selection, "
                             f"not {self.train_select!r}")

    @property
    def elementwise(self) -> bool:
        """Inference decides each latent on its own (a gate), so one latent's code needs only its own column."""
        return self.inference != "topk"


ARCHS: dict[str, ArchSpec] = {}


def register(spec: ArchSpec, *, replace: bool = False) -> ArchSpec:
    """Add an architecture. A name already taken is refused unless `replace`: SAEs saved under it would then load
    as the new record."""
    if spec.name in ARCHS and not replace:
        raise ValueError(f"architecture {spec.name!r} is already registered; pass replace=True to replace it")
    ARCHS[spec.name] = spec
    add_arch_name(spec.name)
    return spec


def arch_spec(name: str) -> ArchSpec:
    if name not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCHS)}")
    return ARCHS[name]


RECON = Term(losses.mse)
AUX = Term(losses.aux_k, weight="aux_alpha")

register(ArchSpec("relu", "relu", "relu", {"recon": RECON, "aux": AUX, "l1": Term(losses.l1, weight="l1_coeff")},
                  needs_k=False))
register(ArchSpec("topk", "topk", "topk", {"recon": RECON, "aux": AUX}, tracks_threshold=True, fast_path=True))
register(ArchSpec("batchtopk", "batchtopk", "threshold", {"recon": RECON, "aux": AUX}, tracks_threshold=True,
                  fast_path=True))
register(ArchSpec("matryoshka", "batchtopk", "threshold", {"recon": Term(losses.matryoshka_mse), "aux": AUX},
                  tracks_threshold=True, fast_path=True, nested_groups=True))
L0_PENALTY = Term(losses.l0_deviation, weight="l0_coeff", options=(("bandwidth", "jumprelu_bandwidth"),))
register(ArchSpec("jumprelu", "jumprelu", "threshold", {"recon": RECON, "aux": AUX, "l0_penalty": L0_PENALTY},
                  learned_threshold=True, needs_k=False))
