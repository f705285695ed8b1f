"""`sae-vlm demo`: the whole pipeline on the toy world, through the same code paths a real model takes.

generate images of the toy phylogeny → extract (tiny CLIP: CLS at two layers + the projection; toy LLaVA: 2 random
tokens at the layer its projector reads) → train BatchTopK and Matryoshka SAEs (Matryoshka groups sized like the
taxonomy's levels) → evaluate (MS under the tiny CLIP and under the ground-truth concepts, FVE, L0, LCA depth and
taxonomy-node detection, neuron baseline) → steer the toy LLaVA towards each colour with one latent, against a
difference-of-means baseline → metrics.json (with its `findings`), plots and report/index.html.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch

from sae_vlm import toyworld
from sae_vlm.config import DemoConfig, EvaluateConfig, ExtractConfig, PlantedConfig, TrainConfig
from sae_vlm.data.extract import run_extract
from sae_vlm.data.store import open_store
from sae_vlm.device import cpu_summary
from sae_vlm.eval.planted import run_planted
from sae_vlm.eval.run import EvalMetrics, evaluate_run
from sae_vlm.io import atomic_save_npy, atomic_save_npz, atomic_write_text
from sae_vlm.outdir import claim
from sae_vlm.sae.model import SAE
from sae_vlm.sae.trainer import train
from sae_vlm.toyworld import world as W
from sae_vlm.toyworld.findings import by_base, findings, hierarchy_summary, median, shares_by_base
from sae_vlm.toyworld.steering import steer_colours


@dataclass(frozen=True)
class DemoSize:
    n_train: int
    n_eval: int
    steps: int
    batch_size: int


@dataclass
class SAESummary:
    """One SAE of a hook point in the demo's metrics.json: MS under both embedders, FVE/L0, purity, hierarchy."""

    ms_clip: dict | None
    ms_truth: dict | None
    ms_correlation: float
    fve: float
    l0: float
    dead_frac: float | None
    top16_purity: float
    hierarchy: dict | None  # hierarchy_summary's record


@dataclass
class LayerSummary:
    """A hook point's SAEs by name, its raw neurons under both embedders and its seed summaries."""

    no_sae: dict  # clip, truth: summarize_ms's records; top16_purity
    saes: dict[str, SAESummary] = field(default_factory=dict)
    seeds: dict = field(default_factory=dict)


@dataclass
class DemoMetrics:
    """The demo's metrics.json, filled step by step; `findings` reads the JSON of the steps before it."""

    size: DemoSize
    seeds: list[int]
    layers: dict[str, LayerSummary] = field(default_factory=dict)
    zero_shot: dict = field(default_factory=dict)
    planted: dict = field(default_factory=dict)
    steering: dict = field(default_factory=dict)
    localisation: dict = field(default_factory=dict)  # localisation.py: chance, and per SAE share, pairs, detectors
    naming: dict = field(default_factory=dict)  # toyworld/naming.py's naming_detail, by "<hook>/<base>"
    alignment: dict = field(default_factory=dict)  # evaluate --labels at `last`: eval/alignment.py's record
    findings: dict = field(default_factory=dict)
    seconds: float = 0.0
    step_seconds: dict[str, float] = field(default_factory=dict)
    machine: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


FULL = DemoSize(n_train=6000, n_eval=2000, steps=1000, batch_size=256)
QUICK = DemoSize(n_train=2000, n_eval=1000, steps=600, batch_size=256)


def say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, flush=True)


def write_embeddings(path: Path, emb: np.ndarray, ids) -> Path:
    """.npy plus a sidecar .json of image ids, which `evaluate` checks against the store."""
    atomic_save_npy(path, np.asarray(emb, np.float32))
    atomic_write_text(path.with_suffix(".json"), json.dumps({"image_ids": [str(i) for i in ids]}))
    return path


CLASSES = [W.CONCEPT_INDEX[W.node_name(n)] for n in W.NODES if len(n) == 3]  # the 8 colour classes
# Matryoshka groups sized like the taxonomy's levels (2 kingdoms .. 32 species), as paper-hierarchy is like iNat's
TAXONOMY_GROUPS = tuple(n / len(W.NODES) for n in (2, 4, 8, 16, 32))
WIDTH, K = 1, 8  # 64 latents for 71 concepts (62 taxa + 9 nuisance values); a creature has 8 of them
# AuxK revives latents that have not fired for 10 batches (idle), weighted 10x the paper's 0.03: at these sizes the
# paper's settings leave 20-50% of the latents dead (README, "What the demo shows")
AUX_ALPHA, DEAD_BATCHES = 0.3, 10
# The token SAE: BatchTopK x2. Over 3 seeds it has a latent that detects a colour at AUROC >= 0.9 for 4-7 of the 8
# colours, Matryoshka x2 and x4 for 1-3 (their early groups hold hue regions, not colours); x1, x4 and k=4 did not
# do better (README, "What the demo shows")
TOKEN_ARCH, TOKEN_WIDTH = "batchtopk", 2


def concept_purity(top_indices_FT: np.ndarray, top_values_FT: np.ndarray, concepts_NC: np.ndarray) -> np.ndarray:
    """Per latent: the largest fraction of its top-16 images whose creatures belong to one class (colour).

    NaN for a latent with fewer than 16 images where it is positive ('rare': the paper's rule that leaves it out).
    """
    out = np.full(len(top_indices_FT), np.nan)
    for j, (idx, val) in enumerate(zip(top_indices_FT, top_values_FT)):
        if (val > 0).sum() == len(idx):
            out[j] = concepts_NC[idx][:, CLASSES].mean(0).max()
    return out


def run_demo(cfg: DemoConfig) -> DemoMetrics:
    # One thread: the toy's matrices are tiny, and a second spinning thread on a busy 2-core machine made the
    # planted step 4x slower (21 s -> 82 s); the results are the same either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with claim(cfg.out, "demo"):
            return _demo(cfg)
    finally:
        torch.set_num_threads(threads)


class Steps:
    """Announces the demo's numbered steps and keeps each one's wall time (metrics.json `step_seconds`)."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet, self.seconds, self.t0 = total, quiet, {}, time.time()

    @contextmanager
    def __call__(self, name: str, message: str):
        say(f"[{len(self.seconds) + 1}/{self.total}] {message}", self.quiet)
        t = time.time()
        yield
        self.seconds[name] = round(time.time() - t, 1)


def _demo(cfg: DemoConfig) -> DemoMetrics:
    out, quiet, size = Path(cfg.out), cfg.quiet, QUICK if cfg.quick else FULL
    clip_dir, llava_dir = toyworld.clip_path(), toyworld.llava_path()
    step = Steps(7, quiet)
    with step("generate", f"generating {size.n_train} + {size.n_eval} toy images"):
        images = generate_images(out, size)
    layers = hook_points(clip_dir)
    with step("extract", f"extracting CLS at {', '.join(layers[:2])} and 'last'; 2 random tokens at {layers[1]} "
                         "(toy LLaVA)"):
        stores = extract_stores(out, images, layers, clip_dir, llava_dir, quiet)
    with step("train", f"training BatchTopK and Matryoshka SAEs (x{WIDTH}, k={K}) per hook point and a token SAE, "
                       f"each under seeds {', '.join(map(str, cfg.seeds))}"):
        runs = {layer: out / "runs" / layer for layer in layers} | {"tokens": out / "runs" / "llava_tokens"}
        for layer in layers:
            train_sweep(stores["train"], layer, runs[layer], size, quiet, seeds=cfg.seeds)
        train_sweep(stores["tokens"], None, runs["tokens"], size, quiet, archs=(TOKEN_ARCH,), width=TOKEN_WIDTH,
                    seeds=cfg.seeds)
    metrics = DemoMetrics(size, list(cfg.seeds))
    with step("evaluate", "evaluating: MS (tiny CLIP and ground truth), FVE, L0, hierarchy, neuron baseline, "
                          "stability across seeds, heatmaps and whether they find the creature, names, alignment "
                          "with the labels against PCA, k-means, NMF and the neurons"):
        metrics.layers, metrics.alignment = evaluate_layers(out, images, stores, runs, layers, clip_dir)
        metrics.zero_shot = zero_shot_recovered(runs, layers, clip_dir)
        metrics.localisation, examples = localise(out, images, stores, runs, layers, cfg.seeds)
        metrics.naming = name_layers(out, stores, runs, layers)
    with step("planted", "a planted feature tree: does each SAE find its features, and Matryoshka its hierarchy?"):
        metrics.planted = run_planted(PlantedConfig(out=str(out / "planted"), seeds=cfg.seeds, quiet=True))
    with step("steer", "steering the toy LLaVA towards each colour: one latent clamped on images of other colours"):
        metrics.steering = steer_colours(runs["tokens"], llava_dir)
    metrics.findings = findings(metrics.to_json(), token_key=f"llava_tokens/{TOKEN_ARCH}_x{TOKEN_WIDTH:g}_k{K}")
    with step("report", "writing report/index.html and metrics.json"):
        write_report(out, runs["last"], out / "eval" / "last", stores["eval"], metrics, examples)
    metrics.seconds, metrics.step_seconds = round(time.time() - step.t0, 1), step.seconds
    metrics.machine = {"cpu": cpu_summary(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    atomic_write_text(out / "metrics.json", json.dumps(metrics.to_json(), indent=2, default=float))  # marks done
    return metrics


def generate_images(out: Path, size: DemoSize) -> dict[str, Path]:
    images = {"train": out / "images" / "train", "eval": out / "images" / "eval"}
    if not (images["eval"] / "toyworld.jsonl").is_file():
        toyworld.write_folder(toyworld.generate(size.n_train, seed=0), images["train"])
        toyworld.write_folder(toyworld.generate(size.n_eval, seed=0, start=size.n_train), images["eval"])
    return images


def hook_points(clip_dir: Path) -> tuple[str, str, str]:
    """A middle layer, the layer the toy LLaVA's projector reads (-2, as in llava-1.5) and `last`."""
    from transformers import AutoConfig

    n_layers = AutoConfig.from_pretrained(clip_dir).vision_config.num_hidden_layers
    return f"layer.{n_layers // 2 - 1}", f"layer.{n_layers - 2}", "last"


def extract_stores(out: Path, images: dict, layers, clip_dir: Path, llava_dir: Path, quiet: bool) -> dict[str, Path]:
    """CLS rows of the tiny CLIP at `layers` for both splits; 2 random tokens per image where the toy LLaVA reads."""
    stores = {}
    for split in ("train", "eval"):
        stores[split] = out / "stores" / split
        run_extract(ExtractConfig(model=str(clip_dir), data=str(images[split]), out=str(stores[split]),
                                  layers=tuple(layers), tokens=("cls",), dtype="fp32", batch_size=128, workers=2,
                                  quiet=quiet))
    stores["tokens"] = out / "stores" / "llava_tokens"
    run_extract(ExtractConfig(model=str(llava_dir), data=str(images["train"]), out=str(stores["tokens"]),
                              tokens=("random-2",), dtype="fp32", batch_size=128, workers=2, quiet=quiet))
    stores["tokens_eval"] = out / "stores" / "llava_tokens_eval"  # every token: the token SAE's maps
    run_extract(ExtractConfig(model=str(llava_dir), data=str(images["eval"]), out=str(stores["tokens_eval"]),
                              tokens=("all",), dtype="fp32", batch_size=128, workers=2, quiet=quiet))
    return stores


def evaluate_layers(out: Path, images: dict, stores: dict, runs: dict, layers, clip_dir: Path
                    ) -> tuple[dict[str, LayerSummary], dict]:
    """(each hook point's SAEs evaluated under the tiny CLIP's and the ground-truth embeddings (the first with every
    latent's heatmaps, and at `last` the alignment with the world's labels), and summarised; the alignment). The
    token SAEs are evaluated on every token of the evaluation images, for their maps."""
    ev = open_store(stores["eval"], layer="last")
    ids = ev.image_ids()
    truth = toyworld.folder_concepts(images["eval"], ids)
    emb = {"clip": write_embeddings(out / "embeddings" / "clip.npy", ev.all().numpy(), ids),
           "truth": write_embeddings(out / "embeddings" / "truth.npy", truth, ids)}
    concepts_NC = np.load(emb["truth"])
    labels = W.write_labels([images["eval"], images["train"]], out / "labels.csv")  # the probes fit on train
    summary, alignment = {}, {}
    for layer in layers:
        per = {name: evaluate_run(EvaluateConfig(run_dir=str(runs[layer]), data=str(stores["eval"]),
                                                 out=str(out / "eval" / layer / name), embeddings=str(path),
                                                 heatmaps=name == "clip", heatmap_latents=0, model=str(clip_dir),
                                                 labels=str(labels) if (name, layer) == ("clip", "last") else None,
                                                 device="cpu", quiet=True))
               for name, path in emb.items()}
        alignment |= per["clip"].alignment
        neurons_ND = open_store(stores["eval"], layer=layer).all()
        summary[layer] = summarize_layer(per, out / "eval" / layer, concepts_NC, neurons_ND)
    evaluate_run(EvaluateConfig(run_dir=str(runs["tokens"]), data=str(stores["tokens_eval"]),
                                out=str(out / "eval" / "llava_tokens"), device="cpu", quiet=True))
    return summary, alignment


def name_layers(out: Path, stores: dict, runs: dict, layers) -> dict:
    """`sae-vlm name` with the world's words on each hook point's SAEs (under the tiny CLIP), and how often a latent
    that detects a taxonomy node carries its word (toyworld/naming.py)."""
    from sae_vlm.toyworld.naming import name_toy, naming_detail

    for layer in layers:
        name_toy(runs[layer], out / "eval" / layer / "clip", stores["eval"])
    return naming_detail({layer: out / "eval" / layer / "clip" for layer in layers})


EXAMPLE_SAES = (f"llava_tokens/{TOKEN_ARCH}_x{TOKEN_WIDTH:g}_k{K}_s", f"last/batchtopk_x{WIDTH:g}_k{K}_s")


def localise(out: Path, images: dict, stores: dict, runs: dict, layers, seeds) -> tuple[dict, str]:
    """(per SAE, the share of its colour detectors' top images whose map peaks in the creature's box
    (localisation.py), and chance: the box's mean share of the image; example overlays of the first seed's token
    SAE and `last` BatchTopK SAE, as HTML)."""
    from sae_vlm.toyworld import localisation as L

    found = {"chance": L.Truth.of(images["eval"], open_store(stores["eval"], layer="last").image_ids()).chance(),
             "saes": {}}
    examples = {f"{name}{seeds[0]}": "" for name in EXAMPLE_SAES}
    where = [(layer, out / "eval" / layer / "clip", stores["eval"], layer) for layer in layers]
    where.append(("llava_tokens", out / "eval" / "llava_tokens", stores["tokens_eval"], None))
    for key, eval_dir, store, layer in where:
        run = runs["tokens" if key == "llava_tokens" else key]
        for sdir in sorted(p.parent for p in (run / "saes").glob("*/config.json")):
            scored = L.score(eval_dir, sdir.name, SAE.from_pretrained(sdir), store, layer, images["eval"])
            if scored is not None:
                found["saes"][f"{key}/{sdir.name}"] = scored.to_json()
                if f"{key}/{sdir.name}" in examples:
                    examples[f"{key}/{sdir.name}"] = L.examples_html(f"{key}/{sdir.name}", scored)
    return found, "".join(examples.values())


def train_sweep(store: Path, layer: str | None, run: Path, size: DemoSize, quiet: bool,
                archs=("batchtopk", "matryoshka"), width: float = WIDTH, seeds=(0, 1, 2)) -> None:
    cfg = TrainConfig(data=str(store), out=str(run), layer=layer, archs=archs, expansions=(width,), ks=(K,),
                      seeds=tuple(seeds), fast=False,  # at 64-128 latents the dense path is ~1.5x faster
                      group_fractions=TAXONOMY_GROUPS, batch_size=size.batch_size, steps=size.steps, lr=2e-3,
                      warmup_steps=size.steps // 10,
                      threshold_start_step=size.steps // 4, dead_window=DEAD_BATCHES * size.batch_size,
                      aux_alpha=AUX_ALPHA,
                      checkpoint_every=size.steps, log_every=max(1, size.steps // 10), quiet=quiet,
                      resume=(run / "train_config.json").is_file())  # a killed demo picks up where it was
    train(cfg)


def summarize_layer(per: dict[str, EvalMetrics], eval_dir: Path, concepts_NC: np.ndarray,
                    neurons_ND: torch.Tensor) -> LayerSummary:
    """MS under both embedders, their correlation across latents, FVE/L0, purity and hierarchy, per SAE;
    the raw neurons' MS and top-16 purity beside them."""
    top_val, top_idx = neurons_ND.T.topk(16, dim=1)
    top_val = top_val - neurons_ND.min(0).values[:, None] + 1  # a neuron is signed: its top-16 always count
    out = LayerSummary({k: next(iter(m.baselines.values())).no_sae for k, m in per.items()},
                       seeds=per["clip"].seeds)
    out.no_sae["top16_purity"] = float(np.nanmean(concept_purity(top_idx.numpy(), top_val.numpy(), concepts_NC)))
    for r_clip, r_truth in zip(per["clip"].saes, per["truth"].saes):
        name = r_clip.name
        a_clip = np.load(eval_dir / "clip" / "latents" / f"{name}.npz")
        a_truth = np.load(eval_dir / "truth" / "latents" / f"{name}.npz")
        both = ~np.isnan(a_clip["ms"]) & ~np.isnan(a_truth["ms"])
        corr = float(np.corrcoef(a_clip["ms"][both], a_truth["ms"][both])[0, 1]) if both.sum() > 2 else float("nan")
        purity = concept_purity(a_clip["top_indices"], a_clip["top_values"], concepts_NC)
        out.saes[name] = SAESummary(r_clip.ms, r_truth.ms, corr, r_clip.recon["fve"], r_clip.recon["l0_threshold"],
                                    r_clip.recon.get("dead_frac"), float(np.nanmean(purity)),
                                    hierarchy_summary(r_truth.hierarchy))
    return out


ZERO_SHOT_ATTRIBUTES = ("shape", "colour", "pattern")  # phylum, class and species nodes


@torch.no_grad()
def zero_shot_recovered(runs: dict, layers, clip_dir: Path, n: int = 500) -> dict:
    """Tiny-CLIP zero-shot accuracy (shape, colour and species of the creature) with each SAE's reconstruction
    spliced in at its hook point, against the unmodified model: the "accuracy recovered"."""
    from transformers import AutoProcessor, CLIPModel

    from sae_vlm.backbones import quiet_loading
    from sae_vlm.eval.recon import accuracies_recovered
    from sae_vlm.toyworld.quality import EVAL_SEED, ZERO_SHOT, truth_of

    with quiet_loading():
        model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = AutoProcessor.from_pretrained(clip_dir)
    samples = W.generate(n, seed=EVAL_SEED)
    pixels = processor(images=[x.image for x in samples], return_tensors="pt")["pixel_values"]
    saes = {f"{layer}/{d.name}": (layer, SAE.from_pretrained(d))
            for layer in layers for d in sorted(p.parent for p in runs[layer].glob("saes/*/config.json"))}
    tasks = {}
    for attr in ZERO_SHOT_ATTRIBUTES:
        values, prompt = ZERO_SHOT[attr]
        tasks[attr] = ([values.index(truth_of(x, attr)) for x in samples],
                       dict(processor(text=[prompt(v) for v in values], return_tensors="pt", padding=True)))
    return {key: accuracies_recovered(model, sae, layer, pixels, tasks) for key, (layer, sae) in saes.items()}


def add_truth_ms(eval_dir: Path) -> None:
    """Put the ground-truth MS beside the tiny-CLIP one (`ms__truth`), so the browser shows both embedders."""
    for f in sorted((eval_dir / "clip" / "latents").glob("*.npz")):
        truth = np.load(eval_dir / "truth" / "latents" / f.name)
        key = "ms" if "ms" in truth.files else "no_sae_ms"
        arrays = dict(np.load(f))
        arrays["ms__truth" if key == "ms" else "no_sae_ms__truth"] = truth[key]
        atomic_save_npz(f, **arrays)


def write_report(out: Path, run: Path, eval_dir: Path, store: Path, metrics: DemoMetrics, examples: str = ""
                 ) -> Path:
    """report/index.html: the findings first, then the `last` hook point's SAEs as `sae-vlm report` shows them."""
    from sae_vlm.browse.data import RunView
    from sae_vlm.browse.report import write_report as write_static
    from sae_vlm.toyworld.front import front_page

    add_truth_ms(eval_dir)
    front = front_page(metrics.to_json(), out / "report", out / "eval", examples)
    return write_static(RunView(run, eval_dir / "clip", store), out / "report", front=front)


def spread(values, fmt: str = ".3f") -> str:
    """'median [min..max]' over seeds."""
    v = [x for x in values if x is not None]
    return f"{median(v):{fmt}} [{min(v):{fmt}}..{max(v):{fmt}}]" if v else "–"


def summary_lines(m: DemoMetrics, cfg: DemoConfig) -> list[str]:
    """What the demo prints at the end, each number a median [min..max] over the SAE seeds: the `last` hook
    point's SAEs and neurons, zero-shot accuracy, hierarchy, steering, the planted world and stability."""
    last, out, f = m.layers["last"], Path(cfg.out), m.findings  # f: findings.py's record
    lines = [f"seeds {', '.join(map(str, m.seeds))}; each number: median [min..max] over seeds"]
    for base, seeds in by_base(last.saes).items():
        rs = cast(list[SAESummary], list(seeds.values()))
        lines.append(f"  last/{base:18s} FVE {spread([100 * r.fve for r in rs], '.1f')}%  "
                     f"MS clip {spread([(r.ms_clip or {})['mean'] for r in rs])}  "
                     f"MS truth {spread([(r.ms_truth or {})['mean'] for r in rs])}  "
                     f"corr {spread([r.ms_correlation for r in rs], '.2f')}")
    base = last.no_sae
    lines.append(f"  last/raw neurons        MS clip {base['clip']['mean']:.3f}  MS truth {base['truth']['mean']:.3f}")
    worst = {}
    for key, per in m.zero_shot.items():
        for attr, v in per.items():
            worst[attr] = min(worst.get(attr, 1.0), v["accuracy_spliced"] / max(v["accuracy"], 1e-9))
    lines.append("  zero-shot accuracy with any SAE spliced in, worst share of the unmodified model's: "
                 + ", ".join(f"{a} {v:.0%}" for a, v in worst.items()))
    for name, h in f["hierarchy"].items():
        lca = " / ".join("–" if v is None else f"{v:.2f}" for v in h["mean_lca_by_level"])
        best = " / ".join("–" if v is None else f"{v:.1f}" for v in h["best_level_by_depth"])
        lines.append(f"  hierarchy {name}: LCA depth by level {lca}; Matryoshka level of the best latent by taxonomy "
                     f"depth {best}; {h['nodes_detected']:.0%} of nodes detected at AUROC >= 0.9")
    st = f["steering"]
    per_colour = ", ".join(f"{c} {v:.0%} (min {st['success_min_by_concept'][c]:.0%})"
                           for c, v in st["success_by_concept"].items())
    lines.append(f"  steering: clamping the latent that detects a colour makes the toy LLaVA name it on images of "
                 f"other colours: {per_colour}; other colours' latents name it at most {st['control_max']:.0%} "
                 f"(control), unsteered at most {st['unsteered']:.0%}")
    for arch, p in f.get("planted", {}).items():
        rho = "–" if p["depth_level_spearman"] is None else f"{p['depth_level_spearman']:.2f}"
        lines.append(f"  planted tree, {arch}: features recovered at cos >= 0.9 by depth "
                     + " / ".join(f"{v:.0%}" for v in p["recovery_by_depth"])
                     + f"; Spearman(depth, group) {rho}; absorption {p['absorption']:.0%}")
    if f.get("localisation"):
        loc = shares_by_base({k: v for k, v in f["localisation"].items() if k != "chance"})
        lines.append("  heatmaps: colour detectors' top images whose map peaks in the creature's box: "
                     + ", ".join(f"{k} {spread(v.values(), '.2f')}" for k, v in loc.items())
                     + f" (chance {f['localisation']['chance']:.2f})")
    if f.get("naming"):
        lines.append("  names: node-detecting latents named by their node's word: "
                     + ", ".join(f"{k} {spread([r['share'] for r in m.naming[k]['by_seed'].values()], '.2f')}"
                                for k in f["naming"]))
    for hook, row in f.get("alignment", {}).items():
        lines.append(f"  alignment at {hook}, mean best-unit AP over the world's labels: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "range"))
    if f["stability"]:
        lines.append("  stable latents (matched cos >= 0.9 in every other seed): "
                     + ", ".join(f"{k} {v:.0%}" for k, v in f["stability"].items()))
    lines.append(f"done in {m.seconds:.0f} s: {out / 'metrics.json'}, {out / 'report' / 'index.html'}, "
                 f"plots in {out / 'eval'}/<layer>/<embedder>/plots/")
    lines.append(f"CPU: {m.machine['cpu']}")
    return lines
