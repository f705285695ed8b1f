"""Why the toy demo's Matryoshka levels barely follow the taxonomy: the rank of the tiny CLIP's activations.

    python scripts/toy_rank.py runs/demo

For each CLS hook point of a finished demo: the share of variance in the top 2 / 6 / 14 principal components of
the held-out activations, and the FVE of its Matryoshka SAE when only the first 2 / 6 / 14 / 30 / all latents
(levels 0, 0-1, 0-2, 0-3, all) are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sae_vlm.data.store import open_store
from sae_vlm.sae.model import SAE

PREFIXES = (2, 6, 14, 30, None)


@torch.no_grad()
def main(out: Path) -> None:
    for layer in ("layer.1", "layer.2", "last"):
        x_ND = open_store(out / "stores" / "eval", layer=layer).all().float()
        centred = x_ND - x_ND.mean(0)
        var = torch.linalg.svdvals(centred) ** 2
        pca = [float(var[:p].sum() / var.sum()) for p in (2, 6, 14)]
        sae = SAE.from_pretrained(next((out / "runs" / layer / "saes").glob("matryoshka*"))).eval()
        codes_NF = sae.encode(x_ND)
        fve = []
        for p in PREFIXES:
            kept = codes_NF.clone()
            if p is not None:
                kept[:, p:] = 0
            fve.append(float(1 - ((x_ND - sae.decode(kept)) ** 2).sum() / (centred**2).sum()))
        print(f"{layer:8s} PCA variance in 2/6/14 components: " + " / ".join(f"{v:.3f}" for v in pca)
              + "; Matryoshka FVE with the first 2/6/14/30/all latents: " + " / ".join(f"{v:.3f}" for v in fve))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/demo"))
