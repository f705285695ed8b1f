"""Steering the toy LLaVA towards each colour (the classes of the toy taxonomy) with one SAE latent, against the
truth and against a difference-of-means baseline.

The paper's protocol (§6) with the two changes its own review asks for: an error term (unsteered = the original
model) and α set per latent from its activation scale. For each colour:

1. candidates: the live latents (16 positive images) of the token SAE whose top-16 images, by the code
   max-pooled over the image tokens, most often show a creature of that colour: what a reader of the browser
   would pick;
2. selection: each candidate is clamped on every image token at α = m × its largest token code, m in
   `ALPHA_MULTIPLES`, on 12 images of other colours; the (latent, α) that most often makes the answer's first
   word that colour is kept;
3. evaluation, on 24 held-out images of other colours: success = the steered answer names the colour;
   unsteered = the unpatched model names it; and the log-probability of the colour word as the answer's first
   token with and without the clamp (the evidence when a colour fails).

The baseline adds the difference of the mean image token of images of that colour and the rest to every token,
at β × the mean token norm, β chosen on the same selection images.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch

from sae_vlm.sae.model import SAE
from sae_vlm.toyworld import world as W

N_CANDIDATES = 10
ALPHA_MULTIPLES = (4, 8, 16, 32, 64)  # × the latent's largest code on one token of the training images
BETAS = (1, 2, 4)  # × the mean norm of an image token
N_CODES, N_SELECT, N_EVAL = 1000, 12, 24


@torch.no_grad()
def read_layer(bb, images, batch: int = 100) -> torch.Tensor:
    """[N, T, D] image tokens (CLS dropped, as LLaVA's projector drops it) at the layer the projector reads."""
    point = bb.default_layer
    return torch.cat([bb.capture(bb.preprocess(images[b0 : b0 + batch]), [point])[point][:, 1:].float()
                      for b0 in range(0, len(images), batch)])


@torch.no_grad()
def answer_logprobs(model, processor, images, question: str, patch) -> torch.Tensor:
    """[N, vocab] log-probabilities of the answer's first token; `patch()` is entered around the forward pass."""
    from sae_vlm.steer.generate import Case, batch_inputs

    inputs = batch_inputs(model, processor, [Case(im, question, None) for im in images])
    with patch():
        logits = model(**inputs).logits[:, -1].float()
    return logits.log_softmax(-1)


def other_colour_images(colour: str, seed: int, n: int) -> list:
    """n images of world `seed` whose creature is not `colour` (7 in 8 are)."""
    return [s.image for s in W.generate(2 * n + 40, seed=seed) if s.main.colour != colour][:n]


@torch.no_grad()
def training_codes(bb, sae: SAE) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Colour index [N], image tokens [N, T, D] and their SAE codes [N, T, F] of the first N_CODES training images."""
    samples = W.generate(N_CODES, seed=0)
    x_NTD = read_layer(bb, [s.image for s in samples])
    codes_NTF = torch.stack([sae.encode(x_TD) for x_TD in x_NTD])
    return np.array([W.COLOURS.index(s.main.colour) for s in samples]), x_NTD, codes_NTF


def first_words(model, processor, sae, images, question: str, edits: dict | None) -> list[str]:
    from sae_vlm.steer.generate import Case, generate_cases
    from sae_vlm.steer.score import first_word

    cases = [Case(im, question, edits) for im in images]
    return [first_word(t).lower() for t in generate_cases(model, processor, sae, cases, max_new_tokens=3)]


def mean_difference(x_ND: torch.Tensor, in_N: torch.Tensor, norm: float) -> torch.Tensor:
    """The mean of the rows in `in_N` minus the mean of the rest, scaled to length `norm`."""
    d_D = x_ND[in_N].mean(0) - x_ND[~in_N].mean(0)
    return d_D / d_D.norm() * norm


def colour_candidates(codes_NF: np.ndarray, colours_N: np.ndarray) -> dict[str, list[tuple[int, float]]]:
    """{colour: [(latent, top-16 purity)]}: the live latents whose top-16 images most often show that colour."""
    val_FT, idx_FT = torch.from_numpy(codes_NF).T.topk(16, dim=1)
    alive_F = (val_FT > 0).all(1).numpy()
    out = {}
    for ci, colour in enumerate(W.COLOURS):
        purity_F = np.where(alive_F, (colours_N[idx_FT.numpy()] == ci).mean(1), -1.0)
        best = np.argsort(-purity_F, kind="stable")[:N_CANDIDATES]
        out[colour] = [(int(j), float(purity_F[j])) for j in best if purity_F[j] > 0]
    return out


def steer_colours(run: Path, llava_dir: Path) -> dict:
    """Per colour: the chosen latent and α, success and unsteered rates on held-out images, log-probabilities of
    the colour word, and the difference-of-means baseline."""
    from contextlib import nullcontext

    from sae_vlm.backbones import Backbone
    from sae_vlm.steer.generate import load_llava
    from sae_vlm.steer.intervene import intervene

    sae = SAE.from_pretrained(next(p.parent for p in sorted(run.glob("saes/*/config.json")))).eval()
    model, processor = load_llava(str(llava_dir), device="cpu")
    bb = Backbone(model, processor=processor.image_processor)
    question = W.QUESTIONS["colour"]
    word_id = {c: processor.tokenizer.convert_tokens_to_ids(c) for c in W.COLOURS}

    colours_N, x_NTD, codes_NTF = training_codes(bb, sae)
    token_max_F = codes_NTF.amax((0, 1))
    candidates = colour_candidates(codes_NTF.amax(1).numpy(), colours_N)
    token_norm = float(x_NTD.norm(dim=-1).mean())
    mean_ND = x_NTD.mean(1)

    def clamp(j: int, alpha: float):
        return lambda: intervene(model, None, sae, {j: ("clamp", alpha)}, error_term=True)

    def add(direction_D: torch.Tensor):
        return lambda: bb.patch(cast(str, bb.default_layer), lambda t: t + direction_D.to(t.dtype))

    def hit_rate(images, colour: str, patch) -> float:
        lp = answer_logprobs(model, processor, images, question, patch)
        return float((lp.argmax(-1) == word_id[colour]).float().mean())

    per: dict = {}
    for colour in W.COLOURS:
        select = other_colour_images(colour, seed=5, n=N_SELECT)
        held_out = other_colour_images(colour, seed=7, n=N_EVAL)
        trials = [(hit_rate(select, colour, clamp(j, m * float(token_max_F[j]))), -m, -rank, j, m, purity)
                  for rank, (j, purity) in enumerate(candidates[colour]) for m in ALPHA_MULTIPLES]
        sel_rate, _, _, j, m, purity = max(trials)  # ties: the smaller α, then the purer latent
        alpha = m * float(token_max_F[j])
        steered = first_words(model, processor, sae, held_out, question, {j: ("clamp", alpha)})
        plain = first_words(model, processor, sae, held_out, question, None)
        lp_on = answer_logprobs(model, processor, held_out, question, clamp(j, alpha))[:, word_id[colour]]
        lp_off = answer_logprobs(model, processor, held_out, question, nullcontext)[:, word_id[colour]]
        diff_D = mean_difference(mean_ND, torch.from_numpy(colours_N == W.COLOURS.index(colour)), token_norm)
        beta = max(BETAS, key=lambda b: (hit_rate(select, colour, add(b * diff_D)), -b))
        per[colour] = {
            "latent": j, "top16_purity": purity, "alpha": alpha, "alpha_multiple": m, "selection_success": sel_rate,
            "candidates": [c for c, _ in candidates[colour]],
            "success": float(np.mean([w == colour for w in steered])),
            "unsteered": float(np.mean([w == colour for w in plain])),
            "answers": steered, "unsteered_answers": plain,
            "logprob_steered": float(lp_on.mean()), "logprob_unsteered": float(lp_off.mean()),
            "baseline": {"beta": beta, "success": hit_rate(held_out, colour, add(beta * diff_D))},
        }
    return {"question": question, "per_colour": per, "dead_frac": float((token_max_F <= 0).float().mean()),
            "mean_success": float(np.mean([v["success"] for v in per.values()])),
            "max_unsteered": max(v["unsteered"] for v in per.values()),
            "baseline_mean_success": float(np.mean([v["baseline"]["success"] for v in per.values()]))}
