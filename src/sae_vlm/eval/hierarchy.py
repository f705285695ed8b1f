"""Do latents of deeper Matryoshka levels pick more specific taxa? (paper.md §5)

Each image gets a taxonomy path: iNat's 7 levels (kingdom, phylum, class, order, family, genus, species), a
`--taxonomy` file, or the image's nested folders. For a latent, every pair of its top-16 images has an LCA depth =
length of the common prefix of their paths; the latent's depth is the rounded mean ("mean") or the mode ("mode")
of those 120 depths. Levels average over their live latents (the 16th top activation > 0). Images without a
taxonomy (with a file: the rows it does not match) are counted in metrics.json and left out: of LCA pairs, and of
node detection, as neither positives nor negatives. A file that matches no row is an error.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sae_vlm.data.source import ActivationSource
from sae_vlm.io import read_utf8
from sae_vlm.sae.groups import level_slices

_PREFIX = re.compile(r"^\d+_")


def parse_inat_label(name: str) -> tuple[str, ...] | None:
    """'00000_Animalia_Chordata_Aves_Order_Family_Genus_species' -> 7 levels (iNat: genus and epithet make the
    species); a shorter label with iNat's 5-digit class id, '00042_A_B_C', -> one level per part (2 to 6);
    None otherwise."""
    if not _PREFIX.match(name):
        return None
    parts = _PREFIX.sub("", name, count=1).split("_")
    if not all(parts):
        return None
    if len(parts) >= 7:
        return (*parts[:6], "_".join(parts[6:]))
    return tuple(parts) if len(parts) >= 2 and re.match(r"^\d{5}_", name) else None


def _taxonomy_text(path: Path) -> str:
    """The file as text; bytes that are not UTF-8 are named with their line (a BOM, as Excel writes, is dropped)."""
    text = read_utf8(path, "taxonomy file")
    if not text.strip():
        raise ValueError(f"taxonomy file {path} is empty; expected label -> taxonomy path entries")
    return text


def _csv_items(path: Path, text: str) -> list[tuple[str, object, str]]:
    """(label, path, where) per row of a CSV with a `label,path` header; every row has the header's field count."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader)]
    if not {"label", "path"} <= set(header):
        raise ValueError(f"taxonomy file {path} has columns {header}; expected 'label' and 'path'")
    i_label, i_path = header.index("label"), header.index("path")
    items = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"taxonomy file {path} line {reader.line_num}: {len(row)} fields, expected "
                             f"{len(header)} ({','.join(header)}); quote a path that holds a comma")
        items.append((row[i_label], row[i_path], f"line {reader.line_num}"))
    return items


def _json_items(path: Path, text: str) -> list[tuple[str, object, str]]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"taxonomy file {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"taxonomy file {path} holds a {type(raw).__name__}; expected an object label -> path")
    return [(label, tax, f"label {label!r}") for label, tax in raw.items()]


def _levels(path: Path, where: str, tax) -> tuple[str, ...]:
    """A path 'A/B/C' (or ';', '|' separated) or a list of non-empty strings as its levels."""
    if isinstance(tax, list) and all(isinstance(p, str) and p.strip() for p in tax):
        levels = tuple(tax)
    elif isinstance(tax, str):
        levels = tuple(p for p in re.split(r"[/;|]", tax) if p.strip())
    else:
        raise ValueError(f"taxonomy file {path} {where}: {json.dumps(tax)[:60]} is not a taxonomy path; expected "
                         "'A/B/C' or a list of names")
    if not levels:
        raise ValueError(f"taxonomy file {path} {where}: path {tax!r} has no levels; expected e.g. 'A/B/C'")
    return levels


def load_taxonomy_file(path: str | Path) -> dict[str, tuple[str, ...]]:
    """A CSV (columns `label,path`) or JSON ({label: "A/B/..." or [..]}) mapping labels to taxonomy paths, all of
    one depth (LCA depths of a ragged tree would mix levels). An empty path or null: that label has no taxonomy."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"taxonomy file {path} does not exist or is not a file")
    kind = path.suffix.lower()
    if kind not in (".csv", ".json"):
        raise ValueError(f"taxonomy file {path} has suffix {path.suffix!r}; expected .csv or .json")
    text = _taxonomy_text(path)
    items = _csv_items(path, text) if kind == ".csv" else _json_items(path, text)
    out: dict[str, tuple[str, ...]] = {}
    first: tuple[str, tuple[str, ...]] | None = None
    for label, tax, where in items:
        if tax is None or tax == "":
            continue  # no taxonomy: the image is reported as missing later
        levels = _levels(path, where, tax)
        if first is not None and len(levels) != len(first[1]):
            raise ValueError(f"taxonomy file {path} {where}: {len(levels)} levels, but label {first[0]!r} has "
                             f"{len(first[1])}; every path needs the same number of levels")
        if out.get(label, levels) != levels:
            raise ValueError(f"taxonomy file {path} {where}: label {label!r} is given two different paths")
        first = first or (label, levels)
        out[label] = levels
    if not out:
        raise ValueError(f"taxonomy file {path} maps no label to a taxonomy path")
    return out


def image_taxonomy(
    labels: Sequence[str | None] | None = None,
    paths: Sequence[str | None] | None = None,
    mapping: dict[str, tuple[str, ...]] | None = None,
) -> list[tuple[str, ...] | None]:
    """Taxonomy per image. With a mapping, only the mapping, by label, else by the image's folder name: a file's
    rows are never mixed with parsed ones, so the source stays the file. Without, an iNat-style label or folder."""
    n = len(labels) if labels is not None else len(paths) if paths is not None else 0
    out: list[tuple[str, ...] | None] = []
    for i in range(n):
        label = labels[i] if labels is not None else None
        path = paths[i] if paths is not None else None
        keys = [str(k) for k in (label, Path(path).parent.name if path is not None else None) if k is not None]
        found = (mapping.get(k) for k in keys) if mapping is not None else (parse_inat_label(k) for k in keys)
        out.append(next((t for t in found if t is not None), None))
    return out


def folder_taxonomy(labels: Sequence[str | None]) -> list[tuple[str, ...] | None] | None:
    """Each image's nested folder path as its taxonomy ('animals/mammals/rodents' -> 3 levels), or None when the
    folders are not nested (one level of class folders is no hierarchy)."""
    taxa = [tuple(p for p in str(lab).split("/") if p) if lab else None for lab in labels]
    return taxa if any(t is not None and len(t) > 1 for t in taxa) else None


def _credit(source: str, file, taxa: list, keys: list[str]) -> dict:
    """What metrics.json says of the taxonomy used: its source, the file, and how many rows it covers."""
    unmatched = list(dict.fromkeys(k for k, t in zip(keys, taxa) if t is None))
    return {"source": source, "file": str(file) if file else None, "rows": len(taxa),
            "matched_rows": sum(t is not None for t in taxa), "unmatched_labels": unmatched[:5]}


def credit_line(credit: dict) -> str:
    """'taxonomy file F matched 812 of 1000 rows (unmatched labels: a, b); the others are left out'."""
    where = f"file {credit['file']}" if credit["file"] else f"from {credit['source']}"
    miss = f" (unmatched labels: {', '.join(credit['unmatched_labels'])})" if credit["unmatched_labels"] else ""
    return (f"taxonomy {where} matched {credit['matched_rows']} of {credit['rows']} rows{miss}; the others are left "
            "out of the hierarchy metrics")


def store_taxonomy(src: ActivationSource, rows: int,
                   taxonomy_file=None) -> tuple[list | None, list | None, dict | None]:
    """(per-row taxonomy, per-row names, credit) from a `--taxonomy` file (source "file"), iNat-style labels
    ("inat") or nested image folders ("folders"); (None, None, None) when there is none. Credit is `_credit`'s.
    A file that matches no row is an error; rows it does not match are left out of the hierarchy metrics."""
    mapping = load_taxonomy_file(taxonomy_file) if taxonomy_file else None
    store = src.meta
    if store is not None:
        labels, paths = store.labels(), store.paths(resolve=False)  # folder names only
    elif mapping is not None:  # plain arrays: the mapping is keyed by row number
        labels, paths = [str(i) for i in range(rows)], None
    else:
        return None, None, None
    names = [str(p) for p in paths] if paths is not None else labels
    keys = [str(lab) if lab is not None else Path(str(p)).parent.name if p is not None else str(i)
            for i, (lab, p) in enumerate(zip(labels, paths if paths is not None else [None] * len(labels)))]
    taxa = image_taxonomy(labels, paths, mapping)
    if mapping is not None:
        if not any(t is not None for t in taxa):
            theirs = "row numbers 0.." + str(rows - 1) if store is None else ", ".join(dict.fromkeys(keys[:200]))
            ours = ", ".join(list(mapping)[:3]) + (", …" if len(mapping) > 3 else "")
            raise ValueError(f"taxonomy file {taxonomy_file} matches none of the {rows} rows: its labels are "
                             f"{ours}; the data's are {theirs[:120]}")
        return taxa, names, _credit("file", taxonomy_file, taxa, keys)
    if any(t is not None for t in taxa):
        return taxa, names, _credit("inat", None, taxa, keys)
    nested = folder_taxonomy(labels)
    return (nested, names, _credit("folders", None, nested, keys)) if nested is not None else (None, None, None)


def taxonomy_depth(taxa: Sequence[tuple[str, ...] | None]) -> int:
    """The number of levels of the deepest path (7 for iNat)."""
    return max((len(t) for t in taxa if t is not None), default=0)


def _prefix_codes(taxa: Sequence[tuple[str, ...] | None]) -> np.ndarray:
    """[N, depth] int ids of each path prefix (equal id at level l <=> equal first l+1 levels); -1 when missing."""
    codes = np.full((len(taxa), taxonomy_depth(taxa)), -1, np.int64)
    seen: dict[tuple[str, ...], int] = {}
    for i, tax in enumerate(taxa):
        if tax is None:
            continue
        for lvl in range(len(tax)):
            codes[i, lvl] = seen.setdefault(tuple(tax[: lvl + 1]), len(seen))
    return codes


def latent_lca_depths(top_idx_FT, top_val_FT, taxa: Sequence[tuple[str, ...] | None]) -> dict:
    """Per latent: 'mean' (rounded mean depth), 'mode', 'raw_mean', 'pairs' (#pairs used) and 'rare' [F], as
    inat_depth.py computes them (paper.md §5).

    `top_idx_FT`/`top_val_FT` are best first. The pairs are `itertools.combinations` of the top images in
    ascending order of activation (what `argsort(...)[-16:]` yields); 'mean' is Python's `round` of their mean
    depth (half to even) and 'mode' is `Counter.most_common(1)`: among equally frequent depths, the one seen
    first. Depth is NaN for a rare latent (positive on fewer images than it has top slots: 16th activation 0) or
    one with fewer than two top images that have a taxonomy; pairs with a missing taxonomy are left out.
    """
    idx = np.asarray(top_idx_FT, dtype=np.int64)[:, ::-1]
    val = np.asarray(top_val_FT, dtype=np.float64)
    if idx.shape != val.shape or idx.ndim != 2:
        raise ValueError(f"top indices {idx.shape} and values {val.shape} must both be [latents, top]")
    if idx.size and (idx.min() < 0 or idx.max() >= len(taxa)):
        raise ValueError(f"top image index {int(idx.max())} is outside the {len(taxa)} images that have taxonomy "
                         "entries")
    depth = taxonomy_depth(taxa)
    codes = _prefix_codes(taxa)[idx]  # [F, T, depth]
    valid_FT = codes[..., 0] >= 0 if depth else np.zeros(idx.shape, bool)
    same_FTTL = (codes[:, :, None, :] == codes[:, None, :, :]) & (codes[:, :, None, :] >= 0)
    depth_FTT = same_FTTL.sum(-1)  # prefix ids make "equal at l" imply "equal below l"
    t = idx.shape[1]
    iu = np.triu_indices(t, k=1)  # row-major: the order of itertools.combinations
    pair_ok_FP = (valid_FT[:, :, None] & valid_FT[:, None, :])[:, iu[0], iu[1]]
    depth_FP = depth_FTT[:, iu[0], iu[1]]
    n_pairs = pair_ok_FP.sum(1)
    rare = val[:, -1] <= 0 if t else np.ones(len(idx), bool)
    raw_mean = np.where(n_pairs > 0, (depth_FP * pair_ok_FP).sum(1) / np.maximum(n_pairs, 1), np.nan)
    usable = (n_pairs > 0) & ~rare
    return {
        "mean": np.where(usable, np.round(raw_mean), np.nan),  # numpy rounds half to even, as Python's round
        "mode": np.where(usable, _first_most_common(depth_FP, pair_ok_FP, depth), np.nan),
        "raw_mean": np.where(usable, raw_mean, np.nan),
        "pairs": n_pairs,
        "rare": rare,
    }


def _first_most_common(depth_FP: np.ndarray, ok_FP: np.ndarray, max_depth: int) -> np.ndarray:
    """Per row, the most frequent depth among the ok pairs; ties go to the depth that occurs first."""
    n_pairs = depth_FP.shape[1]
    hits_FDP = (depth_FP[:, None, :] == np.arange(max_depth + 1)[None, :, None]) & ok_FP[:, None, :]
    counts_FD = hits_FDP.sum(2)
    first_FD = np.where(hits_FDP.any(2), hits_FDP.argmax(2), n_pairs)  # position of the first occurrence
    key_FD = np.where(counts_FD == counts_FD.max(1, keepdims=True), first_FD, n_pairs + 1)
    return key_FD.argmin(1).astype(float)


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


def top_set_uniqueness(top_idx_FT, skip_F=None, thresholds=(0.5, 0.75, 1.0)) -> dict:
    """Jaccard index between latents' top-image sets: per-latent max over the others, and pair counts.

    Sparse: only latents sharing an image are compared (inverted index via a sparse product).
    """
    idx = torch.as_tensor(np.asarray(top_idx_FT, dtype=np.int64))
    k, t = idx.shape
    live = torch.ones(k, dtype=torch.bool) if skip_F is None else ~torch.as_tensor(np.asarray(skip_F, dtype=bool))
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


BLOCK_CELLS = 25_000_000  # node x latent cells scored at once


def node_detection(chunks, taxa: Sequence[tuple[str, ...] | None], group_sizes=None) -> dict:
    """For every taxonomy node (every path prefix), the latent that best detects it by AUROC.

    `chunks` yields the codes [R, F] of consecutive rows (all rows, in order, one per image). A latent's codes score
    each image; the node's images are the positives, the other images with a taxonomy the negatives. AUROC by
    the rank-sum formula, ties averaged; codes are sparse, so only positive entries are ranked and the zeros of
    a latent share one average rank. Returns per node (depth, name, best latent, its AUROC and Matryoshka level)
    and per depth the mean best AUROC, the share detected at AUROC ≥ 0.9 and the mean level of the best latents.
    """
    collector = NodeCollector(taxa, group_sizes)
    for c_RF in chunks:
        collector.add(c_RF)
    return collector.result()


class NodeCollector:
    """`node_detection` fed chunk by chunk: `add` keeps the positive code entries of the images that have a
    taxonomy, `result` ranks them and scores every node."""

    def __init__(self, taxa: Sequence[tuple[str, ...] | None], group_sizes=None):
        self.taxa, self.group_sizes = taxa, group_sizes
        self.prefix_ND = _prefix_codes(taxa)
        self.valid_N = self.prefix_ND[:, 0] >= 0 if self.prefix_ND.shape[1] else np.zeros(len(taxa), bool)
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.n = self.d_sae = 0

    def add(self, c_RF) -> None:
        """Codes [R, F] (tensor on any device, or array) of the next R rows."""
        if isinstance(c_RF, torch.Tensor):  # only the positive entries leave the device
            r, f = (c_RF > 0).nonzero(as_tuple=True)
            r, f, v = r.cpu().numpy(), f.cpu().numpy(), c_RF[r, f].detach().cpu().numpy()
        else:
            c_RF = np.asarray(c_RF)
            r, f = np.nonzero(c_RF > 0)
            v = c_RF[r, f]
        valid_R = np.zeros(c_RF.shape[0], bool)
        part = self.valid_N[self.n : self.n + c_RF.shape[0]]
        valid_R[: len(part)] = part  # rows past the taxonomy are an error in `result`
        keep = valid_R[r]
        self.rows.append(r[keep].astype(np.int64) + self.n)
        self.cols.append(f[keep].astype(np.int64))
        self.vals.append(v[keep])
        self.n, self.d_sae = self.n + c_RF.shape[0], c_RF.shape[1]

    def result(self) -> dict:
        if self.n != len(self.taxa):
            raise ValueError(f"codes have {self.n} rows but {len(self.taxa)} images have taxonomy entries (or None)")
        row_M, col_M, val_M = (np.concatenate(x) if x else np.zeros(0, t)
                               for x, t in ((self.rows, np.int64), (self.cols, np.int64), (self.vals, np.float64)))
        best_latent, best_auroc, defined = _best_detectors(row_M, col_M, val_M, self.d_sae, self.prefix_ND,
                                                           self.valid_N)
        return _summarise_detection(best_latent, best_auroc, defined, self.prefix_ND, self.taxa, self.group_sizes,
                                    self.d_sae)


def _best_detectors(row_M, col_M, val_M, d_sae: int, prefix_ND, valid_N) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(best latent, its AUROC, whether the AUROC is defined) per node, from the positive entries of valid rows."""
    n_valid = int(valid_N.sum())
    rank_M = _ranks_within(col_M, val_M) + (n_valid - np.bincount(col_M, minlength=d_sae))[col_M]
    n_nodes = int(prefix_ND.max()) + 1 if prefix_ND.size and prefix_ND.max() >= 0 else 0
    pos = np.bincount(prefix_ND[valid_N][prefix_ND[valid_N] >= 0], minlength=n_nodes).astype(np.float64)
    neg = n_valid - pos
    zeros_F = (n_valid - np.bincount(col_M, minlength=d_sae)).astype(np.float64)
    best_auroc = np.full(n_nodes, -np.inf)
    best_latent = np.zeros(n_nodes, np.int64)
    block = max(1, BLOCK_CELLS // max(n_nodes, 1))  # [nodes, latents] blocks stay ~200 MB at iNat x 65k latents
    for f0 in range(0, d_sae, block):
        f1 = min(d_sae, f0 + block)
        sel = (col_M >= f0) & (col_M < f1)
        node_EL = prefix_ND[row_M[sel]]  # the nodes each ranked entry's image belongs to, -1 below a short path
        hit = node_EL >= 0
        key = node_EL[hit] * (f1 - f0) + np.repeat(col_M[sel][:, None] - f0, node_EL.shape[1], 1)[hit]
        rank_sum = np.bincount(key, weights=np.repeat(rank_M[sel][:, None], node_EL.shape[1], 1)[hit],
                               minlength=n_nodes * (f1 - f0)).reshape(n_nodes, f1 - f0)
        count = np.bincount(key, minlength=n_nodes * (f1 - f0)).reshape(n_nodes, f1 - f0)
        total = (pos[:, None] - count) * (zeros_F[None, f0:f1] + 1) / 2 + rank_sum
        with np.errstate(invalid="ignore", divide="ignore"):
            auroc = (total - pos[:, None] * (pos[:, None] + 1) / 2) / (pos[:, None] * neg[:, None])
        auroc = np.where(np.isnan(auroc), -np.inf, auroc)
        j = auroc.argmax(1)
        better = auroc[np.arange(n_nodes), j] > best_auroc
        best_auroc[better], best_latent[better] = auroc[better, j[better]], j[better] + f0
    return best_latent, best_auroc, neg > 0


def _ranks_within(col_M: np.ndarray, val_M: np.ndarray) -> np.ndarray:
    """1-based ranks of each entry's value among its column's entries (ascending), ties averaged."""
    order = np.lexsort((val_M, col_M))
    c, v = col_M[order], val_M[order]
    idx = np.arange(len(c))
    col_start = np.maximum.accumulate(np.where(np.r_[True, c[1:] != c[:-1]], idx, 0)) if len(c) else idx
    pos = idx - col_start + 1
    first = np.r_[True, (c[1:] != c[:-1]) | (v[1:] != v[:-1])] if len(c) else np.zeros(0, bool)
    last = np.r_[first[1:], True] if len(c) else first
    mean_rank = (pos[first] + pos[last]) / 2  # a group of equal values shares the mean of its positions
    ranks = np.empty(len(c))
    ranks[order] = mean_rank[np.cumsum(first) - 1]
    return ranks


def _summarise_detection(best_latent, best_auroc, defined_N, prefix_ND, taxa, group_sizes, d_sae) -> dict:
    from sae_vlm.sae.groups import latent_levels

    names: dict[int, tuple[str, ...]] = {}
    for i, tax in enumerate(taxa):
        if tax is not None:
            for d in range(len(tax)):
                names.setdefault(int(prefix_ND[i, d]), tuple(tax[: d + 1]))
    ids = [n for n in sorted(names) if defined_N[n]]
    levels_F = latent_levels(group_sizes, d_sae)
    nodes = [{"node": "/".join(names[n]), "depth": len(names[n]), "latent": int(best_latent[n]),
              "auroc": float(best_auroc[n]), "level": int(levels_F[best_latent[n]])} for n in ids]
    per_depth = []
    for d in range(1, max((x["depth"] for x in nodes), default=0) + 1):
        at = [x for x in nodes if x["depth"] == d]
        per_depth.append({"depth": d, "nodes": len(at),
                          "mean_auroc": float(np.mean([x["auroc"] for x in at])) if at else float("nan"),
                          "detected": float(np.mean([x["auroc"] >= 0.9 for x in at])) if at else float("nan"),
                          "mean_best_level": float(np.mean([x["level"] for x in at])) if at else float("nan")})
    detected = float(np.mean([x["auroc"] >= 0.9 for x in nodes])) if nodes else float("nan")
    return {"nodes": nodes, "per_depth": per_depth, "detected": detected}
