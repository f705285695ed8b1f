"""Steered LLaVA generation for many (edits, image, prompt) cases per call: left-padded batches, greedy.

Each case carries its own edits; LLaVA's vision tower sees one row per image, so the per-item list form of
`intervene` maps case i of a batch to image row i (every case has exactly one image).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from typing import cast

import torch
from PIL import Image
from tqdm.auto import tqdm

from sae_vlm.backbones import load_processor, quiet_loading
from sae_vlm.config import SteerConfig
from sae_vlm.data.images import open_image
from sae_vlm.device import resolve_device, resolve_dtype
from sae_vlm.io import atomic_write_json
from sae_vlm.outdir import check_result_file
from sae_vlm.steer.intervene import intervene


@dataclasses.dataclass(frozen=True)
class Case:
    image: Image.Image
    prompt: str
    edits: dict | None  # None: the model unpatched (the unsteered run)


def load_llava(model_id_or_dir: str, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = "auto"):
    """(LlavaForConditionalGeneration in eval mode, its AutoProcessor)."""
    from transformers import LlavaForConditionalGeneration

    torch_dtype = resolve_dtype(dtype, device, "--dtype")  # before the weights load
    with quiet_loading():
        model = LlavaForConditionalGeneration.from_pretrained(model_id_or_dir, dtype=torch_dtype)
    cast(torch.nn.Module, model).to(device).eval()
    return model, load_processor(model_id_or_dir)


def build_prompt(processor, prompt: str) -> str:
    """The processor's chat template when it has one, else LLaVA-1.5's 'USER: <image>\\n... ASSISTANT:'."""
    if getattr(processor, "chat_template", None):
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(conv, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"USER: {image_token}\n{prompt} ASSISTANT:"


@contextlib.contextmanager
def _left_padding(tokenizer):
    old = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = old


def batch_inputs(model, processor, cases: Sequence[Case]) -> dict:
    """The cases' prompts and images as one left-padded batch on the model's device and dtype."""
    with _left_padding(processor.tokenizer):
        inputs = processor(images=[c.image for c in cases], text=[build_prompt(processor, c.prompt) for c in cases],
                           return_tensors="pt", padding=True)
    dev = next(model.parameters()).device
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return inputs


@torch.no_grad()
def generate_batch(model, processor, sae, cases: Sequence[Case], *, hook_point=None, error_term: bool = True,
                   max_new_tokens: int = 60, positions: Sequence[int] | None = None,
                   details: list | None = None) -> list[str]:
    """One left-padded greedy `generate` call for all cases; returns the new text of each (special tokens dropped).
    `details` gets one dict per case: its new token ids (up to the first end-of-sequence) and the call's seconds."""
    tok = processor.tokenizer
    t0 = time.perf_counter()
    inputs = batch_inputs(model, processor, cases)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, num_beams=1)
    edits = [c.edits for c in cases]
    if all(e is None for e in edits):
        out = model.generate(**inputs, **gen)
    else:
        with intervene(model, hook_point, sae, edits, error_term=error_term, positions=positions):
            out = model.generate(**inputs, **gen)
    new = out[:, inputs["input_ids"].shape[1] :]
    texts = [s.strip() for s in processor.batch_decode(new, skip_special_tokens=True)]
    if details is not None:
        seconds, eos = time.perf_counter() - t0, tok.eos_token_id
        for ids in new.tolist():
            details.append({"token_ids": ids[: ids.index(eos) + 1] if eos in ids else ids, "batch_seconds": seconds})
    return texts


def generate_cases(model, processor, sae, cases: Sequence[Case], *, hook_point=None, error_term: bool = True,
                   max_new_tokens: int = 60, batch_size: int = 16, quiet: bool = True,
                   positions: Sequence[int] | None = None, details: list | None = None) -> list[str]:
    """Text for every case, `batch_size` cases per `generate` call, in the order given (`details`: see
    generate_batch)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected >= 1")
    out: list[str] = []
    for b0 in tqdm(range(0, len(cases), batch_size), desc="generate", disable=quiet, leave=False):
        out += generate_batch(model, processor, sae, cases[b0 : b0 + batch_size], hook_point=hook_point,
                              error_term=error_term, max_new_tokens=max_new_tokens, positions=positions,
                              details=details)
    return out


def grid_cases(latents: Sequence[int], alphas: Sequence[float], images: Sequence, prompts: Sequence[str],
               op: str = "clamp", names: Sequence[str] | None = None) -> tuple[list[Case], list[dict]]:
    """Every (latent, α, image, prompt) combination -> (cases, one metadata row per case). `names`: what the rows
    call the images (default: their paths, image[i] for PIL images)."""
    cases, rows = [], []
    names = names or [f"image[{i}]" if isinstance(spec, Image.Image) else str(spec) for i, spec in enumerate(images)]
    opened = [(name, open_image(spec)) for name, spec in zip(names, images)]
    for j in latents:
        for a in alphas:
            for name, img in opened:
                for p in prompts:
                    cases.append(Case(img, p, {int(j): (op, float(a))}))
                    rows.append({"latent": int(j), "alpha": float(a), "op": op, "image": name, "prompt": p})
    return cases, rows


def load_steering(llava: str, sae_dir: str, step: str | None = None, device: str = "auto", dtype: str = "auto"):
    """(LLaVA model, its processor, the SAE at `step` or its run's default snapshot, the device)."""
    from sae_vlm.sae.model import SAE
    from sae_vlm.sae.runs import resolve_sae_dir

    sae_path = resolve_sae_dir(sae_dir, step)
    dev = resolve_device(device)
    model, processor = load_llava(llava, device=dev, dtype=dtype)
    return model, processor, SAE.from_pretrained(sae_path, device=dev), dev


def run_steer(cfg: SteerConfig) -> list[dict]:
    """Every latent × α × image × prompt (and, with `cfg.unsteered`, every image × prompt unpatched), generated in
    batches; writes `cfg.out` (JSON) and returns one row per case with its output."""
    check_result_file(cfg.out, ("llava", "results"), "sae-vlm steer")
    images = [open_image(spec) for spec in cfg.image]  # before the model loads: a missing image fails fast
    model, processor, sae, _ = load_steering(cfg.llava, cfg.sae, cfg.step, cfg.device, cfg.dtype)
    if not all(0 <= j < sae.cfg.d_sae for j in cfg.latents):
        raise ValueError(f"--latents {','.join(map(str, cfg.latents))}: ids must be in 0..{sae.cfg.d_sae - 1}")
    cases, rows = grid_cases(cfg.latents, cfg.alpha, images, cfg.prompt, op=cfg.op, names=cfg.image)
    if cfg.unsteered:
        base = [(img, p) for img in cfg.image for p in cfg.prompt]
        cases = [Case(image, p, None) for image in images for p in cfg.prompt] + cases
        rows = [{"latent": None, "alpha": None, "op": "none", "image": img, "prompt": p} for img, p in base] + rows
    details: list[dict] = []
    texts = generate_cases(model, processor, sae, cases, hook_point=cfg.hook_point, error_term=not cfg.replace,
                           max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, quiet=cfg.quiet,
                           details=details)
    eos = processor.tokenizer.eos_token_id
    for r, t, d in zip(rows, texts, details):
        # an answer that ends at once would be a blank cell: say so
        r["output"] = t if t or d["token_ids"][:1] != [eos] else "<eos>"
        r |= d
    atomic_write_json(cfg.out, {"llava": cfg.llava, "sae": cfg.sae, "mode": "replace" if cfg.replace else "error_term",
                                "max_new_tokens": cfg.max_new_tokens, "results": rows}, indent=2)
    return rows
