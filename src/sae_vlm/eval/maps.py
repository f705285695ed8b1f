"""Where in the image a latent fires: a map over the patch grid, rows × columns in the image's orientation.

Token SAEs (trained with `--tokens all` or `random-k`) read every token, so their map is the latent's code on each
patch (`token_maps`): one forward pass up to the hook point, then one encode of the image's tokens.
SAEs on one vector per image (the CLS token, token 0, the patch mean, or the pooled `last` vector) have no code
per patch; their map is gradient × input (`attribution_maps`): the latent's code differentiated with respect to
the input of the first encoder layer (the patch embeddings with position embeddings, after any pre-layer norm),
times that input, summed over channels, patch tokens only, in absolute value: how much the patch moves the code,
either way. (The sign is kept out: on the toy world the creature's patches often push a colour latent down as
well as up, and the signed peak fell in the creature's box on about half the top images, the absolute one on 90%.)
Both maps are non-negative, so one colour scale from 0 serves both.

Cost of attribution: one forward pass up to the hook point and one backward pass per (image, latent) pair, 2-3
forward passes of the vision tower (benchmarks/RESULTS.md); pairs run `batch_size` at a time (an image repeated
once per latent), so memory is that of a training step at that batch size whatever the number of latents.
`inspect_images` (also `sae_vlm.inspect`) ranks an image's latents by code and maps the top ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from sae_vlm.backbones import Backbone
from sae_vlm.eval.top import MAP_PATCHES, largest_patches, maps_npz
from sae_vlm.token_selection import parse_tokens

READINGS = ("tokens", "cls", "first", "mean", "pooled")  # how an SAE read its hook point (see `reading`)


def _named(sae) -> str:
    return f"SAE {sae.path}" if getattr(sae, "path", None) else "the SAE"


def reading(sae, point: str, tokens: str | None = None) -> str:
    """How the SAE read the hook point, from `tokens` if given, else its config's `token_selection`: "tokens"
    (every token or random ones: a code per patch), "cls", "first", "mean" or "pooled" (one vector per image)."""
    if point == "last":
        return "pooled"
    spec = tokens if tokens is not None else sae.cfg.token_selection
    if spec is None:
        raise ValueError(f"{_named(sae)} does not record its token selection at {point}; pass --tokens all (a token "
                         "SAE) or --tokens cls")
    [sel] = parse_tokens(spec)
    return "tokens" if sel.kind in ("all", "random") else sel.kind


def _rows(bb: Backbone, how: str, t: torch.Tensor) -> torch.Tensor:
    """The SAE's input rows [B, D] of a hook-point output, for an SAE that reads one vector per image."""
    if t.ndim == 2:
        return t.float()
    if how == "cls" and not bb.has_cls:
        raise ValueError(f"{bb.model_id} has no CLS token; an SAE on CLS cannot have read it")
    if how in ("cls", "first"):
        return t[:, 0].float()
    return t[:, bb.n_prefix :].float().mean(1)


def _check_tokens(bb: Backbone, T: int, grid: tuple[int, int]) -> None:
    if T != bb.n_prefix + grid[0] * grid[1]:
        raise ValueError(f"{bb.model_id} gives {T} tokens, expected {bb.n_prefix} before a {grid[0]}x{grid[1]} "
                         "patch grid")


@torch.no_grad()
def _patch_codes(bb: Backbone, sae, pixel_values: torch.Tensor, hook_point: str):
    """Per image, a token SAE's codes on the patches [rows * cols, F] (row-major), from one forward pass stopped at
    the hook point; images are encoded one at a time, so the buffer is one image's [tokens, F]."""
    point = bb.hook_point(hook_point)
    t_BTD = bb.capture(pixel_values, [point])[point]
    if t_BTD.ndim != 3:
        raise ValueError(f"hook point {point} gives one vector per image; token maps need a layer's tokens")
    _check_tokens(bb, t_BTD.shape[1], bb.patch_grid(pixel_values))
    sae = sae.to(t_BTD.device)
    for b in range(t_BTD.shape[0]):
        yield sae.encode(t_BTD[b, bb.n_prefix :].float())


@torch.no_grad()
def token_codes(bb: Backbone, sae, pixel_values: torch.Tensor, hook_point: str,
                latents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image codes [B, F]: each latent's largest code on a patch, the map's peak; maps [B, rows, cols, F]) of a
    token SAE, from one forward pass stopped at the hook point. `latents` [L]: keep those columns only (the encode
    is still over all latents, which top-k selection needs)."""
    rows, cols = bb.patch_grid(pixel_values)
    maps = [(c if latents is None else c[:, latents.to(c.device)]).reshape(rows, cols, -1).cpu()
            for c in _patch_codes(bb, sae, pixel_values, hook_point)]
    maps_BRCF = torch.stack(maps)
    return maps_BRCF.amax((1, 2)), maps_BRCF


def token_maps(bb: Backbone, sae, pixel_values: torch.Tensor, hook_point: str,
               latents: torch.Tensor | None = None) -> torch.Tensor:
    """A token SAE's code of every latent (or of `latents` [L]) on every patch, [B, rows, cols, F or L]."""
    return token_codes(bb, sae, pixel_values, hook_point, latents)[1]


def _latent_grid(latents, B: int, d_sae: int) -> torch.Tensor:
    """latents as [B, L]: one list for every image ([L]) or one per image ([B, L]), ids checked."""
    lat = torch.as_tensor(latents, dtype=torch.long)
    lat = lat[None].expand(B, -1) if lat.ndim == 1 else lat
    if lat.ndim != 2 or lat.shape[0] != B:
        raise ValueError(f"latents of shape {tuple(lat.shape)}: expected [L] or [{B}, L], one row per image")
    if lat.numel() and not (0 <= int(lat.min()) and int(lat.max()) < d_sae):
        raise ValueError(f"latent ids must be in 0..{d_sae - 1}; got {int(lat.min())}..{int(lat.max())}")
    return lat


def attribution_maps(bb: Backbone, sae, pixel_values: torch.Tensor, latents, hook_point: str, *,
                     how: str = "cls", batch_size: int = 32, signed: bool = False,
                     quiet: bool = True) -> torch.Tensor:
    """|Gradient × input| of each latent's code w.r.t. the first encoder layer's input, summed over channels, on the
    patch tokens: [B, L, rows, cols] float32 on the CPU (`signed=True` keeps the sign). `latents`: [L] for every
    image or [B, L] per image; `how`: the SAE's reading (cls, first, mean or pooled). Pairs (image, latent) run
    `batch_size` at a time."""
    point = bb.hook_point(hook_point)
    bb.check_sae(point, sae)
    if how not in READINGS[1:]:
        raise ValueError(f"attribution reads one vector per image: how={how!r}, expected one of {READINGS[1:]}")
    B = pixel_values.shape[0]
    lat_BL = _latent_grid(latents, B, sae.cfg.d_sae)
    L, grid = lat_BL.shape[1], bb.patch_grid(pixel_values)
    image_P, latent_P = torch.arange(B).repeat_interleave(L), lat_BL.reshape(-1)
    sae = sae.to(bb.device())
    out = []
    for p0 in tqdm(range(0, B * L, batch_size), desc="attribution", disable=quiet, leave=False):
        img, lat = image_P[p0 : p0 + batch_size], latent_P[p0 : p0 + batch_size].to(bb.device())
        x_PTD, t = bb.capture_with_input(pixel_values[img], point)
        with torch.enable_grad():
            code_P = sae.encode(_rows(bb, how, t))[torch.arange(len(img)), lat]
            (grad_PTD,) = torch.autograd.grad(code_P.sum(), x_PTD)  # pairs are independent: one backward for all
        attr_PT = (grad_PTD * x_PTD.detach()).float().sum(-1)
        attr_PT = attr_PT if signed else attr_PT.abs()
        _check_tokens(bb, attr_PT.shape[1], grid)
        out.append(attr_PT[:, bb.n_prefix :].reshape(-1, *grid).cpu())
    if not out:
        return torch.zeros(B, L, *grid)
    return torch.cat(out).reshape(B, L, *grid)


def top_image_maps(bb: Backbone, sae, point: str, how: str, image_of, top_idx_FT: torch.Tensor,
                   top_val_FT: torch.Tensor, latents, *, batch_size: int = 32, quiet: bool = True
                   ) -> dict[str, np.ndarray]:
    """Attribution maps of `latents` on their top images (store rows `top_idx_FT`, where `top_val_FT` > 0), as
    maps/<name>.npz arrays (`eval.top.maps_npz`, kind "attribution", `mapped` marking `latents`): each map's
    `MAP_PATCHES` largest patches. `image_of(row)` gives a row's image. Latents run `batch_size // top` at a time,
    so a batch's pairs are (image, latent) of `batch_size` at most."""
    F, T = top_idx_FT.shape
    grid = bb.patch_grid()
    keep = min(MAP_PATCHES, grid[0] * grid[1])
    code_MP, patch_MP = torch.zeros(F * T, keep, dtype=torch.float16), torch.full((F * T, keep), -1)
    mapped_F = np.zeros(F, bool)
    per = max(1, batch_size // T)
    lat = [int(j) for j in latents]
    for l0 in tqdm(range(0, len(lat), per), desc="heatmaps", unit="batch", disable=quiet, leave=False):
        pairs = [(j * T + r, int(top_idx_FT[j, r]), j) for j in lat[l0 : l0 + per] for r in range(T)
                 if top_idx_FT[j, r] >= 0 and top_val_FT[j, r] > 0]
        mapped_F[lat[l0 : l0 + per]] = True
        if not pairs:
            continue
        pv = bb.preprocess([image_of(row) for _, row, _ in pairs])
        if bb.patch_grid(pv) != grid:
            raise ValueError(f"{bb.model_id}'s processor gives {tuple(pv.shape[-2:])} px images, not the "
                             f"{grid[0]}x{grid[1]} patch grid of its config")
        m_PRC = attribution_maps(bb, sae, pv, [[j] for _, _, j in pairs], point, how=how, batch_size=batch_size)[:, 0]
        dense = m_PRC.flatten(1)
        slot = torch.tensor([m for m, _, _ in pairs])
        code_MP[slot], patch_MP[slot] = largest_patches(dense, dense > 0, keep)
    return maps_npz(code_MP, patch_MP, grid, True, "attribution", mapped_F)


@torch.no_grad()
def image_codes(bb: Backbone, sae, pixel_values: torch.Tensor, hook_point: str, how: str) -> torch.Tensor:
    """[B, F] codes of an SAE that reads one vector per image (cls, first, mean or pooled)."""
    point = bb.hook_point(hook_point)
    t = bb.capture(pixel_values, [point])[point]
    return sae.to(t.device).encode(_rows(bb, how, t)).cpu()


def _top(codes_F: torch.Tensor, top: int) -> torch.Tensor:
    """Ids of the `top` highest positive codes, by code descending then id (a stable order)."""
    order = torch.sort(codes_F.float(), descending=True, stable=True).indices
    return order[codes_F[order] > 0][:top]


def _entries(latents: torch.Tensor, codes_F: torch.Tensor, maps_LRC: torch.Tensor) -> list[dict]:
    return [{"latent": int(j), "code": float(codes_F[j]), "map": m.tolist()} for j, m in zip(latents, maps_LRC)]


@torch.no_grad()  # attribution turns autograd on where it needs it
def inspect_batch(bb: Backbone, sae, pixel_values: torch.Tensor, point: str, how: str, *, top: int = 10,
                  batch_size: int = 32, quiet: bool = True) -> list[list[dict]]:
    """Per image, its top latents by code (positive codes only, descending) with their maps."""
    if how == "tokens":
        rows, cols = bb.patch_grid(pixel_values)
        result = []
        for c_PF in _patch_codes(bb, sae, pixel_values, point):  # only the top latents' maps are kept
            peaks_F = c_PF.amax(0).cpu()
            j = _top(peaks_F, top)
            result.append(_entries(j, peaks_F, c_PF[:, j.to(c_PF.device)].T.reshape(-1, rows, cols).cpu()))
        return result
    codes_BF = image_codes(bb, sae, pixel_values, point, how)
    result = []
    for b, c_F in enumerate(codes_BF):  # images differ in how many latents fire: one call each
        j = _top(c_F, top)
        maps = attribution_maps(bb, sae, pixel_values[b : b + 1], j, point, how=how, batch_size=batch_size,
                                quiet=quiet)[0]
        result.append(_entries(j, c_F, maps))
    return result


def resolve(sae, backbone=None, hook_point: str | None = None, tokens: str | None = None, device=None):
    """(SAE, Backbone, hook point, reading) from objects or paths: `sae` an SAE or its directory; `backbone` a
    Backbone, an HF vision model, a hub id or a directory, None for the SAE's recorded `model_id`."""
    from sae_vlm.backbones import load_backbone
    from sae_vlm.device import resolve_device
    from sae_vlm.sae.model import SAE

    sae = sae if isinstance(sae, SAE) else SAE.from_pretrained(sae)
    if backbone is None:
        backbone = sae.cfg.model_id
        if backbone is None:
            raise ValueError(f"{_named(sae)} does not record its backbone model; pass --model ID|DIR")
    if isinstance(backbone, (str, Path)):
        backbone = load_backbone(str(backbone), device=resolve_device(device), dtype="fp32")
    bb = backbone if isinstance(backbone, Backbone) else Backbone(backbone)
    name = hook_point if hook_point is not None else sae.cfg.hook_point
    if name is None:
        raise ValueError(f"{_named(sae)} does not record its hook point; pass --hook-point")
    point = bb.hook_point(name)
    bb.check_sae(point, sae)
    return sae.eval(), bb, point, reading(sae, point, tokens)


def inspect_images(images, sae, backbone=None, *, hook_point: str | None = None, tokens: str | None = None,
                   top: int = 10, batch_size: int = 32, device=None, quiet: bool = True) -> list[dict]:
    """`[{"image": path, "latents": [{"latent": int, "code": float, "map": [[float, ...], ...]}]}]`: for each
    image (a path, 'white' or a PIL image), its `top` latents by code, descending (those with a positive code),
    each with its map over the patch grid. See `resolve` for `sae` and `backbone`; `hook_point` and `tokens`
    override what the SAE's config records. A token SAE's image code is its largest code on a patch: the latents
    that fire strongly on a small object rank above those that fire weakly everywhere."""
    from sae_vlm.data.images import open_image

    if top < 1:
        raise ValueError(f"top={top}: expected at least 1 latent per image")
    named = [(str(im) if not isinstance(im, Image.Image) else f"<image {i}>", open_image(im))
             for i, im in enumerate(images)]
    sae, bb, point, how = resolve(sae, backbone, hook_point, tokens, device)
    out = []
    for i0 in range(0, len(named), batch_size):
        chunk = named[i0 : i0 + batch_size]
        pixel_values = bb.preprocess([im for _, im in chunk])
        found = inspect_batch(bb, sae, pixel_values, point, how, top=top, batch_size=batch_size, quiet=quiet)
        out += [{"image": name, "latents": lat} for (name, _), lat in zip(chunk, found)]
    return out
