"""Evaluate every SAE of a run on a held-out store, reading each distinct source (hook point, token selection) once.

A pass over a source moves each chunk of rows to the device once and feeds it to the accumulators of every metric:
the MS of the layer's raw neurons and of a random rotation of them, and for every SAE that reads the source (each
chunk encoded once) its MS, top images, reconstruction and taxonomy node detection. Then each SAE's results are
written in named steps, and the run-wide tables and plots.

Writes under the output directory: metrics.json (summaries, written last: it marks the evaluation done),
latents/<name>.npz (per-latent arrays), top/<name>/top_*.npy, maps/<name>.npz (for a store of patch tokens: each
latent's code on the patches of its top images; with --heatmaps, for an SAE on one vector per image, |gradient x
input| of its mapped latents' codes over their top images' patches, through the vision model), tables.md (paper Tables
A1/A6/A7 shape), plots/*.png, nodes/<name>.json (each taxonomy node's best-detecting latent), grids/ with --grids and,
with an embedder, embeddings/ (the cache; the input store is only read). SAEs of one configuration trained with
several seeds are also summarised together, with each latent's stability across them (eval/seeds.py).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.backbones import Backbone, load_backbone
from sae_vlm.config import FEW_HELDOUT_ROWS, EvaluateConfig
from sae_vlm.data.images import is_store_member, open_image
from sae_vlm.data.source import ActivationSource, sequential_chunks
from sae_vlm.device import resolve_device
from sae_vlm.eval import hierarchy as H
from sae_vlm.eval.alignment import HookAlignment, SparseCollector
from sae_vlm.eval.embed import check_text_tower, load_embeddings
from sae_vlm.eval.labels import resolve_labels, training_data
from sae_vlm.eval.maps import resolve, top_image_maps
from sae_vlm.eval.ms import MSAccumulator, RotatedSource, chance_similarity, summarize_ms, unit_embeddings
from sae_vlm.eval.naming import FiredImages, default_vocab, name_latents, read_vocab, text_embeddings, unit
from sae_vlm.eval.naming import summary as naming_summary
from sae_vlm.eval.recon import ReconAccumulator, heldout_rows
from sae_vlm.eval.report import (
    alignment_table,
    paper_tables,
    plot_alignment,
    plot_fve_vs_width,
    plot_lca_levels,
    plot_ms_levels,
)
from sae_vlm.eval.seeds import needs_scipy, score_seeds
from sae_vlm.eval.sources import open_data, sae_config, source_key
from sae_vlm.eval.top import ImageTopMaps, PatchGrid, patch_grid, render_grid
from sae_vlm.io import atomic_save_npz, atomic_write_bytes
from sae_vlm.outdir import claim
from sae_vlm.sae.model import SAE
from sae_vlm.sae.runs import find_saes
from sae_vlm.topk import TopAccumulator, save_top

NAMES_PER_LATENT = 3  # --names keeps each latent's top 3, as `sae-vlm name` does by default


@dataclasses.dataclass
class Inputs:
    """One (hook point, token selection) of the data, and what describes its rows: embeddings and taxonomy."""

    src: ActivationSource
    grid: PatchGrid | None = None  # a store of patch tokens: top images are whole images, with maps
    emb: np.ndarray | None = None
    chance: float | None = None
    taxa: list | None = None
    names: list | None = None
    taxonomy: dict | None = None  # H.store_taxonomy's credit: source (file | inat | folders) and rows matched
    align: HookAlignment | None = None  # with --labels
    paths: list[str] | None = None  # with --heatmaps: each row's image file
    words: list[str] | None = None  # with --names: the vocabulary, read once per source


@dataclasses.dataclass
class SAEResult:
    """One SAE's entry in metrics.json. `ms_per_level` and `ms_support_median` are written only with an MS,
    `hierarchy` only with a taxonomy and `stable_share` only for an SAE trained under several seeds."""

    name: str
    path: str
    step: int | None
    arch: str
    hook_point: str
    d_in: int
    d_sae: int
    k: int | None
    group_sizes: list[int] | None
    ms: dict | None = None  # summarize_ms's record
    ms_per_level: list | None = None
    ms_support_median: float | None = None
    recon: dict = dataclasses.field(default_factory=dict)  # ReconAccumulator's record, fire_freq moved to the arrays
    hierarchy: dict | None = None
    stable_share: float | None = None  # set by score_seeds
    heatmaps: dict | None = None  # with --heatmaps: what was mapped and what it cost
    naming: dict | None = None  # with --names: eval/naming.py's summary (named latents, scores, seconds)

    def to_json(self) -> dict:
        entry = dataclasses.asdict(self)
        absent = (["ms_per_level", "ms_support_median"] if self.ms is None else []) + \
            [k for k in ("hierarchy", "stable_share", "heatmaps", "naming") if entry[k] is None]
        return {k: v for k, v in entry.items() if k not in absent}


@dataclasses.dataclass
class LatentArrays:
    """One SAE's per-latent arrays, saved to latents/<name>.npz in this order (those the evaluation computed)."""

    ms: np.ndarray | None = None
    support: np.ndarray | None = None
    max_act: np.ndarray | None = None
    freq: np.ndarray | None = None
    fire_freq: np.ndarray | None = None
    top_values: np.ndarray | None = None
    top_indices: np.ndarray | None = None
    lca_mean: np.ndarray | None = None
    lca_mode: np.ndarray | None = None
    max_jaccard: np.ndarray | None = None
    names: dict[str, np.ndarray] | None = None  # with --names: names, name_cos, name_score, name_score_shuffled

    def npz(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in vars(self).items() if v is not None and k != "names"} | (self.names or {})



@dataclasses.dataclass
class LayerBaseline:
    """The MS of a layer's raw neurons and (unless --rotation-seed is negative) of a random rotation of them."""

    no_sae: dict
    rotated: dict | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class BrokenSAE:
    """An SAE that could not be scored, and why (one line)."""

    name: str
    path: str
    error: str


@dataclasses.dataclass
class EvalMetrics:
    """metrics.json. The embeddings' source, row count and chance similarity are written only with embeddings;
    `broken`, `seeds` and `taxonomy` only when there is one."""

    run: str
    data: str
    saes: list[SAEResult] = dataclasses.field(default_factory=list)
    baselines: dict[str, LayerBaseline] = dataclasses.field(default_factory=dict)
    step: int | str | None = None  # which snapshot was scored: a step number or "final"
    broken: list[BrokenSAE] = dataclasses.field(default_factory=list)
    embeddings: str | None = None
    rows: int | None = None
    chance_similarity: float | None = None
    seeds: dict = dataclasses.field(default_factory=dict)  # score_seeds's records, by base name
    taxonomy: dict | None = None
    alignment: dict = dataclasses.field(default_factory=dict)  # with --labels: per hook point, eval/alignment.py

    def to_json(self) -> dict:
        entry = dataclasses.asdict(self) | {"saes": [r.to_json() for r in self.saes],
                                            "baselines": {k: b.to_json() for k, b in self.baselines.items()}}
        absent = [k for k in ("broken", "seeds", "taxonomy", "alignment") if not entry[k]]
        absent += ["embeddings", "rows", "chance_similarity"] if self.embeddings is None else []
        return {k: v for k, v in entry.items() if k not in absent}


@dataclasses.dataclass
class Baselines:
    """The MS of a layer's raw neurons ("No SAE") and, unless the seed is negative, of a random rotation of them."""

    layer: str
    neurons: MSAccumulator
    rotation: RotatedSource | None = None
    rotated: MSAccumulator | None = None

    def add(self, x_RD: torch.Tensor, e_RD: torch.Tensor) -> None:
        self.neurons.add(x_RD, e_RD)
        if self.rotation is not None and self.rotated is not None:
            self.rotated.add(self.rotation.rotate(x_RD), e_RD)


@dataclasses.dataclass(frozen=True)
class Attribution:
    """Where --heatmaps differentiates an SAE's codes: the vision model, the hook point and how the SAE read it."""

    bb: Backbone
    point: str
    how: str


@dataclasses.dataclass
class Scoring:
    """One SAE during the pass over its source: the model and the accumulators of its metrics."""

    name: str
    sdir: Path
    sae: SAE
    top: TopAccumulator | ImageTopMaps
    recon: ReconAccumulator
    ms: MSAccumulator | None = None  # with embeddings
    nodes: H.NodeCollector | None = None  # with a taxonomy
    attribution: Attribution | None = None  # with --heatmaps, for an SAE on one vector per image
    fired: FiredImages | None = None  # with --names: the (image, latent) pairs where it fires
    align: SparseCollector | None = None  # with --labels

    def add(self, x_RD: torch.Tensor, e_RD: torch.Tensor | None, r0: int) -> None:
        codes_RF = self.sae.encode(x_RD).float()  # once per chunk, for every metric
        if self.ms is not None and e_RD is not None:
            self.ms.add(codes_RF, e_RD)
        if isinstance(self.top, ImageTopMaps):
            self.top.add(codes_RF, r0)
        else:
            self.top.add(codes_RF)
        self.recon.add(x_RD, codes_RF, r0)
        if self.nodes is not None:
            self.nodes.add(codes_RF)
        if self.align is not None:
            self.align.add(codes_RF, r0)
        if self.fired is not None:
            self.fired.add(codes_RF)


class Evaluation:
    """The state the steps share: settings, device, output directory, the metrics being built, and per-source and
    per-layer results that several SAEs reuse."""

    def __init__(self, cfg: EvaluateConfig):
        self.cfg, self.dev, self.out = cfg, resolve_device(cfg.device), Path(cfg.out_dir)
        self.metrics = EvalMetrics(str(cfg.run_dir), str(cfg.data))
        self.inputs: dict[tuple, Inputs] = {}
        self.neuron_ms: dict[str, np.ndarray] = {}  # hook point -> MS of the raw neurons
        self.first_taxonomy: Inputs | None = None
        self.backbones: dict[str, Backbone] = {}  # --heatmaps: vision models by id, loaded once
        self.heatmap_models: dict[str, Backbone | None] = {}  # --heatmaps: each SAE's, None for a token SAE
        self.texts: dict[tuple, torch.Tensor] = {}  # --names: unit text embeddings per vocabulary
        self.text_seconds = 0.0

    def score_all(self, saes: list[tuple[str, Path]]) -> list[SAEResult]:
        """Every SAE's metrics.json entry, in the order of `saes`; one pass per distinct source, in the order the
        sources first appear."""
        by_source: dict[tuple, list[int]] = {}
        raws: dict[str, dict] = {}
        for i, (name, sdir) in enumerate(saes):
            try:
                raws[name] = sae_config(sdir)
                by_source.setdefault(source_key(sdir, raws[name]), []).append(i)
            except (OSError, ValueError) as e:
                self.broken(name, sdir, str(e))  # read_json's message names the file
        if self.cfg.heatmaps:  # before any pass: a wrong or missing --model leaves nothing behind
            for name, raw in raws.items():
                self.heatmap_models[name] = self.heatmap_model(name, raw)
        results: dict[int, SAEResult | None] = {}
        for members in by_source.values():
            results.update(zip(members, self.score_source([saes[i] for i in members])))
        scored = [r for i in range(len(saes)) if (r := results.get(i)) is not None]
        broken = self.metrics.broken
        if not scored:  # exit 0 would claim a result
            raise ValueError(f"no SAE of {self.cfg.run_dir} could be scored; {broken[0].name}: {broken[0].error}")
        for b in broken:
            print(f"warning: skipped SAE {b.name}: {b.error}", file=sys.stderr)
        return scored

    def broken(self, name: str, sdir: Path, error: str) -> None:
        """An SAE that cannot be read, or whose weights or metrics are not finite: named in metrics.json (and on
        stderr); the others are still scored."""
        error = error.strip().splitlines()[0] if error.strip() else "unreadable"
        self.metrics.broken.append(BrokenSAE(name, str(sdir), error))

    def load(self, name: str, sdir: Path) -> SAE | None:
        try:
            return SAE.from_pretrained(sdir, device=self.dev).eval()
        except (ValueError, OSError) as e:
            self.broken(name, sdir, str(e))
            return None

    def score_source(self, saes: list[tuple[str, Path]]) -> list[SAEResult | None]:
        """Read one source once for its layer's baselines and every SAE that reads it, then write their results
        (None for an SAE that could not be loaded)."""
        maybe = [(name, sdir, self.load(name, sdir)) for name, sdir in saes]
        loaded = [(name, sdir, sae) for name, sdir, sae in maybe if sae is not None]
        if not loaded:
            return [None] * len(saes)
        inp = self.inputs_for(loaded[0][2])
        layer = loaded[0][2].cfg.hook_point or "unknown"
        e_ND = unit_embeddings(inp.emb, inp.src.rows) if inp.emb is not None else None
        base = self.baseline_accumulators(layer, inp, e_ND)
        keep_N = self.heldout(inp.src.rows)
        scoring = [self.accumulators(name, sdir, sae, inp, e_ND, keep_N) for name, sdir, sae in loaded]
        self.read_once(inp.src, e_ND, base, scoring, layer, inp.align)
        if base is not None:
            self.baselines(base, inp)
        done = {s.name: self.score(s, inp) for s in scoring}
        if inp.align is not None:
            self.alignment(inp.align, {s.name: s.sae for s in scoring if done[s.name] is not None}, layer)
        return [done.get(name) for name, _, _ in maybe]

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
        per_image = src.meta.rows_per_image if src.meta else 1
        want_ms = cfg.embeddings is not None or cfg.embedder is not None
        paths = image_paths(src, cfg.data) if cfg.heatmaps and per_image == 1 else None
        if per_image > 1 and (want_ms or cfg.taxonomy is not None):
            where = src.meta.path if src.meta else cfg.data
            raise ValueError(f"{where} has {per_image} rows per image ({scfg.token_selection} tokens); MS and "
                             "taxonomy need one row per image: evaluate a CLS, mean or pooled store")
        inp = Inputs(src, patch_grid(src), paths=paths)
        if per_image == 1:  # before embeddings are cached: a taxonomy refused leaves the output folder as it was
            inp.taxa, inp.names, inp.taxonomy = H.store_taxonomy(src, src.rows, cfg.taxonomy)
        if cfg.labels is not None:  # labels refused, too, leave it as it was
            inp.align = self.align_labels(src, scfg.hook_point, scfg.token_selection)
        if want_ms:
            inp.emb, emb_src = load_embeddings(src, src.rows, self.out / "embeddings", cfg.embeddings, cfg.embedder,
                                               self.dev, cfg.quiet)
            inp.chance = chance_similarity(inp.emb)
            m = self.metrics
            if m.embeddings is None:
                m.embeddings, m.rows, m.chance_similarity = emb_src, src.rows, inp.chance
        if self.first_taxonomy is None and inp.taxonomy is not None:
            self.first_taxonomy = inp
            if inp.taxonomy["matched_rows"] < inp.taxonomy["rows"]:  # said once, not per layer
                print(f"warning: {H.credit_line(inp.taxonomy)}", file=sys.stderr)
        self.inputs[key] = inp
        return inp

    def align_labels(self, src: ActivationSource, hook_point, token_selection) -> HookAlignment:
        """--labels resolved on the evaluation store and the training store (opened at the same hook point)."""
        cfg = self.cfg
        assert cfg.labels is not None
        train_data = training_data(cfg.run_dir, cfg.train_data)
        if not Path(train_data).exists():
            raise FileNotFoundError(f"training store {train_data} does not exist; pass --train-data")
        train = open_data(train_data, hook_point, token_selection)
        if train.d_in != src.d_in:
            raise ValueError(f"training store {train_data} has width {train.d_in}, --data {cfg.data} {src.d_in}")
        return HookAlignment(resolve_labels(cfg.labels, src, train, train_data, cfg.taxonomy), src.rows)

    # --- step 2: the accumulators of the layer's baselines and of each SAE, filled by one pass ---------------------
    def baseline_accumulators(self, layer: str, inp: Inputs, e_ND: torch.Tensor | None) -> Baselines | None:
        if e_ND is None or layer in self.neuron_ms:  # a layer's baselines come from its first source
            return None
        d, dim = inp.src.d_in, e_ND.shape[1]
        base = Baselines(layer, MSAccumulator(d, dim, self.dev))
        if self.cfg.rotation_seed >= 0:
            base.rotation = RotatedSource(inp.src, self.cfg.rotation_seed)
            base.rotated = MSAccumulator(d, dim, self.dev)
        return base

    def heldout(self, n: int) -> torch.Tensor | None:
        """The rows the reconstruction metrics use, as a mask over all rows; None for all of them."""
        if self.cfg.heldout_frac >= 1:
            return None
        keep_N = torch.zeros(n, dtype=torch.bool)
        keep_N[heldout_rows(n, self.cfg.heldout_frac)] = True
        if keep_N.sum() < FEW_HELDOUT_ROWS:  # a warning, not an error: the metrics are still right, only noisy
            print(f"warning: --heldout-frac {self.cfg.heldout_frac:g} leaves {int(keep_N.sum())} of {n} rows for the "
                  f"reconstruction metrics, fewer than {FEW_HELDOUT_ROWS}: FVE and L0 will be noisy", file=sys.stderr)
        return keep_N

    def accumulators(self, name: str, sdir: Path, sae: SAE, inp: Inputs, e_ND: torch.Tensor | None,
                     keep_N: torch.Tensor | None) -> Scoring:
        cfg, scfg = self.cfg, sae.cfg
        if inp.src.d_in != scfg.d_in:
            raise ValueError(f"activations have width {inp.src.d_in} but the SAE expects d_in={scfg.d_in}")
        top = ImageTopMaps(cfg.top, inp.grid, scfg.d_sae, self.dev) if inp.grid else TopAccumulator(cfg.top)
        s = Scoring(name, sdir, sae, top,
                    ReconAccumulator(sae, keep_N, batch_rows=cfg.batch_rows, dense_cutoff=cfg.dense_cutoff))
        if e_ND is not None:
            s.ms = MSAccumulator(scfg.d_sae, e_ND.shape[1], self.dev)
        if inp.taxa is not None:
            s.nodes = H.NodeCollector(inp.taxa, scfg.group_sizes)
        if cfg.heatmaps and inp.grid is None:  # checked before the pass: a wrong --model costs nothing
            s.attribution = self.attribution(name, sae)
        if inp.align is not None:
            s.align = inp.align.collector(name)
        if cfg.names and inp.emb is not None and (inp.src.meta is None or inp.src.meta.rows_per_image == 1):
            s.fired = FiredImages(scfg.d_sae)
        return s

    def heatmap_model(self, name: str, raw: dict) -> Backbone | None:
        """The vision model --heatmaps differentiates an SAE (from its config.json) through, loaded once and checked
        against the SAE's hook point and width; None for a token SAE (its maps come from its store)."""
        if str(raw.get("token_selection")).startswith(("all", "random")):
            return None
        model = self.cfg.model or raw.get("model_id")
        if model is None:
            raise ValueError(f"SAE {name} does not record its vision model; pass --model ID|DIR for --heatmaps")
        if model not in self.backbones:
            self.backbones[model] = load_backbone(str(model), device=self.dev, dtype="fp32")
        bb = self.backbones[model]
        if raw.get("hook_point") is None:
            raise ValueError(f"SAE {name} does not record its hook point; --heatmaps needs it")
        bb.check_width(raw["hook_point"], int(raw.get("d_in", -1)))
        return bb

    def attribution(self, name: str, sae: SAE) -> Attribution | None:
        bb = self.heatmap_models.get(name)
        if bb is None:
            return None
        _, bb, point, how = resolve(sae, bb)
        return Attribution(bb, point, how)

    @torch.no_grad()
    def read_once(self, src, e_ND: torch.Tensor | None, base: Baselines | None, scoring: list[Scoring],
                  layer: str, align: HookAlignment | None = None) -> None:
        """The one pass over a source: each chunk goes to the device once and into every accumulator."""
        per = src.meta.rows_per_image if src.meta else 1
        chunk = max(per, self.cfg.chunk_rows // per * per)  # whole images, for the top images' maps
        with tqdm(total=src.rows, desc=f"evaluate {layer}", unit="rows", disable=self.cfg.quiet, leave=False) as bar:
            for r0, x_RD in sequential_chunks(src, chunk):
                x_RD = x_RD.to(self.dev)
                e_RD = e_ND[r0 : r0 + x_RD.shape[0]].to(self.dev) if e_ND is not None else None
                if base is not None and e_RD is not None:
                    base.add(x_RD, e_RD)
                for s in scoring:
                    s.add(x_RD, e_RD, r0)
                if align is not None:
                    align.add_rows(x_RD, r0)
                bar.update(x_RD.shape[0])

    # --- step 3: the raw neurons of the layer ("No SAE") and a random rotation of them ----------------------------
    def baselines(self, base: Baselines, inp: Inputs) -> None:
        neurons = base.neurons.result()
        entry = LayerBaseline(summarize_ms(neurons.ms, inp.chance))
        arrays = {"no_sae_ms": neurons.ms.numpy()}
        if base.rotated is not None:
            rot = base.rotated.result()
            entry.rotated = summarize_ms(rot.ms, inp.chance) | {"seed": self.cfg.rotation_seed}
            arrays["rotated_ms"] = rot.ms.numpy()
        self.neuron_ms[base.layer] = neurons.ms.numpy()
        self.metrics.baselines[base.layer] = entry
        atomic_save_npz(self.out / "latents" / f"baseline__{base.layer}.npz", **arrays)

    # --- step 4: MS of every latent ----------------------------------------------------------------------------
    def ms(self, sae: SAE, acc: MSAccumulator | None, inp: Inputs, r: SAEResult, arrays: LatentArrays) -> None:
        if acc is None:
            return
        res = acc.result()
        ms = res.ms.numpy()
        r.ms = summarize_ms(res.ms, inp.chance)
        r.ms_per_level = H.per_level(ms, sae.cfg.group_sizes)
        r.ms_support_median = float(res.support[~res.ms.isnan()].double().median()) if r.ms["scored"] else None
        arrays.ms, arrays.support, arrays.max_act = ms, res.support.numpy(), res.max_act.numpy()
        arrays.freq = res.freq.numpy()

    # --- step 5: FVE, MSE, cosine, L0, dead and dense fractions ----------------------------------------------------
    def reconstruction(self, acc: ReconAccumulator, r: SAEResult, arrays: LatentArrays) -> None:
        recon = acc.result()
        arrays.fire_freq = recon.pop("fire_freq").numpy()
        r.recon = recon

    # --- step 6: each latent's top-activating images ---------------------------------------------------------------
    def top_images(self, name: str, acc: TopAccumulator | ImageTopMaps, arrays: LatentArrays
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        tv, ti = (t.cpu() for t in acc.result())
        save_top(self.out / "top" / name, tv, ti)
        maps = self.out / "maps" / f"{name}.npz"
        if isinstance(acc, ImageTopMaps):
            atomic_save_npz(maps, **acc.npz())
        else:  # an earlier evaluation's maps would be read beside these top images
            maps.unlink(missing_ok=True)
        arrays.top_values, arrays.top_indices = tv.numpy(), ti.numpy()
        return tv, ti

    # --- step 6b: with --heatmaps, attribution maps of the top images of an SAE on one vector per image ----------
    def heatmaps(self, s: Scoring, inp: Inputs, tv: torch.Tensor, ti: torch.Tensor, arrays: LatentArrays
                 ) -> dict | None:
        a, cfg, paths = s.attribution, self.cfg, inp.paths
        if a is None or paths is None:
            return None
        fired = np.flatnonzero(tv[:, 0].numpy() > 0)
        rank = arrays.ms if arrays.ms is not None else arrays.fire_freq
        if rank is not None:  # highest MS (else most often firing) first; NaN last
            fired = fired[np.argsort(-np.nan_to_num(rank[fired], nan=-np.inf), kind="stable")]
        latents = fired[: cfg.heatmap_latents or None]
        pairs = int((tv[latents] > 0).sum())
        if not cfg.quiet:
            print(f"heatmaps {s.name}: {len(latents)} latents, {pairs} (latent, top image) pairs, each about 2-3 "
                  f"forward passes of {a.bb.model_id}", file=sys.stderr)
        t0 = time.perf_counter()
        maps = top_image_maps(a.bb, s.sae, a.point, a.how, lambda row: open_image(paths[row]), ti, tv, latents,
                              batch_size=cfg.heatmap_batch, quiet=cfg.quiet)
        atomic_save_npz(self.out / "maps" / f"{s.name}.npz", **maps)
        seconds = time.perf_counter() - t0
        return {"kind": "attribution", "model": a.bb.model_id, "latents": len(latents), "pairs": pairs,
                "batch": cfg.heatmap_batch, "seconds": round(seconds, 3),
                "seconds_per_latent": round(seconds / max(1, len(latents)), 4)}

    # --- step 6c: with --names, each live latent's names and their scores (eval/naming.py) -------------------------
    def names(self, s: Scoring, inp: Inputs, tv: torch.Tensor, ti: torch.Tensor, arrays: LatentArrays
              ) -> dict | None:
        if s.fired is None or inp.emb is None:
            return None
        if inp.words is None:  # once per source: the store's own names differ between stores
            inp.words = read_vocab(self.cfg.vocab) if self.cfg.vocab is not None else default_vocab(inp.src)[0]
        key = tuple(inp.words)
        if key not in self.texts:
            t0 = time.perf_counter()
            self.texts[key] = text_embeddings(str(self.cfg.embedder), inp.words, self.dev)
            self.text_seconds = time.perf_counter() - t0
        arrays.names, seconds = name_latents(unit(inp.emb), self.texts[key], inp.words, ti.numpy(), tv.numpy(),
                                             s.fired.result(), NAMES_PER_LATENT)
        return naming_summary(arrays.names, seconds | {"text": self.text_seconds})

    # --- step 7: LCA depth of each latent's top images per Matryoshka level, uniqueness of the top sets -----------
    def hierarchy(self, s: Scoring, inp: Inputs, tv: torch.Tensor, ti: torch.Tensor, r: SAEResult,
                  arrays: LatentArrays) -> None:
        if inp.taxa is None or s.nodes is None:
            return
        groups = s.sae.cfg.group_sizes
        lca = H.latent_lca_depths(ti.clamp(min=0).numpy(), tv.numpy(), inp.taxa)
        rare = lca["rare"]  # positive on fewer images than top slots: left out, as in the paper
        uniq = H.top_set_uniqueness(ti.numpy(), skip_F=rare)
        used = ti[~torch.as_tensor(rare)].clamp(min=0)
        detection = s.nodes.result()
        atomic_write_bytes(self.out / "nodes" / f"{r.name}.json", json.dumps(detection["nodes"]).encode())
        r.hierarchy = {
            "taxonomy_source": inp.taxonomy["source"] if inp.taxonomy else None,
            "taxonomy_rows": {k: inp.taxonomy[k] for k in ("matched_rows", "rows")} if inp.taxonomy else None,
            "nodes_detected": detection["detected"],  # share of taxonomy nodes some latent detects at AUROC >= 0.9
            "node_detection_per_depth": detection["per_depth"],
            "taxonomy_depth": H.taxonomy_depth(inp.taxa),
            "lca_mean_per_level": H.per_level(lca["mean"], groups),
            "lca_mode_per_level": H.per_level(lca["mode"], groups),
            "rare": int(rare.sum()),
            "missing_taxonomy": H.missing_taxonomy(inp.taxa, inp.names, used_rows=used),
            "uniqueness": {k: v for k, v in uniq.items() if k != "max_jaccard"},
        }
        arrays.lca_mean, arrays.lca_mode, arrays.max_jaccard = lca["mean"], lca["mode"], uniq["max_jaccard"]

    def grids(self, name: str, inp: Inputs, tv: torch.Tensor, ti: torch.Tensor, arrays: LatentArrays) -> None:
        if not self.cfg.grids or inp.src.meta is None or arrays.ms is None:
            return
        paths = inp.src.meta.paths()
        for j in np.argsort(np.nan_to_num(arrays.ms, nan=-np.inf))[::-1][: self.cfg.grids]:
            render_grid(ti[j].numpy(), lambda i: paths[i], self.out / "grids" / name / f"latent_{j}.png",
                        values=tv[j].numpy())

    def score(self, s: Scoring, inp: Inputs) -> SAEResult | None:
        """One SAE's files and metrics.json entry, from the accumulators the pass filled; None, listed as broken
        before any of its files is written, when its reconstruction metrics are not finite."""
        scfg, name = s.sae.cfg, s.name
        layer = scfg.hook_point or "unknown"
        r = SAEResult(name, str(s.sdir), s.sae.meta.get("training", {}).get("step"), scfg.arch, layer, scfg.d_in,
                      scfg.d_sae, scfg.k, list(scfg.group_sizes) if scfg.group_sizes else None)
        arrays = LatentArrays()
        self.ms(s.sae, s.ms, inp, r, arrays)
        self.reconstruction(s.recon, r, arrays)
        bad = [f"{k} {r.recon[k]}" for k in ("fve", "mse", "cosine", "l0") if not np.isfinite(r.recon[k])]
        if bad:
            self.broken(name, s.sdir, f"{s.sdir}: non-finite metrics ({', '.join(bad)}) on {self.cfg.data}")
            return None
        tv, ti = self.top_images(name, s.top, arrays)
        r.heatmaps = self.heatmaps(s, inp, tv, ti, arrays)
        r.naming = self.names(s, inp, tv, ti, arrays)
        self.hierarchy(s, inp, tv, ti, r, arrays)
        self.grids(name, inp, tv, ti, arrays)
        atomic_save_npz(self.out / "latents" / f"{name}.npz", **arrays.npz())
        if arrays.ms is not None:
            plot_ms_levels(self.out / "plots" / f"ms_levels__{name}.png", name, arrays.ms, scfg.group_sizes,
                           self.neuron_ms.get(layer))
        return r

    # --- step 7b: concept alignment of the SAEs and the baselines (with --labels) ---------------------------------
    def alignment(self, align: HookAlignment, saes: dict[str, SAE], layer: str) -> None:
        key = layer if layer not in self.metrics.alignment else f"{layer}__{len(self.metrics.alignment)}"
        summary, per_class = align.result(saes, self.cfg.rotation_seed, self.cfg.chunk_rows, self.dev)
        atomic_write_bytes(self.out / "alignment" / f"{key}.json", json.dumps(per_class).encode())
        self.metrics.alignment[key] = summary

    # --- step 8: run-wide tables and plots, then metrics.json ------------------------------------------------------
    def finish(self, results: list[SAEResult]) -> EvalMetrics:
        metrics, out = self.metrics, self.out
        metrics.saes = results
        entries = [r.to_json() for r in results]  # the seed summary and the tables read metrics.json's records
        metrics.seeds = score_seeds(entries, out / "latents", self.dev)  # sets stable_share in the entries it groups
        for r, entry in zip(results, entries):
            r.stable_share = entry.get("stable_share")
        t = self.first_taxonomy
        if t is not None and t.taxa is not None and t.taxonomy is not None:
            metrics.taxonomy = t.taxonomy | {"images_missing": H.missing_taxonomy(t.taxa, t.names)["count"],
                                             "depth": H.taxonomy_depth(t.taxa)}
        record = metrics.to_json()
        tables = paper_tables(entries, record["baselines"])
        if metrics.alignment:
            tables += "\n" + alignment_table(metrics.alignment)
            plot_alignment(out / "plots" / "alignment.png", metrics.alignment)
        atomic_write_bytes(out / "tables.md", tables.encode())
        plot_fve_vs_width(out / "plots" / "fve_vs_width.png", entries)
        if any(r.hierarchy is not None for r in results):
            plot_lca_levels(out / "plots" / "lca_per_level.png", entries)
        atomic_write_bytes(out / "metrics.json", json.dumps(record, indent=2, default=float).encode())
        return metrics


def image_paths(src: ActivationSource, data) -> list[str]:
    """The image of each row, which --heatmaps reads; a source without them is refused before anything is computed."""
    paths = src.meta.paths() if src.meta is not None else []
    if not paths:
        raise ValueError(f"--heatmaps needs the images behind the activations; {data} records none (a store "
                         "extracted by sae-vlm from an image folder or path list has them)")
    if is_store_member(paths[0]):
        raise ValueError(f"--heatmaps needs the store's images as files; {data} reads them from {paths[0]} "
                         "(a tar shard or dataset)")
    if not Path(paths[0]).is_file():
        raise ValueError(f"--heatmaps needs the store's images; {paths[0]} (the first of {data}) does not exist")
    return paths


def check_names(cfg: EvaluateConfig) -> None:
    """--names: an embedder with a text tower and a readable vocabulary, before anything is read or written."""
    if not cfg.names:
        return
    if cfg.embedder is None:
        raise ValueError("--names needs --embedder ID|DIR, a model with a text tower (CLIP, SigLIP)")
    check_text_tower(cfg.embedder)
    if cfg.vocab is not None:
        read_vocab(cfg.vocab)


def evaluate_run(cfg: EvaluateConfig) -> EvalMetrics:
    """Score every SAE of `cfg.run_dir` (at `cfg.step`, or the run's default snapshot) on `cfg.data`; returns what
    metrics.json holds."""
    saes, step = find_saes(cfg.run_dir, cfg.step)
    needs_scipy([name for name, _ in saes])
    check_names(cfg)
    with claim(cfg.out_dir, "evaluate"):
        ev = Evaluation(cfg)
        ev.metrics.step = step
        return ev.finish(ev.score_all(saes))
