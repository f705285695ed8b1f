"""Vision encoders behind one interface: preprocess, hook_points, capture, patch."""

from sae_vlm.backbones.hf import Backbone, load_backbone, load_image_processor, parse_hook_point

__all__ = ["Backbone", "load_backbone", "load_image_processor", "parse_hook_point"]
