"""Steering the toy LLaVA towards each colour (the classes of the toy taxonomy) with one SAE latent, under every
seed of the token SAE, against the truth, a specificity control and a difference-of-means baseline.

The paper's protocol (§6) with an error term (unsteered = the original model) and α set per latent from its
activation scale. Per token SAE (one per seed) and colour c:

1. candidates: the live latents whose image code (max over the image tokens) detects colour c on 1000 training
   images with AUROC ≥ `MIN_AUROC` (ground truth) and detects no other colour better, best first, at most
   `N_CANDIDATES`. A latent that does not detect the colour is never chosen, however well a clamp of it happens to
   work; a colour without one has no latent (success 0);
2. selection: each candidate is clamped on every image token at α = m × its largest token code, m in
   `ALPHA_MULTIPLES`, on the `N_SELECT` selection images (world seed 5) not of colour c; the (latent, α) whose
   answers most often name c is kept (ties: the smaller α, then the higher AUROC);
3. evaluation on the `N_EVAL` held-out images (world seed 7) not of colour c: success = the answer's first token
   is c; the chosen latent's AUROC for c on the held-out images; log p(c) with and without the clamp;
4. control: each other colour's chosen latent, clamped at its own α on the same held-out images: how often the
   answer names c (images of colour c left out). A latent that makes the LLaVA say "purple" whatever it is shows
   up here, not as a success.

Across seeds, each colour's success is reported as the median and the minimum, beside the per-seed values. The
baseline adds the difference of the mean image token of images of colour c and the rest to every token, at
β × the mean token norm, β chosen on the selection images; it does not depend on the SAE.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from sae_vlm.eval.planted import average_ranks
from sae_vlm.sae.model import SAE
from sae_vlm.toyworld import world as W
from sae_vlm.toyworld.findings import split_seed

if TYPE_CHECKING:
    from sae_vlm.backbones import Backbone

N_CANDIDATES = 5
MIN_AUROC = 0.9
ALPHA_MULTIPLES = (4, 8, 16, 32, 64)  # × the latent's largest code on one token of the training images
BETAS = (1, 2, 4)  # × the mean norm of an image token
N_CODES, N_SELECT, N_EVAL = 1000, 40, 64  # images: candidates' codes, selection, held-out evaluation
CHUNK = 256  # rows per forward pass


@dataclass
class Llava:
    """The toy LLaVA, its processor and vision backbone, and the colour words' token ids."""

    model: torch.nn.Module
    processor: Any
    bb: Backbone
    word_id: dict[str, int]
    question: str = W.QUESTIONS["colour"]


@dataclass
class Images:
    """A set of images with each one's colour index, and the LLaVA's inputs for the colour question on them."""

    colour_N: np.ndarray
    inputs: dict

    def others(self, colour: str) -> np.ndarray:
        """Indices of the images whose creature is not `colour`."""
        return np.flatnonzero(self.colour_N != W.COLOURS.index(colour))


def load(llava_dir: Path) -> Llava:
    from sae_vlm.backbones import Backbone
    from sae_vlm.steer.generate import load_llava

    model, processor = load_llava(str(llava_dir), device="cpu")
    tok = processor.tokenizer
    return Llava(model, processor, Backbone(model, processor=processor.image_processor),
                 {c: tok.convert_tokens_to_ids(c) for c in W.COLOURS})


def images(lv: Llava, n: int, seed: int) -> tuple[Images, list]:
    from sae_vlm.steer.generate import Case, batch_inputs

    samples = W.generate(n, seed=seed)
    pics = [s.image for s in samples]
    inputs = batch_inputs(lv.model, lv.processor, [Case(im, lv.question, None) for im in pics])
    return Images(np.array([W.COLOURS.index(s.main.colour) for s in samples]), inputs), pics


@torch.no_grad()
def read_tokens(bb, pics, batch: int = 100) -> torch.Tensor:
    """[N, T, D] image tokens (CLS dropped, as LLaVA's projector drops it) at the layer the projector reads."""
    point = bb.default_layer
    return torch.cat([bb.capture(bb.preprocess(pics[b0 : b0 + batch]), [point])[point][:, 1:].float()
                      for b0 in range(0, len(pics), batch)])


@torch.no_grad()
def first_token_logprobs(lv: Llava, ims: Images, rows_R: np.ndarray, patch) -> torch.Tensor:
    """[R, vocab] log-probabilities of the answer's first token on images `rows_R`; `patch(chunk)` gives the
    context manager for the rows of one chunk (a slice of range(R))."""
    out = []
    for r0 in range(0, len(rows_R), CHUNK):
        idx = torch.from_numpy(rows_R[r0 : r0 + CHUNK])
        with patch(slice(r0, r0 + len(idx))):
            logits = lv.model(**{k: v[idx] for k, v in ims.inputs.items()}).logits[:, -1].float()
        out.append(logits.log_softmax(-1))
    return torch.cat(out) if out else torch.empty(0, len(lv.word_id))


def clamped(lv: Llava, sae: SAE, ims: Images, rows_R: np.ndarray, edits_R: list[dict]) -> torch.Tensor:
    """First-token log-probabilities with row r's latents clamped as edits_R[r] says (error term kept)."""
    from sae_vlm.steer.intervene import intervene

    return first_token_logprobs(lv, ims, rows_R,
                                lambda s: intervene(lv.model, None, sae, edits_R[s], error_term=True))


def auroc(scores_NF: np.ndarray, positive_N: np.ndarray) -> np.ndarray:
    """Per column, the probability that a positive row scores above a negative one (ties count half)."""
    pos, neg = int(positive_N.sum()), int((~positive_N).sum())
    out = np.full(scores_NF.shape[1], np.nan)
    for f, s in enumerate(scores_NF.T):
        out[f] = (average_ranks(s)[positive_N].sum() - pos * (pos + 1) / 2) / (pos * neg)
    return out


def colour_aurocs(image_codes_NF: np.ndarray, colour_N: np.ndarray) -> np.ndarray:
    """[colours, F] AUROC of each live latent's image code for each colour; -1 for a latent that never fires."""
    live_F = image_codes_NF.max(0) > 0
    return np.stack([np.where(live_F, auroc(image_codes_NF, colour_N == ci), -1.0) for ci in range(len(W.COLOURS))])


def candidates(auc_CF: np.ndarray, colour: str) -> list[tuple[int, float]]:
    """[(latent, AUROC)] of the latents that detect `colour` at AUROC ≥ MIN_AUROC and better than any other colour
    (a latent for "blue or cyan" is a candidate for one of them only), best first."""
    ci = W.COLOURS.index(colour)
    auc_F = np.where(auc_CF.argmax(0) == ci, auc_CF[ci], -1.0)
    best = np.argsort(-auc_F, kind="stable")[:N_CANDIDATES]
    return [(int(j), float(auc_F[j])) for j in best if auc_F[j] >= MIN_AUROC]


def named(lp_RV: torch.Tensor, word_id: int) -> np.ndarray:
    return (lp_RV.argmax(-1) == word_id).numpy()


def select(lv: Llava, sae: SAE, sel: Images, colour: str, cands: list, token_max_F: torch.Tensor) -> dict | None:
    """The candidate and α that most often make the answer `colour` on selection images of other colours."""
    if not cands:
        return None
    rows = sel.others(colour)
    trials = [(j, auc, m) for j, auc in cands for m in ALPHA_MULTIPLES]
    edits = [{j: ("clamp", m * float(token_max_F[j]))} for j, _, m in trials for _ in rows]
    hits = named(clamped(lv, sae, sel, np.tile(rows, len(trials)), edits), lv.word_id[colour])
    rate = hits.reshape(len(trials), len(rows)).mean(1)
    i = max(range(len(trials)), key=lambda t: (rate[t], -trials[t][2], trials[t][1]))
    j, auc, m = trials[i]
    return {"latent": j, "auroc_train": auc, "alpha_multiple": m, "alpha": m * float(token_max_F[j]),
            "selection_success": float(rate[i]), "candidates": [c for c, _ in cands]}


def evaluate_choices(lv: Llava, sae: SAE, held: Images, chosen: dict, unsteered_RV: torch.Tensor,
                     heldout_codes_NF: np.ndarray) -> dict:
    """Per colour: success, the control (other colours' latents naming it), AUROC and log p on held-out images."""
    n = len(held.colour_N)
    rows = np.arange(n)
    steered = {c: clamped(lv, sae, held, rows, [{ch["latent"]: ("clamp", ch["alpha"])}] * n)
               for c, ch in chosen.items() if ch is not None}
    vocab = lv.processor.tokenizer.convert_ids_to_tokens
    out = {}
    for colour, ch in chosen.items():
        others, wid = held.others(colour), lv.word_id[colour]
        control = [float(named(lp[others], wid).mean()) for c, lp in steered.items() if c != colour]
        entry = {"success": 0.0, "control": float(np.mean(control)) if control else 0.0,
                 "control_max": max(control, default=0.0), "logprob_unsteered": float(unsteered_RV[others, wid].mean())}
        if ch is not None:
            lp = steered[colour][others]
            truth_N = held.colour_N == W.COLOURS.index(colour)
            entry |= ch | {"success": float(named(lp, wid).mean()), "logprob_steered": float(lp[:, wid].mean()),
                           "auroc_heldout": float(auroc(heldout_codes_NF[:, [ch["latent"]]], truth_N)[0]),
                           "answers": vocab(lp.argmax(-1).tolist())}
        out[colour] = entry
    return out


@dataclass
class Shared:
    """What every seed's steering reads: the LLaVA, the images and the unsteered answers."""

    lv: Llava
    train_colour_N: np.ndarray
    x_NTD: torch.Tensor
    sel: Images
    held: Images
    held_x_NTD: torch.Tensor
    unsteered_RV: torch.Tensor


def prepare(llava_dir: Path) -> Shared:
    lv = load(llava_dir)
    train = W.generate(N_CODES, seed=0)
    x_NTD = read_tokens(lv.bb, [s.image for s in train])
    sel, _ = images(lv, N_SELECT, seed=5)
    held, held_pics = images(lv, N_EVAL, seed=7)
    unsteered = first_token_logprobs(lv, held, np.arange(N_EVAL), lambda s: nullcontext())
    return Shared(lv, np.array([W.COLOURS.index(s.main.colour) for s in train]), x_NTD, sel, held,
                  read_tokens(lv.bb, held_pics), unsteered)


@torch.no_grad()
def image_codes(sae: SAE, x_NTD: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """([N, F] each latent's largest code over an image's tokens, [F] its largest code on any token)."""
    codes_NTF = torch.stack([sae.encode(x_TD) for x_TD in x_NTD])
    return codes_NTF.amax(1).numpy(), codes_NTF.amax((0, 1))


def steer_one_sae(sh: Shared, sae: SAE) -> dict:
    image_NF, token_max_F = image_codes(sae, sh.x_NTD)
    auc_CF = colour_aurocs(image_NF, sh.train_colour_N)
    chosen = {c: select(sh.lv, sae, sh.sel, c, candidates(auc_CF, c), token_max_F) for c in W.COLOURS}
    per = evaluate_choices(sh.lv, sae, sh.held, chosen, sh.unsteered_RV, image_codes(sae, sh.held_x_NTD)[0])
    return {"per_colour": per, "dead_frac": float((token_max_F <= 0).float().mean())}


def baseline(sh: Shared) -> dict:
    """Difference of means per colour: β chosen on the selection images, success on the held-out images."""
    lv, bb = sh.lv, sh.lv.bb
    token_norm, mean_ND = float(sh.x_NTD.norm(dim=-1).mean()), sh.x_NTD.mean(1)

    def added(ims: Images, rows: np.ndarray, d_D: torch.Tensor) -> torch.Tensor:
        layer = cast(str, bb.default_layer)
        return first_token_logprobs(lv, ims, rows, lambda s: bb.patch(layer, lambda t: t + d_D.to(t.dtype)))

    out = {}
    for ci, colour in enumerate(W.COLOURS):
        in_N = torch.from_numpy(sh.train_colour_N == ci)
        d_D = mean_ND[in_N].mean(0) - mean_ND[~in_N].mean(0)
        d_D = d_D / d_D.norm() * token_norm
        wid = lv.word_id[colour]
        beta = max(BETAS, key=lambda b: (named(added(sh.sel, sh.sel.others(colour), b * d_D), wid).mean(), -b))
        rows = sh.held.others(colour)
        out[colour] = {"beta": beta, "success": float(named(added(sh.held, rows, beta * d_D), wid).mean())}
    return out


def sae_seed(sae_dir: Path, sae: SAE) -> int:
    seed = split_seed(sae_dir.name)[1]
    return seed if seed is not None else int(sae.meta.get("training", {}).get("seed", 0))


def steer_colours(run: Path, llava_dir: Path) -> dict:
    """Every seed's chosen latents, success, control and log-probabilities per colour, their median and minimum
    over seeds, the unsteered rates and the difference-of-means baseline."""
    from sae_vlm.eval.stability import STABLE_COS, stable_per_latent, stable_share

    sh = prepare(llava_dir)
    dirs = sorted(p.parent for p in run.glob("saes/*/config.json"))
    saes = [SAE.from_pretrained(d).eval() for d in dirs]
    stable = stable_per_latent([s.W_dec.detach().numpy() for s in saes]) if len(saes) > 1 else [None] * len(saes)
    by_seed = {}
    for d, sae, stable_F in zip(dirs, saes, stable):
        r = by_seed[sae_seed(d, sae)] = {"sae": d.name, **steer_one_sae(sh, sae)}
        if stable_F is not None:  # how stable across seeds each chosen latent is, and the whole dictionary
            r["stable_share"] = stable_share(stable_F, STABLE_COS)
            for v in r["per_colour"].values():
                if "latent" in v:
                    v["stable"] = float(stable_F[v["latent"]])
    base = baseline(sh)
    unsteered = {c: float(named(sh.unsteered_RV[sh.held.others(c)], sh.lv.word_id[c]).mean()) for c in W.COLOURS}
    per = {}
    for c in W.COLOURS:
        success = {s: r["per_colour"][c]["success"] for s, r in by_seed.items()}
        control = [r["per_colour"][c]["control"] for r in by_seed.values()]
        per[c] = {"success_median": float(np.median(list(success.values()))), "success_min": min(success.values()),
                  "success_by_seed": success, "control_median": float(np.median(control)),
                  "control_max": max(control), "unsteered": unsteered[c], "baseline": base[c]}
    return {"question": sh.lv.question, "seeds": sorted(by_seed), "by_seed": by_seed, "per_colour": per,
            "max_unsteered": max(unsteered.values()),
            "max_control": max(v["control_max"] for v in per.values()),
            "median_success": float(np.median([v["success_median"] for v in per.values()])),
            "baseline_mean_success": float(np.mean([v["success"] for v in base.values()])),
            "dead_frac": {s: r["dead_frac"] for s, r in by_seed.items()},
            **({"stable_share": {s: r["stable_share"] for s, r in by_seed.items()}} if len(saes) > 1 else {})}
