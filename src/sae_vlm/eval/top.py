"""Top-activating images per latent in one streaming pass (the running top-k of `sae_vlm.topk`, on the device), and
4×4 grids of them. Token-level codes are mean-pooled per image first (rows of one image must be contiguous).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.data.images import is_store_member, open_image
from sae_vlm.data.source import ActivationSource, sequential_chunks
from sae_vlm.data.store import as_source
from sae_vlm.device import resolve_device
from sae_vlm.eval.ms import is_sparse_codes
from sae_vlm.io import atomic_save_image
from sae_vlm.topk import running_top


class EncodedSource(ActivationSource):
    """SAE codes of an activation source, computed chunk by chunk (an ActivationSource of width d_sae)."""

    def __init__(self, sae, source, mode: str | None = None, device=None):
        self.sae, self.src, self.mode = sae, as_source(source), mode
        self.rows, self.d_in = self.src.rows, sae.cfg.d_sae
        self.device = resolve_device(device)
        if self.src.d_in != sae.cfg.d_in:
            raise ValueError(f"activations have width {self.src.d_in} but the SAE expects d_in={sae.cfg.d_in}")

    @torch.no_grad()
    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        sae = self.sae.to(self.device)
        return sae.encode(self.src.get(idx_N).to(self.device), mode=self.mode).float()


def code_chunks(codes, chunk_rows: int, dev):
    """Yield dense [R, F] float chunks of a dense source or a sparse code store."""
    if is_sparse_codes(codes):
        n, k = int(codes.indices.shape[0]), int(codes.d_sae)
        for r0 in range(0, n, chunk_rows):
            idx = torch.as_tensor(np.asarray(codes.indices[r0 : r0 + chunk_rows]), device=dev).long()
            val = torch.as_tensor(np.asarray(codes.values[r0 : r0 + chunk_rows]), device=dev).float()
            out = torch.zeros(idx.shape[0], k, device=dev)
            yield out.scatter_(1, idx, val)
    else:
        for _, c_RF in sequential_chunks(as_source(codes), chunk_rows):
            yield c_RF.to(dev).float()


def _rows_of(codes) -> int:
    return int(codes.indices.shape[0]) if is_sparse_codes(codes) else as_source(codes).rows


def _pooled_chunks(codes, image_ids, chunk_rows, dev):
    """Mean-pool token rows per image; yields (image ids [I], pooled codes [I, F]) for completed images."""
    ids_all = torch.as_tensor(np.asarray(image_ids)).long()
    if ids_all.numel() != _rows_of(codes):
        raise ValueError(f"{ids_all.numel()} image ids given for {_rows_of(codes)} code rows; expected one id per row")
    # contiguity check up front: each image's tokens form one run
    starts = torch.ones_like(ids_all, dtype=torch.bool)
    starts[1:] = ids_all[1:] != ids_all[:-1]
    run_ids = ids_all[starts]
    if run_ids.unique().numel() != run_ids.numel():
        raise ValueError("image ids of token rows are not contiguous; expected all rows of an image to be adjacent")
    carry_id: int | None = None
    carry_sum, carry_n = torch.zeros(0, device=dev), torch.zeros((), device=dev)
    r0 = 0
    for c_RF in code_chunks(codes, chunk_rows, dev):
        ids = ids_all[r0 : r0 + c_RF.shape[0]].to(dev)
        r0 += c_RF.shape[0]
        uniq, inv = torch.unique_consecutive(ids, return_inverse=True)
        sums = torch.zeros(len(uniq), c_RF.shape[1], device=dev).index_add_(0, inv, c_RF)
        counts = torch.zeros(len(uniq), device=dev).index_add_(0, inv, torch.ones_like(ids, dtype=torch.float))
        if carry_id is not None and int(uniq[0]) == carry_id:
            sums[0] += carry_sum
            counts[0] += carry_n
        elif carry_id is not None:
            yield torch.tensor([carry_id], device=dev), carry_sum[None] / carry_n
        # the last image may continue in the next chunk
        carry_id, carry_sum, carry_n = int(uniq[-1]), sums[-1], counts[-1]
        if len(uniq) > 1:
            yield uniq[:-1], sums[:-1] / counts[:-1, None]
    if carry_id is not None:
        yield torch.tensor([carry_id], device=dev), carry_sum[None] / carry_n


@torch.no_grad()
def top_activating(
    codes, *, top: int = 16, image_ids=None, device=None, chunk_rows: int = 1024, quiet: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [F, top] float32, indices [F, top] int64), best first, on the CPU.

    `codes`: dense [N, F] (tensor/array/.npy/ActivationSource, e.g. `EncodedSource`) or a sparse code store.
    Indices are row numbers, or with `image_ids` (one id per token row) image ids, codes mean-pooled per image.
    Latents seen on fewer than `top` rows pad with value -inf and index -1.
    """
    dev = resolve_device(device)
    if _rows_of(codes) == 0:
        raise ValueError("evaluation set is empty: codes have 0 rows, expected at least 1")
    if image_ids is None:
        stream = ((None, c) for c in code_chunks(codes, chunk_rows, dev))
    else:
        stream = _pooled_chunks(codes, image_ids, chunk_rows, dev)
    vals_FT, idx_FT = running_top(tqdm(stream, desc="top images", disable=quiet, leave=False), top)
    return vals_FT.cpu(), idx_FT.cpu()


def render_grid(indices, image_fn: Callable, path: str | Path, *, tile: int = 96, values=None, cols: int = 4) -> Path:
    """A PNG grid (4×4 for 16) of the images `image_fn(index)` returns (a path or a PIL image); -1 stays blank."""
    from PIL import Image, ImageDraw

    idx = [int(i) for i in np.asarray(indices).reshape(-1)]
    rows = (len(idx) + cols - 1) // cols
    canvas = Image.new("RGB", (cols * tile, rows * tile), "white")
    draw = ImageDraw.Draw(canvas)
    for slot, i in enumerate(idx):
        if i < 0:
            continue
        img = image_fn(i)
        if not isinstance(img, Image.Image):
            if is_store_member(img):
                raise ValueError(f"image grids need a folder or path-list store; {img} is not a file (pass --grids 0)")
            img = open_image(img)
        x, y = (slot % cols) * tile, (slot // cols) * tile
        canvas.paste(img.convert("RGB").resize((tile, tile)), (x, y))
        if values is not None:
            draw.text((x + 2, y + 2), f"{float(np.asarray(values).reshape(-1)[slot]):.2f}", fill="yellow")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_image(path, canvas)
    return path

