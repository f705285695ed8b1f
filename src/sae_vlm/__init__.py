"""sae-vlm: sparse autoencoders for vision-language models."""

from sae_vlm.eval.ms import monosemanticity_score
from sae_vlm.sae.model import SAE, SAEConfig
from sae_vlm.steer.intervene import intervene

__version__ = "0.1.0"
__all__ = ["SAE", "SAEConfig", "intervene", "monosemanticity_score"]
