"""Where the demo's colour latents fire: the share of their top images whose map peaks inside the creature's box.

Per SAE, the latents that best detect each colour (AUROC >= 0.9 on the evaluation images; a token SAE's image code is
its largest code on a patch, its map's peak) and their top images from `evaluate`, with its maps: token
maps for the token SAEs, |gradient x input| (`--heatmaps`) for the SAEs on the CLS token and on `last`. A (latent,
image) pair counts when the centre of the map's highest patch lies in the creature's box (`world.Box`, recorded by
`write_folder`). Chance is the box's mean share of the image: how often a peak on a random pixel would land in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae_vlm.browse.data import PatchMaps, check_maps, read_npz
from sae_vlm.data.store import open_store
from sae_vlm.eval.inspect_page import map_pictures
from sae_vlm.eval.top import patch_grid
from sae_vlm.sae.model import SAE
from sae_vlm.toyworld import world as W
from sae_vlm.toyworld.steering import MIN_AUROC, colour_aurocs

EXAMPLES = 4  # top images shown per example latent on the front page


@dataclass
class Truth:
    """Per image of the evaluation store: its creature's colour (index into W.COLOURS) and box."""

    colour_N: np.ndarray
    box_N3: np.ndarray  # top, left, side in pixels

    @classmethod
    def of(cls, images: Path, ids: list[str]) -> Truth:
        recs = W.folder_records(images, ids)
        return cls(np.array([W.COLOURS.index(r["labels"]["objects"][0]["colour"]) for r in recs]),
                   W.folder_boxes(images, ids))

    def chance(self) -> float:
        return float(np.mean(self.box_N3[:, 2].astype(float) ** 2) / W.IMAGE_SIZE**2)


def peak_in_box(map_RC: np.ndarray, box) -> bool:
    """Whether the centre of the map's highest patch lies inside the box (a map without a positive patch has no
    peak; NaN patches were not sampled)."""
    m = np.nan_to_num(map_RC, nan=-np.inf)
    if not m.max() > 0:
        return False
    r, c = np.unravel_index(int(m.argmax()), m.shape)
    ph, pw = W.IMAGE_SIZE / m.shape[0], W.IMAGE_SIZE / m.shape[1]
    top, left, side = (int(v) for v in box)
    return bool(top <= (r + 0.5) * ph < top + side and left <= (c + 0.5) * pw < left + side)


@torch.no_grad()
def image_codes(sae: SAE, store: Path, layer: str | None, images: Path
                ) -> tuple[np.ndarray, int, Truth, list[str]]:
    """([images, F] each image's largest code on a patch (its map's peak; on its one row for a store of one row per
    image), rows per image, the images' truth, their paths). A token SAE's latent that fires on the CLS token alone
    has no map to find the creature with, so it is no detector here."""
    src = open_store(store, layer)
    per = src.meta.rows_per_image if src.meta else 1
    codes_RF = sae.eval().encode(src.all().float())
    grid = patch_grid(src)
    if grid is not None:  # CLS and register rows out
        codes_RF[torch.as_tensor(np.asarray(grid.positions) < grid.prefix)] = 0
    ids, paths = src.image_ids()[::per], src.paths()[::per]
    return codes_RF.reshape(-1, per, codes_RF.shape[1]).amax(1).numpy(), per, Truth.of(images, ids), paths


def detectors(codes_NF: np.ndarray, colour_N: np.ndarray) -> dict[str, int]:
    """{colour: the latent that detects it best}, for the colours some latent detects at AUROC >= MIN_AUROC."""
    auc_CF = colour_aurocs(codes_NF, colour_N)
    best = auc_CF.argmax(1)
    return {c: int(best[i]) for i, c in enumerate(W.COLOURS) if auc_CF[i, best[i]] >= MIN_AUROC}


@dataclass
class Scored:
    """One SAE's localisation: the share of (detector, top image) pairs whose peak is in the box."""

    share: float | None
    pairs: int
    detectors: dict[str, int]
    maps: PatchMaps
    top_rows: np.ndarray  # [F, top] store rows of each latent's top images, -1 or non-positive: none
    per: int  # store rows per image
    paths: list[str]  # per image

    def images(self, j: int) -> list[tuple[int, int, np.ndarray]]:
        """(rank, image, map) of latent j's top images with a map, best first."""
        out = []
        for rank, row in enumerate(self.top_rows[j]):
            grid = self.maps.grid(j, rank) if row >= 0 else None
            if grid is not None:
                out.append((rank, int(row) // self.per, grid))
        return out

    def to_json(self) -> dict:
        return {"share": self.share, "pairs": self.pairs, "detectors": self.detectors}


def score(eval_dir: Path, name: str, sae: SAE, store: Path, layer: str | None, images: Path) -> Scored | None:
    """An SAE's localisation from its evaluation's maps; None where the evaluation wrote no maps for it."""
    maps_file = eval_dir / "maps" / f"{name}.npz"
    if not maps_file.is_file():
        return None
    arrays = read_npz(eval_dir / "latents" / f"{name}.npz")
    top_i, top_v = arrays["top_indices"], arrays["top_values"]
    maps = check_maps(maps_file, top_i.shape[0], top_i.shape[1])
    codes_NF, per, truth, paths = image_codes(sae, store, layer, images)
    found = detectors(codes_NF, truth.colour_N)
    s = Scored(None, 0, found, maps, np.where(top_v > 0, top_i, -1), per, paths)
    hits = [peak_in_box(grid, truth.box_N3[img]) for j in found.values() for _, img, grid in s.images(j)]
    s.share, s.pairs = (float(np.mean(hits)) if hits else None), len(hits)
    return s


def examples_html(title: str, s: Scored) -> str:
    """One detector's first top images, each under its map, for the front page (pictures as data: URIs)."""
    from PIL import Image

    if not s.detectors:
        return ""
    colour, j = next(iter(s.detectors.items()))
    cells = []
    for rank, img, grid in s.images(j)[:EXAMPLES]:
        over, _ = map_pictures(Image.open(s.paths[img]).convert("RGB"), np.nan_to_num(grid))
        cells.append(f'<img src="{over}" alt="latent {j}, top image {rank + 1}" width="96">')
    return (f"<figure><figcaption>{title}: latent {j} (detects {colour}), its top {len(cells)} images under "
            f"their maps</figcaption>{''.join(cells)}</figure>")
