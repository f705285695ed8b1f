"""The toy world's known answer for latent names: its words are the vocabulary and its taxonomy nodes the labels.

A latent that detects a node (it is that node's best detector in evaluate's nodes/<name>.json, at AUROC >= 0.9)
should carry the node's word (the last part of its path: "dark" for round/circle/red/dark) among its top-3 names.
A latent that best detects several nodes is counted once, for the node it detects with the highest AUROC (ties:
the shallower node), so a colour latent is not failed for every species under that colour. True names should also
score above another latent's name (`name_score_shuffled`) on every SAE.

The demo calls, after evaluating a hook point under the tiny CLIP:

    name_toy(run_dir, eval_dir, store)             # writes the names into eval_dir (sae-vlm name)
    naming_detail({"last": eval_dir, ...})         # {"<hook>/<base>": median share, its range over seeds, scores}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_vlm import toyworld
from sae_vlm.config import NameConfig
from sae_vlm.eval.naming import NamingResult, name_run
from sae_vlm.io import atomic_write_text, read_json
from sae_vlm.toyworld import world as W
from sae_vlm.toyworld.findings import median, split_seed


def toy_vocab() -> list[str]:
    """Every word of the world: taxonomy levels and nuisance values (positions as the captions write them)."""
    values = (W.KINGDOMS + W.SHAPES + W.COLOURS + W.SHADES + W.PATTERNS + W.SIZES + W.BACKGROUNDS
              + tuple(W.POSITION_WORDS.values()))
    return list(dict.fromkeys(values))


def name_toy(run_dir: str | Path, eval_dir: str | Path, store: str | Path, device: str = "cpu",
             quiet: bool = True) -> NamingResult:
    """`sae-vlm name` on an evaluated toy run with the world's words (written to eval_dir/toy_vocab.txt)."""
    vocab = Path(eval_dir) / "toy_vocab.txt"
    atomic_write_text(vocab, "\n".join(toy_vocab()) + "\n")
    return name_run(NameConfig(run_dir=str(run_dir), eval_dir=str(eval_dir), data=str(store), vocab=str(vocab),
                               embedder=str(toyworld.clip_path()), device=device, quiet=quiet))


def detected_nodes(nodes: list[dict], threshold: float = 0.9) -> dict[int, str]:
    """{latent: the node it detects best} over the nodes whose best detector reaches `threshold`."""
    best: dict[int, tuple] = {}
    for x in nodes:
        key = (x["auroc"], -x["depth"])
        if x["auroc"] >= threshold and (x["latent"] not in best or key > best[x["latent"]][0]):
            best[x["latent"]] = (key, x["node"])
    return {j: node for j, (_, node) in best.items()}


def sae_naming(eval_dir: Path, name: str) -> dict:
    """One SAE: the share of its node-detecting latents named by their node's word, and median name scores."""
    z = np.load(Path(eval_dir) / "latents" / f"{name}.npz")
    found = detected_nodes(read_json(Path(eval_dir) / "nodes" / f"{name}.json"))
    hits = [node.rsplit("/", 1)[-1] in set(z["names"][j].tolist()) for j, node in found.items()]
    live = z["names"][:, 0] != ""
    return {"share": float(np.mean(hits)) if hits else None, "latents": len(hits),
            "score": median(z["name_score"][live, 0].tolist()),
            "score_shuffled": median(z["name_score_shuffled"][live].tolist())}


def per_sae(eval_dirs: dict[str, Path]) -> dict[str, dict]:
    """{"<hook>/<base>": {seed: sae_naming}} of every named SAE with taxonomy nodes."""
    out = {}
    for hook, eval_dir in eval_dirs.items():
        for f in sorted((Path(eval_dir) / "nodes").glob("*.json")):
            base, seed = split_seed(f.stem)
            out.setdefault(f"{hook}/{base}", {})[seed] = sae_naming(Path(eval_dir), f.stem)
    return out


def naming_detail(eval_dirs: dict[str, Path]) -> dict[str, dict]:
    """{"<hook>/<base>": the share of its node-detecting latents named by their node's word (median over seeds) and
    its range, the median name scores of true and shuffled names, and whether true names score above shuffled ones
    on every seed}."""
    out = {}
    for key, seeds in per_sae(eval_dirs).items():
        shares = [r["share"] for r in seeds.values() if r["share"] is not None]
        out[key] = {"share": median(shares), "share_range": [min(shares), max(shares)] if shares else None,
                    "score": median(r["score"] for r in seeds.values()),
                    "score_shuffled": median(r["score_shuffled"] for r in seeds.values()),
                    "true_above_shuffled": all(r["score"] is not None and r["score_shuffled"] is not None
                                               and r["score"] > r["score_shuffled"] for r in seeds.values()),
                    "by_seed": {str(s): r for s, r in seeds.items()}}
    return out
