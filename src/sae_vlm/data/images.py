"""Image sources (folder tree, HF datasets, webdataset tars, path lists) with robust decoding.

Every source lists its images up front in a deterministic order (`records`), so a run can be split by rank
and resumed by index. `load_image(src, i)` returns an RGB PIL image or raises `BadImage(reason)`; unusual
but valid files (CMYK, 16-bit, grayscale, palette with transparency, EXIF-rotated) are converted, never dropped.
`open_image` decodes one image named on a command line (or 'white') the same way.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

ARCHIVE_EXTS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
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

    @property
    def notes(self) -> list[str]:
        """Lines for the run's summary: what was read that the user may not expect, and what was passed over."""
        return []

    def describe(self) -> dict:
        """What the source was read as, for the store's manifest."""
        return {"kind": self.kind, "images": len(self), "ignored_files": self.ignored}


class FileSource(ImageSource):
    def read_bytes(self, i: int) -> bytes:
        with open(self.records[i].path, "rb") as f:
            return f.read()


class FolderSource(FileSource):
    """ImageFolder-style tree; each image's label is its parent folder relative to the root ('' at the root).

    Symbolic links to folders and files are followed. A folder is read once whatever the number of ways to reach
    it: real folders first, then links in name order, so a link to a folder already read (or to an ancestor: a loop)
    is passed over and named in `notes`. Archives (.tar, .zip) are never opened here: they are counted as ignored
    files and named, so a stray backup.tar cannot turn the folder into a webdataset.
    """

    kind = "folder"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.archives: list[str] = []  # archives found in the tree, not read
        self.linked_folders: list[str] = []  # symlinked folders that were read
        self.repeated_folders: list[str] = []  # symlinked folders passed over: already read under another name
        self.unreadable: list[str] = []  # folders that could not be listed
        self.via_links = 0  # images reached through a symlinked folder or that are symlinks themselves
        recs, ignored = [], Counter()
        seen = {os.path.realpath(self.root)}
        queue: deque[Path] = deque([self.root])  # folders to walk: the root, then symlinked folders
        while queue:
            top = queue.popleft()
            if top != self.root:
                if os.path.realpath(top) in seen:
                    self.repeated_folders.append(self._rel(top))
                    continue
                seen.add(os.path.realpath(top))
                self.linked_folders.append(self._rel(top))
            for dirpath, dirnames, filenames in os.walk(top, onerror=self._unlistable):
                dirnames[:] = self._real_subfolders(dirpath, dirnames, seen, queue)
                recs += self._images(Path(dirpath), filenames, ignored, via_link=top != self.root)
        recs.sort(key=lambda r: r.id)
        super().__init__(recs, dict(ignored.most_common()))

    def _rel(self, p: str | Path) -> str:
        return Path(p).relative_to(self.root).as_posix()

    def _unlistable(self, e: OSError) -> None:
        self.unreadable.append(f"{self._rel(e.filename)} ({e.strerror or type(e).__name__})")

    @staticmethod
    def _real_subfolders(dirpath: str, dirnames: list[str], seen: set[str], queue: deque[Path]) -> list[str]:
        """The subfolders os.walk should enter (real ones not seen yet); symlinked ones are queued for later."""
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                queue.append(Path(full))
            elif os.path.realpath(full) not in seen:  # a bind mount or a folder inside a linked tree seen before
                seen.add(os.path.realpath(full))
                keep.append(d)
        return keep

    def _images(self, folder: Path, filenames: list[str], ignored: Counter, via_link: bool) -> list[ImageRecord]:
        recs = []
        for fn in sorted(filenames):
            p = folder / fn
            if fn.lower().endswith(ARCHIVE_EXTS):
                self.archives.append(self._rel(p))
            ext = p.suffix.lower()
            if ext not in IMAGE_EXTS:
                ignored[ext or "(no extension)"] += 1
                continue
            self.via_links += via_link or p.is_symlink()
            label = p.parent.relative_to(self.root).as_posix()
            recs.append(ImageRecord(self._rel(p), str(p), None if label == "." else label))
        return recs

    @property
    def notes(self) -> list[str]:
        notes = []
        if self.via_links:
            notes.append(f"{self.via_links} of {len(self)} images found through symbolic links"
                         + (f" (linked folders: {_some(self.linked_folders)})" if self.linked_folders else ""))
        if self.repeated_folders:
            notes.append(f"read once: {_some(self.repeated_folders)} link(s) to a folder already read")
        if self.archives:
            notes.append(f"not read: {_some(self.archives)} (an archive inside an image folder is not opened; "
                         "to read .tar shards, pass them: --data 'DIR/*.tar')")
        if self.unreadable:
            notes.append(f"not read: folder {_some(self.unreadable)} cannot be listed")
        return notes

    def describe(self) -> dict:
        return {**super().describe(), "via_symlinks": self.via_links, "linked_folders": self.linked_folders,
                "repeated_folders": self.repeated_folders, "ignored_archives": self.archives,
                "unreadable_folders": self.unreadable}


def _some(names: list[str], n: int = 5) -> str:
    """The first n names, and how many more."""
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


class PathListSource(FileSource):
    """A text file with one image path per line, optionally `path<TAB>label`; relative paths are from the file."""

    kind = "paths"

    def __init__(self, list_file: str | Path):
        list_file = Path(list_file)
        data = list_file.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[: e.start].count(b"\n") + 1
            raise ValueError(f"path list {list_file} is not UTF-8 text (line {line}, byte {e.start})") from None
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            path, _, label = line.partition("\t")
            if "\0" in path:
                raise ValueError(f"path list {list_file}: line {n} holds a NUL byte (a binary file?)")
            p = Path(path.strip())
            full = p if p.is_absolute() else list_file.parent / p
            recs.append(ImageRecord(path.strip(), str(full), label.strip() or None))
        super().__init__(recs)


def _tar_members(tar: Path) -> tuple[dict[str, dict[str, tarfile.TarInfo]], dict[str, str | None]]:
    """A shard's members grouped by key, and the labels of the keys that have one; a shard cut short anywhere (an
    interrupted download) is a ValueError naming it, never a skipped tail."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    labels: dict[str, str | None] = {}
    size = tar.stat().st_size
    try:
        with tarfile.open(tar, "r:") as tf:  # uncompressed: images are read by offset
            for m in tf:
                if not m.isfile():
                    continue
                if m.offset_data + m.size > size:
                    raise ValueError(f"--data shard {tar} is cut short: member {m.name!r} needs "
                                     f"{m.offset_data + m.size} bytes, the file has {size} (an interrupted download?)")
                base = m.name.rsplit("/", 1)[-1]
                stem, _, ext = base.partition(".")
                groups.setdefault(m.name[: len(m.name) - len(base)] + stem, {})[ext.lower()] = m
            _check_end(tar, tf)
            for key, members in groups.items():
                label = next((members[e] for e in ("cls", "txt", "label") if e in members), None)
                f = tf.extractfile(label) if label is not None else None
                if f is not None:
                    labels[key] = f.read().decode("utf-8", "replace").strip()
    except (tarfile.TarError, EOFError, OSError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--data {tar} is not a readable tar archive ({why}; shards are uncompressed .tar)") from None
    return groups, labels


def _check_end(tar: Path, tf: tarfile.TarFile) -> None:
    """tarfile ends its listing quietly at a cut or garbled header; an archive that is whole ends in a zero block."""
    assert tf.fileobj is not None
    tf.fileobj.seek(tf.offset)
    if tf.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
        raise ValueError(f"--data shard {tar} is cut short or damaged at byte {tf.offset}: no member header and no "
                         "end-of-archive block there (an interrupted download?)")


class TarSource(ImageSource):
    """webdataset shards: members grouped by key (name up to the first dot); label from a .cls/.txt member."""

    kind = "webdataset"

    def __init__(self, tars: list[Path]):
        self.tars = tars
        self._where: list[tuple[str, int, int]] = []
        recs = []
        for tar in tars:
            groups, labels = _tar_members(tar)
            for key, members in groups.items():
                img = next((members[e] for e in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS), None)
                if img is None:
                    continue
                self._where.append((str(tar), img.offset_data, img.size))
                recs.append(ImageRecord(key, f"{tar}::{img.name}", labels.get(key)))
        super().__init__(recs)

    def read_bytes(self, i: int) -> bytes:
        tar, off, size = self._where[i]
        with open(tar, "rb") as f:
            f.seek(off)
            return f.read(size)

    @property
    def notes(self) -> list[str]:
        return [f"read as webdataset shards: {_some([str(t) for t in self.tars], 3)}"]

    def describe(self) -> dict:
        return {**super().describe(), "shards": [str(t) for t in self.tars]}


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


def expand_braces(pattern: str) -> list[str]:
    """Shell-style braces, as webdataset names shards: 'a-{000..002}.tar' and '{x,y}.tar' (nested: left first)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        if int(hi) < int(lo):
            raise ValueError(f"--data {pattern}: the range {{{body}}} runs backwards")
        parts = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    elif "," in body:
        parts = body.split(",")
    else:
        raise ValueError(f"--data {pattern}: {{{body}}} is neither a range {{000..009}} nor a list {{a,b}}")
    return [x for part in parts for x in expand_braces(head + part + tail)]


def _shards(spec: str) -> list[Path]:
    """The .tar files a pattern names: braces must all exist, a glob must match at least one."""
    names = expand_braces(spec)
    paths: list[Path] = []
    for name in names:
        if any(c in name for c in "*?["):
            hits = sorted(Path(x) for x in glob.glob(name))
            if not hits:
                raise FileNotFoundError(f"--data {spec}: no file matches {name}")
            paths += hits
        elif not Path(name).is_file():
            raise FileNotFoundError(f"--data {spec}: shard {name} does not exist")
        else:
            paths.append(Path(name))
    not_tar = next((p for p in paths if p.suffix.lower() != ".tar" or not p.is_file()), None)
    if not_tar is not None:
        raise ValueError(f"--data {spec} matches {not_tar}, which is not a .tar shard; a pattern names webdataset "
                         "shards (an image folder is passed as the folder itself)")
    return list(dict.fromkeys(paths))


def is_pattern(spec: str) -> bool:
    """Whether --data names shards by a pattern (glob or braces) rather than one path."""
    return not Path(spec).exists() and (any(c in spec for c in "*?[") or re.search(r"\{[^{}]*\}", spec) is not None)


def _only_shards(folder: Path) -> list[Path]:
    """The .tar files of a folder that holds nothing else (hidden files aside): a folder of shards; else []."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if entries and all(p.suffix.lower() == ".tar" and p.is_file() for p in entries):
        return sorted(entries)
    return []


def open_images(src: str | Path, image_column: str | None = None) -> ImageSource:
    """Dispatch on what `src` is. A .tar file, a glob or brace pattern ('shards/{000..009}.tar'), or a folder that
    holds only .tar files: webdataset shards. A .txt/.lst path list. A `save_to_disk` folder. Any other folder: an
    image folder tree, whatever else lies in it (archives in it are counted and named, never opened). Else a hub
    dataset id (`name` or `name:split`)."""
    s = str(src)
    p = Path(s)
    if is_pattern(s) or (p.suffix.lower() == ".tar" and p.is_file()):
        return TarSource(_shards(s))
    if p.is_file():
        if p.suffix.lower() in {".txt", ".lst", ".list", ".tsv"}:
            return PathListSource(p)
        raise ValueError(f"data source {s} is a file but not a path list (.txt) or .tar shard")
    if p.is_dir():
        if any((p / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _saved_dataset(p, image_column)
        shards = _only_shards(p)
        return TarSource(shards) if shards else FolderSource(p)
    if s.startswith(("/", ".")) or os.sep + os.sep in s:
        raise FileNotFoundError(f"data source {s} does not exist")
    from datasets import load_dataset

    name, _, split = s.removeprefix("hf:").partition(":")
    return HFDatasetSource(load_dataset(name, split=split or "train"), name, image_column)


def _saved_dataset(folder: Path, image_column: str | None) -> HFDatasetSource:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(folder))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:  # a damaged save: datasets' own errors
        raise ValueError(f"--data {folder} looks like a `datasets` save_to_disk folder but cannot be loaded "
                         f"({type(e).__name__}: {e})") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[sorted(ds)[0]]
    return HFDatasetSource(ds, folder.name, image_column)


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
    except (OSError, ValueError) as e:  # ValueError: a path with a NUL byte
        raise BadImage(f"cannot read: {getattr(e, 'strerror', None) or e}") from None
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


WHITE = "white"


def white_image(size: int = 336) -> Image.Image:
    return Image.new("RGB", (size, size), "white")


def is_store_member(path: str | Path) -> bool:
    """True for a store image path that names no file: a tar member (`x.tar::member`) or a dataset row
    (`name[i]`), as the sources here record them."""
    s = str(path)
    return not Path(s).is_file() and ("::" in s or re.search(r"\[\d+\]$", s) is not None)


def open_image(spec: str | Path | Image.Image) -> Image.Image:
    """'white', a path, or a PIL image -> RGB PIL image, decoded like extraction does (`decode_image`: EXIF
    rotation, 16-bit, transparency over white, decompression-bomb guard)."""
    if isinstance(spec, Image.Image):
        return to_rgb(spec)
    if str(spec) == WHITE:
        return white_image()
    p = Path(spec)
    if not p.is_file():
        if is_store_member(p):
            raise ValueError(f"image {spec} is inside a tar shard or dataset, not a file; "
                             "expected 'white' or an image file")
        raise FileNotFoundError(f"image {p} does not exist; expected 'white' or an image file")
    try:
        return decode_image(p.read_bytes())
    except BadImage as e:
        raise ValueError(f"image {p}: {e}") from None
