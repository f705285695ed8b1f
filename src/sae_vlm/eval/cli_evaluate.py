"""`sae-vlm evaluate RUN --data STORE`: MS, reconstruction, top images and hierarchy for every SAE of a run.

Writes OUT/metrics.json (summaries), OUT/latents/<name>.npz (per-latent arrays), OUT/top/<name>/top_*.npy,
OUT/tables.md (paper Tables A1/A6/A7 shape), OUT/plots/*.png and, with --embedder, OUT/embeddings/ (the
embedding cache; the input store is only read). Every file is written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import typer

from sae_vlm.data.source import as_source
from sae_vlm.io import atomic_save_npz, atomic_write_bytes
from sae_vlm.eval import hierarchy as H
from sae_vlm.eval.embed import backbone_embedder, cached_embeddings
from sae_vlm.eval.ms import RotatedSource, _device, chance_similarity, ms_stats, summarize_ms
from sae_vlm.eval.recon import heldout_rows, reconstruction_metrics
from sae_vlm.eval.report import paper_tables, plot_fve_vs_width, plot_lca_levels, plot_ms_levels
from sae_vlm.eval.top import EncodedSource, render_grid, save_top, top_activating


def find_saes(run_dir: str | Path) -> list[Path]:
    """SAE directories of a run (RUN/saes/*/config.json), or RUN itself when it is one SAE directory."""
    run = Path(run_dir)
    if (run / "config.json").is_file() and (run / "model.safetensors").is_file():
        return [run]
    dirs = [p.parent for p in sorted(run.glob("saes/*/config.json"))]
    if not dirs:
        raise FileNotFoundError(f"{run} holds no SAEs; expected {run}/saes/<name>/config.json or an SAE directory")
    return dirs


def open_data(data, hook_point: str | None, token_selection: str | None):
    """The activation source an SAE reads: a store subdir picked by hook point (and tokens), or a .npy/tensor."""
    if not (isinstance(data, (str, Path)) and Path(data).is_dir()):
        return as_source(data)
    tries = [f"{hook_point}__{token_selection}", hook_point] if hook_point else [None]
    err = None
    for layer in tries:
        try:
            return as_source(data, layer=layer)
        except (ValueError, FileNotFoundError) as e:
            err = e
    raise err


def load_embeddings(src, rows: int, embeddings=None, embedder=None, cache_dir=None, device="cpu", quiet=True):
    """Precomputed embeddings (checked against the store's image ids when a sidecar json lists them), or
    embeddings of the store's images computed once with `embedder` and cached in `cache_dir` (keyed by the
    model and the store's image ids). None when neither is given."""
    store = src if hasattr(src, "image_ids") else None
    ids = [str(i) for i in store.image_ids()] if store is not None else None
    if embeddings is not None:
        path = Path(embeddings)
        if not path.is_file():
            raise FileNotFoundError(f"embeddings file {path} does not exist")
        emb = np.load(path, mmap_mode="r")
        if emb.ndim != 2 or emb.shape[0] != rows:
            raise ValueError(f"embeddings {path} have shape {emb.shape} but the activations have {rows} rows")
        side = path.with_suffix(".json")
        if ids is not None and side.is_file():
            their = json.loads(side.read_text()).get("image_ids")
            if their is not None and [str(i) for i in their] != ids:
                bad = next((i for i, (a, b) in enumerate(zip(their, ids)) if str(a) != b), min(len(their), len(ids)))
                raise ValueError(f"image ids differ at row {bad}: embeddings {side} list "
                                 f"{their[bad] if bad < len(their) else '<end>'}, the store has {ids[bad] if bad < len(ids) else '<end>'}")
        return emb, str(path)
    if embedder is not None:
        if store is None or not hasattr(store, "paths"):
            raise ValueError(f"--embedder {embedder} needs a store with image paths; this source has none (pass --embeddings)")
        paths = store.paths()
        compute = backbone_embedder(embedder, paths, device=device, quiet=quiet)
        return cached_embeddings(cache_dir, embedder, rows, compute, image_ids=ids), str(embedder)
    return None, None


def _taxonomy(src, rows: int, taxonomy_file):
    """Per-row taxonomy from the store's labels / paths (and an optional mapping file), or None."""
    mapping = H.load_taxonomy_file(taxonomy_file) if taxonomy_file else None
    store = src if hasattr(src, "labels") else None
    if store is not None:
        labels, paths = store.labels(), store.paths()
    elif mapping is not None:  # plain arrays: the mapping is keyed by row number
        labels, paths = [str(i) for i in range(rows)], None
    else:
        return None, None
    taxa = H.image_taxonomy(labels, paths, mapping)
    names = [str(p) for p in paths] if paths is not None else labels
    if all(t is None for t in taxa) and mapping is None:
        return None, None
    return taxa, names


def evaluate_run(run_dir, data, *, out=None, embeddings=None, embedder=None, taxonomy=None, device=None,
                 heldout_frac: float = 1.0, dense_cutoff: float = 0.1, rotation_seed: int | None = 0, top: int = 16,
                 grids: int = 0, chunk_rows: int = 2048, quiet: bool = True) -> dict:
    from sae_vlm.sae.model import SAE

    dev = _device(device)
    out = Path(out) if out is not None else Path(run_dir) / "eval"
    sae_dirs = find_saes(run_dir)
    metrics: dict = {"run": str(run_dir), "data": str(data), "saes": [], "baselines": {}}
    want_ms = embeddings is not None or embedder is not None
    cache_dir = out / "embeddings"  # the input store is only read, never written to
    per_source: dict[tuple, tuple] = {}  # (hook point, token selection) -> (emb, chance, taxa, names)
    first_taxa = first_names = None
    results, per_layer_baseline = [], {}
    for sdir in sae_dirs:
        sae = SAE.from_pretrained(sdir, device=dev).eval()
        cfg = sae.cfg
        src = open_data(data, cfg.hook_point, cfg.token_selection)
        if src.rows == 0:
            raise ValueError(f"evaluation set is empty: {data} has 0 rows for {cfg.hook_point}, expected at least 2")
        key = (cfg.hook_point, cfg.token_selection)
        if key not in per_source:  # embeddings and taxonomy describe this source's rows: once per distinct source
            per_image = int(getattr(src, "rows_per_image", 1) or 1)
            if per_image > 1 and (want_ms or taxonomy is not None):
                raise ValueError(f"{getattr(src, 'path', data)} has {per_image} rows per image ({cfg.token_selection} "
                                 "tokens); MS and taxonomy need one row per image: evaluate a CLS, mean or pooled store")
            emb = chance = None
            if want_ms:
                emb, emb_src = load_embeddings(src, src.rows, embeddings, embedder, cache_dir, dev, quiet)
                chance = chance_similarity(emb)
                if "embeddings" not in metrics:
                    metrics |= {"embeddings": emb_src, "rows": src.rows, "chance_similarity": chance}
            taxa, names = _taxonomy(src, src.rows, taxonomy) if per_image == 1 else (None, None)
            if first_taxa is None and taxa is not None:
                first_taxa, first_names = taxa, names
            per_source[key] = (emb, chance, taxa, names)
        emb, chance, taxa, names = per_source[key]
        layer = cfg.hook_point or "unknown"
        if emb is not None and layer not in per_layer_baseline:
            base = ms_stats(src, emb, device=dev, chunk_rows=chunk_rows, quiet=quiet)
            entry = {"no_sae": summarize_ms(base.ms, chance)}
            arrays = {"no_sae_ms": base.ms.numpy()}
            if rotation_seed is not None:
                rot = ms_stats(RotatedSource(src, rotation_seed), emb, device=dev, chunk_rows=chunk_rows, quiet=quiet)
                entry["rotated"] = summarize_ms(rot.ms, chance) | {"seed": rotation_seed}
                arrays["rotated_ms"] = rot.ms.numpy()
            per_layer_baseline[layer] = base.ms.numpy()
            metrics["baselines"][layer] = entry
            atomic_save_npz(out / "latents" / f"baseline__{layer}.npz", **arrays)

        name = sdir.name
        r = {"name": name, "path": str(sdir), "arch": cfg.arch, "hook_point": layer, "d_in": cfg.d_in,
             "d_sae": cfg.d_sae, "k": cfg.k, "group_sizes": list(cfg.group_sizes) if cfg.group_sizes else None}
        codes = EncodedSource(sae, src, device=dev)
        arrays = {}
        dead_top = None
        if emb is not None:
            res = ms_stats(codes, emb, device=dev, chunk_rows=chunk_rows, quiet=quiet)
            ms = res.ms.numpy()
            r["ms"] = summarize_ms(res.ms, chance)
            r["ms_per_level"] = H.per_level(ms, cfg.group_sizes)
            r["ms_support_median"] = float(res.support[~res.ms.isnan()].double().median()) if r["ms"]["scored"] else None
            arrays |= {"ms": ms, "support": res.support.numpy(), "max_act": res.max_act.numpy(), "freq": res.freq.numpy()}
        else:
            r["ms"] = None
        rows = torch.arange(src.rows) if heldout_frac >= 1 else heldout_rows(src.rows, heldout_frac)
        recon = reconstruction_metrics(sae, src, rows=rows, device=dev, chunk_rows=chunk_rows,
                                       dense_cutoff=dense_cutoff, quiet=quiet)
        arrays["fire_freq"] = recon.pop("fire_freq").numpy()
        r["recon"] = recon
        tv, ti = top_activating(codes, top=top, device=dev, chunk_rows=chunk_rows, quiet=quiet)
        save_top(out / "top" / name, tv, ti)
        arrays |= {"top_values": tv.numpy(), "top_indices": ti.numpy()}
        dead_top = (tv[:, -1] <= 0).numpy()
        if taxa is not None:
            lca = H.latent_lca_depths(ti.clamp(min=0).numpy(), tv.numpy(), taxa)
            uniq = H.top_set_uniqueness(ti.numpy(), dead_K=dead_top)
            r["hierarchy"] = {
                "lca_mean_per_level": H.per_level(lca["mean"], cfg.group_sizes),
                "lca_mode_per_level": H.per_level(lca["mode"], cfg.group_sizes),
                "dead_top": int(dead_top.sum()),
                "missing_taxonomy": H.missing_taxonomy(taxa, names, used_rows=ti[~torch.as_tensor(dead_top)].clamp(min=0)),
                "uniqueness": {k: v for k, v in uniq.items() if k != "max_jaccard"},
            }
            arrays |= {"lca_mean": lca["mean"], "lca_mode": lca["mode"], "max_jaccard": uniq["max_jaccard"]}
        if grids and hasattr(src, "paths") and "ms" in arrays:
            paths = src.paths()
            order = np.argsort(np.nan_to_num(arrays["ms"], nan=-np.inf))[::-1][:grids]
            for j in order:
                render_grid(ti[j].numpy(), lambda i: paths[i], out / "grids" / name / f"latent_{j}.png", values=tv[j].numpy())
        atomic_save_npz(out / "latents" / f"{name}.npz", **arrays)
        if "ms" in arrays:
            plot_ms_levels(out / "plots" / f"ms_levels__{name}.png", name, arrays["ms"], cfg.group_sizes,
                           per_layer_baseline.get(layer))
        results.append(r)
    metrics["saes"] = results
    if first_taxa is not None:
        metrics["taxonomy"] = {"images_missing": H.missing_taxonomy(first_taxa, first_names)["count"],
                               "file": str(taxonomy) if taxonomy else None}
    atomic_write_bytes(out / "tables.md", paper_tables(results, metrics["baselines"]).encode())
    plot_fve_vs_width(out / "plots" / "fve_vs_width.png", results)
    if any("hierarchy" in r for r in results):
        plot_lca_levels(out / "plots" / "lca_per_level.png", results)
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2, default=float).encode())  # last: marks done
    return metrics


def evaluate(
    run_dir: Path = typer.Argument(..., help="Training run directory (RUN/saes/<name>/) or one SAE directory."),
    data: str = typer.Option(..., help="Held-out activation store directory or a .npy of shape (rows, d_in)."),
    embeddings: Optional[Path] = typer.Option(None, help="Image embeddings .npy [rows, D] for the MS similarity."),
    embedder: Optional[str] = typer.Option(None, help="Model id or dir to embed the store's images (cached in OUT/embeddings)."),
    taxonomy: Optional[Path] = typer.Option(None, help="CSV (label,path) or JSON mapping labels to 7-level taxa."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default RUN/eval)."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda, ... (default: cuda when available)."),
    heldout_frac: float = typer.Option(1.0, help="Fraction of --data rows used for reconstruction metrics."),
    dense_cutoff: float = typer.Option(0.1, help="A latent firing on more than this fraction of rows is dense."),
    rotation_seed: int = typer.Option(0, help="Seed of the random-rotation baseline; -1 to skip it."),
    top: int = typer.Option(16, help="Top-activating images kept per latent."),
    grids: int = typer.Option(0, help="Render 4x4 image grids for this many highest-MS latents per SAE."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Monosemanticity, reconstruction, top images and hierarchy of every SAE in a run."""
    m = evaluate_run(run_dir, data, out=out, embeddings=embeddings, embedder=embedder, taxonomy=taxonomy,
                     device=device, heldout_frac=heldout_frac, dense_cutoff=dense_cutoff,
                     rotation_seed=None if rotation_seed < 0 else rotation_seed, top=top, grids=grids, quiet=quiet)
    dest = out if out is not None else Path(run_dir) / "eval"
    for r in m["saes"]:
        ms = r["ms"]
        ms_txt = f"MS {ms['mean']:.3f}±{ms['std']:.3f} ({ms['dead']} dead)" if ms and "mean" in ms else "MS –"
        typer.echo(f"{r['name']}: {ms_txt}, FVE {100 * r['recon']['fve']:.1f}%, L0 {r['recon']['l0_threshold']:.1f}")
    typer.echo(f"wrote {dest / 'metrics.json'}")
