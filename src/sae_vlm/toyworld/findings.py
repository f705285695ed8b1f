"""The demo's `findings`: the paper's three findings on the toy world in numbers, each a median over the SAE seeds
with the per-seed values beside it, plus the planted-feature hierarchy and the seeds' dictionary stability.

Every SAE of the demo is trained under several seeds (`<arch>_x<w>_k<k>_s<seed>`); a finding keyed by an SAE uses
its seed-free name (`layer.2/matryoshka_x1_k8`).
"""

from __future__ import annotations

import numpy as np

from sae_vlm.eval.alignment import alignment_finding
from sae_vlm.eval.seeds import SEED_NAME


def split_seed(name: str) -> tuple[str, int | None]:
    """'matryoshka_x1_k8_s2' -> ('matryoshka_x1_k8', 2); a name without a seed -> (name, None)."""
    m = SEED_NAME.fullmatch(name)
    return (m["base"], int(m["seed"])) if m else (name, None)


def by_base(saes: dict) -> dict[str, dict[int | None, dict]]:
    """{seed-free name: {seed: entry}} of a {name: entry} mapping."""
    out: dict[str, dict] = {}
    for name, entry in saes.items():
        base, seed = split_seed(name)
        out.setdefault(base, {})[seed] = entry
    return out


def shares_by_base(shares: dict) -> dict[str, dict]:
    """{"<hook>/<base>": {seed: value}} from {"<hook>/<name with seed>": value}."""
    out: dict[str, dict] = {}
    for key, value in shares.items():
        hook, name = key.split("/", 1)
        base, seed = split_seed(name)
        out.setdefault(f"{hook}/{base}", {})[seed] = value
    return out


def median(values) -> float | None:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return float(np.median(v)) if v else None


def median_lists(lists) -> list:
    """Element-wise median over seeds of equal-length lists; None where no seed has a value."""
    return [median(col) for col in zip(*lists)]


def hierarchy_summary(h: dict | None) -> dict | None:
    """Mean LCA depth per Matryoshka level and, per taxonomy depth, the mean level of its nodes' best latents."""
    if not h:
        return None
    return {"mean_lca_by_level": [lv.get("mean") for lv in h["lca_mean_per_level"]],
            "best_level_by_depth": [d["mean_best_level"] for d in h["node_detection_per_depth"]],
            "auroc_by_depth": [d["mean_auroc"] for d in h["node_detection_per_depth"]],
            "nodes_detected": h["nodes_detected"]}


def hierarchy_over_seeds(per_seed: dict) -> dict:
    keys = ("mean_lca_by_level", "best_level_by_depth", "auroc_by_depth")
    seeds = list(per_seed.values())
    return {**{k: median_lists([h[k] for h in seeds]) for k in keys},
            "nodes_detected": median(h["nodes_detected"] for h in seeds),
            "by_seed": {str(s): h for s, h in per_seed.items()}}


def ms_finding(layers: dict, key: str, embedder: str) -> dict:
    return {layer: {"sae": {base: median(r[key]["mean"] for r in seeds.values())
                            for base, seeds in by_base(v["saes"]).items()},
                    "neurons": v["no_sae"][embedder]["mean"]} for layer, v in layers.items()}


def steering_finding(st: dict) -> dict:
    per = st["per_colour"]
    return {"success_by_concept": {c: v["success_median"] for c, v in per.items()},
            "success_min_by_concept": {c: v["success_min"] for c, v in per.items()},
            "success_by_seed": {str(s): {c: r["per_colour"][c]["success"] for c in per}
                                for s, r in st["by_seed"].items()},
            "control_by_concept": {c: v["control_median"] for c, v in per.items()},
            "control_max": st["max_control"],
            "unsteered": st["max_unsteered"],
            "baseline_by_concept": {c: v["baseline"]["success"] for c, v in per.items()}}


def stability(m: dict, token_key: str) -> dict:
    """{"<hook>/<base>": mean over seeds of the share of latents matched at cos ≥ 0.9 in every other seed}."""
    out = {f"{layer}/{base}": e["stable_share"]["mean"] for layer, v in m["layers"].items()
           for base, e in v.get("seeds", {}).items()}
    out |= {f"planted/{base}": v for base, v in m.get("planted", {}).get("stable_share", {}).items()}
    st = m["steering"]
    if "stable_share" in st:
        out[token_key] = float(np.mean(list(st["stable_share"].values())))
    return out


def findings(m: dict, token_key: str) -> dict:
    """The front page's numbers; `token_key` names the token SAE (`llava_tokens/<name>`)."""
    layers, hierarchy, dead, dead_range = m["layers"], {}, {}, {}
    for layer, v in layers.items():
        for base, seeds in by_base(v["saes"]).items():
            fracs = [r["dead_frac"] for r in seeds.values()]
            dead[f"{layer}/{base}"], dead_range[f"{layer}/{base}"] = median(fracs), [min(fracs), max(fracs)]
            per_seed = {s: r["hierarchy"] for s, r in seeds.items() if r["hierarchy"]}
            if per_seed and all(len(h["mean_lca_by_level"]) > 1 for h in per_seed.values()):
                hierarchy[f"{layer}/{base}"] = hierarchy_over_seeds(per_seed)
    token_dead = list(m["steering"]["dead_frac"].values())  # never firing on a token of 1000 images
    dead[token_key], dead_range[token_key] = median(token_dead), [min(token_dead), max(token_dead)]
    out = {"seeds": m["seeds"], "ms": ms_finding(layers, "ms_clip", "clip"),
           "ms_truth": ms_finding(layers, "ms_truth", "truth"), "hierarchy": hierarchy,
           "steering": steering_finding(m["steering"]), "dead_frac": dead, "dead_frac_range": dead_range,
           "stability": stability(m, token_key)}
    if "planted" in m:
        out["planted"] = m["planted"]["summary"]
    if m.get("naming"):
        out["naming"] = {k: v["share"] for k, v in m["naming"].items()}
    if m.get("alignment"):
        out["alignment"] = alignment_finding(m["alignment"])
    if m.get("localisation"):
        loc = m["localisation"]
        out["localisation"] = {k: v["share"] for k, v in loc["saes"].items()} | {"chance": loc["chance"]}
    return out
