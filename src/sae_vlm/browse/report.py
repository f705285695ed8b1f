"""`sae-vlm report`: the browser's views as static HTML that works from file:// with no server.

Layout: OUT/index.html, OUT/s/<dict>.html (latent table), OUT/s/<dict>/<j>.html (latent pages),
OUT/img/*.png (thumbnails), OUT/plots/*.png, OUT/static/browse.js. Every input is read and checked before OUT is
touched; an earlier report's index.html is removed first and the new one written last, so a report that fails
part-way never looks complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sae_vlm.browse.data import Dictionary, RunView, TableQuery
from sae_vlm.browse.render import (
    STATIC,
    STRIP,
    Links,
    fired_images,
    index_context,
    latent_context,
    make_env,
    table_context,
    thumb_name,
)
from sae_vlm.config import ReportConfig
from sae_vlm.io import atomic_save_image, atomic_write_text
from sae_vlm.outdir import check_owned, claim

THUMB_PX = 128


def _write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def _thumb(src: Path, dst: Path) -> None:
    from sae_vlm.steer.generate import open_image

    if dst.exists():
        return
    im = open_image(src)
    im.thumbnail((THUMB_PX, THUMB_PX))
    atomic_save_image(dst, im)


def _thumbs(view: RunView, d: Dictionary, images: list[dict], out: Path) -> None:
    for im in images:
        path = view.image_path(d, im["row"])
        if path is not None:
            _thumb(path, out / "img" / thumb_name(path))


def chosen_latents(d: Dictionary, top: int, all_: bool) -> list[int]:
    """Latents that get a page: all, or the `top` highest by MS (then max activation) among those not rare."""
    if all_:
        return list(range(d.n))
    ms = d.arrays.get("ms", np.full(d.n, np.nan))
    alive = np.flatnonzero(~d.rare)
    score = np.nan_to_num(ms[alive], nan=-np.inf)
    act = np.nan_to_num(d.arrays.get("max_act", np.zeros(d.n))[alive], nan=-np.inf)
    order = alive[np.lexsort((alive, -act, -score))]
    return sorted(int(j) for j in order[:top])


def loaded(view: RunView) -> dict[str, Dictionary]:
    """Every dictionary complete and every SAE loaded, so a broken input is refused before a page is written."""
    dicts = {name: view.get(name) for name in view.dicts}  # completes lazily loaded views
    for d in dicts.values():
        d.decoder_unit()
    return dicts


def write_report(view: RunView, out, *, top: int = 200, all_latents: bool = False, quiet: bool = True,
                 front: str = "") -> Path:
    """The static pages of `view` in `out`; `front` is HTML placed first on index.html (links relative to it)."""
    out = Path(out)
    dicts = loaded(view)
    (out / "index.html").unlink(missing_ok=True)  # an earlier report's front page: until the new one, none
    (out / "img").mkdir(parents=True, exist_ok=True)
    env = make_env()
    included = {name: set(chosen_latents(d, top, all_latents)) for name, d in dicts.items()}
    links = Links(static=True, depth=0, included=included)
    (out / "static").mkdir(exist_ok=True)
    shutil.copyfile(STATIC / "browse.js", out / "static" / "browse.js")
    (out / "plots").mkdir(exist_ok=True)
    for rel in view.plots:
        shutil.copyfile(view.eval_dir / rel, out / "plots" / Path(rel).name)
    for name, d in dicts.items():
        order = sorted(included[name])
        # the table: latents with a page, and the rare ones (no page), which it hides until asked; by MS, NaN last
        ids = np.array([j for j in d.select(TableQuery(show="all")) if j in included[name] or d.rare[j]], np.int64)
        for j in ids:
            _thumbs(view, d, fired_images(view, d, int(j), links)[:STRIP], out)
        table = env.get_template("table.html").render(**table_context(view, d, links.at(1), ids=ids))
        _write(out / "s" / f"{name}.html", table)
        for j in tqdm(order, desc=f"report {name}", disable=quiet, leave=False):
            ctx = latent_context(view, d, j, links.at(2), order=order)
            _thumbs(view, d, ctx["images"], out)
            _write(out / "s" / name / f"{j}.html", env.get_template("latent.html").render(**ctx))
    _write(out / "index.html", env.get_template("index.html").render(**index_context(view, links, front)))
    return out / "index.html"


def report_run(cfg: ReportConfig) -> Path:
    """The static report of `cfg.run_dir` in `cfg.out`; returns the path of its index.html."""
    check_owned(Path(cfg.out), "report")  # before reading the run, so a foreign folder is named first
    view = RunView(cfg.run_dir, cfg.eval_dir, cfg.data)
    loaded(view)
    with claim(cfg.out, "report"):
        return write_report(view, cfg.out, top=cfg.top, all_latents=cfg.all_latents, quiet=cfg.quiet)
