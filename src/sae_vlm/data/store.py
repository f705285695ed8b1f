"""Sharded activation store: write (atomic, resumable, multi-rank) and read (memory-mapped ActivationSource).

Layout of one extraction:
  STORE/extract_config.json          the run's settings; a resume must match them
  STORE/parts/shard_000000.json      written last for each shard: it marks the shard done (images, skipped,
                                     per-subdir rows + checksums); a killed run redoes only unmarked shards
  STORE/<hook point>__<tokens>/      e.g. layer.11__cls, layer.22__random-2, last__pooled
      shard_000000.npy               rows of the shard (fp16 | fp32 | bf16 stored as raw uint16), after a header
                                     padded to 4096 bytes (so rows can be read with O_DIRECT)
      manifest.json                  model id + revision, hook point, tokens, dtype, shape, shards + crc32 of
                                     the header and of each block of rows (`checksums` says the block size; a
                                     store from before them: sha256 of each file), rows, skipped, rows_file
      rows.jsonl                     one line per kept image: id, path, label, first row, row count
      token_index.npy                token position of each row (-1 = pooled/mean), int32
  STORE/manifest.json                written last of all: the store is complete
Shard s holds the kept images among input images [s * shard_images, (s + 1) * shard_images), so every rank
can write its shards independently and the store is identical for any number of ranks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from zlib_ng.zlib_ng import crc32

from sae_vlm.config import VerifyConfig
from sae_vlm.data.loader import ALIGN, REREAD, FileRows, RowFile, npy_layout
from sae_vlm.data.source import ActivationSource, NumpySource, StoreMeta, TensorSource
from sae_vlm.io import atomic_write_bytes, atomic_write_json, npy_bytes, read_json

FORMAT = "sae-vlm-store/1"
STORAGE = {"fp16": np.float16, "fp32": np.float32, "bf16": np.uint16}
FP16_MAX = 65504.0
PART_NAME = re.compile(r"shard_(\d{6})\.json")
# crc32 per block of about 64 KB of rows: checked on every first read at ~20 GB/s a core, a loader chunk (1 MB) is
# whole blocks when its rows are, and the manifest grows by 8 hex digits per 64 KB (0.01%)
BLOCK_BYTES = 1 << 16


def block_rows(row_bytes: int) -> int:
    return max(1, BLOCK_BYTES // row_bytes)


def shard_bytes(arr: np.ndarray) -> tuple[bytes, dict]:
    """The .npy bytes of a shard, its header padded to ALIGN bytes (rows start on a disk block), and its checksums:
    crc32 of the header and of each block of `block_rows` rows (hex, 8 digits a block). No whole-file sha256: the
    blocks cover every byte, and it was two thirds of the writer thread's work (benchmarks/shard_write.py)."""
    arr = np.ascontiguousarray(arr)
    fields = np.lib.format.header_data_from_array_1_0(arr)
    text = "{" + "".join(f"'{k}': {v!r}, " for k, v in sorted(fields.items())) + "}"  # as numpy writes it
    head = b"\x93NUMPY\x01\x00" + (ALIGN - 10).to_bytes(2, "little") + text.encode().ljust(ALIGN - 11) + b"\n"
    raw = memoryview(arr.reshape(-1).view(np.uint8).data) if arr.size else memoryview(b"")
    step = block_rows(arr.dtype.itemsize * arr.shape[1]) * arr.dtype.itemsize * arr.shape[1]
    data = head + raw.tobytes()
    crc = "".join(f"{crc32(raw[i : i + step]):08x}" for i in range(0, len(raw), step))
    return data, {"header_crc32": crc32(head), "crc32": crc}


def to_storage(acts_ND: torch.Tensor, dtype: str, hook_point: str) -> np.ndarray:
    """Cast to the store dtype; fp16 refuses values it cannot hold instead of writing inf."""
    if dtype not in STORAGE:
        raise ValueError(f"store dtype {dtype!r} is not understood; expected fp16, bf16 or fp32")
    if acts_ND.numel() and not torch.isfinite(acts_ND).all():
        raise ValueError(f"activations at {hook_point} contain inf/NaN (the model's compute dtype overflowed?)")
    if dtype == "fp16":
        m = acts_ND.abs().max().item() if acts_ND.numel() else 0.0
        if m > FP16_MAX:
            raise ValueError(f"activations at {hook_point} reach {m:.6g}, beyond fp16's max 65504; "
                             "use --dtype bf16 or fp32")
        return acts_ND.to(torch.float16).cpu().numpy()
    if dtype == "bf16":
        return acts_ND.to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return acts_ND.float().cpu().numpy()


def from_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bf16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def _same_setting(key: str, old: dict, new: dict, finished: bool) -> bool:
    """Differences that are not different settings: the same --data folder spelled another way (older stores kept
    it as typed), or a setting recorded only since the store was finished (nothing is left to compute)."""
    if key == "data" and isinstance(old.get(key), str) and isinstance(new.get(key), str):
        return Path(old[key]).resolve() == Path(new[key]).resolve()
    return finished and key not in old


def shard_name(s: int) -> str:
    return f"shard_{s:06d}"


class StoreWriter:
    """Writes shards of one extraction into `root`; see the module docstring for the layout."""

    def __init__(self, root: str | Path, config: dict, subdirs: dict[str, dict]):
        self.root = Path(root)
        self.config = config
        self.subdirs = subdirs  # name -> {"hook_point", "tokens", "rows_per_image", "width", "note"}

    def prepare(self, is_main: bool = True) -> None:
        """Create dirs and record the config; raise if `root` holds a different extraction."""
        cfg_path = self.root / "extract_config.json"
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if cfg_path.exists():
                old = read_json(cfg_path)
                finished = (self.root / "manifest.json").is_file()
                diff = sorted(k for k in set(old) | set(self.config)
                              if old.get(k) != self.config.get(k) and not _same_setting(k, old, self.config, finished))
                if diff:
                    raise ValueError(f"--out {self.root} holds an extraction with different settings "
                                     f"({', '.join(diff)}); use a new --out directory or the same settings to resume")
            else:
                atomic_write_json(cfg_path, self.config, indent=1)
            (self.root / "parts").mkdir(exist_ok=True)
            for name in self.subdirs:
                (self.root / name).mkdir(exist_ok=True)

    def done_shards(self) -> set[int]:
        parts = self.root / "parts"
        if not parts.is_dir():
            return set()
        return {int(m.group(1)) for p in parts.iterdir() if (m := PART_NAME.fullmatch(p.name))}

    def read_part(self, s: int) -> dict:
        """Shard s's part file, checked: a damaged one is a ValueError naming it and how to redo the shard."""
        p = self.root / "parts" / f"{shard_name(s)}.json"
        part = read_json(p)
        try:
            ok = (isinstance(part["images"], list) and isinstance(part["skipped"], list)
                  and all(isinstance(im["id"], str) for im in part["images"])
                  and all(isinstance(part["subdirs"][name][k], list if k == "token_index" else (int, str))
                          for name in self.subdirs for k in ("rows", "token_index"))
                  and all("crc32" in part["subdirs"][name] or "sha256" in part["subdirs"][name]
                          for name in self.subdirs))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ValueError(f"{p} is not a complete record of shard {s}; delete it and rerun extract to redo it")
        return part

    def check_listing(self, done: set[int], ids: list[str], shard_images: int, data: str) -> None:
        """Refuse to resume (or rerun) over shards done from another listing of --data: files added, removed or
        renamed since, even with the same count, would mix two listings in one store. Parts written before
        listings were recorded are compared by their kept images."""
        for s in sorted(done):
            part = self.read_part(s)
            now = ids[s * shard_images : (s + 1) * shard_images]
            then = part.get("listing")
            if then is None:
                gone = [str(sk["path"]) for sk in part["skipped"]]  # a skipped image's path ends in its id
                then = [im["id"] for im in part["images"]]
                now = [i for i in now if not any(g == i or g.endswith(("/" + i, os.sep + i)) for g in gone)]
            diff = next(((a, b) for a, b in itertools.zip_longest(then, now) if a != b), None)
            if diff is not None:
                was, is_ = (repr(x) if x is not None else "gone" for x in diff)
                when = "extract" if (self.root / "manifest.json").is_file() else "interrupted extract"
                raise ValueError(f"--data {data} changed since the {when} into {self.root}: {was} is now {is_} "
                                 f"(shard {s}); rerun into a new --out, or restore the folder to resume")

    def write_shard(self, s: int, arrays: dict[str, np.ndarray], token_index: dict[str, np.ndarray],
                    images: list[dict], skipped: list[dict], listing: list[str] | None = None) -> None:
        """Write every subdir's rows for shard s, then the part file that marks the shard done; `listing` is the
        ids of the shard's input images, kept or skipped, so a resume can tell that the input is the same (without
        it, a resume compares the kept images)."""
        info = {}
        for name, arr in arrays.items():
            data, sums = shard_bytes(arr)
            atomic_write_bytes(self.root / name / f"{shard_name(s)}.npy", data)
            info[name] = {"rows": int(arr.shape[0]), **sums, "token_index": token_index[name].tolist()}
        atomic_write_json(self.root / "parts" / f"{shard_name(s)}.json",
                          {"shard": s, "images": images, "skipped": skipped, "subdirs": info,
                           **({"listing": listing} if listing is not None else {})}, indent=1)

    def finalize(self, n_shards: int, meta: dict) -> dict:
        """Merge the part files into one manifest per subdir and the root manifest (rank 0, after all shards)."""
        parts = []
        for s in range(n_shards):
            if not (self.root / "parts" / f"{shard_name(s)}.json").exists():
                raise RuntimeError(f"shard {s} of {self.root} is missing; rerun extract to resume")
            parts.append(self.read_part(s))
        images = [im for part in parts for im in part["images"]]
        skipped = [sk for part in parts for sk in part["skipped"]]
        for name, sd in self.subdirs.items():
            shards, lines, tok, row = [], [], [], 0
            # blocks only when every shard has them; a resume over parts from before block checksums keeps the
            # whole-file path, hashing the newer shards it has no sha256 for
            blocks = all("crc32" in part["subdirs"][name] for part in parts)
            for part in parts:
                si, file = part["subdirs"][name], f"{shard_name(part['shard'])}.npy"
                sums = {k: si[k] for k in ("header_crc32", "crc32")} if blocks else \
                    {"sha256": si.get("sha256") or sha256_of(self.root / name / file)}
                shards.append({"file": file, "rows": si["rows"], **sums})
                tok.extend(si["token_index"])
            n_per = sd["rows_per_image"]
            for im in images:
                lines.append(json.dumps({**im, "row": row, "n": n_per}))
                row += n_per
            total = sum(x["rows"] for x in shards)
            if total != row:
                raise RuntimeError(f"{name}: shards hold {total} rows but {len(images)} images x {n_per} = {row}")
            d = self.root / name
            atomic_write_bytes(d / "rows.jsonl", ("\n".join(lines) + "\n").encode() if lines else b"")
            atomic_write_bytes(d / "token_index.npy", npy_bytes(np.asarray(tok, dtype=np.int32)))
            atomic_write_json(d / "manifest.json", {
                "format": FORMAT, **meta, "hook_point": sd["hook_point"], "hook_point_note": sd["note"],
                "token_selection": sd["tokens"],
                "dtype": self.config["dtype"], "storage_dtype": np.dtype(STORAGE[self.config["dtype"]]).name,
                "shape": [total, sd["width"]], "rows": total, "images": len(images), "rows_per_image": n_per,
                **({"checksums": {"kind": "crc32", "header_bytes": ALIGN, "block_rows": block_rows(
                    sd["width"] * np.dtype(STORAGE[self.config["dtype"]]).itemsize)}} if blocks else {}),
                "rows_file": "rows.jsonl", "token_index_file": "token_index.npy", "shards": shards,
                "skipped": skipped, **({k: sd[k] for k in ("tokens_per_image", "prefix_tokens") if k in sd}
                                       if n_per > 1 else {})}, indent=1)  # where the patches are, for heatmaps
        root_manifest = {"format": FORMAT, **meta, "rows": len(images), "images": len(images),
                         "subdirs": list(self.subdirs), "skipped": skipped, "config": self.config}
        atomic_write_json(self.root / "manifest.json", root_manifest, indent=1)
        return root_manifest


_VERIFIED: set[tuple[str, int, int, str]] = set()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def verify_once(path: Path, sha256: str, what: str = "", force: bool = False) -> None:
    """Check a file's sha256 the first time it is read, and again only if its size or mtime changed (or `force`).
    Passed checks are remembered for this process and in ~/.cache/sae-vlm/verified/, so later runs don't re-hash a
    large store."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, sha256)
    mark = _cache_dir() / hashlib.blake2b(repr(key).encode(), digest_size=16).hexdigest()
    if not force and (key in _VERIFIED or mark.is_file()):
        _VERIFIED.add(key)
        return
    if sha256_of(path) != sha256:
        raise ValueError(f"shard {path}{what} is corrupt: its sha256 differs from the manifest's; {REREAD}")
    _VERIFIED.add(key)
    try:
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()
    except OSError:  # a read-only home only costs a re-hash next time
        pass


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sae-vlm" / "verified"


def _whole(lo: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _file_name(v) -> bool:
    """A plain file name beside the manifest: nothing that reaches into another folder."""
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\\" not in v and "\0" not in v


def _text(v) -> bool:
    return isinstance(v, str) and bool(v)


MANIFEST_FIELDS = {  # field: (test, what it must be); StoreReader reads these and only these
    "dtype": (lambda v: isinstance(v, str) and v in STORAGE, "one of fp16, bf16, fp32"),
    "shape": (lambda v: isinstance(v, list) and len(v) == 2 and _whole(0)(v[0]) and _whole(1)(v[1]),
              "[rows, width]: two whole numbers"),
    "hook_point": (_text, "a hook point name"),
    "token_selection": (_text, "a token selection name"),
    "rows_per_image": (_whole(1), "a whole number >= 1"),
    "rows_file": (_file_name, "a file name beside the manifest"),
    "token_index_file": (_file_name, "a file name beside the manifest"),
    "shards": (lambda v: isinstance(v, list), "a list of shards"),
    "skipped": (lambda v: isinstance(v, list), "a list of skipped images"),
}
SHARD_FIELDS = {
    "file": (lambda v: _file_name(v) and v.endswith(".npy"), "a .npy file name beside the manifest"),
    "rows": (_whole(0), "a whole number"),
}
WHOLE_FILE_FIELDS = {  # a store from before block checksums
    "sha256": (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]{64}", v) is not None, "64 hex digits"),
}


CHECKSUM_FIELDS = {  # present in stores written since block checksums
    "kind": (lambda v: v == "crc32", '"crc32"'),
    "header_bytes": (lambda v: v == ALIGN, str(ALIGN)),
    "block_rows": (_whole(1), "a whole number >= 1"),
}
BLOCK_FIELDS = {
    "header_crc32": (lambda v: _whole(0)(v) and v < 1 << 32, "a crc32: a whole number below 2**32"),
    "crc32": (lambda v: isinstance(v, str) and re.fullmatch("[0-9a-f]*", v) is not None, "hex digits, 8 a block"),
}


def check_manifest(path: Path, m) -> dict:
    """A subdir manifest whose every field the reader uses is there and of its kind; else one ValueError naming the
    manifest, the field and the value (a hand-edited or foreign file must not end in a traceback)."""
    if not isinstance(m, dict):
        raise ValueError(f"{path} is not a store manifest: it holds a JSON {type(m).__name__}, not an object")

    def check(fields: dict, obj: dict, where: str) -> None:
        for key, (ok, want) in fields.items():
            if key not in obj:
                raise ValueError(f"{path}: field {where}{key!r} is missing; expected {want}")
            if not ok(obj[key]):
                raise ValueError(f"{path}: field {where}{key!r} is {json.dumps(obj[key])[:60]}; expected {want}")

    check(MANIFEST_FIELDS, m, "")
    sums = m.get("checksums")
    if sums is not None:
        if not isinstance(sums, dict):
            raise ValueError(f"{path}: field 'checksums' is {json.dumps(sums)[:60]}; expected an object with "
                             f"{', '.join(CHECKSUM_FIELDS)}")
        check(CHECKSUM_FIELDS, sums, "checksums.")
    for j, sh in enumerate(m["shards"]):
        if not isinstance(sh, dict):
            raise ValueError(f"{path}: shards[{j}] is {json.dumps(sh)[:60]}; expected an object with "
                             f"{', '.join(SHARD_FIELDS)}")
        check(SHARD_FIELDS, sh, f"shards[{j}].")
        if sums is None:
            check(WHOLE_FILE_FIELDS, sh, f"shards[{j}].")
        else:
            check(BLOCK_FIELDS, sh, f"shards[{j}].")
            blocks = -(-sh["rows"] // sums["block_rows"]) if _whole(0)(sh["rows"]) else 0
            if len(sh["crc32"]) != 8 * blocks:
                raise ValueError(f"{path}: field shards[{j}].'crc32' holds {len(sh['crc32']) / 8:g} checksums; "
                                 f"expected {blocks} (one per {sums['block_rows']} rows of {sh['rows']})")
    rows, per = m["shape"][0], m["rows_per_image"]
    if rows % per:
        raise ValueError(f"{path}: shape says {rows} rows, not a multiple of rows_per_image {per}")
    total = sum(sh["rows"] for sh in m["shards"])
    if total != rows:
        raise ValueError(f"{path}: its shards hold {total} rows but its shape says {rows}")
    return m


class StoreReader(ActivationSource):
    """One (hook point, token selection) of a store as an ActivationSource (float32 rows on demand)."""

    files: FileRows
    meta: StoreMeta

    def __init__(self, subdir: str | Path):
        self.path = Path(subdir)
        mp = self.path / "manifest.json"
        if not mp.exists():
            raise FileNotFoundError(f"{self.path} has no manifest.json "
                                    "(incomplete extraction? rerun extract to resume)")
        self.manifest = check_manifest(mp, read_json(mp))
        self.dtype = self.manifest["dtype"]
        self.rows, self.d_in = self.manifest["shape"]
        self.hook_point = self.manifest["hook_point"]
        self.token_selection = self.manifest["token_selection"]
        self.rows_per_image = self.manifest["rows_per_image"]
        self._shards = [sh for sh in self.manifest["shards"] if sh["rows"] > 0]
        self._starts = np.cumsum([0] + [sh["rows"] for sh in self._shards])
        self._mm: dict[int, np.ndarray] = {}
        self._images: list[dict] | None = None
        self.checksums = self.manifest.get("checksums")  # None: a store from before block checksums
        self.files = FileRows([self._row_file(j) for j in range(len(self._shards))], self.d_in,
                              np.dtype(STORAGE[self.dtype]), check=None if self.checksums else self._verify_sha256,
                              bf16=self.dtype == "bf16", block_rows=(self.checksums or {}).get("block_rows", 0))
        self._whole_checked: set[int] = set()
        self.meta = StoreMeta(self.path, self.manifest, self.rows_per_image, self.images)

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"StoreReader({str(self.path)!r}, rows={self.rows}, d_in={self.d_in}, dtype={self.dtype})"

    def _row_file(self, j: int) -> RowFile:
        sh, path = self._shards[j], self.path / self._shards[j]["file"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} of the store is missing")
        crc32_K = None
        if self.manifest.get("checksums"):  # the header first: a flipped byte there may not break the parse
            with open(path, "rb") as f:
                head = f.read(ALIGN)
            if crc32(head) != sh["header_crc32"]:
                raise ValueError(f"shard {path} (rows {self._starts[j]}..{self._starts[j + 1]}) is corrupt: the crc32 "
                                 f"of its .npy header differs from the manifest's; {REREAD}")
            crc32_K = np.array([int(sh["crc32"][i : i + 8], 16) for i in range(0, len(sh["crc32"]), 8)], np.uint32)
        offset, shape, dtype = npy_layout(path)
        if shape != (sh["rows"], self.d_in) or dtype != np.dtype(STORAGE[self.dtype]):
            raise ValueError(f"shard {path} holds {dtype} {list(shape)}; the manifest says "
                             f"{np.dtype(STORAGE[self.dtype])} {[sh['rows'], self.d_in]}")
        return RowFile(path, offset, sh["rows"], int(self._starts[j]), crc32_K)

    def _verify_sha256(self, j: int, force: bool = False) -> None:
        a, b = int(self._starts[j]), int(self._starts[j + 1])
        verify_once(self.path / self._shards[j]["file"], self._shards[j]["sha256"], f" (rows {a}..{b})", force)

    def _verify(self, j: int) -> None:
        """Shard j checked whole before its memory map is read (once per reader; blocks, or the sha256)."""
        if j not in self._whole_checked:
            self.files.check_file(j)
            self._whole_checked.add(j)

    def _shard(self, j: int) -> np.ndarray:
        if j not in self._mm:
            self._verify(j)
            self._mm[j] = np.load(self.path / self._shards[j]["file"], mmap_mode="r")
        return self._mm[j]

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) as float32, read with large positioned reads (no per-row page faults)."""
        return self.files.read_float(r0, r1)

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        idx = np.asarray(idx_N.cpu().numpy() if isinstance(idx_N, torch.Tensor) else idx_N, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.rows):
            raise IndexError(f"row index out of range for a store of {self.rows} rows")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        shard_of = np.searchsorted(self._starts, sidx, side="right") - 1
        out = np.empty((len(idx), self.d_in), dtype=np.float32)
        for j in np.unique(shard_of):
            sel = shard_of == j
            out[order[sel]] = from_storage(self._shard(int(j))[sidx[sel] - self._starts[j]], self.dtype)
        return torch.from_numpy(out)

    def all(self) -> torch.Tensor:
        return self.read_rows(0, self.rows)

    # ---- metadata --------------------------------------------------------------------------------------
    def images(self) -> list[dict]:
        """One dict per kept image: id, path, label, row (first row), n (rows)."""
        if self._images is None:
            self._images = read_rows_file(self.path / self.manifest["rows_file"], self.rows // self.rows_per_image)
        return self._images

    def image_ids(self) -> list[str]:
        return self.meta.image_ids()

    def paths(self, resolve: bool = True) -> list[str]:
        return self.meta.paths(resolve)

    def labels(self) -> list[str | None]:
        return self.meta.labels()

    def token_index(self) -> np.ndarray:
        path = self.path / self.manifest["token_index_file"]
        try:
            tok = np.load(path, allow_pickle=False)
        except (ValueError, EOFError) as e:
            raise ValueError(f"{path} is not a readable .npy array ({str(e).splitlines()[0]})") from None
        if tok.shape != (self.rows,) or tok.dtype.kind not in "iu":
            raise ValueError(f"{path} holds {tok.dtype} {list(tok.shape)}; expected {self.rows} integer positions")
        return tok

    @property
    def skipped(self) -> list[dict]:
        return self.manifest["skipped"]

    def verify(self, force: bool = False) -> None:
        """Check every shard, reading it whole: its header and block crc32s, or in a store from before them its
        sha256 (remembered: see `verify_once`; `force` hashes again); raise naming the first that does not match."""
        for j in range(len(self._shards)):
            if self.checksums is None:
                self._verify_sha256(j, force)
            else:
                self.files.check_file(j, force)


ROW_KEYS = ("id", "path", "label")


def read_rows_file(path: Path, n_images: int) -> list[dict]:
    """rows.jsonl: one object per kept image; a line that is not one, or a count that disagrees with the manifest,
    is a ValueError naming the file and the line."""
    try:
        lines = [line for line in path.read_bytes().decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from None
    images = []
    for n, line in enumerate(lines, 1):
        try:
            im = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {n} is not valid JSON ({e.msg})") from None
        if not isinstance(im, dict) or any(k not in im for k in ROW_KEYS):
            raise ValueError(f"{path}: line {n} is not an object with {', '.join(ROW_KEYS)}")
        images.append(im)
    if len(images) != n_images:
        raise ValueError(f"{path} lists {len(images)} images; the manifest beside it says {n_images}")
    return images


def _is_subdir_manifest(m) -> bool:
    """A subdir's manifest (one hook point), not a store root's; anything else that is not JSON object counts as
    one, so that the reader names what is wrong with it."""
    return not isinstance(m, dict) or "hook_point" in m or "subdirs" not in m


def list_subdirs(root: str | Path) -> list[str]:
    return sorted(p.parent.name for p in Path(root).glob("*/manifest.json"))


def open_store(path: str | Path, layer: str | None = None) -> StoreReader:
    """A store subdir, or the root with `layer` naming a subdir ('layer.11__cls'), a hook point ('layer.11',
    '11', 'last') when only one token selection exists for it, or None when the store has one subdir."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"activation store {path} does not exist")
    if (path / "manifest.json").exists() and _is_subdir_manifest(read_json(path / "manifest.json")):
        return StoreReader(path)
    names = list_subdirs(path)
    if not names:
        if (path / "extract_config.json").exists():
            raise FileNotFoundError(f"store {path} is incomplete (no manifest.json); rerun the same extract to resume")
        raise FileNotFoundError(f"{path} is not an activation store (no manifest.json)")
    if layer is None:
        if len(names) == 1:
            return StoreReader(path / names[0])
        raise ValueError(f"store {path} has several layers; pick one with layer=, one of {names}")
    layer = str(layer)
    if layer in names:
        return StoreReader(path / layer)
    from sae_vlm.backbones import parse_hook_point

    try:
        hp = parse_hook_point(layer.split("__")[0])
    except ValueError:
        hp = layer
    tok = layer.split("__")[1] if "__" in layer else None
    hits = [n for n in names if n.split("__")[0] == hp and (tok is None or n.split("__")[1] == tok)]
    if len(hits) == 1:
        return StoreReader(path / hits[0])
    raise ValueError(f"layer {layer!r} does not pick one subdir of {path}; choose one of {names}")


def verify_store(cfg: VerifyConfig) -> list[tuple[str, int, int, int]]:
    """`sae-vlm verify`: every shard of the store (or of `cfg.layer`) read whole and checked, hashes not taken from
    the cache; (subdir, shards, rows, bytes) per subdir checked."""
    root = Path(cfg.store)
    if not root.is_dir():
        raise FileNotFoundError(f"store {root} does not exist")
    names, top = list_subdirs(root), root / "manifest.json"
    one = cfg.layer is not None or not names or top.is_file() and _is_subdir_manifest(read_json(top))
    readers = [open_store(root, cfg.layer)] if one else [StoreReader(root / name) for name in names]
    done = []
    for r in readers:
        r.verify(force=True)
        nbytes = sum(f.path.stat().st_size for f in r.files.files)
        done.append((str(r.path), len(r.files.files), r.rows, nbytes))
    return done


def as_source(data, layer: str | None = None) -> ActivationSource:
    """Turn a tensor, numpy array, `.npy` path or store directory into an ActivationSource."""
    if isinstance(data, torch.Tensor):
        return TensorSource(data)
    if isinstance(data, np.ndarray):
        return NumpySource(data)
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.suffix == ".npy":
            if not path.is_file():
                raise FileNotFoundError(f"activation file {path} does not exist")
            try:
                arr = np.load(path, mmap_mode="r")
            except ValueError as e:
                why = "it holds pickled objects or is not .npy at all" if "pickle" in str(e) else str(e).splitlines()[0]
                raise ValueError(f"{path} is not a readable .npy array of numbers ({why})") from None
            return NumpySource(arr, path)
        if path.is_dir():
            return open_store(path, layer=layer)
        raise FileNotFoundError(f"activation source {path} is neither a .npy file nor a store directory")
    if isinstance(data, ActivationSource):
        return data
    raise TypeError(f"cannot read activations from {type(data).__name__}; expected a tensor, array, .npy or store dir")
