"""Evaluate every SAE of a run on a held-out store, in named steps: inputs (rows, embeddings, taxonomy), neuron
baselines, MS, reconstruction, top images, hierarchy, and the run-wide tables and plots.

Writes under the output directory: metrics.json (summaries, written last: it marks the evaluation done),
latents/<name>.npz (per-latent arrays), top/<name>/top_*.npy, tables.md (paper Tables A1/A6/A7 shape), plots/*.png,
nodes/<name>.json (each taxonomy node's best-detecting latent), grids/ with --grids and, with an embedder,
embeddings/ (the cache; the input store is only read).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_vlm.config import EvaluateConfig
from sae_vlm.data.source import as_source
from sae_vlm.device import resolve_device
from sae_vlm.eval import hierarchy as H
from sae_vlm.eval.embed import load_embeddings
from sae_vlm.eval.ms import RotatedSource, chance_similarity, ms_stats, summarize_ms
from sae_vlm.eval.recon import heldout_rows, reconstruction_metrics
from sae_vlm.eval.report import paper_tables, plot_fve_vs_width, plot_lca_levels, plot_ms_levels
from sae_vlm.eval.top import EncodedSource, code_chunks, render_grid, save_top, top_activating
from sae_vlm.io import atomic_save_npz, atomic_write_bytes
from sae_vlm.sae.model import SAE
from sae_vlm.sae.runs import find_saes


def open_data(data, hook_point: str | None, token_selection: str | None):
    """The activation source an SAE reads: a store subdir picked by hook point (and tokens), or a .npy/tensor."""
    if not (isinstance(data, (str, Path)) and Path(data).is_dir()):
        return as_source(data)
    tries = [f"{hook_point}__{token_selection}", hook_point] if hook_point else [None]
    err: Exception | None = None
    for layer in tries:
        try:
            return as_source(data, layer=layer)
        except (ValueError, FileNotFoundError) as e:
            err = e
    assert err is not None
    raise err


@dataclasses.dataclass
class Inputs:
    """One (hook point, token selection) of the data, and what describes its rows: embeddings and taxonomy."""

    src: Any  # an ActivationSource; a store also has paths(), labels() and image ids
    emb: np.ndarray | None = None
    chance: float | None = None
    taxa: list | None = None
    names: list | None = None
    taxonomy_source: str | None = None  # file | inat | folders


class Evaluation:
    """The state the steps share: settings, device, output directory, the metrics being built, and per-source and
    per-layer results that several SAEs reuse."""

    def __init__(self, cfg: EvaluateConfig):
        self.cfg, self.dev, self.out = cfg, resolve_device(cfg.device), Path(cfg.out_dir)
        self.metrics: dict = {"run": str(cfg.run_dir), "data": str(cfg.data), "saes": [], "baselines": {}}
        self.inputs: dict[tuple, Inputs] = {}
        self.neuron_ms: dict[str, np.ndarray] = {}  # hook point -> MS of the raw neurons
        self.first_taxonomy: Inputs | None = None

    # --- step 1: the rows an SAE reads, with their embeddings and taxonomy (once per distinct source) ---------
    def inputs_for(self, sae: SAE) -> Inputs:
        cfg, scfg = self.cfg, sae.cfg
        key = (scfg.hook_point, scfg.token_selection)
        if key in self.inputs:
            return self.inputs[key]
        src = open_data(cfg.data, scfg.hook_point, scfg.token_selection)
        if src.rows == 0:
            raise ValueError(f"evaluation set is empty: {cfg.data} has 0 rows for {scfg.hook_point}, "
                             "expected at least 2")
        per_image = int(getattr(src, "rows_per_image", 1) or 1)
        want_ms = cfg.embeddings is not None or cfg.embedder is not None
        if per_image > 1 and (want_ms or cfg.taxonomy is not None):
            raise ValueError(f"{getattr(src, 'path', cfg.data)} has {per_image} rows per image ({scfg.token_selection} "
                             "tokens); MS and taxonomy need one row per image: evaluate a CLS, mean or pooled store")
        inp = Inputs(src)
        if want_ms:
            inp.emb, emb_src = load_embeddings(src, src.rows, self.out / "embeddings", cfg.embeddings, cfg.embedder,
                                               self.dev, cfg.quiet)
            inp.chance = chance_similarity(inp.emb)
            if "embeddings" not in self.metrics:
                self.metrics |= {"embeddings": emb_src, "rows": src.rows, "chance_similarity": inp.chance}
        if per_image == 1:
            inp.taxa, inp.names, inp.taxonomy_source = H.store_taxonomy(src, src.rows, cfg.taxonomy)
        if self.first_taxonomy is None and inp.taxa is not None:
            self.first_taxonomy = inp
        self.inputs[key] = inp
        return inp

    # --- step 2: the raw neurons of the layer ("No SAE") and a random rotation of them ----------------------------
    def baselines(self, layer: str, inp: Inputs) -> None:
        if inp.emb is None or layer in self.neuron_ms:
            return
        cfg = self.cfg
        base = ms_stats(inp.src, inp.emb, device=self.dev, chunk_rows=cfg.chunk_rows, quiet=cfg.quiet)
        entry = {"no_sae": summarize_ms(base.ms, inp.chance)}
        arrays = {"no_sae_ms": base.ms.numpy()}
        if cfg.rotation_seed >= 0:
            rot = ms_stats(RotatedSource(inp.src, cfg.rotation_seed), inp.emb, device=self.dev,
                           chunk_rows=cfg.chunk_rows, quiet=cfg.quiet)
            entry["rotated"] = summarize_ms(rot.ms, inp.chance) | {"seed": cfg.rotation_seed}
            arrays["rotated_ms"] = rot.ms.numpy()
        self.neuron_ms[layer] = base.ms.numpy()
        self.metrics["baselines"][layer] = entry
        atomic_save_npz(self.out / "latents" / f"baseline__{layer}.npz", **arrays)

    # --- step 3: MS of every latent ----------------------------------------------------------------------------
    def ms(self, sae: SAE, codes: EncodedSource, inp: Inputs, r: dict, arrays: dict) -> None:
        if inp.emb is None:
            r["ms"] = None
            return
        res = ms_stats(codes, inp.emb, device=self.dev, chunk_rows=self.cfg.chunk_rows, quiet=self.cfg.quiet)
        ms = res.ms.numpy()
        r["ms"] = summarize_ms(res.ms, inp.chance)
        r["ms_per_level"] = H.per_level(ms, sae.cfg.group_sizes)
        r["ms_support_median"] = float(res.support[~res.ms.isnan()].double().median()) if r["ms"]["scored"] else None
        arrays |= {"ms": ms, "support": res.support.numpy(), "max_act": res.max_act.numpy(), "freq": res.freq.numpy()}

    # --- step 4: FVE, MSE, cosine, L0, dead and dense fractions ----------------------------------------------------
    def reconstruction(self, sae: SAE, inp: Inputs, r: dict, arrays: dict) -> None:
        cfg, n = self.cfg, inp.src.rows
        rows = torch.arange(n) if cfg.heldout_frac >= 1 else heldout_rows(n, cfg.heldout_frac)
        recon = reconstruction_metrics(sae, inp.src, rows=rows, device=self.dev, batch_rows=cfg.batch_rows,
                                       dense_cutoff=cfg.dense_cutoff, quiet=cfg.quiet)
        arrays["fire_freq"] = recon.pop("fire_freq").numpy()
        r["recon"] = recon

    # --- step 5: each latent's top-activating images ---------------------------------------------------------------
    def top_images(self, name: str, codes: EncodedSource, arrays: dict) -> tuple[torch.Tensor, torch.Tensor]:
        tv, ti = top_activating(codes, top=self.cfg.top, device=self.dev, chunk_rows=self.cfg.chunk_rows,
                                quiet=self.cfg.quiet)
        save_top(self.out / "top" / name, tv, ti)
        arrays |= {"top_values": tv.numpy(), "top_indices": ti.numpy()}
        return tv, ti

    # --- step 6: LCA depth of each latent's top images per Matryoshka level, uniqueness of the top sets -----------
    def hierarchy(self, sae: SAE, inp: Inputs, tv: torch.Tensor, ti: torch.Tensor, r: dict, arrays: dict) -> None:
        if inp.taxa is None:
            return
        groups = sae.cfg.group_sizes
        dead_top = (tv[:, -1] <= 0).numpy()
        lca = H.latent_lca_depths(ti.clamp(min=0).numpy(), tv.numpy(), inp.taxa)
        uniq = H.top_set_uniqueness(ti.numpy(), dead_F=dead_top)
        used = ti[~torch.as_tensor(dead_top)].clamp(min=0)
        detection = H.node_detection(code_chunks(EncodedSource(sae, inp.src, device=self.dev), self.cfg.chunk_rows,
                                                 self.dev), inp.taxa, groups)
        atomic_write_bytes(self.out / "nodes" / f"{r['name']}.json", json.dumps(detection["nodes"]).encode())
        r["hierarchy"] = {
            "taxonomy_source": inp.taxonomy_source,
            "nodes_detected": detection["detected"],  # share of taxonomy nodes some latent detects at AUROC >= 0.9
            "node_detection_per_depth": detection["per_depth"],
            "taxonomy_depth": H.taxonomy_depth(inp.taxa),
            "lca_mean_per_level": H.per_level(lca["mean"], groups),
            "lca_mode_per_level": H.per_level(lca["mode"], groups),
            "dead_top": int(dead_top.sum()),
            "missing_taxonomy": H.missing_taxonomy(inp.taxa, inp.names, used_rows=used),
            "uniqueness": {k: v for k, v in uniq.items() if k != "max_jaccard"},
        }
        arrays |= {"lca_mean": lca["mean"], "lca_mode": lca["mode"], "max_jaccard": uniq["max_jaccard"]}

    def grids(self, name: str, inp: Inputs, tv: torch.Tensor, ti: torch.Tensor, arrays: dict) -> None:
        if not self.cfg.grids or not hasattr(inp.src, "paths") or "ms" not in arrays:
            return
        paths = inp.src.paths()
        for j in np.argsort(np.nan_to_num(arrays["ms"], nan=-np.inf))[::-1][: self.cfg.grids]:
            render_grid(ti[j].numpy(), lambda i: paths[i], self.out / "grids" / name / f"latent_{j}.png",
                        values=tv[j].numpy())

    def score(self, name: str, sdir: Path) -> dict:
        """Every step for one SAE; returns its metrics.json entry."""
        sae = SAE.from_pretrained(sdir, device=self.dev).eval()
        scfg = sae.cfg
        inp = self.inputs_for(sae)
        layer = scfg.hook_point or "unknown"
        self.baselines(layer, inp)
        r = {"name": name, "path": str(sdir), "step": sae.meta.get("training", {}).get("step"), "arch": scfg.arch,
             "hook_point": layer, "d_in": scfg.d_in, "d_sae": scfg.d_sae, "k": scfg.k,
             "group_sizes": list(scfg.group_sizes) if scfg.group_sizes else None}
        codes, arrays = EncodedSource(sae, inp.src, device=self.dev), {}
        self.ms(sae, codes, inp, r, arrays)
        self.reconstruction(sae, inp, r, arrays)
        tv, ti = self.top_images(name, codes, arrays)
        self.hierarchy(sae, inp, tv, ti, r, arrays)
        self.grids(name, inp, tv, ti, arrays)
        atomic_save_npz(self.out / "latents" / f"{name}.npz", **arrays)
        if "ms" in arrays:
            plot_ms_levels(self.out / "plots" / f"ms_levels__{name}.png", name, arrays["ms"], scfg.group_sizes,
                           self.neuron_ms.get(layer))
        return r

    # --- step 7: run-wide tables and plots, then metrics.json ------------------------------------------------------
    def finish(self, results: list[dict]) -> dict:
        metrics, out = self.metrics, self.out
        metrics["saes"] = results
        t = self.first_taxonomy
        if t is not None and t.taxa is not None:
            metrics["taxonomy"] = {"images_missing": H.missing_taxonomy(t.taxa, t.names)["count"],
                                   "file": str(self.cfg.taxonomy) if self.cfg.taxonomy else None,
                                   "source": t.taxonomy_source, "depth": H.taxonomy_depth(t.taxa)}
        atomic_write_bytes(out / "tables.md", paper_tables(results, metrics["baselines"]).encode())
        plot_fve_vs_width(out / "plots" / "fve_vs_width.png", results)
        if any("hierarchy" in r for r in results):
            plot_lca_levels(out / "plots" / "lca_per_level.png", results)
        atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2, default=float).encode())
        return metrics


def evaluate_run(cfg: EvaluateConfig) -> dict:
    """Score every SAE of `cfg.run_dir` (at `cfg.step`, or the run's default snapshot) on `cfg.data`; returns what
    metrics.json holds."""
    saes, step = find_saes(cfg.run_dir, cfg.step)
    ev = Evaluation(cfg)
    ev.metrics["step"] = step  # which snapshot was scored: a step number or "final"
    return ev.finish([ev.score(name, sdir) for name, sdir in saes])
