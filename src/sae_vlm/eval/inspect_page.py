"""`sae-vlm inspect`: OUT/inspect.json (what `inspect_images` returns) and OUT/index.html, which opens from file://.

The page shows, per image, the picture as the model saw it (resized and cropped by its processor, so the map lines
up) and, per top latent, the picture under its map and the map alone, in inferno from 0 to the map's own peak;
beside them the code, the latent's MS and best-detected taxonomy node where the run was evaluated, and a link to
its page in a static report (`--report`) or to its top-image grid (`evaluate --grids`). Pictures are data: URIs.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sae_vlm.config import InspectConfig
from sae_vlm.data.images import open_image
from sae_vlm.eval.maps import inspect_batch, resolve
from sae_vlm.io import atomic_write_json, atomic_write_text, read_json
from sae_vlm.outdir import check_owned, claim

SHOWN_PX = 192  # the side pictures are drawn at, at least
# inferno at 0, 1/7, ..., 1, as the browser's overlays (browse.js): dark to pale yellow, readable in grey and to
# colour-blind eyes, so the peak is the brightest cell
INFERNO = np.array([(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21),
                    (250, 193, 39), (252, 255, 164)], np.float32)
OVERLAY_ALPHA = 0.55


def colour(map_RC: np.ndarray) -> np.ndarray:
    """A map as RGB uint8 [rows, cols, 3], 0 to its peak on the inferno scale (an all-zero map is all dark)."""
    peak = float(map_RC.max(initial=0.0))
    t = np.clip(map_RC / peak, 0, 1) if peak > 0 else np.zeros_like(map_RC)
    x = t * (len(INFERNO) - 1)
    lo = np.minimum(np.floor(x).astype(int), len(INFERNO) - 2)
    w = (x - lo)[..., None]
    return np.rint(INFERNO[lo] * (1 - w) + INFERNO[lo + 1] * w).astype(np.uint8)


def seen_image(bb, pixel_values_3HW: torch.Tensor) -> Image.Image:
    """The picture the model saw: its pixel values with the processor's normalisation undone."""
    proc = getattr(bb.processor, "image_processor", bb.processor)
    x = pixel_values_3HW.float().numpy()
    mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
    if getattr(proc, "do_normalize", True) and mean is not None and std is not None:
        x = x * np.asarray(std, np.float32)[:, None, None] + np.asarray(mean, np.float32)[:, None, None]
    else:  # no recorded normalisation: stretch to the full range
        x = (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
    return Image.fromarray(np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0), "RGB")


def scale_css() -> str:
    """The inferno scale as a CSS gradient, for a page's colour bar."""
    return "linear-gradient(to right, " + ",".join(f"rgb{tuple(int(v) for v in c)}" for c in INFERNO) + ")"


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def shown(img: Image.Image) -> Image.Image:
    scale = max(1, -(-SHOWN_PX // max(img.size)))
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def map_pictures(seen: Image.Image, map_RC: np.ndarray) -> tuple[str, str]:
    """(the picture under its map, the map alone) as data: URIs; each patch's cell keeps its value."""
    heat = Image.fromarray(colour(map_RC), "RGB").resize(seen.size, Image.Resampling.NEAREST)
    return data_uri(shown(Image.blend(seen, heat, OVERLAY_ALPHA))), data_uri(shown(heat))


def run_paths(cfg: InspectConfig) -> tuple[str, Path | None]:
    """(the SAE's name, the evaluation folder to read MS and names from, if any)."""
    sae_dir = Path(cfg.sae)
    run = sae_dir.parent.parent if sae_dir.parent.name == "saes" else None
    if cfg.eval_dir is None:
        return sae_dir.name, run / "eval" if run is not None else None
    ev = Path(cfg.eval_dir)
    if not (ev / "metrics.json").is_file():
        raise FileNotFoundError(f"--eval {cfg.eval_dir} holds no metrics.json; expected `sae-vlm evaluate` output")
    return sae_dir.name, ev


def latent_notes(name: str, eval_dir: Path | None, d_sae: int) -> tuple[np.ndarray | None, dict[int, str]]:
    """(MS per latent, {latent: its best-detected taxonomy node and AUROC}) from an evaluation, where present."""
    ms, names = None, {}
    if eval_dir is None:
        return ms, names
    npz = eval_dir / "latents" / f"{name}.npz"
    if npz.is_file():
        try:
            with np.load(npz, allow_pickle=False) as z:
                ms = np.asarray(z["ms"], np.float64) if "ms" in z.files else None
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{npz} is not a readable .npz ({e}); re-run `sae-vlm evaluate`") from None
        if ms is not None and ms.shape != (d_sae,):
            raise ValueError(f"{npz} holds {ms.shape} MS values for an SAE of {d_sae} latents; is it another SAE's?")
    nodes = eval_dir / "nodes" / f"{name}.json"
    if nodes.is_file():
        raw = read_json(nodes)
        if not isinstance(raw, list) or not all(
                isinstance(x, dict) and isinstance(x.get("node"), str) and type(x.get("latent")) is int
                and 0 <= x["latent"] < d_sae and isinstance(x.get("auroc"), (int, float)) for x in raw):
            raise ValueError(f"{nodes} is not a list of taxonomy nodes (node, latent, auroc); re-run `sae-vlm "
                             "evaluate`")
        for x in sorted(raw, key=lambda x: float(x["auroc"])):  # the best node last, so it stays
            names[int(x["latent"])] = f"{x['node']} (AUROC {float(x['auroc']):.2f})"
    return ms, names


def latent_link(cfg: InspectConfig, name: str, eval_dir: Path | None, j: int) -> str | None:
    """A path from OUT to the latent's report page, else to its top-image grid; None when neither exists."""
    places = [Path(cfg.report) / "s" / name / f"{j}.html"] if cfg.report is not None else []
    places += [eval_dir / "grids" / name / f"latent_{j}.png"] if eval_dir is not None else []
    for p in places:
        if p.is_file():
            return Path(os.path.relpath(p.resolve(), Path(cfg.out).resolve())).as_posix()
    return None


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>sae-vlm inspect</title><style>
body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse}} td,th{{padding:4px 8px;text-align:left;
vertical-align:middle;border-bottom:1px solid #ddd}} img{{image-rendering:pixelated}} .scale{{display:inline-block;
width:160px;height:12px;background:{scale}}}
</style></head><body><h1>Which latents fire, and where</h1><p>SAE {sae} at {point} ({how}). Maps: {what}; each in
inferno from 0 <span class="scale"></span> to its own peak, drawn over the picture as the model saw it and alone.
</p>{sections}</body></html>"""


def image_section(entry: dict, seen: Image.Image, ms, names: dict, link) -> str:
    rows = []
    for x in entry["latents"]:
        j = x["latent"]
        over, alone = map_pictures(seen, np.asarray(x["map"], np.float32))
        ms_j = "–" if ms is None or not np.isfinite(ms[j]) else f"{ms[j]:.3f}"
        ref = link(j)
        cell = f'<a href="{html.escape(ref)}">{j}</a>' if ref else str(j)
        rows.append(f"<tr><td>{cell}</td><td>{x['code']:.4g}</td><td>{ms_j}</td>"
                    f"<td>{html.escape(names.get(j, '–'))}</td><td><img src=\"{over}\" alt=\"latent {j} over the "
                    f"image\"></td><td><img src=\"{alone}\" alt=\"map of latent {j}\"></td></tr>")
    body = ("<table><tr><th>latent</th><th>code</th><th>MS</th><th>name</th><th>on the image</th><th>map</th></tr>"
            + "".join(rows) + "</table>") if rows else "<p>No latent fires on this image.</p>"
    return (f"<section><h2>{html.escape(entry['image'])}</h2><img src=\"{data_uri(shown(seen))}\" alt=\"the image as "
            f"the model saw it\">{body}</section>")


def run_inspect(cfg: InspectConfig) -> list[dict]:
    """Inspect `cfg.images` with the SAE; writes OUT/inspect.json and OUT/index.html, and returns the JSON's list.
    Everything is read and computed before OUT is touched."""
    check_owned(Path(cfg.out), "inspect")
    from sae_vlm.sae.model import SAE
    from sae_vlm.sae.runs import resolve_sae_dir

    opened = [open_image(p) for p in cfg.images]  # a bad image is named before any model loads
    name, eval_dir = run_paths(cfg)
    sae = SAE.from_pretrained(resolve_sae_dir(cfg.sae, cfg.step))
    ms, names = latent_notes(name, eval_dir, sae.cfg.d_sae)
    sae, bb, point, how = resolve(sae, cfg.model, cfg.hook_point, cfg.tokens, cfg.device)
    found, sections = [], []
    for i0 in range(0, len(opened), cfg.batch_size):
        pixel_values = bb.preprocess(opened[i0 : i0 + cfg.batch_size])
        batch = inspect_batch(bb, sae, pixel_values, point, how, top=cfg.top, batch_size=cfg.batch_size,
                              quiet=cfg.quiet)
        for k, latents in enumerate(batch):
            entry = {"image": cfg.images[i0 + k], "latents": latents}
            found.append(entry)
            sections.append(image_section(entry, seen_image(bb, pixel_values[k]), ms, names,
                                          lambda j: latent_link(cfg, name, eval_dir, j)))
    what = "the code on each patch" if how == "tokens" else "|gradient × input| of the code at each patch"
    page = PAGE.format(scale=scale_css(), sae=html.escape(str(cfg.sae)), point=point, how=how, what=what,
                       sections="".join(sections))
    with claim(cfg.out, "inspect") as out:
        atomic_write_json(out / "inspect.json", found)
        atomic_write_text(out / "index.html", page)
    return found

