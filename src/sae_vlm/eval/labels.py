"""Labels for concept alignment (`evaluate --labels`): a CSV `image,label[,label…]` matched to the rows of the
evaluation and training stores, or the stores' own labels and taxonomy nodes, as one 0/1 matrix per store."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_vlm.data.source import ActivationSource
from sae_vlm.eval import hierarchy as H
from sae_vlm.io import read_json, read_utf8

FROM_STORE = "store"  # --labels store: the stores' own labels and taxonomy nodes


def read_labels_csv(path: str | Path) -> dict[str, list[str]]:
    """{image: labels} from `image,label[,label…]` rows (an optional `image,…` header; an image on several rows gets
    all their labels); every row needs an image and at least one label."""
    path = Path(path)
    text = read_utf8(path, "labels file")
    out: dict[str, list[str]] = {}
    reader = csv.reader(io.StringIO(text, newline=""))
    for row in reader:
        cells = [c.strip() for c in row]
        if not any(cells) or (reader.line_num == 1 and cells[0].lower() == "image"):
            continue
        labels = [c for c in cells[1:] if c]
        if not cells[0] or not labels:
            raise ValueError(f"labels file {path} line {reader.line_num}: {','.join(row)[:60]!r} is not "
                             "image,label[,label…]")
        out.setdefault(cells[0], []).extend(lab for lab in labels if lab not in out.get(cells[0], []))
    if not out:
        raise ValueError(f"labels file {path} is empty; expected rows image,label[,label…]")
    return out


def image_keys(src: ActivationSource) -> tuple[dict[str, int], list[str]]:
    """{name: row} by which a CSV may name a row (image id, recorded path; row number for plain arrays), and the
    absolute recorded paths, which a CSV path relative to the working directory is compared with."""
    if src.meta is None:
        return {str(i): i for i in range(src.rows)}, []
    if src.meta.rows_per_image != 1:
        raise ValueError(f"{src.meta.path} has {src.meta.rows_per_image} rows per image; concept alignment needs "
                         "one row per image: evaluate a CLS, mean or pooled store")
    keys: dict[str, int] = {}
    for i, (rid, p) in enumerate(zip(src.meta.image_ids(), src.meta.paths(resolve=False))):
        keys.setdefault(str(rid), i)
        keys.setdefault(Path(p).as_posix(), i)
    return keys, [p for p in keys if os.path.isabs(p)]


def _rows_of(image: str, keys: dict[str, int], absolute: list[str]) -> int | None:
    if image in keys:
        return keys[image]
    full = Path(os.path.abspath(image)).as_posix()
    return keys.get(full) if absolute else None


def match_csv(path, table: dict[str, list[str]], srcs: dict[str, ActivationSource]) -> dict[str, list[list[str]]]:
    """Per store ("eval", "train"): each row's labels from the CSV ([] when not listed); an image the CSV names that
    is in no store is an error that counts them and names the first few."""
    per = {k: [[] for _ in range(s.rows)] for k, s in srcs.items()}
    missing: list[str] = []
    keyed = {k: image_keys(s) for k, s in srcs.items()}
    for image, labels in table.items():
        hit = False
        for k, (keys, absolute) in keyed.items():
            row = _rows_of(image, keys, absolute)
            if row is not None:
                per[k][row], hit = labels, True
        if not hit:
            missing.append(image)
    if missing:
        where = " or ".join(str(s.meta.path if s.meta else "the --data array") for s in srcs.values())
        raise ValueError(f"labels file {path} names {len(missing)} of its {len(table)} images that are not in "
                         f"{where}: {', '.join(missing[:3])}{', …' if len(missing) > 3 else ''}")
    return per


def store_labels(src: ActivationSource, taxonomy_file=None) -> list[list[str]]:
    """Each row's classes from the store itself: every node of its taxonomy path (a `--taxonomy` file, iNat
    labels or nested folders) at every depth, else its flat label."""
    if src.meta is None and taxonomy_file is None:
        raise ValueError("--labels store needs an activation store with labels; --data is a plain array: pass a "
                         "labels CSV")
    taxa = H.store_taxonomy(src, src.rows, taxonomy_file)[0]
    if taxa is not None:
        return [["/".join(t[: d + 1]) for d in range(len(t))] if t else [] for t in taxa]
    labels = src.meta.labels() if src.meta is not None else []
    if not any(lab for lab in labels):
        where = src.meta.path if src.meta is not None else "--data"
        raise ValueError(f"--labels store: {where} has neither labels nor a taxonomy; pass a labels CSV")
    return [[str(lab)] if lab else [] for lab in labels]


@dataclass
class ClassMatrix:
    """The labelled rows of one store and which classes each belongs to."""

    rows_N: torch.Tensor  # int64 store rows that carry a label
    Y_NC: torch.Tensor  # float32 0/1


def class_matrices(per: dict[str, list[list[str]]], what: str) -> tuple[list[str], dict[str, ClassMatrix], dict]:
    """The classes with positives and negatives in every store, their matrices, and what was left out."""
    def counts(lists):
        rows = [i for i, labs in enumerate(lists) if labs]
        c: dict[str, int] = {}
        for i in rows:
            for lab in lists[i]:
                c[lab] = c.get(lab, 0) + 1
        return rows, c

    stats = {k: counts(v) for k, v in per.items()}
    every = list(dict.fromkeys(lab for _, c in stats.values() for lab in c))
    ok = sorted(lab for lab in every if all(0 < c.get(lab, 0) < len(rows) for rows, c in stats.values()))
    if not ok:
        raise ValueError(f"{what} gives no class both positive and negative images in "
                         f"{' and '.join(f'the {k} store' for k in per)}; each class needs both")
    index = {lab: j for j, lab in enumerate(ok)}
    mats = {}
    for k, lists in per.items():
        rows = stats[k][0]
        Y = torch.zeros(len(rows), len(ok))
        for n, i in enumerate(rows):
            for lab in lists[i]:
                if lab in index:
                    Y[n, index[lab]] = 1.0
        mats[k] = ClassMatrix(torch.tensor(rows, dtype=torch.int64), Y)
    left = [lab for lab in every if lab not in index]
    return ok, mats, {"count": len(left), "first": left[:5]}


@dataclass
class AlignLabels:
    """What `--labels` resolved to, before anything is written: classes and both stores' class matrices."""

    source: str
    classes: list[str]
    eval: ClassMatrix
    train: ClassMatrix
    train_src: ActivationSource
    train_data: str
    skipped: dict


def resolve_labels(labels: str, eval_src: ActivationSource, train_src: ActivationSource, train_data: str,
                   taxonomy_file=None) -> AlignLabels:
    srcs = {"eval": eval_src, "train": train_src}
    if labels == FROM_STORE:
        per = {k: store_labels(s, taxonomy_file) for k, s in srcs.items()}
        what = "--labels store"
    else:
        per = match_csv(labels, read_labels_csv(labels), srcs)
        what = f"labels file {labels}"
    for k, s in srcs.items():
        if s.meta is not None and s.meta.rows_per_image != 1:
            raise ValueError(f"{s.meta.path} has {s.meta.rows_per_image} rows per image; concept alignment needs "
                             "one row per image")
    classes, mats, skipped = class_matrices(per, what)
    return AlignLabels(labels, classes, mats["eval"], mats["train"], train_src, train_data, skipped)


def training_data(run_dir: str | Path, override: str | None) -> str:
    """The store the run's SAEs were trained on (train_config.json of the run, or of the run above an SAE
    directory), unless --train-data names one."""
    if override is not None:
        return override
    run = Path(run_dir)
    for cand in (run / "train_config.json", run.parent.parent / "train_config.json"):
        if cand.is_file():
            cfg = read_json(cand)
            if isinstance(cfg, dict) and isinstance(cfg.get("data"), str):
                return cfg["data"]
    raise ValueError(f"--labels needs the training store to fit probes and baselines on, and {run} records none "
                     "(no train_config.json); pass --train-data")
