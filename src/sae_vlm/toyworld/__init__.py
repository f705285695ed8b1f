"""The toy world: generated images with known concepts, and the tiny CLIP and toy LLaVA trained on them.

    from sae_vlm import toyworld
    samples = toyworld.generate(100, seed=0)           # images + captions + labels + concept vectors
    toyworld.write_folder(samples, "toy_images")       # ImageFolder tree named by taxonomy label
    CLIPModel.from_pretrained(toyworld.clip_path())    # shipped weights, 1.5 MB (float32)
    LlavaForConditionalGeneration.from_pretrained(toyworld.llava_path(), dtype=torch.float32)  # stored float16
"""

from __future__ import annotations

from pathlib import Path

from sae_vlm.toyworld.world import (
    CONCEPTS,
    PROMPT_TEMPLATE,
    QUESTIONS,
    Sample,
    folder_boxes,
    folder_concepts,
    generate,
    parse_taxonomy,
    read_manifest,
    sample,
    write_folder,
)

WEIGHTS = Path(__file__).resolve().parent / "weights"


def _weights(name: str) -> Path:
    path = WEIGHTS / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"toy {name} weights are missing at {path}; train them with "
                                f"sae-vlm toy-train-{name}")
    return path


def clip_path() -> Path:
    """Directory of the shipped tiny CLIP (CLIPModel + CLIPProcessor)."""
    return _weights("clip")


def llava_path() -> Path:
    """Directory of the shipped toy LLaVA (LlavaForConditionalGeneration + LlavaProcessor)."""
    return _weights("llava")


__all__ = ["CONCEPTS", "PROMPT_TEMPLATE", "QUESTIONS", "Sample", "clip_path", "folder_boxes", "folder_concepts",
           "generate", "llava_path", "parse_taxonomy", "read_manifest", "sample", "write_folder"]
