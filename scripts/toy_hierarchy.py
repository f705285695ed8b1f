"""Does the toy world's hierarchy show in Matryoshka levels when the CLIP must store more concepts than it has
dimensions? Node detection and LCA depth per level, over several SAE seeds, for any tiny CLIP of the toy world.

    python scripts/toy_hierarchy.py --out runs/hier_narrow         # the 12-wide CLIP: 62 taxa in 12 dimensions
    python scripts/toy_hierarchy.py --clip src/sae_vlm/toyworld/weights/clip --width 1 --out runs/hier_wide

The 12-wide CLIP (`toyworld/weights/clip_narrow`, 0.7 MB) was trained with
`sae-vlm toy-train-clip --vision-hidden 12 --projection-dim 12 --heads 2 --out <dir>`.

Generates the demo's images (10,000 training, 3,000 held-out), extracts the CLS at every layer and `last`, trains
Matryoshka (groups sized like the taxonomy's levels) and BatchTopK SAEs of `--width` × the CLIP's width under
`--seeds`, scores them against the ground-truth taxonomy and prints, per hook point and SAE, the median and range
over seeds of the Spearman correlation between a node's taxonomy depth and the level of the latent that detects it
best, the mean level per depth, the LCA depth per level and the share of nodes detected at AUROC ≥ 0.9. Everything
is written under --out (rerun to reuse what is there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sae_vlm import toyworld
from sae_vlm.config import EvaluateConfig, ExtractConfig, TrainConfig
from sae_vlm.data.extract import run_extract
from sae_vlm.data.store import open_store
from sae_vlm.eval.planted import spearman
from sae_vlm.eval.run import evaluate_run
from sae_vlm.sae.trainer import train
from sae_vlm.toyworld import demo as D


def prepare(clip: Path, out: Path, n_train: int, n_eval: int) -> tuple[dict, list[str]]:
    """{"train": store, "stores_eval": store, "eval": held-out image folder}, and the hook points."""
    from transformers import AutoConfig

    images = {"train": out / "images" / "train", "eval": out / "images" / "eval"}
    if not (images["eval"] / "toyworld.jsonl").is_file():
        toyworld.write_folder(toyworld.generate(n_train, seed=0), images["train"])
        toyworld.write_folder(toyworld.generate(n_eval, seed=0, start=n_train), images["eval"])
    n_layers = AutoConfig.from_pretrained(clip).vision_config.num_hidden_layers
    layers = [*(f"layer.{i}" for i in range(n_layers)), "last"]
    stores = {}
    for split, folder in images.items():
        stores[split] = out / "stores" / split
        if not (stores[split] / "manifest.json").is_file():
            run_extract(ExtractConfig(model=str(clip), data=str(folder), out=str(stores[split]), layers=tuple(layers),
                                      tokens=("cls",), dtype="fp32", batch_size=128, workers=2, quiet=True))
    return {"train": stores["train"], "stores_eval": stores["eval"], "eval": images["eval"]}, layers


def run_layer(paths: dict, layer: str, out: Path, a) -> dict:
    run = out / "runs" / layer
    steps = a.steps
    if not list(run.glob("saes/*/config.json")):
        train(TrainConfig(data=str(paths["train"]), out=str(run), layer=layer, archs=("batchtopk", "matryoshka"),
                          expansions=(a.width,), ks=(D.K,), group_fractions=D.TAXONOMY_GROUPS, batch_size=256,
                          steps=steps, lr=2e-3, warmup_steps=steps // 10, threshold_start_step=steps // 4,
                          dead_window=D.DEAD_BATCHES * 256, aux_alpha=D.AUX_ALPHA, checkpoint_every=steps,
                          log_every=steps // 10, seeds=tuple(a.seeds), quiet=True))
    ev = open_store(paths["stores_eval"], layer="last")
    truth = out / "truth.npy"
    if not truth.is_file():
        D.write_embeddings(truth, toyworld.folder_concepts(paths["eval"], ev.image_ids()), ev.image_ids())
    eval_dir = out / "eval" / layer
    m = json.loads((eval_dir / "metrics.json").read_text()) if (eval_dir / "metrics.json").is_file() else \
        evaluate_run(EvaluateConfig(run_dir=str(run), data=str(paths["stores_eval"]), out=str(eval_dir),
                                    embeddings=str(truth), device="cpu", quiet=True)).to_json()
    return {r["name"]: summarise(r, eval_dir) for r in m["saes"]}


def summarise(r: dict, eval_dir: Path) -> dict:
    h = r.get("hierarchy") or {}
    nodes = json.loads((eval_dir / "nodes" / f"{r['name']}.json").read_text()) if h else None
    rows = nodes["nodes"] if isinstance(nodes, dict) else nodes or []
    depth = [len(x["node"].split("/")) for x in rows]
    level = [x["level"] for x in rows]
    return {"spearman": spearman(np.array(depth), np.array(level)) if r.get("group_sizes") else None,
            "best_level_by_depth": [d["mean_best_level"] for d in h.get("node_detection_per_depth", [])],
            "lca_by_level": [lv.get("mean") for lv in h.get("lca_mean_per_level", [])],
            "nodes_detected": h.get("nodes_detected"), "dead_frac": r["recon"]["dead_frac"],
            "fve": r["recon"]["fve"], "ms_truth": (r.get("ms") or {}).get("mean")}


def spread(values) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    return f"{np.median(v):.2f} [{min(v):.2f}..{max(v):.2f}]" if v else "–"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--clip", default=str(toyworld.WEIGHTS / "clip_narrow"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--width", type=float, default=6.0, help="SAE width as a multiple of the CLIP's width")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-eval", type=int, default=3000)
    a = ap.parse_args()
    out = Path(a.out)
    paths, layers = prepare(Path(a.clip), out, a.n_train, a.n_eval)
    results = {layer: run_layer(paths, layer, out, a) for layer in layers}
    (out / "hierarchy.json").write_text(json.dumps(results, indent=1, default=float))
    for layer, per in results.items():
        for base in sorted({n.rsplit("_s", 1)[0] for n in per}):
            seeds = [v for n, v in per.items() if n.rsplit("_s", 1)[0] == base]
            by_depth = np.array([s["best_level_by_depth"] for s in seeds], float)
            lca = np.array([[np.nan if x is None else x for x in s["lca_by_level"]] for s in seeds], float)
            print(f"{layer:8s} {base:20s} Spearman(depth, level) {spread([s['spearman'] for s in seeds])}; "
                  f"nodes detected {spread([s['nodes_detected'] for s in seeds])}; dead "
                  f"{spread([s['dead_frac'] for s in seeds])}; FVE {spread([s['fve'] for s in seeds])}; "
                  f"MS truth {spread([s['ms_truth'] for s in seeds])}")
            if by_depth.size and by_depth.shape[1]:
                print("    best level by depth (median over seeds): "
                      + " / ".join(f"{v:.2f}" for v in np.nanmedian(by_depth, 0))
                      + "; LCA depth by level: " + " / ".join(f"{v:.2f}" for v in np.nanmedian(lca, 0)))


if __name__ == "__main__":
    main()
