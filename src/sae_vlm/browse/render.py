"""Jinja rendering shared by the web app and the static report; only `Links` differs between the two."""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from urllib.parse import quote, urlencode

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from sae_vlm.browse.data import MAP_KINDS, SHOW, Dictionary, RunView, TableQuery
from sae_vlm.eval.stability import stable_share

HERE = Path(__file__).parent
TEMPLATES, STATIC = HERE / "templates", HERE / "static"
SHOW_LABELS = tuple(zip(SHOW, ("positive on 16+ images", "rare (on < 16 images)", "dead (never positive)", "all")))
COLUMNS = (("id", "latent"), ("level", "level"), ("ms", "MS"), ("freq", "frequency"), ("support", "support"),
           ("max_act", "max act"))
# a seed sweep's evaluation adds each latent's minimum matched decoder cosine over the other seeds
STABLE = ("stable", "stable")
NAMED = ("name_score", "name score")  # `sae-vlm name`'s score of each latent's best name (AUROC)
FILTERS = (("ms", "MS"), ("freq", "freq"), ("support", "support"), ("max_act", "max act"))
STRIP = 6  # thumbnails of top images per row of a latent table


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    v = float(v)
    if math.isnan(v):
        return "–"
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.{digits}g}" if abs(v) < 1e-3 else f"{v:.{digits}f}"


def make_env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=select_autoescape(["html"]))
    env.filters["fmt"] = fmt
    return env


class Links:
    """URLs for the server (absolute paths) or for the static report (relative to a page `depth` deep)."""

    def __init__(self, static: bool = False, depth: int = 0, included: dict[str, set] | None = None):
        self.static, self.included = static, included or {}
        self.root = "../" * depth if static else "/"

    def at(self, depth: int) -> "Links":
        return Links(self.static, depth, self.included)

    def index(self) -> str:
        return self.root + ("index.html" if self.static else "")

    def table(self, name: str, /, **params) -> str:
        if self.static:
            return f"{self.root}s/{quote(name)}.html"
        params = {k: v for k, v in params.items() if v not in (None, "")}
        return f"/sae/{quote(name)}" + (f"?{urlencode(params)}" if params else "")

    def latent(self, name: str, j: int) -> str | None:
        if self.static:
            return f"{self.root}s/{quote(name)}/{j}.html" if j in self.included.get(name, ()) else None
        return f"/sae/{quote(name)}/latent/{j}"

    def img(self, name: str, row: int, path: Path | None) -> str | None:
        if path is None:
            return None
        return f"{self.root}img/{thumb_name(path)}" if self.static else f"/img/{quote(name)}/{row}"

    def plot(self, rel: str) -> str:
        return f"{self.root}plots/{quote(Path(rel).name)}" if self.static else f"/files/eval/{quote(rel)}"

    def asset(self, file: str) -> str:
        return f"{self.root}static/{file}"


def thumb_name(path: Path) -> str:
    return hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".png"


def histogram_svg(values: np.ndarray, bins: int = 30, width: int = 360, height: int = 120) -> Markup:
    """A small bar chart of `values` as inline SVG (no plotting library, no file)."""
    if len(values) == 0:
        return Markup("")
    counts, edges = np.histogram(values, bins=bins)
    top = max(int(counts.max()), 1)
    bw = width / bins
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 14 - (height - 20) * c / top:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{(height - 20) * c / top:.1f}"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title></rect>'
        for i, c in enumerate(counts))
    return Markup(
        f'<svg class="hist" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f'<g fill="#4a78b0">{bars}</g><line x1="0" x2="{width}" y1="{height - 14}" y2="{height - 14}" stroke="#888"/>'
        f'<text x="0" y="{height - 2}" font-size="10">{edges[0]:.3g}</text>'
        f'<text x="{width}" y="{height - 2}" font-size="10" text-anchor="end">{edges[-1]:.3g}</text></svg>')


def summary(d: Dictionary) -> dict:
    ms = d.arrays.get("ms")
    ok = ms[~np.isnan(ms)] if ms is not None else np.zeros(0)
    stable = d.arrays.get("stable")
    return {"name": d.name, "kind": d.kind, "hook_point": d.hook_point, "n": d.n, "info": d.info,
            "dead": int(d.dead.sum()), "rare": int(d.rare.sum()), "ms_mean": float(ok.mean()) if len(ok) else None,
            "scored": len(ok), "levels": d.n_levels,
            "stable_share": stable_share(stable) if stable is not None else None}


def _row(d: Dictionary, j: int, extra: list[str], view: RunView | None = None, links: Links | None = None,
         strip: int = 0) -> dict:
    a = d.arrays
    row = {"j": j, "level": int(d.level[j]), "dead": bool(d.dead[j]), "rare": bool(d.rare[j]),
           **{k: (a[k][j] if k in a else None) for k in ("ms", "freq", "support", "max_act", "stable", "name_score",
                                                        *extra)},
           "names": d.names.of(j) if d.names is not None else []}
    if strip and view is not None and links is not None:
        row["strip"] = [im["url"] for im in fired_images(view, d, j, links)[:strip] if im["url"]]
    return row


def fired_images(view: RunView, d: Dictionary, j: int, links: Links, maps: bool = False) -> list[dict]:
    """Latent j's top images on which it fired (activation > 0), best first; raw neurons: all of them. With `maps`,
    a token SAE's image carries its map: rows of codes per patch, None where the patch was not sampled."""
    if d.top_idx is None or d.top_val is None:
        return []
    images = []
    for rank, (row, val) in enumerate(zip(d.top_idx[j], d.top_val[j])):
        row = int(row)
        if row < 0 or (d.kind == "sae" and val <= 0):
            continue
        im = {"row": row, "value": float(val), "url": links.img(d.name, row, view.image_path(d, row)), "map": None}
        grid = d.maps.grid(j, rank) if maps and d.maps is not None else None
        if grid is not None:
            im["map"] = [[None if math.isnan(v) else float(f"{v:.4g}") for v in r] for r in grid]
        images.append(im)
    return images


def map_scale(images: list[dict]) -> float | None:
    """The top of the colour scale the maps of one latent share (its largest patch code); None without maps."""
    codes = [v for im in images if im["map"] for r in im["map"] for v in r if v is not None]
    return max(codes, default=0.0) if any(im["map"] for im in images) else None


def extra_ms(d: Dictionary) -> list[str]:
    return sorted(k for k in d.arrays if k.startswith("ms__"))


def index_context(view: RunView, links: Links, front: str = "") -> dict:
    """The front page: `front` (HTML placed first), the dictionaries, plots and tables; no machine paths."""
    dicts = [summary(d) for d in view.dicts.values()]
    return {"links": links, "run": view.run_dir.name, "dicts": dicts,
            "stable": any(s["stable_share"] is not None for s in dicts),
            "plots": [(p, links.plot(p)) for p in view.plots], "tables": markdown_tables(view.tables_md),
            "embedder": Path(view.embedder).name if view.embedder else None, "notes": view.notes,
            "taxonomy": taxonomy_credit(view.metrics.get("taxonomy")),
            "front": Markup(front), "title": f"sae-vlm · {view.run_dir.name}"}


def taxonomy_credit(t: dict | None) -> str | None:
    """Which taxonomy the hierarchy metrics used, as metrics.json credits it, and how many rows it covered."""
    if not t or not t.get("source"):
        return None
    where = f"the file {Path(str(t['file'])).name}" if t.get("file") else {
        "inat": "iNat-style class labels", "folders": "nested image folders"}.get(t["source"], str(t["source"]))
    rows = t.get("rows")
    covered = f": {t.get('matched_rows')} of {rows} rows matched" if isinstance(rows, int) else ""
    return f"Hierarchy metrics use the taxonomy from {where}{covered}."


def undefined(cell: str) -> str:
    """A NaN cell (tables.md from before NaN printed as "–") shows the tables' marker for no value."""
    return "–" if re.fullmatch(r"nan%?(±nan)?", cell, re.IGNORECASE) else cell


def markdown_tables(text: str) -> Markup:
    """The evaluation's tables.md as HTML: `### ` headings, `|`-tables and paragraphs (all text escaped)."""
    from markupsafe import escape

    out, table = [], []

    def flush() -> None:
        if table:
            rows = [[undefined(c.strip()) for c in line.strip().strip("|").split("|")] for line in table
                    if not set(line.replace("|", "").strip()) <= {"-", ":"}]
            head = "".join(f"<th>{escape(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f'<table class="lat md"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')
            table.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("### "):
            out.append(f"<h3>{escape(line[4:])}</h3>")
        elif line.strip():
            out.append(f"<p>{escape(line)}</p>")
    flush()
    return Markup("\n".join(out))


def table_context(view: RunView, d: Dictionary, links: Links, q: TableQuery | None = None, ids=None) -> dict:
    """A page of the latent table (server), or all `ids` in the given order (static report)."""
    extra = extra_ms(d)
    if ids is None:
        ids = d.select(q or TableQuery())
    total = len(ids)
    pages = max(1, math.ceil(total / q.per)) if q else 1
    page = min(q.page, pages) if q else 1
    shown = ids[(page - 1) * q.per : page * q.per] if q else ids
    seeds = (STABLE,) if "stable" in d.arrays else ()  # runs without seeds keep their table as it was
    seeds += (NAMED,) if d.names is not None else ()
    ctx = {"links": links, "d": summary(d), "rows": [_row(d, int(j), extra, view, links, STRIP) for j in shown],
           "extra": extra, "show_options": SHOW_LABELS, "filters": FILTERS + seeds,
           "total": total, "page": page, "pages": pages, "q": q, "columns": COLUMNS + seeds,
           "values": [k for k, _ in COLUMNS[2:] + seeds] + extra, "embedder": view.embedder,
           "named": d.names is not None, "title": f"{d.name} · latents"}
    if q is not None:  # links that keep the filters and change one thing
        base = {"sort": q.sort, "order": "desc" if q.desc else "asc", "show": q.show, "level": q.level, "per": q.per,
                "name": q.name}
        for k, (lo, hi) in q.ranges.items():
            base |= {f"{k}_min": lo, f"{k}_max": hi}

        def ascending(key: str) -> bool:
            return (key == q.sort and q.desc) or (key != q.sort and key in ("id", "level"))

        ctx["sort_link"] = lambda key: links.table(d.name, **(base | {
            "sort": key, "order": "asc" if ascending(key) else "desc", "page": 1}))
        ctx["page_link"] = lambda p: links.table(d.name, **(base | {"page": p}))
        ctx["form"] = base
    return ctx


def latent_context(view: RunView, d: Dictionary, j: int, links: Links, order: list[int] | None = None) -> dict:
    """Everything the latent page shows; `order` is the list prev/next walk (default: all ids)."""
    d.check(j)
    a = d.arrays
    images = fired_images(view, d, j, links, maps=True)
    hist = d.sample_activations(j)
    if order is None:
        prev_j, next_j = (j - 1 if j > 0 else None), (j + 1 if j + 1 < d.n else None)
    else:
        pos = order.index(j)
        prev_j = order[pos - 1] if pos > 0 else None
        next_j = order[pos + 1] if pos + 1 < len(order) else None
    ms_rows = [(Path(view.embedder).name if view.embedder else "embedder", a.get("ms", [None] * d.n)[j])]
    ms_rows += [(k.split("__", 1)[1], a[k][j]) for k in extra_ms(d)]
    return {
        "links": links, "d": summary(d), "j": j, "title": f"{d.name} · latent {j}", "detects": d.detects.get(j, []),
        "names": d.names.of(j) if d.names is not None else [],
        "stats": _row(d, j, []), "ms_rows": ms_rows, "images": images, "map_max": map_scale(images),
        "sampled_only": d.maps is not None and not d.maps.complete,
        "map_what": MAP_KINDS[d.maps.kind] if d.maps is not None else None,
        "hist": histogram_svg(hist[0]) if hist is not None else None,
        "hist_n": (len(hist[0]), hist[1]) if hist is not None else None,
        "nearest": [(i, c, links.latent(d.name, i)) for i, c in d.nearest(j)],
        "prev": (prev_j, links.latent(d.name, prev_j)) if prev_j is not None else None,
        "next": (next_j, links.latent(d.name, next_j)) if next_j is not None else None,
    }
