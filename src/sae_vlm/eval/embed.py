"""Image embeddings for the MS similarity, computed once per dataset and cached.

Cache: `DIR/embeddings__<model slug>.npy` + `.json` ({model_id, rows, dim[, image_ids_sha256]}); reused only
when they match.
The cache logic takes a callable or an array, so it does not depend on any backbone; `backbone_embedder`
builds such a callable from a hub id / directory via the extraction code's loader ("last" hook point: CLIP
image_embeds, DINOv2 pooler output). `ClipEmbedder` holds a dual encoder's both towers, for what compares images
with text: latent names, text search and the steering score.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from sae_vlm.data.source import ActivationSource
from sae_vlm.io import atomic_save_npy, atomic_write_json


def _slug(model_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(model_id)).strip("_")[-80:] or "model"


def cache_paths(cache_dir: str | Path, model_id: str) -> tuple[Path, Path]:
    base = Path(cache_dir) / f"embeddings__{_slug(model_id)}"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def cached_embeddings(
    cache_dir: str | Path, model_id: str, rows: int, compute: Callable[[], np.ndarray] | np.ndarray,
    image_ids: Sequence[str] | None = None,
) -> np.ndarray:
    """Embeddings [rows, D] for `model_id`: from the cache if it matches, else `compute()` and store them.
    With `image_ids`, the cache also records their sha256 and is reused only for the same images."""
    npy, meta = cache_paths(cache_dir, model_id)
    ids_sha = None
    if image_ids is not None:
        joined = "\n".join(str(i) for i in image_ids).encode("utf-8", "surrogateescape")
        ids_sha = hashlib.sha256(joined).hexdigest()
    if npy.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        want = {"model_id": str(model_id), "rows": rows, "image_ids_sha256": ids_sha}
        if all(info.get(k) == v for k, v in want.items()):
            return np.load(npy, mmap_mode="r")
    emb = np.asarray(compute() if callable(compute) else compute, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != rows:
        raise ValueError(f"embedder {model_id} gave embeddings of shape {emb.shape} but the dataset has {rows} rows")
    atomic_save_npy(npy, emb)
    info = {"model_id": str(model_id), "rows": rows, "dim": int(emb.shape[1])}
    if ids_sha is not None:
        info["image_ids_sha256"] = ids_sha
    atomic_write_json(meta, info)
    return emb


def backbone_embedder(model_id: str, paths: Sequence[str], *, device: str | torch.device = "cpu",
                      batch_size: int = 64, quiet: bool = True) -> Callable[[], np.ndarray]:
    """A callable that embeds the images at `paths` with the backbone's "last" hook point.

    Only image files can be embedded: a store of tar members or dataset rows raises ValueError at once."""
    from sae_vlm.data.images import is_store_member

    if any(is_store_member(p) for p in paths):
        raise ValueError("--embedder needs a folder or path-list store; pass --embeddings")

    def compute() -> np.ndarray:
        from tqdm.auto import tqdm

        from sae_vlm.backbones import load_backbone
        from sae_vlm.data.images import open_image

        bb = load_backbone(model_id, device=device)
        out = []
        for b0 in tqdm(range(0, len(paths), batch_size), desc="embeddings", disable=quiet, leave=False):
            imgs = [open_image(p) for p in paths[b0 : b0 + batch_size]]
            with torch.no_grad():
                out.append(bb.capture(bb.preprocess(imgs), ["last"])["last"].float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)

    return compute


def load_embeddings(src: ActivationSource, rows: int, cache_dir: str | Path, embeddings=None, embedder=None,
                    device: str | torch.device = "cpu", quiet: bool = True):
    """Precomputed embeddings (checked against the store's image ids when a sidecar json lists them), or
    embeddings of the store's images computed once with `embedder` and cached in `cache_dir` (keyed by the
    model and the store's image ids). None when neither is given."""
    store = src.meta
    ids = [str(i) for i in store.image_ids()] if store is not None else None
    if embeddings is not None:
        path = Path(embeddings)
        if not path.is_file():
            raise FileNotFoundError(f"embeddings file {path} does not exist")
        try:
            emb = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"embeddings file {path} is not a readable .npy array ({why})") from None
        if emb.ndim != 2 or emb.shape[0] != rows:
            raise ValueError(f"embeddings {path} have shape {emb.shape} but the activations have {rows} rows")
        bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
        if len(bad):  # a NaN row would silently poison the similarity of every latent that fires on it
            raise ValueError(f"embeddings {path} hold NaN or inf in {len(bad)} rows (first: row {bad[0]}); "
                             "fix or drop those rows")
        side = path.with_suffix(".json")
        if ids is not None and side.is_file():
            their = json.loads(side.read_text()).get("image_ids")
            if their is not None and [str(i) for i in their] != ids:
                bad = next((i for i, (a, b) in enumerate(zip(their, ids)) if str(a) != b), min(len(their), len(ids)))
                theirs = their[bad] if bad < len(their) else "<end>"
                ours = ids[bad] if bad < len(ids) else "<end>"
                raise ValueError(f"image ids differ at row {bad}: embeddings {side} list {theirs}, "
                                 f"the store has {ours}")
        return emb, str(path)
    if embedder is not None:
        if store is None:
            raise ValueError(f"--embedder {embedder} needs a store with image paths; this source has none "
                             "(pass --embeddings)")
        paths = store.paths()
        compute = backbone_embedder(embedder, paths, device=device, quiet=quiet)
        return cached_embeddings(cache_dir, embedder, rows, compute, image_ids=ids), str(embedder)
    return None, None


def check_text_tower(model_id_or_dir: str, flag: str = "--embedder") -> None:
    """Refuse, before any weight loads, a model without both a text and an image tower (DINOv2, CLIPVisionModel)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    if str(model_id_or_dir).startswith((".", "/", "~")) and not Path(model_id_or_dir).expanduser().is_dir():
        raise FileNotFoundError(f"{flag} {model_id_or_dir}: model directory does not exist")
    try:
        cfg = AutoConfig.from_pretrained(model_id_or_dir)
    except (OSError, ValueError) as e:
        raise OSError(f"{flag} {model_id_or_dir}: not a model id or directory ({str(e).splitlines()[0]})") from None
    cls = MODEL_MAPPING[type(cfg)] if type(cfg) in MODEL_MAPPING else None
    if not (hasattr(cls, "get_text_features") and hasattr(cls, "get_image_features")):
        raise ValueError(f"{flag} {model_id_or_dir} is a {cfg.model_type} model without a text tower; expected a "
                         "CLIP-style model with image and text towers (e.g. openai/clip-vit-base-patch32)")


class ClipEmbedder:
    """A CLIP-style model's image tower (concepts) and text tower (words), in one joint space."""

    def __init__(self, model, processor, batch_size: int = 64):
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size

    @classmethod
    def load(cls, model_id_or_dir: str, device: str = "cpu", batch_size: int = 64) -> "ClipEmbedder":
        from transformers import AutoModel

        from sae_vlm.backbones import load_processor, quiet_loading

        with quiet_loading():  # as every other model load: no load report or weight bar among our own lines
            model = cast(torch.nn.Module, AutoModel.from_pretrained(model_id_or_dir)).to(device)
        return cls(model, load_processor(model_id_or_dir), batch_size)

    def _dev(self):
        return next(self.model.parameters()).device

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 5 returns an output object

    @torch.no_grad()
    def images(self, images: Sequence) -> np.ndarray:
        out = []
        for b0 in range(0, len(images), self.batch_size):
            px = self.processor.image_processor(images=list(images[b0 : b0 + self.batch_size]), return_tensors="pt")
            pv = px["pixel_values"].to(self._dev(), next(self.model.parameters()).dtype)
            out.append(self._tensor(self.model.get_image_features(pixel_values=pv)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        tok = self.processor.tokenizer
        n_pos = getattr(self.model.config.text_config, "max_position_embeddings", 77)
        for b0 in range(0, len(texts), self.batch_size):
            enc = tok(list(texts[b0 : b0 + self.batch_size]), padding=True, truncation=True, max_length=n_pos,
                      return_tensors="pt")
            enc = {k: v.to(self._dev()) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out.append(self._tensor(self.model.get_text_features(**enc)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.model.config.projection_dim), np.float32)
