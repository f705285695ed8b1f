"""Concept alignment on the toy world, the known answer: do SAE latents beat PCA, k-means and the raw neurons on
mean best-latent AP? Also the time the alignment step takes.

    OMP_NUM_THREADS=1 MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2 python benchmarks/alignment_toy.py OUT

The demo's quick sizes (2000 training and 1000 evaluation images, BatchTopK and Matryoshka x1 k=8, 600 steps, seeds
0, 1, 2), CLS of the tiny CLIP at the demo's three hook points. Labels: the 62 taxonomy nodes and the 9 nuisance
values of each image's creature(s), from the folder's toyworld.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from sae_vlm import toyworld
from sae_vlm.config import EvaluateConfig
from sae_vlm.eval.alignment import alignment_finding
from sae_vlm.eval.run import evaluate_run
from sae_vlm.toyworld import demo
from sae_vlm.toyworld import world as W


def main(out: Path) -> None:
    torch.set_num_threads(1)
    size = demo.QUICK
    images = demo.generate_images(out, size)
    layers = demo.hook_points(toyworld.clip_path())
    stores = demo.extract_stores(out, images, layers, toyworld.clip_path(), toyworld.llava_path(), quiet=True)
    # the training images too: the probes and baselines are fit on them
    csv_path = W.write_labels([images["eval"], images["train"]], out / "labels.csv")
    result = {}
    for layer in layers:
        run = out / "runs" / layer
        demo.train_sweep(stores["train"], layer, run, size, quiet=True, seeds=(0, 1, 2))
        t = time.time()
        m = evaluate_run(EvaluateConfig(run_dir=str(run), data=str(stores["eval"]), out=str(out / "eval" / layer),
                                        labels=str(csv_path), device="cpu", quiet=True))
        result[layer] = {"seconds_evaluate_with_alignment": round(time.time() - t, 1), **m.alignment}
    finding = alignment_finding({k: v[k] for k, v in result.items()})
    (out / "alignment_toy.json").write_text(json.dumps({"finding": finding, "alignment": result}, indent=1))
    print(json.dumps(finding, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
