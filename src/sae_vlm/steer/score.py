"""The steering score (paper §6): does clamping latent j make LLaVA name j's concept?

concept_j = mean embedder image embedding of j's top-16 images (codes mean-pooled over tokens);
ask "What is shown in this image? Use exactly one word!" (≤ 5 new tokens) with j clamped to α, keep the first
word, embed it with the CLIP text tower; score = cos(concept_j, word). Reported beside: the unsteered run
(same images, model unpatched) and, when class names are given, the upper bound cos(image, its class name)
and the lower bound cos(image, a shuffled class name). protocol.py runs it end to end.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.backbones import Backbone
from sae_vlm.config import LatentSpec
from sae_vlm.eval.embed import ClipEmbedder
from sae_vlm.sae.groups import level_slices
from sae_vlm.steer.generate import Case, generate_cases
from sae_vlm.steer.intervene import steering_point
from sae_vlm.topk import running_top

PROMPT = "What is shown in this image? Use exactly one word!"
MAX_NEW_TOKENS = 5


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def first_word(text: str) -> str:
    """The first whitespace-separated word, surrounding punctuation stripped ('Pencil.' -> 'Pencil')."""
    parts = text.split()
    return parts[0].strip(string.punctuation) if parts else ""


def paper_first_word(text: str) -> str:
    """The answer up to its first space, punctuation kept ('Pencil.'), as steering_score.py takes it."""
    return text.split(" ")[0]


WORD_RULES = {"paper": paper_first_word, "stripped": first_word}


def mean_std(x) -> dict:
    """Mean and unbiased std (as the paper's torch `.std()`), NaN where undefined."""
    a = np.asarray(x, dtype=np.float64)
    return {"mean": float(a.mean()) if a.size else float("nan"),
            "std": float(a.std(ddof=1)) if a.size > 1 else float("nan"), "n": int(a.size)}


# ---- top images from a folder (mean-pooled token codes at the steering layer) --------------------------------
@torch.no_grad()
def top_images(model, sae, images: Sequence, *, hook_point=None, top: int = 16, batch_size: int = 32,
               processor=None, quiet: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(values [F, top], indices [F, top]) over `images` (PIL), codes of all tokens mean-pooled per image.

    Runs only the vision tower (LLaVA: up to the hook layer). Latents active on fewer images pad with 0 / -1.
    """
    bb = Backbone(model, processor=getattr(processor, "image_processor", processor))
    hook_point = steering_point(bb, hook_point, sae)
    bb.check_sae(hook_point, sae)
    dev = bb.device()
    sae.to(device=dev, dtype=torch.float32)

    def pooled_chunks():
        for b0 in tqdm(range(0, len(images), batch_size), desc="top images", disable=quiet, leave=False):
            imgs = list(images[b0 : b0 + batch_size])
            x_BTD = bb.capture(bb.preprocess(imgs), [hook_point])[hook_point].float()
            x_BTD = x_BTD[:, None] if x_BTD.ndim == 2 else x_BTD
            pooled_BF = torch.stack([sae.encode(x_TD).mean(0) for x_TD in x_BTD])  # per image: [T, F] at most
            yield torch.arange(b0, b0 + x_BTD.shape[0], device=dev), pooled_BF

    # running values start at 0, so only positive pooled codes enter the top
    vals, idx = running_top(pooled_chunks(), top, fill=0.0, width=sae.cfg.d_sae, device=dev)
    idx = torch.where(vals > 0, idx, torch.full_like(idx, -1))  # an inactive slot is no top image
    return vals.cpu().numpy(), idx.cpu().numpy()


def alive_latents(top_indices_FT: np.ndarray, top_values_FT: np.ndarray | None = None) -> np.ndarray:
    """Boolean [F]: the latent has at least one top image with a positive pooled code."""
    alive = np.asarray((np.asarray(top_indices_FT) >= 0).any(1))
    if top_values_FT is not None:
        alive &= (np.asarray(top_values_FT) > 0).any(1)
    return alive


def select_latents(spec: LatentSpec | str, alive_F: np.ndarray, group_sizes=None, seed: int = 0,
                   paper_count: int = 10) -> list[int]:
    """Sorted latent ids. 'paper': latents 0..paper_count−1 and 'first:N': 0..N−1, dead ones included, as
    steering_score.py's --neuron_prefix; '39,120' | '0-999' | 'random:N' | 'level:L[:N]' | 'all': live ones only."""
    spec = LatentSpec.parse(spec) if isinstance(spec, str) else spec
    F = len(alive_F)
    rng = np.random.default_rng(seed)
    if spec.kind in ("paper", "first"):
        return list(range(min(paper_count if spec.kind == "paper" else cast(int, spec.count), F)))
    if spec.kind == "all":
        ids = list(range(F))
    elif spec.kind == "random":
        pool = np.flatnonzero(alive_F)
        ids = sorted(rng.choice(pool, size=min(cast(int, spec.count), len(pool)), replace=False).tolist())
    elif spec.kind == "level":
        ids = level_latents(spec, alive_F, group_sizes, rng)
    else:
        bad = [f"{max(lo, F)}" + (f"-{hi}" if hi > max(lo, F) else "") for lo, hi in spec.spans if hi >= F]
        if bad:  # checked on the ranges: '0-10**12' is refused without listing its ids
            raise ValueError(f"--latents {spec.text!r}: latent ids {', '.join(bad)} are out of range; the SAE has "
                             f"latents 0..{F - 1}")
        ids = [j for lo, hi in spec.spans for j in range(lo, hi + 1)]
    return sorted({j for j in ids if alive_F[j]})


def level_latents(spec: LatentSpec, alive_F: np.ndarray, group_sizes, rng: np.random.Generator) -> list[int]:
    """The live latents of Matryoshka level L, or N of them drawn at random (level:L:N)."""
    if not group_sizes:
        raise ValueError(f"--latents {spec.text!r}: the SAE has no Matryoshka levels (group_sizes is None)")
    level = cast(int, spec.level)
    if level >= len(group_sizes):
        raise ValueError(f"--latents {spec.text!r}: level must be 0..{len(group_sizes) - 1}")
    F = len(alive_F)
    ids = [j for j in range(F)[level_slices(group_sizes, F)[level]] if alive_F[j]]
    if spec.count is not None and ids:
        ids = sorted(rng.choice(ids, size=min(spec.count, len(ids)), replace=False).tolist())
    return ids


def paper_top_indices(top_indices_FT: np.ndarray, n_images: int) -> np.ndarray:
    """Top-image tables as find_hai_indices.py's `argsort(codes)[-16:]` would fill them: a latent positive on fewer
    images than slots also takes zero-activation images, those a stable ascending sort puts last (the highest
    indices). So every latent, a dead one too, has a full set and a concept embedding."""
    idx = np.array(top_indices_FT, dtype=np.int64, copy=True)
    t = idx.shape[1]
    for row in idx:
        missing = int((row < 0).sum())
        if missing:
            taken = set(row[row >= 0].tolist())
            fill = [i for i in range(n_images - 1, -1, -1) if i not in taken][:missing]
            row[t - missing : t - missing + len(fill)] = fill
    return idx


def concept_embeddings(top_indices_JT: np.ndarray, image_embeds_ND: np.ndarray) -> np.ndarray:
    """Mean embedding of each latent's top images ([J, D]); -1 slots are skipped."""
    idx = np.asarray(top_indices_JT)
    out = np.zeros((idx.shape[0], image_embeds_ND.shape[1]), np.float32)
    for k, row in enumerate(idx):
        row = row[row >= 0]
        if row.size == 0:
            raise ValueError(f"row {k} of the top-image table has no images; dead latents must be excluded first")
        out[k] = image_embeds_ND[row].mean(0)
    return out


def similarity_bounds(embedder: ClipEmbedder, images: Sequence, class_names: Sequence[str], seed: int = 0,
                      image_embeds: np.ndarray | None = None) -> dict:
    """Upper: cos(image, its class name); lower: cos(image, the class name of a shuffled other image)."""
    if len(images) != len(class_names):
        raise ValueError(f"{len(class_names)} class names given for {len(images)} images; expected one per image")
    img = _unit(embedder.images(images) if image_embeds is None else image_embeds)
    names = [str(c) for c in class_names]  # embedded as given (see classes.py)
    uniq = sorted(set(names))
    txt = dict(zip(uniq, _unit(embedder.texts(uniq))))
    perm = np.random.default_rng(seed).permutation(len(names))
    wrong = [names[p] for p in perm]
    upper = [float(img[i] @ txt[names[i]]) for i in range(len(names))]
    lower = [float(img[i] @ txt[wrong[i]]) for i in range(len(names))]
    return {"upper": mean_std(upper), "lower": mean_std(lower)}


def steering_score(model, processor, sae, embedder: ClipEmbedder, *, latents: Sequence[int],
                   concept_JD: np.ndarray, images: Sequence, image_names: Sequence[str] | None = None,
                   alpha: float = 100.0, op: str = "clamp", error_term: bool = False, hook_point=None,
                   prompt: str = PROMPT, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 16,
                   class_names: Sequence[str] | None = None, seed: int = 0, word: str = "paper",
                   quiet: bool = True) -> dict:
    """Steered and unsteered scores over all (latent, image) pairs; bounds when class names are given.

    error_term=False is the paper's setting (the residual replaced by the edited reconstruction). `word`: how the
    answer's first word is taken (WORD_RULES: "paper" keeps punctuation, "stripped" drops it).
    """
    take_word = WORD_RULES[word]
    latents = [int(j) for j in latents]
    if len(concept_JD) != len(latents):
        raise ValueError(f"{len(concept_JD)} concept embeddings for {len(latents)} latents; expected one per latent")
    names = list(image_names) if image_names is not None else [f"image[{i}]" for i in range(len(images))]
    cases = [Case(img, prompt, None) for img in images]  # unsteered: model not patched at all
    cases += [Case(img, prompt, {j: (op, float(alpha))}) for j in latents for img in images]
    texts = generate_cases(model, processor, sae, cases, hook_point=hook_point, error_term=error_term,
                           max_new_tokens=max_new_tokens, batch_size=batch_size, quiet=quiet)
    words = [take_word(t) for t in texts]
    uniq = sorted(set(words))
    word_emb = dict(zip(uniq, _unit(embedder.texts(uniq))))
    concept = _unit(np.asarray(concept_JD, np.float32))
    n_img = len(images)
    base_words = words[:n_img]
    pairs, steered, unsteered = [], [], []
    for k, j in enumerate(latents):
        for i in range(n_img):
            w = words[n_img + k * n_img + i]
            s = float(concept[k] @ word_emb[w])
            u = float(concept[k] @ word_emb[base_words[i]])
            steered.append(s)
            unsteered.append(u)
            pairs.append({"latent": j, "image": names[i], "text": texts[n_img + k * n_img + i], "word": w,
                          "score": s, "unsteered_word": base_words[i], "unsteered_score": u})
    result = {
        "settings": {"alpha": float(alpha), "op": op, "error_term": error_term, "prompt": prompt,
                     "max_new_tokens": max_new_tokens, "latents": latents, "images": names, "word": word},
        "steered": mean_std(steered),
        "unsteered": mean_std(unsteered),
        "bounds": None,
        "pairs": pairs,
        "unsteered_texts": [{"image": names[i], "text": texts[i], "word": base_words[i]} for i in range(n_img)],
    }
    if class_names is not None:
        result["bounds"] = similarity_bounds(embedder, images, class_names, seed=seed)
    return result
