"""Loading a backbone from a hub id or a local directory with transformers' `from_pretrained`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from sae_vlm.backbones.base import Backbone, family_of
from sae_vlm.device import resolve_dtype


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' load report and weight progress bar, silenced for one load."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:  # not back on under --quiet
            hf_logging.enable_progress_bar()


def pil_backend() -> dict:
    """Keyword arguments that make transformers pick its PIL image processors (torchvision is optional)."""
    import transformers

    return {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}


def load_image_processor(model_id_or_dir: str, revision: str | None = None):
    """The model's own image processor, PIL backend; None when the checkpoint has none."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_id_or_dir, revision=revision, **pil_backend())
    except (OSError, ValueError):
        return None


def load_processor(model_id_or_dir: str):
    """The checkpoint's AutoProcessor (tokenizer + image processor), with the PIL image backend where supported."""
    import transformers
    from transformers import AutoProcessor

    kw = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    try:
        return AutoProcessor.from_pretrained(model_id_or_dir, **kw)
    except (TypeError, ValueError):
        return AutoProcessor.from_pretrained(model_id_or_dir)


def load_backbone(model_id_or_dir: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                  revision: str | None = None) -> Backbone:
    """Load a hub id or local directory with `from_pretrained`, the class chosen by the config's family."""
    from transformers import AutoConfig

    torch_dtype = resolve_dtype(dtype, device)  # validated before anything is loaded
    if str(model_id_or_dir).startswith((".", "/", "~")) and not Path(model_id_or_dir).expanduser().is_dir():
        raise FileNotFoundError(f"model directory {model_id_or_dir} does not exist; expected a hub id or a directory")
    cfg = AutoConfig.from_pretrained(model_id_or_dir, revision=revision)
    cls = family_of(cfg.model_type, str(model_id_or_dir)).hf_class(cfg)
    with quiet_loading():  # a full CLIP checkpoint loaded as its vision side lists every text weight as unused
        model = cls.from_pretrained(model_id_or_dir, revision=revision, dtype=torch_dtype)
    model.to(device)
    local = Path(model_id_or_dir).exists()
    rev = getattr(model.config, "_commit_hash", None) or ("local" if local else (revision or "unknown"))
    return Backbone(model, load_image_processor(model_id_or_dir, revision), model_id=str(model_id_or_dir), revision=rev)
