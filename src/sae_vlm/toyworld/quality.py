"""How good are the shipped toy models? Zero-shot attribute accuracy of the tiny CLIP, answer accuracy of the toy LLaVA.

    sae-vlm toy-quality --out toyworld_quality.md      # settings: config.ToyQualityConfig

Evaluation images come from world seed 1 (training uses seed 0), so they are fresh draws of the world.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path

import numpy as np
import torch

from sae_vlm.config import ToyQualityConfig
from sae_vlm.io import atomic_write_text
from sae_vlm.toyworld import world as W

EVAL_SEED = 1


def _an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# attribute -> (values, prompt per value); prompts are the partial descriptions the CLIP trained on
# The taxonomy levels (kingdom .. species: one prompt per node of the level) and the nuisances.
_NODE_TEXT = {
    "kingdom": lambda p: f"{_an(p[0])} {p[0]} object",
    "shape": lambda p: f"a {p[1]}",
    "colour": lambda p: f"{_an(p[2])} {p[2]} object",
    "shade": lambda p: f"a {p[3]} {p[2]} object",
    "pattern": lambda p: f"a {p[4]} {p[3]} {p[2]} object",
}
ZERO_SHOT = {
    **{lvl: (tuple(dict.fromkeys(sp[: d + 1] for sp in W.SPECIES)), _NODE_TEXT[lvl])
       for d, lvl in enumerate(W.TAXONOMY_LEVELS)},
    "size": (W.SIZES, lambda v: f"a {v} object"),
    "position": (W.POSITIONS, lambda v: f"an object in the {W.POSITION_WORDS[v]}"),
    "background": (W.BACKGROUNDS, lambda v: f"an object on a {v} background"),
}


def truth_of(s: W.Sample, attr: str):
    """The sample's value for a ZERO_SHOT key: its taxonomy node at that level, or a nuisance."""
    if attr in W.TAXONOMY_LEVELS:
        return W.taxonomy_path(s.main)[: W.TAXONOMY_LEVELS.index(attr) + 1]
    return s.background if attr == "background" else s.main.as_dict()[attr]


@torch.no_grad()
def _clip_logits(model, processor, images, texts) -> torch.Tensor:
    enc = processor(text=list(texts), images=list(images), return_tensors="pt", padding=True)
    return model(**enc).logits_per_image  # [images, texts]


@torch.no_grad()
def clip_zero_shot(path: str | Path | None = None, n: int = 500, seed: int = EVAL_SEED) -> dict:
    """{attribute: accuracy} on n images (prompt per value, argmax), plus caption retrieval top-1
    among them (image->caption and caption->image)."""
    from transformers import AutoProcessor, CLIPModel

    from sae_vlm import toyworld

    path = path or toyworld.clip_path()
    model = CLIPModel.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    samples = W.generate(n, seed)
    images = [s.image for s in samples]
    res: dict = {"n_images": n}
    for attr, (values, prompt) in ZERO_SHOT.items():
        logits = _clip_logits(model, proc, images, [prompt(v) for v in values])
        truth = torch.tensor([values.index(truth_of(s, attr)) for s in samples])
        res[attr] = (logits.argmax(1) == truth).float().mean().item()
        res[f"{attr}_chance"] = 1 / len(values)
    logits = _clip_logits(model, proc, images, [s.caption for s in samples])
    diag = torch.arange(n)
    res["retrieval_image_to_caption"] = (logits.argmax(1) == diag).float().mean().item()
    res["retrieval_caption_to_image"] = (logits.argmax(0) == diag).float().mean().item()
    return res


@torch.no_grad()
def llava_answer(model, processor, images, question: str, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers of a LLaVA to one question about each image."""
    prompt = W.PROMPT_TEMPLATE.format(question=question)
    enc = processor(images=list(images), text=[prompt] * len(images), return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]


def _positions(caption: str) -> list[str]:
    return [ph.split(" in the ")[-1].split(" on a ")[0] for ph in caption.split(" and ")]


@torch.no_grad()
def llava_accuracy(path: str | Path | None = None, n: int = 200, seed: int = EVAL_SEED, batch: int = 50) -> dict:
    """{question kind: accuracy} on n images; captions also give word accuracy (position-wise)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from sae_vlm import toyworld

    path = path or toyworld.llava_path()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(path)
    samples = W.generate(n, seed)
    res: dict = {"n_images": n}
    for kind, question in W.QUESTIONS.items():
        got = []
        for b in range(0, n, batch):
            chunk = samples[b : b + batch]
            got += llava_answer(model, proc, [s.image for s in chunk], question, 48 if kind == "caption" else 4)
        truth = [s.answer(kind) for s in samples]
        res[kind] = float(np.mean([g == t for g, t in zip(got, truth)]))
        if kind == "caption":
            words = [
                np.mean([a == b for a, b in zip(g.split(), t.split())] + [0] * abs(len(g.split()) - len(t.split())))
                for g, t in zip(got, truth)
            ]
            res["caption_word_accuracy"] = float(np.mean(words))
            res["caption_positions"] = float(np.mean([_positions(g) == _positions(t) for g, t in zip(got, truth)]))
            res["caption_examples"] = [{"truth": t, "answer": g} for g, t in list(zip(got, truth))[:3]]
    res["chance"] = {"one_word": 1 / len(W.SHAPES), "colour": 1 / len(W.COLOURS), "shade": 1 / len(W.SHADES),
                     "shape": 1 / len(W.SHAPES), "pattern": 1 / len(W.PATTERNS), "size": 1 / len(W.SIZES)}
    return res


def _training_lines(clip_dir, llava_dir) -> list[str]:
    lines = ["## The models", "",
             "| model | parameters | size on disk | trained by | CPU time (1 thread) |", "|---|---|---|---|---|"]
    for name, d in (("tiny CLIP", clip_dir), ("toy LLaVA", llava_dir)):
        from safetensors import safe_open

        with safe_open(str(Path(d) / "model.safetensors"), "pt") as f:
            n = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())
        info = json.loads((Path(d) / "training.json").read_text())
        command = "toy-train-clip" if name == "tiny CLIP" else "toy-train-llava"
        size_mb = (Path(d) / "model.safetensors").stat().st_size / 2**20
        cfg = info["config"]
        lines.append(f"| {name} | {n / 1e3:.0f}k | {size_mb:.1f} MB | "
                     f"`sae-vlm {command}` ({cfg['steps']} steps, batch {cfg['batch_size']}) "
                     f"| {info['cpu_seconds'] / 60:.1f} min |")
    return lines + [""]


def report(clip: dict, llava: dict, command: str, clip_dir=None, llava_dir=None) -> str:
    from sae_vlm import toyworld

    lines = ["# Toy world: quality of the shipped models", "",
             f"Fresh images from world seed {EVAL_SEED} (training used seed 0). Reproduce with:", "",
             f"    {command}", "",
             *_training_lines(clip_dir or toyworld.clip_path(), llava_dir or toyworld.llava_path()),
             f"## Tiny CLIP: zero-shot accuracy on {clip['n_images']} images", "",
             "| attribute | prompt (example) | accuracy | chance |", "|---|---|---|---|"]
    for attr, (values, prompt) in ZERO_SHOT.items():
        lines.append(f"| {attr} ({len(values)}) | \"{prompt(values[0])}\" | {clip[attr]:.3f} | "
                     f"{clip[attr + '_chance']:.3f} |")
    lines += ["", f"Full-caption retrieval among {clip['n_images']} images (top-1): "
              f"image→caption {clip['retrieval_image_to_caption']:.3f}, "
              f"caption→image {clip['retrieval_caption_to_image']:.3f} "
              f"(chance {1 / clip['n_images']:.3f}).", "",
              "Position is not in the CLIP's pooled embedding (zero-shot at chance) although every caption names it; "
              "its patch tokens do carry it: the LLaVA, which reads them, names all positions right in "
              f"{llava['caption_positions']:.0%} of its captions.", "",
              f"## Toy LLaVA: greedy answers on {llava['n_images']} images", "",
              "| question | accuracy | chance |", "|---|---|---|"]
    for kind, q in W.QUESTIONS.items():
        ch = llava["chance"].get(kind)
        lines.append(f"| {q} | {llava[kind]:.3f} | {'-' if ch is None else f'{ch:.3f}'} |")
    lines += ["", f"Caption exact match {llava['caption']:.3f}; "
              f"word accuracy {llava['caption_word_accuracy']:.3f}. Examples:", ""]
    lines += [f"- truth: `{e['truth']}`  \n  answer: `{e['answer']}`" for e in llava["caption_examples"]]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Quality:
    """What `sae-vlm toy-quality` measured: the CLIP's scores, the LLaVA's (None with --skip-llava) and the report
    written (None with --skip-llava)."""

    clip: dict
    llava: dict | None
    report: Path | None


def command_line(cfg: ToyQualityConfig) -> str:
    """The command that reproduces `cfg`: the flags whose values differ from the defaults."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != f.default:
            flag = "--" + f.name.replace("_", "-")
            flags.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
    return " ".join(["sae-vlm toy-quality", *flags])


def assess(cfg: ToyQualityConfig) -> Quality:
    """Score the CLIP (and unless --skip-llava the LLaVA) and write the report to `cfg.out`."""
    for flag, path in (("--clip", cfg.clip), ("--llava", cfg.llava)):
        if path is not None and not (Path(path) / "config.json").is_file():  # before minutes of scoring
            raise FileNotFoundError(f"{flag} {path}: no model there (no config.json)")
    torch.set_num_threads(1)
    clip = clip_zero_shot(cfg.clip, cfg.n_clip)
    if cfg.skip_llava:
        return Quality(clip, None, None)
    llava = llava_accuracy(cfg.llava, cfg.n_llava)
    atomic_write_text(cfg.out, report(clip, llava, command_line(cfg), cfg.clip, cfg.llava))
    return Quality(clip, llava, Path(cfg.out))
