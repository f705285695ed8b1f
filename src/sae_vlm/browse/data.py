"""What the browser shows, read once from a run, its evaluation outputs and the activation store.

A `Dictionary` is one set of latents with per-latent arrays: an SAE of the run, or the raw neurons of a
layer (the "no SAE" baseline). Tables are sorted, filtered and paged here, on the server, so 65,536
latents cost one numpy pass per request.
"""

from __future__ import annotations

import json
import sys
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from sae_vlm.io import read_json
from sae_vlm.sae.groups import latent_levels

if TYPE_CHECKING:
    from sae_vlm.data.source import ActivationSource
    from sae_vlm.sae.model import SAE

SORT_KEYS = ("id", "ms", "freq", "support", "max_act", "level", "stable", "name_score")
RANGE_KEYS = ("ms", "freq", "support", "max_act", "stable", "name_score")  # stable: only in a seed sweep's evaluation
NAME_ARRAYS = ("names", "name_cos", "name_score", "name_score_shuffled")  # `sae-vlm name` adds them
SHOW = ("common", "rare", "dead", "all")  # the table filter; rare includes dead
HIST_SAMPLE_ROWS = 2048


def as_index(text) -> int | None:
    """A non-negative index written in ASCII digits, else None ('²'.isdigit() is True, but int('²') fails)."""
    text = str(text)
    return int(text) if text.isascii() and text.isdigit() else None


def read_npz(f: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz, read now: a truncated, empty or foreign file is one error naming it."""
    try:
        z = np.load(f, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds one array, not an .npz archive")
        with z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{f} is not a readable .npz ({type(e).__name__}: {e}); re-run `sae-vlm evaluate`") from None


def read_npy(f: Path) -> np.ndarray:
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing; re-run `sae-vlm evaluate`")
    try:
        return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{f} is not a readable .npy array ({e}); re-run `sae-vlm evaluate`") from None


def per_latent(f: Path, key: str, a: np.ndarray, n: int) -> np.ndarray:
    """`a` as one float per latent, or an error naming the file and the array."""
    if a.shape != (n,) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ValueError(f"{f}: {key!r} has shape {a.shape} ({a.dtype}); expected {n} numbers, one per latent")
    return a.astype(np.float64)


def top_arrays(where: Path, idx: np.ndarray, val: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Top image rows and values, both [n latents, T], the rows integers."""
    if idx.ndim != 2 or idx.shape[0] != n or val.shape != idx.shape or not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{where}: top images have indices {idx.shape} ({idx.dtype}) and values {val.shape}; "
                         f"expected two [{n}, top] arrays, integer indices")
    return idx, val


MAP_KINDS = {"tokens": "code", "attribution": "|gradient × input| of the code"}  # what a map's values are


@dataclass(frozen=True)
class PatchMaps:
    """maps/<name>.npz: each latent's code on the patches of its top images, CSR over (latent * top + rank)."""

    indptr: np.ndarray
    patch: np.ndarray
    code: np.ndarray
    rows: int
    cols: int
    complete: bool  # absent patches are 0; else they were not sampled (a random-k store)
    top: int
    kind: str = "tokens"  # what the values are: "tokens" (codes) or "attribution" (|gradient x input|)
    mapped: np.ndarray | None = None  # [n] bool: the latents that have maps (--heatmaps maps some); None: all

    def grid(self, j: int, rank: int) -> np.ndarray | None:
        """Latent j's map on its rank-th top image [rows, cols]: 0 where silent, NaN where not sampled; None for a
        latent without maps."""
        if self.mapped is not None and not self.mapped[j]:
            return None
        m = j * self.top + rank
        out = np.full(self.rows * self.cols, 0.0 if self.complete else np.nan)
        a, b = int(self.indptr[m]), int(self.indptr[m + 1])
        out[self.patch[a:b]] = self.code[a:b]
        return out.reshape(self.rows, self.cols)


def check_maps(f: Path, n: int, top: int) -> PatchMaps:
    """evaluate's maps of a token SAE, every array checked against the others and the top images it goes with."""
    z = read_npz(f)

    def bad(why: str) -> ValueError:
        return ValueError(f"{f}: {why}; re-run `sae-vlm evaluate`")

    missing = [k for k in ("indptr", "patch", "code", "grid", "complete") if k not in z]
    if missing:
        raise bad(f"no {missing[0]!r} array (it holds {', '.join(z) or 'nothing'})")
    ip, patch, code, grid, complete = (z[k] for k in ("indptr", "patch", "code", "grid", "complete"))
    if grid.shape != (2,) or grid.dtype.kind not in "iu" or (grid < 1).any():
        raise bad(f"'grid' is {grid.tolist()}; expected (rows, cols), two whole numbers >= 1")
    if ip.shape != (n * top + 1,) or ip.dtype.kind not in "iu":
        raise bad(f"'indptr' has shape {ip.shape} ({ip.dtype}); expected {n * top + 1} integers, one per latent and "
                  "top image, and one more")
    if patch.ndim != 1 or patch.shape != code.shape or ip[0] != 0 or ip[-1] != len(patch) or (np.diff(ip) < 0).any():
        raise bad(f"'indptr' (0..{ip[-1]}) does not index 'patch' {patch.shape} and 'code' {code.shape}")
    cells = int(grid[0] * grid[1])
    if patch.dtype.kind not in "iu" or (len(patch) and not 0 <= patch.min() <= patch.max() < cells):
        raise bad(f"'patch' holds {patch.dtype} values outside 0..{cells - 1}, the grid's patches")
    if code.dtype.kind != "f" or not np.isfinite(code).all():
        raise bad(f"'code' holds {code.dtype}, not finite floats")
    if complete.shape != () or complete.dtype != bool:
        raise bad(f"'complete' is {complete.dtype} {complete.shape}; expected one bool")
    kind = z["kind"] if "kind" in z else np.array("tokens")  # maps from before --heatmaps are token maps
    if kind.shape != () or str(kind) not in MAP_KINDS:
        raise bad(f"'kind' is {kind.tolist()!r}; expected one of {', '.join(MAP_KINDS)}")
    mapped = z["mapped"] if "mapped" in z else None
    if mapped is not None and (mapped.shape != (n,) or mapped.dtype != bool):
        raise bad(f"'mapped' is {mapped.dtype} {mapped.shape}; expected {n} bools, one per latent")
    return PatchMaps(ip, patch, code.astype(np.float32), int(grid[0]), int(grid[1]), bool(complete), top, str(kind),
                     mapped)


def check_metrics(mfile: Path, m) -> dict:
    """evaluate's metrics.json, its shape checked: another file is named, not a traceback later."""
    if not isinstance(m, dict):
        raise ValueError(f"{mfile} holds a JSON {type(m).__name__}; expected the object `sae-vlm evaluate` writes")
    saes = m.get("saes")
    if not isinstance(saes, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str) for r in saes):
        raise ValueError(f"{mfile}: 'saes' is {json.dumps(saes)[:40]}; expected a list of entries with a 'name'")
    if not saes:
        raise ValueError(f"{mfile} lists no scored SAE; re-run `sae-vlm evaluate`")
    step = m.get("step", "final")
    if not (isinstance(step, str) and (step == "final" or step.isdigit())):  # evaluate writes it as text
        raise ValueError(f"{mfile}: 'step' is {step!r}; expected a step number or \"final\"")
    for key, kind in (("data", str), ("embeddings", str), ("taxonomy", dict)):
        if m.get(key) is not None and not isinstance(m[key], kind):
            raise ValueError(f"{mfile}: {key!r} is {json.dumps(m[key])[:40]}; expected a {kind.__name__}")
    return m


@dataclass(frozen=True)
class LatentNames:
    """`sae-vlm name`'s names of each latent, best first ("" for none), with their cosine and score (AUROC)."""

    names: np.ndarray  # [n, K] text
    cos: np.ndarray  # [n, K]
    score: np.ndarray  # [n, K]

    def of(self, j: int) -> list[tuple[str, float, float]]:
        return [(str(w), float(c), float(s)) for w, c, s in zip(self.names[j], self.cos[j], self.score[j]) if w]

    def matching(self, text: str) -> np.ndarray:
        """[n] bool: some name of the latent contains `text` (case-insensitively)."""
        want = text.strip().casefold()
        return np.array([any(want in str(w).casefold() for w in row if w) for row in self.names], bool)


def check_names(f: Path, z: dict, n: int) -> LatentNames | None:
    """The names in latents/<name>.npz, when `sae-vlm name` wrote them, checked against each other."""
    if "names" not in z:
        return None
    names, k = z["names"], z["names"].shape[1] if z["names"].ndim == 2 else -1
    cos, score = (z.get(key, np.zeros(0)) for key in NAME_ARRAYS[1:3])
    ok = names.dtype.kind == "U" and names.shape == (n, k) and all(
        a.shape == (n, k) and a.dtype.kind == "f" for a in (cos, score))
    if not ok:
        raise ValueError(f"{f}: names {names.shape} ({names.dtype}) do not come with [{n}, K] text names and "
                         "float 'name_cos' and 'name_score'; re-run `sae-vlm name`")
    return LatentNames(names, cos.astype(np.float64), score.astype(np.float64))


def check_nodes(f: Path, n: int) -> dict[int, list[tuple[str, float]]]:
    """nodes/<name>.json: per latent, the taxonomy nodes it detects best, with the AUROC."""
    raw = read_json(f)
    ok = isinstance(raw, list) and all(
        isinstance(x, dict) and isinstance(x.get("node"), str) and type(x.get("latent")) is int
        and 0 <= x["latent"] < n and isinstance(x.get("auroc"), (int, float)) for x in raw)
    if not ok:
        raise ValueError(f"{f} is not a list of taxonomy nodes (node, latent 0..{n - 1}, auroc); "
                         "re-run `sae-vlm evaluate`")
    out: dict[int, list[tuple[str, float]]] = {}
    for x in raw:
        out.setdefault(x["latent"], []).append((x["node"], float(x["auroc"])))
    return out


@dataclass
class Dictionary:
    """One SAE's latents, or one layer's raw neurons (kind "neurons")."""

    name: str
    kind: str  # "sae" | "neurons"
    hook_point: str
    n: int
    arrays: dict  # per-latent float arrays: ms, freq, support, max_act, stable (seed sweeps), ms__<embedder> extras
    level: np.ndarray
    top_idx: np.ndarray | None  # [n, T] row numbers, -1 padding
    top_val: np.ndarray | None
    sae_dir: Path | None = None
    info: dict = field(default_factory=dict)  # arch, d_sae, k, group_sizes for the header
    source: ActivationSource | None = None  # the activation store subdir the top indices point into
    detects: dict = field(default_factory=dict)  # latent -> [(taxonomy node, AUROC)] it detects best
    maps: PatchMaps | None = None  # a token SAE's maps of its top images
    names: LatentNames | None = None  # `sae-vlm name`'s names
    _sae: SAE | None = None
    _dec_unit: np.ndarray | None = None
    _sample: tuple | None = None
    _paths: list | None = None
    _pending: Callable[[], None] | None = None  # work left before the arrays are complete (see RunView.get)

    @property
    def dead(self) -> np.ndarray:
        """Never positive on the evaluation images (evaluate's dead count). Raw neurons are signed: dead there
        means constant, which leaves MS undefined."""
        if self.kind == "neurons":
            return np.isnan(self.arrays["ms"])
        sup = self.arrays.get("support")
        if sup is not None:
            return ~(sup > 0)
        if self.top_val is not None:
            return ~(self.top_val[:, 0] > 0)
        return np.zeros(self.n, bool)

    @property
    def rare(self) -> np.ndarray:
        """Positive on fewer images than there are top-image slots (16th top activation 0), dead ones included:
        the paper's rule that keeps MS ≈ 1 latents with 2 supporting images from leading the tables."""
        if self.top_val is None or self.kind == "neurons":
            return self.dead
        return self.dead | ~(self.top_val[:, -1] > 0)

    @property
    def n_levels(self) -> int:
        return int(self.level.max()) + 1 if self.n else 0

    def sae(self) -> SAE:
        if self._sae is None:
            if self.sae_dir is None:
                raise ValueError(f"{self.name} holds raw neurons, not an SAE")
            from sae_vlm.sae.model import SAE

            self._sae = SAE.from_pretrained(self.sae_dir).eval()
        return self._sae

    # --- tables ---------------------------------------------------------------------------------------
    def column(self, key: str) -> np.ndarray:
        if key == "id":
            return np.arange(self.n, dtype=np.float64)
        if key == "level":
            return self.level.astype(np.float64)
        arr = self.arrays.get(key)
        return np.full(self.n, np.nan) if arr is None else np.asarray(arr, np.float64)

    def select(self, q: "TableQuery") -> np.ndarray:
        """Latent ids passing the filters, in the requested order (NaN values last either way)."""
        keep = np.ones(self.n, bool)
        if q.show != "all":
            keep &= {"common": ~self.rare, "rare": self.rare, "dead": self.dead}[q.show]
        if q.level is not None:
            keep &= self.level == q.level
        if q.name:
            keep &= self.names.matching(q.name) if self.names is not None else False
        for key, (lo, hi) in q.ranges.items():
            col = self.column(key)
            if lo is not None:
                keep &= col >= lo  # NaN compares False: a bound drops NaN latents
            if hi is not None:
                keep &= col <= hi
        ids = np.flatnonzero(keep)
        col = self.column(q.sort)[ids]
        nan = np.isnan(col)
        key = np.where(nan, 0.0, -col if q.desc else col)
        return ids[np.lexsort((ids, key, nan))]

    # --- latent details -------------------------------------------------------------------------------
    def check(self, j: int) -> None:
        if not 0 <= j < self.n:
            raise KeyError(f"latent {j} is not in {self.name} (0..{self.n - 1})")

    def decoder_unit(self) -> np.ndarray | None:
        if self._dec_unit is None and self.kind == "sae":
            w = self.sae().W_dec.detach().float().numpy()
            self._dec_unit = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
        return self._dec_unit

    def nearest(self, j: int, count: int = 8) -> list[tuple[int, float]]:
        """Latents whose decoder directions are closest in cosine to latent j's (computed on demand)."""
        w = self.decoder_unit()
        if w is None or self.n < 2:
            return []
        cos = w @ w[j]
        cos[j] = -np.inf
        count = min(count, self.n - 1)
        best = np.argpartition(-cos, count - 1)[:count]
        best = best[np.argsort(-cos[best], kind="stable")]
        return [(int(i), float(cos[i])) for i in best]

    def sample_activations(self, j: int) -> tuple[np.ndarray, int] | None:
        """Latent j's activations on an evenly spaced sample of the store's rows, and the sample size.

        The sample's codes are computed once (chunked) and kept sparse, so each page only slices them."""
        if self.source is None:
            return None
        if self._sample is None:
            src = self.source
            rows = np.unique(np.linspace(0, src.rows - 1, min(src.rows, HIST_SAMPLE_ROWS)).round().astype(np.int64))
            cols_all, vals_all = [], []
            with torch.no_grad():
                for r0 in range(0, len(rows), 256):
                    x = src.get(torch.as_tensor(rows[r0 : r0 + 256]))
                    c = self.sae().encode(x) if self.kind == "sae" else x
                    nz = c != 0 if self.kind == "sae" else torch.ones_like(c, dtype=torch.bool)
                    cols_all.append(nz.nonzero()[:, 1].numpy())
                    vals_all.append(c[nz].numpy())
            cols, vals = np.concatenate(cols_all), np.concatenate(vals_all)
            order = np.argsort(cols, kind="stable")
            cols, vals = cols[order], vals[order]
            starts = np.searchsorted(cols, np.arange(self.n + 1))
            self._sample = (vals, starts, len(rows))
        vals, starts, s = self._sample
        return vals[starts[j] : starts[j + 1]], s


@dataclass(frozen=True)
class TableQuery:
    sort: str = "ms"
    desc: bool = True
    show: str = "common"  # one of SHOW: common = not rare (positive on every top-image slot), the paper's rule
    level: int | None = None
    ranges: dict = field(default_factory=dict)  # key -> (lo, hi)
    page: int = 1
    per: int = 50
    name: str = ""  # a text some name of the latent contains

    @classmethod
    def parse(cls, params) -> "TableQuery":
        """From query parameters; bad values raise ValueError naming the parameter."""

        def num(name: str, cast: Callable = float) -> Any:
            v = params.get(name)
            if v in (None, ""):
                return None
            try:
                return cast(v)
            except ValueError:
                raise ValueError(f"query parameter {name}={v!r} is not a number") from None

        sort = params.get("sort") or "ms"
        if sort not in SORT_KEYS:
            raise ValueError(f"sort={sort!r}; expected one of {', '.join(SORT_KEYS)}")
        order = params.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise ValueError(f"order={order!r}; expected asc or desc")
        show = params.get("show") or "common"
        if show not in SHOW:
            raise ValueError(f"show={show!r}; expected one of {', '.join(SHOW)}")
        ranges = {k: (num(f"{k}_min"), num(f"{k}_max")) for k in RANGE_KEYS}
        ranges = {k: v for k, v in ranges.items() if v != (None, None)}
        per = min(max(num("per", int) or 50, 1), 1000)
        return cls(sort, order == "desc", show, num("level", int), ranges, max(num("page", int) or 1, 1), per,
                   (params.get("name") or "").strip())


def _store_for(data, hook_point, token_selection):
    if data is None:
        return None
    from sae_vlm.eval.sources import open_data

    try:
        src = open_data(data, hook_point, token_selection)
    except (ValueError, FileNotFoundError):
        return None
    return src


class RunView:
    """A run directory, its evaluation directory and (optionally) the store the evaluation read. Everything the
    evaluation wrote is read and checked here, so a broken file is refused before a page is served or written."""

    def __init__(self, run_dir, eval_dir=None, data=None):
        self.run_dir = Path(run_dir).resolve()
        if not self.run_dir.is_dir():
            raise FileNotFoundError(f"run directory {run_dir} does not exist")
        self.eval_dir = Path(eval_dir).resolve() if eval_dir is not None else self.run_dir / "eval"
        mfile = self.eval_dir / "metrics.json"
        if not mfile.is_file():
            raise FileNotFoundError(f"{mfile} is missing; run `sae-vlm evaluate {run_dir}` first or pass --eval DIR")
        self.metrics = check_metrics(mfile, read_json(mfile))
        self.data = data if data is not None else self.metrics.get("data")
        self.notes: list[str] = []
        if self.data is not None and not Path(self.data).exists():
            if data is not None:
                raise FileNotFoundError(f"activation store {data} does not exist; expected the store `evaluate` read")
            self.notes.append(f"the evaluated store {self.data} is gone: no images or histograms (pass --data STORE)")
            self.data = None
        self.embedder = self.metrics.get("embeddings")
        self.dicts: dict[str, Dictionary] = {}
        self._lock = threading.Lock()
        self._load_saes(mfile)
        for f in sorted((self.eval_dir / "latents").glob("baseline__*.npz")):
            d = self._load_baseline(f)
            self.dicts[d.name] = d
        self.plots = sorted(p.relative_to(self.eval_dir).as_posix() for p in (self.eval_dir / "plots").glob("*.png"))
        tables = self.eval_dir / "tables.md"
        try:
            self.tables_md = tables.read_text(encoding="utf-8") if tables.is_file() else ""
        except UnicodeDecodeError as e:
            raise ValueError(f"{tables} is not UTF-8 text ({e.reason} at byte {e.start})") from None

    def _load_saes(self, mfile: Path) -> None:
        """The SAEs metrics.json scored, at the snapshot it scored; each must be one of this run's."""
        from sae_vlm.sae.runs import find_saes

        summaries = {r["name"]: r for r in self.metrics["saes"]}
        # an evaluation from before snapshots were chosen scored the final SAEs
        in_run = dict(find_saes(self.run_dir, self.metrics.get("step", "final"))[0])
        foreign = [name for name in summaries if name not in in_run]
        if foreign:
            raise ValueError(f"{mfile} scores SAE {foreign[0]!r}, which run {self.run_dir} does not hold (it holds "
                             f"{', '.join(list(in_run)[:3])}): an evaluation of another run? pass its own --eval DIR")
        broken = {b.get("name"): b.get("error") for b in self.metrics.get("broken") or [] if isinstance(b, dict)}
        for name, sdir in in_run.items():
            if name in summaries:
                self.dicts[name] = self._load_sae(name, sdir, summaries[name])
            else:
                why = f"evaluate could not score it: {broken[name]}" if name in broken else "trained after it?"
                self.notes.append(f"SAE {name} of the run is not in this evaluation ({why})")

    def _load_sae(self, name: str, sdir: Path, summary: dict) -> Dictionary:
        f = self.eval_dir / "latents" / f"{name}.npz"
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing, though metrics.json scores {name}; re-run `sae-vlm evaluate`")
        cfg = read_json(sdir / "config.json")
        if not isinstance(cfg, dict) or type(cfg.get("d_sae")) is not int or cfg["d_sae"] < 1:
            raise ValueError(f"{sdir / 'config.json'} gives no latent count d_sae; expected an SAE config")
        z, n = read_npz(f), cfg["d_sae"]
        arrays = {k: per_latent(f, k, a, n) for k, a in z.items()
                  if (k in RANGE_KEYS and k not in NAME_ARRAYS) or k.startswith("ms__")}
        names = check_names(f, z, n)
        if names is not None:  # the best name's score sorts and filters the table
            arrays["name_score"] = names.score[:, 0]
        if "freq" not in arrays and "fire_freq" in z:
            arrays["freq"] = per_latent(f, "fire_freq", z["fire_freq"], n)
        top_dir = self.eval_dir / "top" / name
        top_idx = top_val = None
        if (top_dir / "top_indices.npy").is_file():
            top_idx, top_val = top_arrays(top_dir, read_npy(top_dir / "top_indices.npy"),
                                          read_npy(top_dir / "top_values.npy"), n)
        elif "top_indices" in z:
            top_idx, top_val = top_arrays(f, z["top_indices"], z.get("top_values", np.zeros(0)), n)
        nodes, maps = self.eval_dir / "nodes" / f"{name}.json", self.eval_dir / "maps" / f"{name}.npz"
        patch_maps = None
        if maps.is_file():
            if top_idx is None:
                raise ValueError(f"{maps} has no top images beside it ({top_dir}); re-run `sae-vlm evaluate`")
            patch_maps = check_maps(maps, n, top_idx.shape[1])
        info = {k: cfg.get(k) for k in ("arch", "d_in", "d_sae", "k", "group_sizes", "token_selection")}
        info["recon"] = summary.get("recon")
        return Dictionary(name, "sae", cfg.get("hook_point") or "unknown", n, arrays,
                          latent_levels(cfg.get("group_sizes"), n), top_idx, top_val, sdir, info,
                          _store_for(self.data, cfg.get("hook_point"), cfg.get("token_selection")),
                          detects=check_nodes(nodes, n) if nodes.is_file() else {},
                          maps=patch_maps, names=names)

    def _load_baseline(self, f: Path) -> Dictionary:
        """Raw neurons of one layer: MS from the evaluation, top rows / support / max from one store pass."""
        layer = f.stem.split("__", 1)[1]
        z = read_npz(f)
        if "no_sae_ms" not in z or z["no_sae_ms"].ndim != 1:
            raise ValueError(f"{f} has no 1-D 'no_sae_ms' array (it holds {', '.join(z) or 'nothing'}); "
                             "re-run `sae-vlm evaluate`")
        n = len(z["no_sae_ms"])
        arrays = {"ms": per_latent(f, "no_sae_ms", z["no_sae_ms"], n)}
        if "rotated_ms" in z:
            arrays["ms__rotated"] = per_latent(f, "rotated_ms", z["rotated_ms"], n)
        tok = next((d.info.get("token_selection") for d in self.dicts.values() if d.hook_point == layer), None)
        src = _store_for(self.data, layer, tok)
        src = src if src is not None and src.d_in == n else None
        d = Dictionary(f"neurons__{layer}", "neurons", layer, n, arrays, np.zeros(n, np.int64), None, None,
                       None, {"arch": "raw neurons", "d_in": n}, src)
        if src is not None:  # one pass over the store, on first use of this view

            def finish():
                d.top_val, d.top_idx, support, max_act = neuron_stats(src)
                d.arrays |= {"support": support, "freq": support / max(src.rows, 1), "max_act": max_act}

            d._pending = finish
        return d

    def get(self, name: str) -> Dictionary:
        if name not in self.dicts:
            raise KeyError(f"no SAE or baseline named {name!r}; expected one of {', '.join(self.dicts)}")
        d = self.dicts[name]
        with self._lock:
            if d._pending is not None:
                d._pending()
                d._pending = None
        return d

    def image_path(self, d: Dictionary, row: int) -> Path | None:
        """The image file behind store row `row`, or None (no store, out of range, not a plain file)."""
        if d.source is None or d.source.meta is None or not 0 <= row < d.source.rows:
            return None
        meta = d.source.meta
        paths = d._paths
        if paths is None:
            try:
                paths = meta.paths()
            except ValueError as e:  # an old store moved away from its images: pages without pictures
                print(f"warning: {e}", file=sys.stderr)
                paths = []
            d._paths = paths
        p = Path(paths[row]) if row < len(paths) else None
        return p if p is not None and p.is_file() else None


@torch.no_grad()
def neuron_stats(src, top: int = 16, chunk_rows: int = 4096):
    """(top values [D, T], top rows [D, T], support [D], max [D]) of raw activations in one streaming pass."""
    from sae_vlm.eval.top import top_activating

    vals, idx = top_activating(src, top=min(top, src.rows), device="cpu", chunk_rows=chunk_rows)
    support = np.zeros(src.d_in, np.float64)
    for r0 in range(0, src.rows, chunk_rows):
        x = src.get(torch.arange(r0, min(r0 + chunk_rows, src.rows)))
        support += (x > 0).sum(0).numpy()
    return vals.numpy(), idx.numpy(), support, vals[:, 0].double().numpy()
