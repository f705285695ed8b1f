"""sae-vlm: sparse autoencoders for vision-language models."""

from sae_vlm.sae.model import SAE, SAEConfig

__version__ = "0.1.0"
__all__ = ["SAE", "SAEConfig"]
