"""Do latents of deeper Matryoshka levels pick more specific taxa? (paper.md §5)

Each image gets a 7-level taxonomy path (kingdom, phylum, class, order, family, genus, species). For a latent,
every pair of its top-16 images has an LCA depth = length of the common prefix of their paths (0..7); the
latent's depth is the rounded mean ("mean") or the mode ("mode") of those 120 depths. Levels average over
their live latents (the 16th top activation > 0). Images without a taxonomy are reported and left out.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sae_vlm.sae.groups import level_slices

LEVELS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
_PREFIX = re.compile(r"^\d+_")


def parse_inat_label(name: str) -> tuple[str, ...] | None:
    """'00000_Animalia_Chordata_Aves_Order_Family_Genus_species' -> 7 levels; None if it is not of that form."""
    if not _PREFIX.match(name):
        return None
    parts = _PREFIX.sub("", name, count=1).split("_")
    if len(parts) < 7 or not all(parts):
        return None
    return (*parts[:6], "_".join(parts[6:]))


def load_taxonomy_file(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A CSV (columns `label,path`) or JSON ({label: "A/B/..." or [..]}) mapping labels to taxonomy paths."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"taxonomy file {path} does not exist")
    if path.suffix.lower() == ".json":
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"taxonomy file {path} holds a {type(raw).__name__}; expected an object label -> path")
        items = raw.items()
    elif path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"label", "path"} <= set(rows[0]):
            raise ValueError(f"taxonomy file {path} has columns {list(rows[0])}; expected 'label' and 'path'")
        items = [(r["label"], r["path"]) for r in rows]
    else:
        raise ValueError(f"taxonomy file {path} has suffix {path.suffix!r}; expected .csv or .json")
    out = {}
    for label, tax in items:
        if tax is None or tax == "":
            continue  # no taxonomy: the image is reported as missing later
        levels = tuple(tax) if isinstance(tax, list) else tuple(p for p in re.split(r"[/;|]", str(tax)) if p)
        out[str(label)] = levels
    return out


def image_taxonomy(
    labels: Sequence[str | None] | None = None,
    paths: Sequence[str | None] | None = None,
    mapping: dict[str, tuple[str, ...]] | None = None,
) -> list[tuple[str, ...] | None]:
    """Taxonomy per image: the mapping by label, else an iNat-style label, else the image's folder name."""
    n = len(labels) if labels is not None else len(paths) if paths is not None else 0
    out: list[tuple[str, ...] | None] = []
    for i in range(n):
        label = labels[i] if labels is not None else None
        path = paths[i] if paths is not None else None
        tax = None
        if mapping is not None and label is not None:
            tax = mapping.get(str(label))
        if tax is None and label is not None:
            tax = parse_inat_label(str(label))
        if tax is None and path is not None:
            folder = Path(path).parent.name
            tax = (mapping or {}).get(folder) or parse_inat_label(folder)
        out.append(tax)
    return out


def store_taxonomy(src, rows: int, taxonomy_file=None):
    """Per-row taxonomy from the store's labels / paths (and an optional mapping file), or None."""
    mapping = load_taxonomy_file(taxonomy_file) if taxonomy_file else None
    store = src if hasattr(src, "labels") else None
    if store is not None:
        labels, paths = store.labels(), store.paths()
    elif mapping is not None:  # plain arrays: the mapping is keyed by row number
        labels, paths = [str(i) for i in range(rows)], None
    else:
        return None, None
    taxa = image_taxonomy(labels, paths, mapping)
    names = [str(p) for p in paths] if paths is not None else labels
    if all(t is None for t in taxa) and mapping is None:
        return None, None
    return taxa, names


def _prefix_codes(taxa: Sequence[tuple[str, ...] | None]) -> np.ndarray:
    """[N, 7] int ids of each path prefix (equal id at level l <=> equal first l+1 levels); -1 when missing."""
    codes = np.full((len(taxa), len(LEVELS)), -1, np.int64)
    seen: dict[tuple[str, ...], int] = {}
    for i, tax in enumerate(taxa):
        if tax is None:
            continue
        for lvl in range(min(len(tax), len(LEVELS))):
            codes[i, lvl] = seen.setdefault(tuple(tax[: lvl + 1]), len(seen))
    return codes


def latent_lca_depths(top_idx_FT, top_val_FT, taxa: Sequence[tuple[str, ...] | None]) -> dict:
    """Per latent: 'mean' (rounded mean depth), 'mode', 'raw_mean', 'pairs' (#pairs used) and 'dead' [F].

    Depth is NaN for a dead latent or one with fewer than two top images that have a taxonomy.
    """
    idx = np.asarray(top_idx_FT, dtype=np.int64)
    val = np.asarray(top_val_FT, dtype=np.float64)
    if idx.shape != val.shape or idx.ndim != 2:
        raise ValueError(f"top indices {idx.shape} and values {val.shape} must both be [latents, top]")
    if idx.size and (idx.min() < 0 or idx.max() >= len(taxa)):
        raise ValueError(f"top image index {int(idx.max())} is outside the {len(taxa)} images that have taxonomy "
                         "entries")
    codes = _prefix_codes(taxa)[idx]  # [F, T, 7]
    valid_FT = codes[..., 0] >= 0
    same_FTTL = (codes[:, :, None, :] == codes[:, None, :, :]) & (codes[:, :, None, :] >= 0)
    depth_FTT = same_FTTL.sum(-1)  # prefix ids make "equal at l" imply "equal below l"
    t = idx.shape[1]
    iu = np.triu_indices(t, k=1)
    pair_ok_FP = (valid_FT[:, :, None] & valid_FT[:, None, :])[:, iu[0], iu[1]]
    depth_FP = depth_FTT[:, iu[0], iu[1]]
    n_pairs = pair_ok_FP.sum(1)
    dead = val[:, -1] <= 0 if t else np.ones(len(idx), bool)
    raw_mean = np.where(n_pairs > 0, (depth_FP * pair_ok_FP).sum(1) / np.maximum(n_pairs, 1), np.nan)
    counts = np.stack([((depth_FP == d) & pair_ok_FP).sum(1) for d in range(len(LEVELS) + 1)], 1)
    mode = np.where(n_pairs > 0, counts.argmax(1).astype(float), np.nan)  # ties -> shallower depth
    usable = (n_pairs > 0) & ~dead
    return {
        "mean": np.where(usable, np.floor(raw_mean + 0.5), np.nan),  # round half up, not to even
        "mode": np.where(usable, mode, np.nan),
        "raw_mean": np.where(usable, raw_mean, np.nan),
        "pairs": n_pairs,
        "dead": dead,
    }


def per_level(values_F, group_sizes, exclude_F=None) -> list[dict]:
    """Mean / std / min / max / count of `values_F` in each level, NaNs and `exclude_F` left out."""
    v = np.asarray(values_F, dtype=np.float64)
    out = []
    for lvl, sl in enumerate(level_slices(group_sizes, len(v))):
        x = v[sl]
        keep = ~np.isnan(x) if exclude_F is None else ~np.isnan(x) & ~np.asarray(exclude_F)[sl]
        x = x[keep]
        stats = {"level": lvl, "latents": sl.stop - sl.start, "count": int(x.size)}
        if x.size:
            stats |= {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}
        out.append(stats)
    return out


def top_set_uniqueness(top_idx_FT, dead_F=None, thresholds=(0.5, 0.75, 1.0)) -> dict:
    """Jaccard index between latents' top-image sets: per-latent max over the others, and pair counts.

    Sparse: only latents sharing an image are compared (inverted index via a sparse product).
    """
    idx = torch.as_tensor(np.asarray(top_idx_FT, dtype=np.int64))
    k, t = idx.shape
    live = torch.ones(k, dtype=torch.bool) if dead_F is None else ~torch.as_tensor(np.asarray(dead_F, dtype=bool))
    rows = torch.arange(k).repeat_interleave(t)
    cols = idx.reshape(-1)
    keep = live[rows]
    n_img = int(cols.max()) + 1 if cols.numel() else 1
    ij = torch.stack([rows[keep], cols[keep]])
    ij = torch.unique(ij, dim=1)  # duplicates inside one latent's set count once
    m = torch.sparse_coo_tensor(ij, torch.ones(ij.shape[1]), (k, n_img), check_invariants=False).coalesce()
    size_F = torch.sparse.sum(m, 1).to_dense() if m._nnz() else torch.zeros(k)
    with warnings.catch_warnings():  # "sparse CSR is beta" is noise here
        warnings.simplefilter("ignore", UserWarning)
        inter = torch.sparse.mm(m, m.t()).coalesce()
    a, b = inter.indices()
    off = a < b
    a, b, v = a[off], b[off], inter.values()[off]
    jac = v / (size_F[a] + size_F[b] - v)
    max_F = torch.zeros(k)
    max_F.scatter_reduce_(0, a, jac, reduce="amax")
    max_F.scatter_reduce_(0, b, jac, reduce="amax")
    max_F[~live] = float("nan")
    n_live = int(live.sum())
    return {
        "live_latents": n_live,
        "max_jaccard": max_F.numpy(),
        "mean_max_jaccard": float(np.nanmean(max_F.numpy())) if n_live else float("nan"),
        "pairs_at_least": {str(th): int((jac >= th - 1e-12).sum()) for th in thresholds},
        "pairs_total": n_live * (n_live - 1) // 2,
    }


def missing_taxonomy(taxa, names: Sequence[str] | None = None, used_rows=None) -> dict:
    """Count and names of images without a taxonomy (optionally only among `used_rows`)."""
    rows = range(len(taxa)) if used_rows is None else sorted({int(r) for r in np.asarray(used_rows).reshape(-1)})
    miss = [r for r in rows if taxa[r] is None]
    return {"count": len(miss), "names": [names[r] if names is not None else str(r) for r in miss]}
