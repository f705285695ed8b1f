"""Image sources (folder tree, HF datasets, webdataset tars, path lists) with robust decoding.

Every source lists its images up front in a deterministic order (`records`), so a run can be split by rank
and resumed by index. `load_image(src, i)` returns an RGB PIL image or raises `BadImage(reason)`; unusual
but valid files (CMYK, 16-bit, grayscale, palette with transparency, EXIF-rotated) are converted, never dropped.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".jfif"}
DEFAULT_MAX_PIXELS = 89_478_485  # as PIL's warning limit; larger images are refused as decompression bombs


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class ImageRecord:
    id: str  # stable id: relative path, dataset index, or webdataset key
    path: str  # where it came from (file path, "tar::member", "dataset[i]")
    label: str | None


class ImageSource:
    """A list of records plus a way to get each one's raw bytes."""

    kind = "base"

    def __init__(self, records: list[ImageRecord], ignored: dict[str, int] | None = None):
        self.records = records
        self.ignored = ignored or {}  # files passed over as not images, counted by extension

    def __len__(self) -> int:
        return len(self.records)

    def read_bytes(self, i: int) -> bytes:
        raise NotImplementedError


class FileSource(ImageSource):
    def read_bytes(self, i: int) -> bytes:
        with open(self.records[i].path, "rb") as f:
            return f.read()


class FolderSource(FileSource):
    """ImageFolder-style tree; each image's label is its parent folder relative to the root ('' at the root)."""

    kind = "folder"

    def __init__(self, root: str | Path):
        root = Path(root)
        recs, ignored = [], Counter()
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for fn in sorted(filenames):
                ext = Path(fn).suffix.lower()
                if ext not in IMAGE_EXTS:
                    ignored[ext or "(no extension)"] += 1
                    continue
                p = Path(dirpath, fn)
                rel = p.relative_to(root)
                label = rel.parent.as_posix()
                recs.append(ImageRecord(rel.as_posix(), str(p), None if label == "." else label))
        recs.sort(key=lambda r: r.id)
        super().__init__(recs, dict(ignored.most_common()))


class PathListSource(FileSource):
    """A text file with one image path per line, optionally `path<TAB>label`; relative paths are from the file."""

    kind = "paths"

    def __init__(self, list_file: str | Path):
        list_file = Path(list_file)
        recs = []
        for line in list_file.read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            path, _, label = line.partition("\t")
            p = Path(path.strip())
            full = p if p.is_absolute() else list_file.parent / p
            recs.append(ImageRecord(path.strip(), str(full), label.strip() or None))
        super().__init__(recs)


class TarSource(ImageSource):
    """webdataset shards: members grouped by key (name up to the first dot); label from a .cls/.txt member."""

    kind = "webdataset"

    def __init__(self, tars: list[Path]):
        self._where: list[tuple[str, int, int]] = []
        recs = []
        for tar in tars:
            groups: dict[str, dict[str, tarfile.TarInfo]] = {}
            try:
                tf = tarfile.open(tar)
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"--data {tar} is not a readable tar archive ({type(e).__name__})") from None
            with tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    base = m.name.rsplit("/", 1)[-1]
                    key_prefix = m.name[: len(m.name) - len(base)]
                    stem, _, ext = base.partition(".")
                    groups.setdefault(key_prefix + stem, {})[ext.lower()] = m
                label_bytes = {}
                for key, members in groups.items():
                    for ext in ("cls", "txt", "label"):
                        if ext in members:
                            f = tf.extractfile(members[ext])
                            label_bytes[key] = f.read().decode("utf-8", "replace").strip() if f else None
                            break
            for key, members in groups.items():
                img = next((members[e] for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
                if img is None:
                    continue
                self._where.append((str(tar), img.offset_data, img.size))
                recs.append(ImageRecord(key, f"{tar}::{img.name}", label_bytes.get(key)))
        super().__init__(recs)

    def read_bytes(self, i: int) -> bytes:
        tar, off, size = self._where[i]
        with open(tar, "rb") as f:
            f.seek(off)
            return f.read(size)


class HFDatasetSource(ImageSource):
    """A `datasets` Dataset (load_from_disk dir or hub id); the image column is found by its feature type."""

    kind = "hf"

    def __init__(self, ds, name: str, image_column: str | None = None, label_column: str | None = None):
        from datasets import Image as HFImage

        cols = ds.features
        if image_column is None:
            image_column = next((c for c, f in cols.items() if isinstance(f, HFImage)), None)
            if image_column is None:
                image_column = next((c for c in ("image", "img", "jpg", "png") if c in cols), None)
        if image_column is None:
            raise ValueError(f"dataset {name} has no image column; columns are {list(cols)}")
        if label_column is None:
            label_column = next((c for c in ("label", "labels", "fine_label", "class", "cls") if c in cols), None)
        if isinstance(cols[image_column], HFImage):
            ds = ds.cast_column(image_column, HFImage(decode=False))  # decode ourselves, robustly
        self.ds, self.image_column = ds, image_column
        names = getattr(cols.get(label_column), "names", None) if label_column else None
        labels = ds[label_column] if label_column else [None] * len(ds)
        recs = []
        for i, lab in enumerate(labels):
            if lab is not None and names is not None and isinstance(lab, int):
                lab = names[lab]
            recs.append(ImageRecord(str(i), f"{name}[{i}]", None if lab is None else str(lab)))
        super().__init__(recs)

    def read_bytes(self, i: int) -> bytes:
        v = self.ds[i][self.image_column]
        if isinstance(v, dict):
            if v.get("bytes"):
                return v["bytes"]
            if v.get("path"):
                with open(v["path"], "rb") as f:
                    return f.read()
            raise BadImage("dataset row has neither image bytes nor a path")
        if isinstance(v, (bytes, bytearray)):
            return bytes(v)
        if isinstance(v, Image.Image):
            buf = io.BytesIO()
            v.save(buf, format="PNG")
            return buf.getvalue()
        raise BadImage(f"unsupported image cell of type {type(v).__name__}")


def open_images(src: str | Path, image_column: str | None = None) -> ImageSource:
    """Dispatch on what `src` is: .txt/.lst path list, .tar file / glob / folder of tars, `save_to_disk`
    folder, image folder tree, else a hub dataset id (`name` or `name:split`)."""
    s = str(src)
    p = Path(s)
    if "*" in s or (p.suffix == ".tar" and p.is_file()):
        tars = sorted(Path(x) for x in __import__("glob").glob(s)) if "*" in s else [p]
        if not tars:
            raise FileNotFoundError(f"no tar shards match {s}")
        return TarSource(tars)
    if p.is_file():
        if p.suffix.lower() in {".txt", ".lst", ".list", ".tsv"}:
            return PathListSource(p)
        raise ValueError(f"data source {s} is a file but not a path list (.txt) or .tar shard")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            from datasets import DatasetDict, load_from_disk

            ds = load_from_disk(s)
            if isinstance(ds, DatasetDict):
                ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
            return HFDatasetSource(ds, p.name, image_column)
        tars = sorted(p.glob("*.tar"))
        if tars and not any(q.suffix.lower() in IMAGE_EXTS for q in p.iterdir()):
            return TarSource(tars)
        return FolderSource(p)
    if s.startswith(("/", ".")) or os.sep + os.sep in s:
        raise FileNotFoundError(f"data source {s} does not exist")
    from datasets import load_dataset

    name, _, split = s.removeprefix("hf:").partition(":")
    return HFDatasetSource(load_dataset(name, split=split or "train"), name, image_column)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: EXIF rotation applied, 16-bit scaled (not clipped), transparency over white."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        scale = 257.0 if img.mode != "F" and a.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(a / scale, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """bytes -> RGB image, or BadImage with a one-line reason."""
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    try:
        # the size check reads only the header, so a bomb is refused before any pixel is decoded
        # (PIL's own DecompressionBombError still guards above 2x its limit)
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > max_pixels:
            raise BadImage(f"too large: {w}x{h} pixels exceeds the limit of {max_pixels} (decompression bomb?)")
        img.load()
        return to_rgb(img)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unidentified format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadImage(f"cannot decode: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_image(src: ImageSource, i: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    try:
        data = src.read_bytes(i)
    except BadImage:
        raise
    except OSError as e:
        raise BadImage(f"cannot read: {e.strerror or e}") from None
    return decode_image(data, max_pixels)


def prefetch_map(fn: Callable, items, workers: int, ahead: int) -> Iterator:
    """Ordered `map(fn, items)` on a thread pool with at most `ahead` results in flight (overlaps I/O with compute)."""
    if workers <= 0:
        for x in items:
            yield fn(x)
        return
    with ThreadPoolExecutor(workers) as ex:
        q: deque = deque()
        it = iter(items)
        for x in it:
            q.append(ex.submit(fn, x))
            if len(q) >= ahead:
                yield q.popleft().result()
        while q:
            yield q.popleft().result()

