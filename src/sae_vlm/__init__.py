"""sae-vlm: sparse autoencoders for vision-language models.

The names below load on first use, so importing a light module (`sae_vlm.config`) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sae_vlm.backbones import load_backbone
    from sae_vlm.data.codes import CodeStore, write_codes
    from sae_vlm.data.store import open_store
    from sae_vlm.eval.maps import inspect_images as inspect
    from sae_vlm.eval.ms import monosemanticity_score
    from sae_vlm.sae.model import SAE, SAEConfig
    from sae_vlm.steer.intervene import intervene

__version__ = "0.1.0"
__all__ = ["SAE", "CodeStore", "SAEConfig", "inspect", "intervene", "load_backbone", "monosemanticity_score",
           "open_store", "write_codes"]
_HOMES = {"SAE": "sae_vlm.sae.model", "SAEConfig": "sae_vlm.sae.model", "CodeStore": "sae_vlm.data.codes",
          "write_codes": "sae_vlm.data.codes", "open_store": "sae_vlm.data.store", "load_backbone": "sae_vlm.backbones",
          "monosemanticity_score": "sae_vlm.eval.ms", "intervene": "sae_vlm.steer.intervene",
          "inspect": "sae_vlm.eval.maps"}
_RENAMED = {"inspect": "inspect_images"}  # the name at home, where it differs


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'sae_vlm' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), _RENAMED.get(name, name))


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
