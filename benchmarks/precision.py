"""How far fp16 activations move MS and FVE, on the shipped tiny CLIP and the toy world.

    python benchmarks/precision.py            # ~2 min on the 2-core CPU; prints a Markdown table

Three extractions of the same images at `layer.2` (CLS) and `last`: the paper's float32 compute and storage, our
CPU default (float32 compute, fp16 storage) and our CUDA default (fp16 compute and storage). The same SAE recipe
(BatchTopK x4, k=4, seeded) is trained on each train store and scored on the matching eval store, with the
ground-truth concept vectors as the MS embedder. Reported: MS and FVE per variant and their change from float32,
and, to separate the stored values from the training run they fed, the float32-trained SAE scored on each store.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from sae_vlm import toyworld
from sae_vlm.config import EvaluateConfig, ExtractConfig, TrainConfig
from sae_vlm.data.extract import run_extract
from sae_vlm.data.store import open_store
from sae_vlm.eval.run import evaluate_run
from sae_vlm.sae.trainer import train

VARIANTS = {"fp32 compute, fp32 store (paper)": ("fp32", "fp32"), "fp32 compute, fp16 store": ("fp32", "fp16"),
            "fp16 compute, fp16 store": ("fp16", "fp16")}


def extract(tmp: Path, images: dict, model_dtype: str, dtype: str) -> dict[str, Path]:
    stores = {}
    for split in ("train", "eval"):
        stores[split] = tmp / f"{model_dtype}_{dtype}" / split
        run_extract(ExtractConfig(model=str(toyworld.clip_path()), data=str(images[split]), out=str(stores[split]),
                                  layers=("layer.2", "last"), tokens=("cls",), dtype=dtype, model_dtype=model_dtype,
                                  batch_size=128, workers=2, quiet=True))
    return stores


def trained(stores: dict, layer: str, steps: int) -> Path:
    """The same seeded SAE recipe trained on the train store's `layer`; returns the run directory."""
    run = stores["train"].parent / f"run_{layer}"
    train(TrainConfig(data=str(stores["train"]), out=str(run), layer=layer, archs=("batchtopk",), expansions=(4,),
                      ks=(4,), batch_size=256, steps=steps, lr=2e-3, warmup_steps=steps // 10,
                      threshold_start_step=steps // 4, dead_window=50 * 256, log_every=steps, device="cpu",
                      quiet=True))
    return run


def scored(run: Path, store: Path, truth: Path, out: Path) -> tuple[float, float]:
    """(MS under the ground truth, FVE) of the run's SAE on an eval store."""
    m = evaluate_run(EvaluateConfig(run_dir=str(run), data=str(store), embeddings=str(truth), out=str(out),
                                    device="cpu", quiet=True)).to_json()
    return m["saes"][0]["ms"]["mean"], m["saes"][0]["recon"]["fve"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-eval", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=400)
    a = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        images = {"train": tmp / "images" / "train", "eval": tmp / "images" / "eval"}
        toyworld.write_folder(toyworld.generate(a.n_train, seed=0), images["train"])
        toyworld.write_folder(toyworld.generate(a.n_eval, seed=0, start=a.n_train), images["eval"])
        stores = {name: extract(tmp, images, *dtypes) for name, dtypes in VARIANTS.items()}
        ids = open_store(next(iter(stores.values()))["eval"], "last").image_ids()
        truth = tmp / "truth.npy"  # ground-truth concept vectors of the eval images, in the stores' row order
        np.save(truth, toyworld.folder_concepts(images["eval"], ids).astype(np.float32))
        print("| hook point | variant | MS (truth) | ΔMS | FVE | ΔFVE (points) "
              "| float32 SAE on this store: ΔMS, ΔFVE |")
        print("|---|---|---|---|---|---|---|")
        for layer in ("layer.2", "last"):
            runs = {name: trained(stores[name], layer, a.steps) for name in VARIANTS}
            paper = next(iter(VARIANTS))
            ms0, fve0 = scored(runs[paper], stores[paper]["eval"], truth, tmp / "ev" / layer / "ref")
            for i, name in enumerate(VARIANTS):
                ms, fve = scored(runs[name], stores[name]["eval"], truth, tmp / "ev" / layer / f"own{i}")
                ms_x, fve_x = scored(runs[paper], stores[name]["eval"], truth, tmp / "ev" / layer / f"x{i}")
                print(f"| {layer} | {name} | {ms:.4f} | {ms - ms0:+.4f} | {100 * fve:.2f}% | "
                      f"{100 * (fve - fve0):+.2f} | {ms_x - ms0:+.4f}, {100 * (fve_x - fve0):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
