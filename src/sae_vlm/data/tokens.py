"""Which tokens of a [B, T, D] activation become store rows.

  cls        token 0 (CLIP, DINOv2, LLaVA tower). SigLIP has no CLS token: asking for it is an error
             (use `--layers last` for SigLIP's MAP-pooled vector, or mean / random-k).
  first      token 0, whatever it is: on SigLIP a patch token. The paper's `--cls_only` took it there, so its
             SigLIP layer rows are reproduced with `first`; elsewhere it equals `cls`.
  mean       mean over patch tokens, excluding CLS and DINOv2 register tokens
  all        every token, CLS and registers included, in sequence order (T rows per image)
  random-k   k distinct tokens per image drawn from CLS + patches (registers excluded), sorted by position.
             The draw is seeded by (seed, image id) only, so it does not depend on batching or rank.
  pooled     the one vector of a 2-D hook point ("last"); any selection asked for at "last" maps to it.
"""

from __future__ import annotations

import hashlib

import torch

from sae_vlm.token_selection import TokenSelection


def rows_per_image(sel: TokenSelection, n_tokens: int) -> int:
    return {"cls": 1, "first": 1, "mean": 1, "pooled": 1, "all": n_tokens, "random": sel.k}[sel.kind]


def image_seed(image_id: str, seed: int) -> int:
    key = f"{seed}:{image_id}".encode("utf-8", "surrogateescape")  # ids from non-UTF-8 file names hold surrogates
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def random_positions(image_id: str, n_tokens: int, k: int, n_cls: int, n_registers: int, seed: int) -> torch.Tensor:
    """k sorted token positions for one image, from CLS (if any) + patches; registers are skipped."""
    eligible = torch.cat([torch.arange(n_cls), torch.arange(n_cls + n_registers, n_tokens)])
    if k > len(eligible):
        raise ValueError(f"random-{k} asks for more tokens than the {len(eligible)} an image has")
    g = torch.Generator().manual_seed(image_seed(image_id, seed))
    return eligible[torch.randperm(len(eligible), generator=g)[:k]].sort().values


def select_tokens(acts, sel: TokenSelection, image_ids: list[str], has_cls: bool, n_registers: int = 0,
                  seed: int = 0, hook_point: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
    """acts [B, T, D] (or [B, D] for pooled points) -> (rows [B * r, D], token position per row [B * r];
    -1 = pooled)."""
    if acts.ndim == 2:
        return acts, torch.full((acts.shape[0],), -1, dtype=torch.int32)
    B, T, D = acts.shape
    n_cls = int(has_cls)
    if sel.kind == "cls":
        if not has_cls:
            raise ValueError(f"token selection 'cls' at {hook_point}: this model has no CLS token (SigLIP); "
                             "use --layers last for its pooled vector, or --tokens mean / random-k")
        return acts[:, 0], torch.zeros(B, dtype=torch.int32)
    if sel.kind == "first":
        return acts[:, 0], torch.zeros(B, dtype=torch.int32)
    if sel.kind == "mean":
        return acts[:, n_cls + n_registers :].float().mean(1).to(acts.dtype), torch.full((B,), -1, dtype=torch.int32)
    if sel.kind == "all":
        return acts.reshape(B * T, D), torch.arange(T, dtype=torch.int32).repeat(B)
    if sel.kind == "random":
        pos_BK = torch.stack([random_positions(i, T, sel.k, n_cls, n_registers, seed) for i in image_ids])
        rows = torch.gather(acts, 1, pos_BK.to(acts.device)[:, :, None].expand(B, sel.k, D))
        return rows.reshape(B * sel.k, D), pos_BK.reshape(-1).to(torch.int32)
    if sel.kind == "pooled":
        raise ValueError(f"token selection 'pooled' only applies to a 2-D hook point such as 'last', not {hook_point}")
    raise ValueError(f"unknown token selection {sel.name!r}")
