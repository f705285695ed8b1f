"""Sparse autoencoders: one model for every architecture (`model.py`, records in `arch.py`), the trainer, and the
readers of other libraries' SAEs (`formats/`, imported here so that `SAE.from_pretrained` reads them)."""

from sae_vlm.sae import formats  # noqa: F401  (registers its loader with SAE.from_pretrained)
from sae_vlm.sae.arch import ARCHS, ArchSpec, Term, arch_spec, register
from sae_vlm.sae.model import SAE, SAEConfig

__all__ = ["ARCHS", "ArchSpec", "SAE", "SAEConfig", "Term", "arch_spec", "register"]
