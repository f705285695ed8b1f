"""Scoring SAEs against a planted-feature world (data/planted.py), where the true hierarchy is known exactly.

Three metrics, each a small function:
- recovery by depth: a true feature's best decoder cosine, max over latents of cos(W_dec row, direction); per tree
  depth, the share of features whose best cosine is at least 0.9, and the mean best cosine;
- depth/level Spearman: the rank correlation, over features, between a feature's depth and the Matryoshka group
  of its best latent (None for an SAE without groups, or when every best latent lies in one group);
- absorption: of all (held-out row, child) events where a child fires, the share where its parent's best latent
  is silent (code 0 in inference-mode `encode`). Pooled over events, so an edge weighs as often as its child fires
  (shallow edges more than rare deep ones), and `absorption_by_child_depth` gives each depth apart. Beside it,
  the control `parent_silent_alone`: how often a parent's best latent is silent when it fires without any child.

`run_planted` generates the world, trains every architecture under every seed in one `train` call on the same
batches, scores each SAE on a fresh held-out sample and writes OUT/planted.json and OUT/planted.png.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from sae_vlm.config import PlantedConfig, TrainConfig
from sae_vlm.data.planted import PlantedWorld, make_world
from sae_vlm.data.source import TensorSource
from sae_vlm.io import atomic_write_json
from sae_vlm.outdir import claim, owner
from sae_vlm.sae.groups import latent_levels
from sae_vlm.sae.model import SAE
from sae_vlm.sae.trainer import train

RECOVERED = 0.9  # a feature is recovered when some latent's decoder row has cosine >= this with it
DEAD_BATCHES = 10  # AuxK trains latents idle for this many batches (as the demo does)
TRAIN_SAMPLE, EVAL_SAMPLE = 0, 1  # sample seeds of the world's training and held-out rows


def best_latents(W_dec_FD: np.ndarray, directions_CD: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best cosine [C], index of the latent that gives it [C]) of each true direction over the decoder rows."""
    W = W_dec_FD / np.linalg.norm(W_dec_FD, axis=1, keepdims=True)
    dirs = directions_CD / np.linalg.norm(directions_CD, axis=1, keepdims=True)
    cos_CF = dirs.astype(np.float64) @ W.astype(np.float64).T
    best_C = cos_CF.argmax(1)
    return cos_CF[np.arange(len(best_C)), best_C], best_C


def recovery_by_depth(best_cos_C: np.ndarray, depth_C: np.ndarray) -> dict[str, list[float]]:
    """Per depth (root first): the share of features recovered at cos >= 0.9, and their mean best cosine."""
    depths = range(int(depth_C.max()) + 1)
    return {"recovered": [float((best_cos_C[depth_C == d] >= RECOVERED).mean()) for d in depths],
            "mean_cos": [float(best_cos_C[depth_C == d].mean()) for d in depths]}


def average_ranks(x_N) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    x_N = np.asarray(x_N, np.float64)
    order = np.argsort(x_N, kind="stable")
    sorted_N = x_N[order]
    first = np.concatenate([[True], sorted_N[1:] != sorted_N[:-1]])  # where each block of equal values starts
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], len(x_N))
    ranks = np.empty(len(x_N))
    ranks[order] = ((starts + ends + 1) / 2)[np.cumsum(first) - 1]  # mean of ranks start+1 .. end
    return ranks


def spearman(a_N, b_N) -> float:
    """Spearman's rank correlation with average ranks for ties; NaN when either side is constant."""
    ra, rb = average_ranks(a_N), average_ranks(b_N)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra**2).sum() * (rb**2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def depth_level_spearman(best_latent_C: np.ndarray, depth_C: np.ndarray, group_sizes, d_sae: int) -> float | None:
    """Spearman(feature depth, Matryoshka group of its best latent); None without groups or when undefined."""
    if not group_sizes:
        return None
    rho = spearman(depth_C, latent_levels(group_sizes, d_sae)[best_latent_C])
    return None if math.isnan(rho) else rho


def absorption(codes_NF: np.ndarray, active_NC: np.ndarray, parent_C: np.ndarray, best_latent_C: np.ndarray,
               edges_P: np.ndarray | None = None) -> float:
    """Of all (row, child) events where a child fires, the share where its parent's best latent is silent (code 0);
    pooled over the child features `edges_P` (default: every non-root). NaN when none of them fires."""
    children = np.flatnonzero(parent_C >= 0) if edges_P is None else np.asarray(edges_P, np.int64)
    fires_NP = active_NC[:, children]
    silent_NP = codes_NF[:, best_latent_C[parent_C[children]]] == 0
    n = int(fires_NP.sum())
    return float((fires_NP & silent_NP).sum() / n) if n else float("nan")


def silent_alone(codes_NF: np.ndarray, active_NC: np.ndarray, parent_C: np.ndarray,
                 best_latent_C: np.ndarray) -> float:
    """The control for absorption: of all (row, parent) events where a feature with children fires and none of its
    children does, the share where its best latent is silent (misses that no child can be blamed for)."""
    children = np.flatnonzero(parent_C >= 0)
    parents = np.unique(parent_C[children])
    child_of_PC = np.zeros((len(children), len(parent_C)), np.float32)
    child_of_PC[np.arange(len(children)), parent_C[children]] = 1
    child_fires_NC = (active_NC[:, children].astype(np.float32) @ child_of_PC) > 0
    alone_NP = active_NC[:, parents] & ~child_fires_NC[:, parents]
    n = int(alone_NP.sum())
    return float((alone_NP & (codes_NF[:, best_latent_C[parents]] == 0)).sum() / n) if n else float("nan")


def score_sae(sae: SAE, world: PlantedWorld, x_ND: np.ndarray, active_NC: np.ndarray) -> dict:
    """The three metrics of one SAE on held-out rows, with absorption by child depth, FVE and L0 beside them."""
    sae = sae.cpu()
    W_dec_FD = sae.W_dec.detach().float().numpy()
    best_cos_C, best_latent_C = best_latents(W_dec_FD, world.directions_CD)
    with torch.no_grad():
        x = torch.from_numpy(x_ND)
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
    codes_NF = codes.numpy()
    rec = recovery_by_depth(best_cos_C, world.depth_C)
    levels_C = latent_levels(sae.cfg.group_sizes, sae.cfg.d_sae)[best_latent_C]
    depth_C, parent_C = world.depth_C, world.parent_C
    children = np.flatnonzero(parent_C >= 0)
    known = children[best_cos_C[parent_C[children]] >= RECOVERED]  # edges whose parent has a latent of its own

    def absorbed(edges_P) -> float | None:
        share = absorption(codes_NF, active_NC, parent_C, best_latent_C, edges_P)
        return None if math.isnan(share) else share

    return {
        "recovery_by_depth": rec["recovered"], "mean_cos_by_depth": rec["mean_cos"],
        "depth_level_spearman": depth_level_spearman(best_latent_C, depth_C, sae.cfg.group_sizes, sae.cfg.d_sae),
        "best_level_by_depth": [float(levels_C[depth_C == d].mean()) for d in range(len(world.branching))]
        if sae.cfg.group_sizes else None,
        "absorption": absorbed(children),
        "absorption_by_child_depth": [absorbed(children[depth_C[children] == d]) for d in range(1, depth_C.max() + 1)],
        "absorption_recovered_parents": absorbed(known),
        "parent_silent_alone": none_if_nan(silent_alone(codes_NF, active_NC, parent_C, best_latent_C)),
        "fve": float(1 - (x - x_hat).var(0).sum() / x.var(0).sum()),
        "l0": float((codes_NF > 0).sum(1).mean()),
    }


def world_of(cfg: PlantedConfig) -> PlantedWorld:
    return make_world(cfg.branching, cfg.d, cfg.root_prob, cfg.child_prob, cfg.noise, cfg.world_seed)


def planted_k(cfg: PlantedConfig, world: PlantedWorld) -> int:
    return cfg.k if cfg.k is not None else max(1, round(world.expected_active))


def level_fractions(level_sizes) -> tuple[float, ...]:
    """Group fractions whose groups (int(f·F), the last the rest) are exactly the tree's levels: half a latent of
    slack keeps int() from truncating s/F·F to s − 1."""
    total = sum(level_sizes)
    head = [(s + 0.5) / total for s in level_sizes[:-1]]
    return (*head, 1.0 - sum(head))


def train_config(cfg: PlantedConfig, world: PlantedWorld, run: Path) -> TrainConfig:
    """The sweep: every arch at width = number of features, k = the mean number firing, once per seed; the demo's
    short-run settings (warmup steps/10, θ from steps/4, idle after 10 batches)."""
    return TrainConfig(data=f"planted world {','.join(map(str, world.branching))} d={world.d} seed={world.seed}",
                       out=str(run), archs=cfg.archs, expansions=(world.n_features / world.d,),
                       ks=(planted_k(cfg, world),), group_fractions=level_fractions(world.level_sizes),
                       batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.steps // 10,
                       threshold_start_step=cfg.steps // 4, dead_window=DEAD_BATCHES * cfg.batch_size,
                       aux_alpha=cfg.aux_alpha, seeds=cfg.seeds, device=cfg.device, quiet=cfg.quiet,
                       checkpoint_every=cfg.steps, log_every=max(1, cfg.steps // 10))


def train_planted(cfg: PlantedConfig, world: PlantedWorld, run: Path) -> dict[str, SAE]:
    """Train the sweep into `run` (an earlier planted run's SAEs there are replaced); refuse non-finite weights."""
    if owner(run) == "train":
        shutil.rmtree(run)
    x_ND, _ = world.sample(cfg.n_train, TRAIN_SAMPLE)
    saes = train(train_config(cfg, world, run), source=TensorSource(torch.from_numpy(x_ND)))
    for name, sae in saes.items():
        if not all(bool(torch.isfinite(p).all()) for p in sae.parameters()):
            raise ValueError(f"training {name} produced non-finite weights; lower --lr")
    return saes


def spread(values: list) -> dict:
    """Median, min and max over seeds, elementwise for lists; None where a seed has None (no groups, no events)."""
    if any(v is None for v in values):
        return {"median": None, "min": None, "max": None}
    a = np.asarray(values, np.float64)  # a None inside a list becomes NaN, and comes back as None
    stats = {"median": np.median(a, 0), "min": a.min(0), "max": a.max(0)}
    return {k: [None if math.isnan(x) else float(x) for x in v] if a.ndim > 1 else none_if_nan(float(v))
            for k, v in stats.items()}


def none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


def aggregate(by_seed: dict) -> tuple[dict, dict]:
    """(per arch: every metric's spread over seeds, the summary the demo embeds: medians of the three metrics)."""
    by_arch = {arch: {key: spread([r[key] for r in runs.values()]) for key in next(iter(runs.values()))}
               for arch, runs in by_seed.items()}
    summary = {arch: {"depth_level_spearman": s["depth_level_spearman"]["median"],
                      "absorption": s["absorption"]["median"], "recovery_by_depth": s["recovery_by_depth"]["median"]}
               for arch, s in by_arch.items()}
    return by_arch, summary


def run_planted(cfg: PlantedConfig) -> dict:
    """Generate the world, train, score on held-out rows; write OUT/planted.json and OUT/planted.png. Returns
    {"world", "train", "by_seed": {arch: {seed: metrics}}, "by_arch": {arch: {metric: median/min/max}},
    "summary": {arch: {"depth_level_spearman", "absorption", "recovery_by_depth"}}, "json", "plot", "seconds"}."""
    t0 = time.time()
    with claim(cfg.out, "planted") as out:
        world = world_of(cfg)
        saes = train_planted(cfg, world, out / "run")
        x_ND, active_NC = world.sample(cfg.n_eval, EVAL_SAMPLE)
        specs = train_config(cfg, world, out / "run").specs()
        by_seed: dict = {}
        for spec in specs:
            by_seed.setdefault(spec.arch, {})[str(spec.seed)] = score_sae(saes[spec.name], world, x_ND, active_NC)
        by_arch, summary = aggregate(by_seed)
        result = {"world": world_summary(world), "train": {"k": planted_k(cfg, world), "width": world.n_features,
                                                           "settings": dataclasses.asdict(cfg)},
                  "summary": summary, "by_arch": by_arch, "by_seed": by_seed,
                  "stable_share": seed_stability(saes, specs),
                  "json": str(out / "planted.json"), "plot": str(out / "planted.png"),
                  "seconds": round(time.time() - t0, 1)}
        plot_planted(out / "planted.png", by_arch, world)
        atomic_write_json(out / "planted.json", result, indent=2, allow_nan=False)
    return result


def seed_stability(saes: dict[str, SAE], specs) -> dict[str, float]:
    """{SAE name without its seed: mean over seeds of the share of latents matched at cosine >= 0.9 in every other
    seed}, for configurations trained under two or more seeds."""
    from sae_vlm.eval.stability import stable_per_latent, stable_share

    groups: dict[str, list] = {}
    for spec in specs:
        groups.setdefault(spec.base_name, []).append(saes[spec.name].W_dec.detach())
    return {base: float(np.mean([stable_share(s) for s in stable_per_latent(decoders)]))
            for base, decoders in groups.items() if len(decoders) > 1}


def world_summary(world: PlantedWorld) -> dict:
    return {"branching": list(world.branching), "level_sizes": list(world.level_sizes),
            "features": world.n_features, "d": world.d, "root_prob": world.root_prob,
            "child_prob": world.child_prob, "noise": world.noise, "seed": world.seed,
            "expected_active": world.expected_active}


def plot_planted(path: Path, by_arch: dict, world: PlantedWorld) -> None:
    """Left: share recovered by depth per arch; right: the Matryoshka group of the best latent by depth. Medians
    over seeds, bars from min to max."""
    from sae_vlm.eval.report import _figure

    depths = np.arange(len(world.branching))
    with _figure(path, size=(9, 3.5)) as ax:
        fig = ax.figure
        ax.remove()
        left, right = fig.subplots(1, 2)
        right.plot(depths, depths, ":", color="grey", label="group = depth")
        for key, ax in (("recovery_by_depth", left), ("best_level_by_depth", right)):
            for i, (arch, s) in enumerate(by_arch.items()):
                m = s[key]
                if m["median"] is None:  # no groups
                    continue
                med = np.asarray(m["median"])
                err = np.stack([med - np.asarray(m["min"]), np.asarray(m["max"]) - med])
                ax.errorbar(depths, med, yerr=err, marker="o", capsize=3, label=arch, color=f"C{i}")
            ax.set_xticks(depths)
            ax.set_xlabel("tree depth (0 = root)")
            ax.legend(fontsize=8)
        left.set_ylabel(f"features recovered (cos ≥ {RECOVERED})")
        left.set_ylim(-0.05, 1.05)
        right.set_ylabel("Matryoshka group of the best latent (mean)")
