"""Top-activating images per latent in one streaming pass (the running top-k of `sae_vlm.topk`, on the device), and
4×4 grids of them. Token-level codes are mean-pooled per image first (rows of one image must be contiguous).

For a store of patch tokens (`--tokens all` or `random-k`), `ImageTopMaps` ranks whole images by their largest
token code and keeps, for each latent's top images, its code on every patch: a sparse map of at most
`MAP_PATCHES` patches (the largest), saved as CSR arrays (`maps/<name>.npz`, see docs/evaluation.md).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
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



MAP_PATCHES = 64  # patches kept per map, the largest: 65,536 latents x 16 images stay under 270 MB
FP16_MAX = 65504.0


@dataclass(frozen=True)
class PatchGrid:
    """Where an image's patches are among its store rows: token positions `prefix`.. (after CLS and registers) form
    a rows x cols grid, row-major as the model flattens it. `complete`: every patch has a row (`--tokens all`);
    else only sampled patches were kept (`random-k`), and the others are unknown."""

    prefix: int
    rows: int
    cols: int
    per_image: int  # store rows per image
    complete: bool
    positions: np.ndarray  # token position of every store row, memory-mapped
    where: Path  # the store's token index file, for errors

    @property
    def patches(self) -> int:
        return self.rows * self.cols


def token_positions(path: Path, rows: int) -> np.ndarray:
    """A store's token index, memory-mapped (an `all` store's is as long as its rows), checked."""
    try:
        tok = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path} is not a readable .npy array ({str(e).splitlines()[0]})") from None
    if tok.shape != (rows,) or tok.dtype.kind not in "iu":
        raise ValueError(f"{path} holds {tok.dtype} {list(tok.shape)}; expected {rows} integer token positions")
    return tok


def patch_grid(src: ActivationSource) -> PatchGrid | None:
    """The patch grid of a store of patch tokens; None for one row per image or a source that is not a store. The
    store records its tokens per image; a store from before that records nothing: for `all` its rows per image are
    the tokens, CLS and registers first, then a square grid; a random-k one gets no maps (a warning)."""
    meta = src.meta
    if meta is None or meta.rows_per_image < 2:
        return None
    man, where, per = meta.manifest, meta.path / "manifest.json", meta.rows_per_image
    tokens, prefix = man.get("tokens_per_image"), man.get("prefix_tokens")
    if tokens is None and man.get("token_selection") == "all":
        tokens, prefix = per, per - math.isqrt(per) ** 2
    if tokens is None:
        print(f"warning: {where} does not record its tokens per image (extracted before heatmaps existed): no "
              "heatmaps for its SAEs; re-extract the store for them", file=sys.stderr)
        return None
    if not (type(tokens) is int and type(prefix) is int and 0 <= prefix < tokens and per <= tokens):
        raise ValueError(f"{where}: tokens_per_image {tokens!r} and prefix_tokens {prefix!r} are not a token count "
                         f"of at least rows_per_image {per} and a smaller count of CLS and register tokens")
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        print(f"warning: {where}: {tokens - prefix} patches form no square grid: no heatmaps", file=sys.stderr)
        return None
    path = meta.path / man["token_index_file"]
    return PatchGrid(prefix, side, side, per, per == tokens, token_positions(path, src.rows), path)


class ImageTopMaps:
    """Each latent's top images of a token store, and its code on every patch of them, from chunks of whole images.

    An image's value for a latent is its largest token code, and its index that token's store row; the running top
    merges as `TopAccumulator` does. An image that enters a latent's top brings its map: the codes on its patches,
    the `max_patches` largest kept (with `complete`, only positive ones: absent patches are 0; else every sampled
    patch: absent ones were not sampled), as float16."""

    def __init__(self, top: int, grid: PatchGrid, width: int, device=None, max_patches: int = MAP_PATCHES):
        self.top, self.grid, self.keep = top, grid, min(max_patches, grid.patches)
        self.vals_FT = torch.full((width, top), float("-inf"), device=device)
        self.rows_FT = torch.full((width, top), -1, dtype=torch.int64, device=device)
        small = torch.int16 if grid.patches < 2**15 else torch.int32
        self.code_FTP = torch.zeros((width, top, self.keep), dtype=torch.float16, device=device)
        self.patch_FTP = torch.full((width, top, self.keep), -1, dtype=small, device=device)

    def add(self, c_RF: torch.Tensor, r0: int) -> None:
        """Codes of store rows [r0, r0 + R), whole images."""
        dev, per = c_RF.device, self.grid.per_image
        c_ITF = c_RF.reshape(-1, per, c_RF.shape[1])
        v_IF, t_IF = c_ITF.max(1)
        first_I = r0 + torch.arange(c_ITF.shape[0], device=dev) * per
        cand_v = torch.cat([self.vals_FT, v_IF.T], 1)
        cand_r = torch.cat([self.rows_FT, (first_I[:, None] + t_IF).T], 1)
        self.vals_FT, pos_FT = cand_v.topk(self.top, dim=1)
        self.rows_FT = cand_r.gather(1, pos_FT)
        moved = (pos_FT != torch.arange(self.top, device=dev)).any(1)  # latents whose top changed
        if moved.any():
            old = pos_FT[moved].clamp(max=self.top - 1)[:, :, None].expand(-1, -1, self.keep)
            self.code_FTP[moved] = self.code_FTP[moved].gather(1, old)
            self.patch_FTP[moved] = self.patch_FTP[moved].gather(1, old)
            self._new_maps(c_ITF, pos_FT, self._patches(r0, c_ITF.shape[0], dev))

    def _patches(self, r0: int, n_images: int, dev) -> torch.Tensor:
        """The patch index of each row of the chunk's images [I, per]; -1 for CLS and register rows."""
        g = self.grid
        pos = torch.as_tensor(np.asarray(g.positions[r0 : r0 + n_images * g.per_image], dtype=np.int64), device=dev)
        patch = pos.reshape(n_images, g.per_image) - g.prefix
        if (patch >= g.patches).any():
            raise ValueError(f"{g.where} holds token position {int(pos.max())}, beyond the store's "
                             f"{g.prefix + g.patches} tokens per image")
        return patch.clamp(min=-1)

    def _new_maps(self, c_ITF: torch.Tensor, pos_FT: torch.Tensor, patch_IT: torch.Tensor) -> None:
        f_K, s_K = (pos_FT >= self.top).nonzero(as_tuple=True)
        i_K = pos_FT[f_K, s_K] - self.top
        block = max(1, (1 << 22) // c_ITF.shape[1])  # bounds the dense maps made at once (the first chunk's many)
        for b in range(0, len(f_K), block):
            f, s, i = f_K[b : b + block], s_K[b : b + block], i_K[b : b + block]
            code, patch = self._sparse(c_ITF[i, :, f], patch_IT[i])
            self.code_FTP[f, s], self.patch_FTP[f, s] = code, patch.to(self.patch_FTP.dtype)

    def _sparse(self, v_KT: torch.Tensor, patch_KT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps [K, rows*cols] from rows' codes and patches, as their `keep` largest (code, patch) pairs."""
        n = self.grid.patches
        dense = torch.full((v_KT.shape[0], n + 1), float("nan"), device=v_KT.device)
        dense.scatter_(1, torch.where(patch_KT >= 0, patch_KT, n), v_KT)  # CLS and registers into a spare column
        dense = dense[:, :n]
        return largest_patches(dense, (dense > 0) if self.grid.complete else ~dense.isnan(), self.keep)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [F, top], store rows [F, top] int64), best first; slots never filled: -inf and -1."""
        return self.vals_FT, self.rows_FT

    def npz(self) -> dict[str, np.ndarray]:
        return maps_npz(self.code_FTP.flatten(0, 1), self.patch_FTP.flatten(0, 1), (self.grid.rows, self.grid.cols),
                        self.grid.complete, "tokens")


def largest_patches(dense_KN: torch.Tensor, wanted_KN: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps [K, rows*cols] as their `keep` largest wanted (code, patch) pairs, largest first: codes [K, keep]
    float16, patch indices [K, keep] (-1 past a map's last wanted patch)."""
    top_v, top_p = torch.where(wanted_KN, dense_KN, float("-inf")).topk(keep, dim=1)
    kept = top_v > float("-inf")
    return torch.where(kept, top_v.clamp(-FP16_MAX, FP16_MAX), 0).half(), torch.where(kept, top_p, -1)


def maps_npz(code_MP: torch.Tensor, patch_MP: torch.Tensor, grid: tuple[int, int], complete: bool, kind: str,
             mapped_F: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """maps/<name>.npz as CSR arrays: map m = latent * top + rank holds `patch[indptr[m]:indptr[m + 1]]` (row-major
    patch index) with values `code[...]`, from [M, keep] arrays whose kept entries come first (patch -1 after);
    `grid` is (rows, cols); `complete` says absent patches are 0; `kind` what the values are: "tokens" (the latent's
    code on the patch) or "attribution" (|gradient x input|); `mapped` [F], where given, which latents have maps."""
    kept = patch_MP >= 0
    counts = kept.sum(-1).cpu().numpy()
    out = {"indptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
           "patch": patch_MP[kept].cpu().numpy(), "code": code_MP[kept].cpu().numpy(),
           "grid": np.array(grid, np.int64), "complete": np.array(complete), "kind": np.array(kind)}
    return out if mapped_F is None else out | {"mapped": np.asarray(mapped_F, bool)}
