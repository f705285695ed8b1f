"""Steering: edit SAE latents inside a backbone (intervene), steered LLaVA generation, the steering score."""

from sae_vlm.data.images import white_image
from sae_vlm.steer.edits import OPS, apply_edits, check_edits
from sae_vlm.steer.generate import Case, generate_cases, grid_cases, load_llava
from sae_vlm.steer.intervene import intervene, make_edit_fn
from sae_vlm.steer.score import ClipEmbedder, steering_score

__all__ = ["OPS", "Case", "ClipEmbedder", "apply_edits", "check_edits", "generate_cases", "grid_cases", "intervene",
           "load_llava", "make_edit_fn", "steering_score", "white_image"]
