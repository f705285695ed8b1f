"""The paper's steering-score protocol end to end (`sae-vlm steer-score`): which images and latents, the latents' top
images, their concept embeddings, the score and its bounds. The parts are in score.py."""

from __future__ import annotations

from collections import abc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_vlm.config import SteerScoreConfig
from sae_vlm.data.images import white_image
from sae_vlm.eval.classes import class_names
from sae_vlm.io import atomic_write_json
from sae_vlm.outdir import check_result_file
from sae_vlm.steer.generate import load_steering
from sae_vlm.steer.score import (
    ClipEmbedder,
    alive_latents,
    concept_embeddings,
    paper_top_indices,
    select_latents,
    similarity_bounds,
    steering_score,
    top_images,
)
from sae_vlm.topk import save_top

if TYPE_CHECKING:
    from sae_vlm.data.images import ImageSource


def _image_list(spec: str, flag: str) -> tuple[ImageSource, list[str] | None]:
    """A folder or path list -> (ImageSource, its labels or None when any image has none); none is an error."""
    from sae_vlm.data.images import open_images

    src = open_images(spec)
    if len(src) == 0:  # a score over no images would be nan ± nan
        raise ValueError(f"{flag} {spec} holds no images")
    labels = [r.label or "" for r in src.records]
    return src, (labels if all(labels) else None)


class LazyImages(abc.Sequence):
    """An image source as a sequence decoded on demand, an item or a slice at a time (the pool may not fit in
    memory)."""

    def __init__(self, src, ids=None):
        self.src, self.ids = src, list(range(len(src)) if ids is None else ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        from sae_vlm.data.images import load_image

        if isinstance(i, slice):
            return [load_image(self.src, int(j)) for j in self.ids[i]]
        return load_image(self.src, int(self.ids[i]))


def first_per_class(labels: Sequence[str], limit: int | None = None) -> list[int]:
    """The first `limit` (default: one) indices of each label, in order: imagenet_subset.py's first image per class."""
    taken: dict[str, int] = {}
    kept = []
    for i, label in enumerate(labels):
        if taken.get(label, 0) < (limit or 1):
            kept.append(i)
            taken[label] = taken.get(label, 0) + 1
    return kept


def steer_images(cfg: SteerScoreConfig) -> tuple[list, list[str], list[str] | None]:
    """(images, their names, their class names or None) to steer on: a white image, or --images, optionally only
    the first --per-class images of each class folder, and at most --max-images."""
    if cfg.images == "white":
        return [white_image()], ["white"], None
    for flag, count in (("--per-class", cfg.per_class), ("--max-images", cfg.max_images)):
        if count is not None and count < 1:
            raise ValueError(f"{flag} {count}: expected at least 1 image")
    src, labels = _image_list(cfg.images, "--images")
    ids = list(range(len(src)))
    if cfg.per_class is not None:
        if labels is None:
            raise ValueError(f"--per-class needs class folders, but {cfg.images} has unlabelled images")
        ids = first_per_class(labels, cfg.per_class)
    ids = ids[: cfg.max_images] if cfg.max_images else ids
    names = class_names([labels[i] for i in ids], cfg.images, cfg.class_names) if labels else None
    return list(LazyImages(src, ids)), [src.records[i].id for i in ids], names


TopTable = tuple["np.ndarray | None", np.ndarray, "ImageSource", "list | None", str]


def top_table(cfg: SteerScoreConfig, model, processor, sae) -> TopTable:
    """(top values or None, top indices [d_sae, 16], the image pool they index, its labels or None, the pool's
    path): a precomputed table (--top, --top-images), or the top images of --pool (default: --images)."""
    if cfg.top is not None:
        if cfg.top_images is None:
            raise ValueError("--top needs --top-images: the folder or path list its indices refer to")
        top_idx = np.load(cfg.top)
        vals_file = Path(str(cfg.top).replace("_indices.npy", "_values.npy"))
        top_vals = np.load(vals_file) if vals_file != Path(cfg.top) and vals_file.is_file() else None
        pool_spec = cfg.top_images
        pool_src, pool_labels = _image_list(pool_spec, "--top-images")
    else:
        pool_spec = cfg.pool or (None if cfg.images == "white" else cfg.images)
        if pool_spec is None:
            raise ValueError("--images white needs --pool DIR or --top FILE.npy to find the top images")
        pool_src, pool_labels = _image_list(pool_spec, "--pool" if cfg.pool else "--images")
        top_vals, top_idx = top_images(model, sae, LazyImages(pool_src), hook_point=cfg.hook_point,
                                       batch_size=cfg.batch_size, processor=processor, quiet=cfg.quiet)
        save_top(top_dir(cfg), top_vals, top_idx)  # reusable with --top next time
    if top_idx.ndim != 2 or top_idx.shape[0] != sae.cfg.d_sae:
        raise ValueError(f"top-image table has shape {top_idx.shape}; expected [d_sae={sae.cfg.d_sae}, 16]")
    if top_idx.max() >= len(pool_src):
        raise ValueError(f"top-image index {int(top_idx.max())} is out of range for {len(pool_src)} images")
    return top_vals, top_idx, pool_src, pool_labels, pool_spec


def top_dir(cfg: SteerScoreConfig) -> Path:
    """Where a computed top-image table is kept: beside --out, for `--top <dir>/top_indices.npy` next time."""
    return Path(cfg.out).with_name(Path(cfg.out).stem + "_top")


def run_steer_score(cfg: SteerScoreConfig) -> dict:
    """The paper's steering score for the latents `cfg.latents` selects; writes `cfg.out` (JSON) and returns it."""
    check_result_file(cfg.out, ("steered", "settings"), "sae-vlm steer-score")
    images, names, labels = steer_images(cfg)  # before the models load: no images fails fast
    model, processor, sae, dev = load_steering(cfg.llava, cfg.sae, cfg.step, cfg.device, cfg.dtype)
    embedder = ClipEmbedder.load(cfg.clip, device=str(dev))
    top_vals, top_idx, pool_src, pool_labels, pool_spec = top_table(cfg, model, processor, sae)
    alive = alive_latents(top_idx, top_vals)
    if not alive.any():  # every concept embedding would come from images no latent fires on
        raise ValueError(f"no latent of SAE {cfg.sae} fires on any of the {len(pool_src)} images of {pool_spec}; "
                         "steering it scores nothing")
    chosen = select_latents(cfg.latent_spec, alive, sae.cfg.group_sizes, seed=cfg.seed,
                            paper_count=1000 if cfg.images == "white" else 10)
    if not chosen:
        raise ValueError(f"--latents {cfg.latents!r} selects no live latent "
                         f"({int(alive.sum())} of {len(alive)} are alive)")
    # concept embeddings from the union of the chosen latents' top images (a dead latent's as argsort fills them)
    table_JT = paper_top_indices(top_idx[chosen], len(pool_src))
    need = sorted({int(i) for i in table_JT.reshape(-1) if i >= 0})
    slot = {i: k for k, i in enumerate(need)}  # pool index -> row of the embeddings of needed images only
    local = np.vectorize(lambda i: slot.get(int(i), -1), otypes=[np.int64])(table_JT)
    concept = concept_embeddings(local, embedder.images(LazyImages(pool_src, need)))
    res = steering_score(model, processor, sae, embedder, latents=chosen, concept_JD=concept, images=images,
                         image_names=names, alpha=cfg.alpha, op=cfg.op, error_term=not cfg.replace,
                         hook_point=cfg.hook_point, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
                         class_names=labels, seed=cfg.seed, word=cfg.word, quiet=cfg.quiet)
    if res["bounds"] is None and pool_labels is not None:  # a white image: bounds from the pool's classes
        ids = first_per_class(pool_labels)
        res["bounds"] = similarity_bounds(embedder, LazyImages(pool_src, ids),
                                          class_names([pool_labels[i] for i in ids], pool_spec, cfg.class_names),
                                          cfg.seed)
        res["bounds"]["source"] = "pool: first image of each class"
    elif res["bounds"] is not None:
        res["bounds"]["source"] = "steered images"
    res["settings"].update({"llava": cfg.llava, "sae": cfg.sae, "clip": cfg.clip, "latent_spec": cfg.latents,
                            "dead_chosen": int((~alive[chosen]).sum()),
                            "top": cfg.top or str(top_dir(cfg) / "top_indices.npy"), "top_images": pool_spec})
    atomic_write_json(cfg.out, res, indent=2)
    return res
