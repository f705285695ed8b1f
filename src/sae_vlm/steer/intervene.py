"""Edit SAE latents inside a backbone with one forward hook (the model's modules are never replaced).

error_term=True:  x ← x + Σ_j (f'_j − f_j)·W_dec[j]  (= x̂_edited + (x − x̂));
                  no edits ⇒ the input tensor itself, bit-identical
error_term=False: x ← x̂_edited = decode(edited codes)  (the paper's splice: even α = 0 replaces the residual)
Codes come from the SAE's inference encode (threshold for batchtopk/matryoshka/jumprelu), in float32; the
result is cast back to the model dtype. Only the chosen token positions of the chosen batch items are touched.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence

import torch

from sae_vlm.backbones import Backbone, parse_hook_point
from sae_vlm.steer.edits import apply_edits, check_batch_edits


def as_backbone(model) -> Backbone:
    return model if isinstance(model, Backbone) else Backbone(model)


_WARNED: set[tuple] = set()  # (SAE, trained at, applied at) already named on stderr


def _trained_at(bb: Backbone, name: str | None) -> str | None:
    """The SAE's hook point in this model's names; a layer the model lacks stays as written (and so differs)."""
    for canon in (bb.hook_point, parse_hook_point):
        try:
            return canon(name) if name else None
        except ValueError:  # a free-form name from an imported checkpoint
            continue
    return None


def steering_point(bb: Backbone, hook_point: str | int | None, sae) -> str:
    """Where to edit: `hook_point` if given, else LLaVA's projector input, else the SAE's own hook point.

    An SAE trained at another layer than that is refused when no hook point was asked for; naming the hook point
    is the override, and then one warning line on stderr says so."""
    point = hook_point if hook_point is not None else bb.default_layer or sae.cfg.hook_point
    if point is None:
        raise ValueError("hook_point is None and neither the model (LLaVA) nor the SAE config names one")
    point = bb.hook_point(point)  # one name per point: '-1' and 'layer.<n - 1>' compare equal
    trained_at = _trained_at(bb, sae.cfg.hook_point)
    if trained_at is None or trained_at == point:
        return point
    name = getattr(sae, "path", None) or f"(d_sae={sae.cfg.d_sae})"
    if hook_point is None:
        raise ValueError(f"SAE {name} was trained at {trained_at} but the model's projector reads {point}; its latents "
                         f"may mean nothing there: pass --hook-point {point} to apply it there anyway, or "
                         f"--hook-point {trained_at} to edit where it was trained")
    if (str(name), trained_at, point) not in _WARNED:
        _WARNED.add((str(name), trained_at, point))
        print(f"warning: SAE {name} was trained at {trained_at} but is applied at {point}; its latents may mean "
              "nothing there", file=sys.stderr)
    return point


def _edited_latent_codes(sae, x_ND: torch.Tensor, J: torch.Tensor) -> torch.Tensor:
    """Codes of latents J only, [N, |J|], for the element-wise inference modes (threshold, relu)."""
    h = torch.relu((x_ND - sae.b_dec) @ sae.W_enc[:, J] + sae.b_enc[J])
    if sae.arch.inference == "threshold":
        th = sae.threshold
        return h * (h > (th[J] if th.ndim else th))
    return h


def _edit_cols(codes_RPJ: torch.Tensor, row_edits: list, col_of: dict[int, int]) -> torch.Tensor:
    return torch.stack([apply_edits(codes_RPJ[r], e, col_of) for r, e in enumerate(row_edits)])


def _positions(positions, T: int) -> torch.Tensor | None:
    if positions is None:
        return None
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    if pos.numel() == 0 or pos.min() < -T or pos.max() >= T:
        raise ValueError(f"token positions {pos.tolist()} are out of range for {T} tokens; expected -{T} <= p < {T}")
    return pos % T


def make_edit_fn(sae, edits, error_term: bool = True, positions: Sequence[int] | None = None):
    """The function a hook applies to a hook point's output t ([B, T, D], or [B, D] for 'last')."""
    checked = check_batch_edits(edits, sae.cfg.d_sae)

    @torch.no_grad()
    def fn(t: torch.Tensor) -> torch.Tensor:
        x_BTD = t[:, None] if t.ndim == 2 else t
        B, T, D = x_BTD.shape
        per_item = checked if isinstance(checked, list) else [checked] * B
        if len(per_item) != B:
            raise ValueError(f"{len(per_item)} per-item edit sets were given but the hook point saw {B} rows "
                             "(LLaVA's vision tower sees one row per image)")
        # None: item untouched. {} with an error term: nothing to change, so untouched too (bit-identical).
        rows = [b for b, e in enumerate(per_item) if e is not None and (e or not error_term)]
        if not rows:
            return t
        pos = _positions(positions, T)
        pos_P = torch.arange(T) if pos is None else pos
        rows_R = torch.tensor(rows)
        dev = t.device
        sel_R1, sel_1P = rows_R.to(dev)[:, None], pos_P.to(dev)[None, :]
        x_RPD = x_BTD[sel_R1, sel_1P].float()
        R, P = len(rows), len(pos_P)
        row_edits = [per_item[b] or {} for b in rows]  # none is None here
        J = sorted({j for e in row_edits for j in e})
        col_of = {j: c for c, j in enumerate(J)}
        J_t = torch.tensor(J, dtype=torch.long, device=dev)
        if error_term and sae.arch.elementwise:
            # element-wise gates: only the edited latents' codes are needed, one small matmul for all rows
            old = _edited_latent_codes(sae, x_RPD.reshape(R * P, D), J_t).reshape(R, P, len(J))
            new_RPD = x_RPD + (_edit_cols(old, row_edits, col_of) - old) @ sae.W_dec[J_t]
        else:
            # full codes, one batch row at a time so the [tokens, d_sae] buffer stays small
            new_RPD = torch.empty_like(x_RPD)
            for r in range(R):
                codes_PF = sae.encode(x_RPD[r])
                edited_PF = codes_PF.clone()
                if J:
                    edited_PF[:, J_t] = apply_edits(codes_PF[:, J_t], row_edits[r], col_of)
                if error_term:
                    new_RPD[r] = x_RPD[r] + (edited_PF[:, J_t] - codes_PF[:, J_t]) @ sae.W_dec[J_t]
                else:
                    new_RPD[r] = sae.decode(edited_PF)
        out = x_BTD.clone()
        out[sel_R1, sel_1P] = new_RPD.to(t.dtype)
        return out[:, 0] if t.ndim == 2 else out

    return fn


@contextlib.contextmanager
def intervene(model, hook_point: str | int | None, sae, edits, error_term: bool = True,
              positions: Sequence[int] | None = None) -> Iterator[Backbone]:
    """Within the block, SAE latents at `hook_point` are edited on every forward pass of `model`.

    model: an HF vision model (CLIP, CLIPModel, SigLIP, DINOv2), a LlavaForConditionalGeneration, or a Backbone.
    hook_point: "layer.<i>" / "last"; None means the LLaVA projector's input layer (or the SAE's own hook point); an
        SAE trained elsewhere needs it named (see steering_point).
    edits: {latent: (op, value)} for every batch item, or a list with one such dict (or None) per batch row.
    positions: token positions to edit (all tokens when None). The SAE is moved to the model's device, float32.
    Yields the Backbone; the hook is removed on exit, also when the block raises.
    """
    bb = as_backbone(model)
    hook_point = steering_point(bb, hook_point, sae)
    bb.check_sae(hook_point, sae)  # also checks the point exists, now rather than at the first forward
    sae.to(device=bb.device(), dtype=torch.float32)
    with bb.patch(hook_point, make_edit_fn(sae, edits, error_term=error_term, positions=positions)):
        yield bb
