"""Vision encoders behind one interface (base.py): preprocess, hook points, module, width, capture, patch.

One adapter per family registers itself on import; adding a family is one more module listed here.
"""

from sae_vlm.backbones import clip, dinov2, llava, siglip  # noqa: F401  (each registers its family)
from sae_vlm.backbones.base import FAMILIES, Backbone, Family, Parts, family_of, parse_hook_point, register
from sae_vlm.backbones.load import load_backbone, load_image_processor, load_processor, quiet_loading

__all__ = ["FAMILIES", "Backbone", "Family", "Parts", "family_of", "load_backbone", "load_image_processor",
           "load_processor", "parse_hook_point", "quiet_loading", "register"]
