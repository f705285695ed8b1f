"""Tiny models and generated images shared by the test_extract_* files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def tiny_clip_config(**kw):
    from transformers import CLIPVisionConfig

    args = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                patch_size=8, projection_dim=16)
    args.update(kw)
    return CLIPVisionConfig(**args)


def tiny_clip_processor():
    try:  # transformers 5: name the PIL backend (torchvision is optional)
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:
        from transformers import CLIPImageProcessor as Proc

    return Proc(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def save_tiny_clip(path: Path, with_projection: bool = True) -> Path:
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    cls(tiny_clip_config()).save_pretrained(path)
    tiny_clip_processor().save_pretrained(path)
    return path


def make_images(root: Path, n_per_class: int, classes=("00000_Animalia_Chordata", "00001_Plantae/sub"), size=(40, 48),
                seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    out = []
    for c in classes:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            p = d / f"img_{i:04d}.png"
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(p)
            out.append(p)
    return out
