"""`sae-vlm steer` (generate with clamped latents, print a table, write JSON) and `sae-vlm steer-score`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from sae_vlm.cli_lists import comma_list
from sae_vlm.io import atomic_write_json


def write_json(path: Path, obj) -> None:
    atomic_write_json(path, obj, indent=2)


def _table(rows: list[dict], cols: list[str], width: int = 70) -> str:
    def cell(v) -> str:
        s = f"{v:g}" if isinstance(v, float) else str(v)
        s = s.replace("\n", " ⏎ ")
        return s if len(s) <= width else s[: width - 1] + "…"

    cells = [[cell(r[c]) for c in cols] for r in rows]
    ws = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, ws)).rstrip()  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in ws])] + [line(r) for r in cells])


def _load(llava: str, sae_dir: str, device: str, dtype: str):
    from sae_vlm.sae.model import SAE
    from sae_vlm.steer.generate import load_llava

    from sae_vlm.sae.distributed import resolve_device

    dev = resolve_device(device)
    model, processor = load_llava(llava, device=dev, dtype=dtype)
    return model, processor, SAE.from_pretrained(sae_dir, device=dev), dev


def steer(
    llava: str = typer.Option(..., help="LLaVA hub id or directory (LlavaForConditionalGeneration + processor)."),
    sae: str = typer.Option(..., help="SAE directory trained at the layer the projector reads."),
    latents: str = typer.Option(..., help="Comma list of latent ids, e.g. 39,120."),
    alpha: str = typer.Option("0,30,50", help="Comma list of values for the op (paper: clamp to 0,30,40,50)."),
    image: list[str] = typer.Option(["white"], help="'white' or an image path; repeat for several."),
    prompt: list[str] = typer.Option(["Write me a short love poem"], help="Prompt text; repeat for several."),
    op: str = typer.Option("clamp", help="clamp | add | scale | zero."),
    max_new_tokens: int = typer.Option(60, help="New tokens per answer (greedy)."),
    replace: bool = typer.Option(False, "--replace/--error-term",
                                 help="Replace the residual by the SAE reconstruction (paper) or keep the error term."),
    hook_point: Optional[str] = typer.Option(None, help="Vision-tower layer; default: the one the projector reads."),
    unsteered: bool = typer.Option(True, help="Also generate once per image/prompt with the model unpatched."),
    batch_size: int = typer.Option(16, help="Cases per generate call."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1 or auto."),
    dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    out: Path = typer.Option(Path("steer.json"), help="JSON file with every output."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Generate with SAE latents edited in LLaVA's vision tower: every latent × α × image × prompt."""
    from sae_vlm.steer.edits import OPS
    from sae_vlm.steer.generate import Case, generate_cases, grid_cases, open_image

    if op not in OPS:
        raise typer.BadParameter(f"--op {op!r}: expected one of {', '.join(OPS)}")
    lat = list(comma_list(latents, "--latents", int, "latent ids like 39,120"))
    alphas = list(comma_list(alpha, "--alpha", float, "numbers"))
    model, processor, sae_m, _ = _load(llava, sae, device, dtype)
    if not all(0 <= j < sae_m.cfg.d_sae for j in lat):
        raise typer.BadParameter(f"--latents {latents!r}: ids must be in 0..{sae_m.cfg.d_sae - 1}")
    cases, rows = grid_cases(lat, alphas, image, prompt, op=op)
    if unsteered:
        base = [(img, p) for img in image for p in prompt]
        cases = [Case(open_image(img), p, None) for img, p in base] + cases
        rows = [{"latent": None, "alpha": None, "op": "none", "image": img, "prompt": p} for img, p in base] + rows
    texts = generate_cases(model, processor, sae_m, cases, hook_point=hook_point, error_term=not replace,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, quiet=quiet)
    for r, t in zip(rows, texts):
        r["output"] = t
    cols = ["latent", "alpha"] + (["image"] if len(image) > 1 else []) + (["prompt"] if len(prompt) > 1 else [])
    typer.echo(_table([{**r, "latent": "-" if r["latent"] is None else r["latent"],
                        "alpha": "-" if r["alpha"] is None else r["alpha"]} for r in rows], cols + ["output"]))
    write_json(out, {"llava": llava, "sae": sae, "mode": "replace" if replace else "error_term",
                     "max_new_tokens": max_new_tokens, "results": rows})
    typer.echo(f"wrote {out}")


def _image_list(src: str):
    """A folder or path list -> (ImageSource, labels or None)."""
    from sae_vlm.data.images import open_images

    s = open_images(src)
    labels = [r.label for r in s.records]
    return s, (labels if all(lab for lab in labels) else None)


def _load_images(src, ids) -> list:
    from sae_vlm.data.images import load_image

    return [load_image(src, int(i)) for i in ids]


class _LazyImages:
    """An image source as a sequence whose slices are decoded on demand (the pool may not fit in memory)."""

    def __init__(self, src, ids=None):
        self.src, self.ids = src, list(range(len(src)) if ids is None else ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, sl: slice) -> list:
        return _load_images(self.src, self.ids[sl])


def steer_score(
    llava: str = typer.Option(..., help="LLaVA hub id or directory."),
    sae: str = typer.Option(..., help="SAE directory (paper: ×64 Matryoshka, layer 22, random tokens)."),
    clip: str = typer.Option(..., help="CLIPModel id or directory: image embedder (concepts) and text tower (words)."),
    images: str = typer.Option("white", help="'white' or an image folder/path list to steer on (labels = folders)."),
    latents: str = typer.Option("random:100",
                                help="39,120 | 0-999 | random:N | level:L[:N] | all (dead latents excluded)."),
    alpha: float = typer.Option(100.0, help="Value for the op (paper: clamp to 100)."),
    op: str = typer.Option("clamp", help="clamp | add | scale | zero."),
    pool: Optional[str] = typer.Option(None, help="Folder/path list to take top images from (default: --images)."),
    top: Optional[Path] = typer.Option(None, help="Precomputed top-image indices [d_sae, 16] (.npy), "
                                                  "indexing --top-images."),
    top_images: Optional[str] = typer.Option(None, help="Folder/path list the --top indices refer to."),
    per_class: Optional[int] = typer.Option(None, help="Steer on the first N images of each class folder."),
    max_images: Optional[int] = typer.Option(None, help="Steer on at most this many images."),
    bound_images: int = typer.Option(1000, help="Labelled images (sampled) for the upper/lower bounds."),
    replace: bool = typer.Option(True, "--replace/--error-term", help="Paper: replace (no error term)."),
    hook_point: Optional[str] = typer.Option(None, help="Vision-tower layer; default: the one the projector reads."),
    max_new_tokens: int = typer.Option(5, help="New tokens per answer (paper: 5)."),
    batch_size: int = typer.Option(16, help="Cases per generate call (and images per encode batch)."),
    seed: int = typer.Option(0, help="Seed for random latents and the shuffled class names."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1 or auto."),
    dtype: str = typer.Option("auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16."),
    out: Path = typer.Option(Path("steer_score.json"), help="JSON file with the scores and every answer."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """The paper's steering score: cos(concept of latent j, first word LLaVA says with j clamped to α)."""
    from sae_vlm.steer import score as S
    from sae_vlm.steer.generate import white_image

    model, processor, sae_m, dev = _load(llava, sae, device, dtype)
    embedder = S.ClipEmbedder.load(clip, device=dev)

    # images to steer on
    if images == "white":
        steer_imgs, steer_names, steer_labels, steer_src = [white_image()], ["white"], None, None
    else:
        steer_src, labels = _image_list(images)
        ids = list(range(len(steer_src)))
        if per_class is not None:
            if labels is None:
                raise typer.BadParameter(f"--per-class needs class folders, but {images} has unlabelled images")
            count: dict[str, int] = {}
            kept = []
            for i in ids:
                if count.get(labels[i], 0) < per_class:
                    kept.append(i)
                    count[labels[i]] = count.get(labels[i], 0) + 1
            ids = kept
        ids = ids[:max_images] if max_images else ids
        steer_imgs = _load_images(steer_src, ids)
        steer_names = [steer_src.records[i].id for i in ids]
        steer_labels = [labels[i] for i in ids] if labels else None

    # top images per latent
    if top is not None:
        if top_images is None:
            raise typer.BadParameter("--top needs --top-images: the folder or path list its indices refer to")
        top_idx = np.load(top)
        vals_file = Path(str(top).replace("_indices.npy", "_values.npy"))
        top_vals = np.load(vals_file) if vals_file != Path(top) and vals_file.is_file() else None
        pool_src, pool_labels = _image_list(top_images)
    else:
        pool_spec = pool or (None if images == "white" else images)
        if pool_spec is None:
            raise typer.BadParameter("--images white needs --pool DIR or --top FILE.npy to find the top images")
        pool_src, pool_labels = _image_list(pool_spec)
        top_vals, top_idx = S.top_images(model, sae_m, _LazyImages(pool_src), hook_point=hook_point,
                                         batch_size=batch_size, processor=processor, quiet=quiet)
    if top_idx.ndim != 2 or top_idx.shape[0] != sae_m.cfg.d_sae:
        raise typer.BadParameter(f"top-image table has shape {top_idx.shape}; expected [d_sae={sae_m.cfg.d_sae}, 16]")
    if top_idx.max() >= len(pool_src):
        raise typer.BadParameter(f"top-image index {int(top_idx.max())} is out of range for {len(pool_src)} images")
    alive = S.alive_latents(top_idx, top_vals)
    chosen = S.select_latents(latents, alive, sae_m.cfg.group_sizes, seed=seed)
    if not chosen:
        raise typer.BadParameter(f"--latents {latents!r} selects no live latent "
                                 f"({int(alive.sum())} of {len(alive)} are alive)")

    # concept embeddings from the union of the chosen latents' top images
    need = sorted({int(i) for i in top_idx[chosen].reshape(-1) if i >= 0})
    slot = {i: k for k, i in enumerate(need)}  # pool index -> row of the embeddings of needed images only
    local = np.vectorize(lambda i: slot.get(int(i), -1), otypes=[np.int64])(top_idx[chosen])
    concept = S.concept_embeddings(local, embedder.images(_LazyImages(pool_src, need)))

    res = S.steering_score(model, processor, sae_m, embedder, latents=chosen, concept_KD=concept, images=steer_imgs,
                           image_names=steer_names, alpha=alpha, op=op, error_term=not replace, hook_point=hook_point,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, class_names=steer_labels, seed=seed,
                           quiet=quiet)
    if res["bounds"] is None and pool_labels is not None:  # white image: bounds from the labelled pool
        rng = np.random.default_rng(seed)
        ids = sorted(rng.choice(len(pool_src), size=min(bound_images, len(pool_src)), replace=False).tolist())
        res["bounds"] = S.similarity_bounds(embedder, _LazyImages(pool_src, ids), [pool_labels[i] for i in ids], seed)
        res["bounds"]["source"] = "pool"
    elif res["bounds"] is not None:
        res["bounds"]["source"] = "steered images"
    res["settings"].update({"llava": llava, "sae": sae, "clip": clip, "latent_spec": latents,
                            "dead_excluded": int((~alive).sum())})
    write_json(out, res)
    fmt = lambda d: f"{d['mean']:.3f} ± {d['std']:.3f} (n={d['n']})"  # noqa: E731
    lines = [("steered", fmt(res["steered"])), ("unsteered", fmt(res["unsteered"]))]
    if res["bounds"]:
        lines += [("upper bound", fmt(res["bounds"]["upper"])), ("lower bound", fmt(res["bounds"]["lower"]))]
    else:
        lines += [("bounds", "n/a (no class names)")]
    typer.echo("\n".join(f"{k:<12} {v}" for k, v in lines))
    typer.echo(f"wrote {out}")
