"""Seed sweeps in `sae-vlm evaluate`: the SAEs of one configuration trained with several seeds (`train --seeds`,
named <base>_s<seed>) summarised together, and how stable each latent is across them.

metrics.json gets `seeds[<base>]`: the seeds and SAE names, and {mean, min, max} over the seeds of the MS mean,
FVE, L0, dead fraction, `stable_share` and, with a taxonomy, each Matryoshka level's mean LCA depth
(`hierarchy.lca_mean_per_level`) and the share of taxonomy nodes detected (`hierarchy.nodes_detected`). Each
member's entry gets `stable_share` and its latents/<name>.npz a `stable` array [F]: each latent's minimum, over the
other seeds, of its matched decoder cosine (eval/stability.py); stable_share is the share of latents, dead ones
included, whose `stable` is at least 0.9.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from sae_vlm.eval.stability import STABLE_COS, stable_per_latent, stable_share
from sae_vlm.io import atomic_save_npz

SEED_NAME = re.compile(r"(?P<base>.+)_s(?P<seed>\d+)")


def needs_scipy(names: list[str]) -> None:
    """Refuse up front, before hours of scoring, a seed sweep that the matching could not score without scipy."""
    if len(seed_groups([{"name": n} for n in names])):
        from sae_vlm.eval.stability import require_scipy

        require_scipy()


def seed_groups(results: list[dict]) -> dict[str, list[tuple[int, dict]]]:
    """{base name: [(seed, metrics entry)] sorted by seed} for every base name scored with two or more seeds."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for r in results:
        m = SEED_NAME.fullmatch(r["name"])
        if m:
            groups.setdefault(m["base"], []).append((int(m["seed"]), r))
    return {base: sorted(members, key=lambda t: t[0]) for base, members in groups.items() if len(members) >= 2}


def spread(values) -> dict | None:
    """{mean, min, max} of the finite values; None when there are none."""
    v = np.asarray([x for x in values if x is not None], np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())} if v.size else None


def _lca_levels(entries: list[dict]) -> list[dict] | None:
    """Per Matryoshka level, the spread over seeds of its mean LCA depth (when every member has a hierarchy)."""
    per = [r.get("hierarchy", {}).get("lca_mean_per_level") for r in entries]
    if not all(per) or len({len(p) for p in per}) != 1:
        return None
    return [{"level": lvl, **(spread(p[lvl].get("mean") for p in per) or {})} for lvl in range(len(per[0]))]


def group_entry(members: list[tuple[int, dict]]) -> dict:
    """metrics.json's `seeds[<base>]` from its members' entries (after their `stable_share` is set)."""
    entries = [r for _, r in members]
    out: dict = {"seeds": [s for s, _ in members], "saes": [r["name"] for r in entries]}
    metrics = {"ms": [(r.get("ms") or {}).get("mean") for r in entries],
               "fve": [r["recon"]["fve"] for r in entries], "l0": [r["recon"]["l0"] for r in entries],
               "dead_frac": [r["recon"]["dead_frac"] for r in entries],
               "stable_share": [r["stable_share"] for r in entries]}
    out |= {k: s for k, v in metrics.items() if (s := spread(v)) is not None}
    lca = _lca_levels(entries)
    if lca is not None:
        hierarchy: dict = {"lca_mean_per_level": lca}
        nodes = spread(r["hierarchy"].get("nodes_detected") for r in entries)
        if nodes is not None:  # the share of taxonomy nodes some latent detects at AUROC >= 0.9
            hierarchy["nodes_detected"] = nodes
        out["hierarchy"] = hierarchy
    return out


def load_decoder(sae_dir) -> np.ndarray:
    """W_dec [F, D] of a saved SAE, read alone from its safetensors file."""
    with safe_open(str(Path(sae_dir) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("W_dec").float().numpy()


def add_arrays(npz: Path, **arrays) -> None:
    """Rewrite a per-latent .npz with `arrays` added, keeping what it holds, atomically."""
    with np.load(npz) as z:
        kept = {k: z[k] for k in z.files}
    atomic_save_npz(npz, **(kept | arrays))


def score_seeds(results: list[dict], latents_dir: Path, device: str | torch.device = "cpu") -> dict:
    """The `seeds` section of metrics.json; sets each member's `stable_share` and adds `stable` to its .npz."""
    out = {}
    for base, members in seed_groups(results).items():
        stable = stable_per_latent([load_decoder(r["path"]) for _, r in members], device=device)
        for (_, r), s_F in zip(members, stable):
            r["stable_share"] = stable_share(s_F, STABLE_COS)
            add_arrays(latents_dir / f"{r['name']}.npz", stable=s_F)
        out[base] = group_entry(members)
    return out


def seed_line(base: str, entry: dict) -> str:
    """One printed line per seed group: each metric's mean [min..max] over the seeds."""
    def part(key: str, label: str, scale: float = 1.0, unit: str = "", digits: int = 3) -> str | None:
        s = entry.get(key)
        if s is None:
            return None
        return (f"{label} {scale * s['mean']:.{digits}f}{unit} "
                f"[{scale * s['min']:.{digits}f}..{scale * s['max']:.{digits}f}]")

    parts = [part("ms", "MS"), part("fve", "FVE", 100, "%", 1), part("l0", "L0", digits=1),
             part("dead_frac", "dead", 100, "%", 1),
             part("stable_share", f"stable (cos ≥ {STABLE_COS:g})", 100, "%", 1)]
    seeds = ",".join(map(str, entry["seeds"]))
    return f"{base} over seeds {seeds}: " + ", ".join(p for p in parts if p is not None)
