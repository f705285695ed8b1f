"""Train the toy world's tiny CLIP (a HF `CLIPModel`) contrastively on generated image-text pairs.

    sae-vlm toy-train-clip             # settings: config.ClipTrainConfig; writes the shipped weights

Texts are the full caption of the image half of the time, otherwise a partial description of one of its objects
("a warm striped object", "a triangle in the top left", "an object on a gray background") so that zero-shot
prompts are in distribution. Because the world's labels are known, the contrastive targets are *all* texts in the
batch that are true of an image (soft multi-positive InfoNCE), not only the diagonal: "a red object" is not a
negative for every other red image. Half of the images also bring a hard negative: their text with one attribute
of one object changed ("a red circle" -> "a red square"), which pushes the model past colour and size.
Deterministic for a given seed and thread count (CPU).

Model (395k parameters, 1.6 MB): vision ViT 48 px, patch 12 (16 patches + CLS), hidden 64, 4 layers, 4 heads,
MLP 256; text hidden 64, 3 layers, 48 positions, 69-token word-level vocabulary; projection 64. Default run: 20k images,
2000 steps of batch 128, about 8 CPU minutes on one thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sae_vlm.config import ClipTrainConfig
from sae_vlm.toyworld import WEIGHTS
from sae_vlm.toyworld import text as T
from sae_vlm.toyworld import world as W


@dataclass(frozen=True)
class Trained:
    """What a toy trainer did: where the model went, its last logged loss, the CPU time."""

    out: Path
    final_loss: float
    cpu_seconds: float


def recorded(cfg) -> dict:
    """The settings training.json records: the model's, not where it was saved or whether bars showed."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "clip", "quiet")}


def build_clip(cfg: ClipTrainConfig, vocab_size: int):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    vc = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden, intermediate_size=cfg.vision_hidden * cfg.mlp_ratio,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.heads, image_size=W.IMAGE_SIZE,
        patch_size=cfg.patch, projection_dim=cfg.projection_dim,
    )
    tc = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_hidden * cfg.mlp_ratio,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, max_position_embeddings=T.CLIP_MAX_LEN,
        pad_token_id=T.PAD, bos_token_id=T.BOS, eos_token_id=T.EOS, projection_dim=cfg.projection_dim,
    )
    config = CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=cfg.projection_dim)
    return CLIPModel(config)


# ---- label encodings for the multi-positive targets --------------------------------------------------------
_VALUES = {"shape": W.SHAPES, "colour": W.COLOURS, "shade": W.SHADES, "pattern": W.PATTERNS, **W.NUISANCES}
_GROUPS = list(_VALUES)
_OFFSET = dict(zip(_GROUPS, np.cumsum([0] + [len(_VALUES[g]) for g in _GROUPS])[:-1]))
_WIDTH = sum(len(v) for v in _VALUES.values())


def scene_onehots(samples) -> np.ndarray:
    """[N, 1, WIDTH] one-hot per attribute group of each image's creature (and its background)."""
    out = np.zeros((len(samples), 1, _WIDTH), np.float32)
    for i, s in enumerate(samples):
        o = s.main
        values = {"shape": o.shape, "colour": o.colour, "shade": o.shade, "pattern": o.pattern, "size": o.size,
                  "position": o.position, "background": s.background}
        for g, v in values.items():
            out[i, 0, _OFFSET[g] + _VALUES[g].index(v)] = 1
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_DEPTH_P = np.array([0.15, 0.2, 0.2, 0.2, 0.25])  # which taxonomy level a partial description names
_NUISANCE_P = np.array([0.4, 0.4, 0.2])  # how many nuisances it also names: 0, 1 or 2


@dataclass(frozen=True)
class Query:
    """A partial description: the creature's path down to `depth` (kingdom .. species), some nuisances."""

    path: tuple[str, ...]  # kingdom, shape, colour, shade, pattern (a prefix of the species)
    nuisances: tuple[tuple[str, str], ...]  # (group, value)
    shape_noun: bool  # name the shape as the noun ("a dark red circle") rather than "object"


def describe(q: Query) -> tuple[str, np.ndarray]:
    """The text of a query and the mask [WIDTH] of attribute values it is true of."""
    mask = np.ones(_WIDTH, np.float32)

    def allow(group: str, values) -> None:
        mask[_OFFSET[group] : _OFFSET[group] + len(_VALUES[group])] = [v in values for v in _VALUES[group]]

    level = dict(zip(W.TAXONOMY_LEVELS, q.path))
    nuis = dict(q.nuisances)
    adj = ([nuis["size"]] if "size" in nuis else []) + [level[k] for k in ("pattern", "shade", "colour") if k in level]
    if len(q.path) == 1:
        adj.append(level["kingdom"])
        allow("shape", W.SHAPES_OF[level["kingdom"]])
    for g in ("shape", "colour", "shade", "pattern"):
        if g in level:
            allow(g, [level[g]])
    noun = level["shape"] if "shape" in level and (q.shape_noun or len(q.path) == 2) else "object"
    words = adj + [noun]
    text = f"{_article(words[0])} {' '.join(words)}"
    if "position" in nuis:
        text += f" in the {W.POSITION_WORDS[nuis['position']]}"
    if "background" in nuis:
        text += f" on a {nuis['background']} background"
    for g, v in q.nuisances:
        allow(g, [v])
    return text, mask


def random_query(s: W.Sample, rng: np.random.Generator) -> tuple[str, np.ndarray, Query]:
    """A partial description of the creature of `s`: (text, mask, query)."""
    depth = int(rng.choice(len(_DEPTH_P), p=_DEPTH_P)) + 1
    n_nuis = int(rng.choice(len(_NUISANCE_P), p=_NUISANCE_P))
    groups = rng.choice(list(W.NUISANCES), n_nuis, replace=False).tolist()
    values = {"size": s.main.size, "position": s.main.position, "background": s.background}
    q = Query(W.taxonomy_path(s.main)[:depth], tuple((g, values[g]) for g in sorted(groups)),
              bool(rng.random() < 0.5))
    return (*describe(q), q)


def _other(values, current, rng):
    return values[(values.index(current) + int(rng.integers(1, len(values)))) % len(values)]


def sibling(path: tuple[str, ...], level: int, rng) -> tuple[str, ...]:
    """The species path with level `level` moved to a sibling node (same parent), the levels below redrawn."""
    options = [sp for sp in W.SPECIES if sp[:level] == path[:level] and sp[level] != path[level]]
    return options[rng.integers(len(options))]


def hard_negative(s: W.Sample, full: bool, q: Query | None, rng) -> tuple[str, np.ndarray]:
    """A near-miss text: the caption or query with one taxonomy level moved to a sibling, or one nuisance changed."""
    if full:
        o = s.main
        if rng.random() < 0.75:
            _, shape, colour, shade, pattern = sibling(W.taxonomy_path(o), int(rng.integers(5)), rng)
            o = W.ToyObject(shape, colour, shade, pattern, o.size, o.position)
            return W.caption_of([o], s.background), np.ones(_WIDTH, np.float32)
        g = list(W.NUISANCES)[rng.integers(3)]
        values = {"size": o.size, "position": o.position, "background": s.background}
        values[g] = _other(W.NUISANCES[g], values[g], rng)
        o = W.ToyObject(o.shape, o.colour, o.shade, o.pattern, values["size"], values["position"])
        return W.caption_of([o], values["background"]), np.ones(_WIDTH, np.float32)
    assert q is not None
    if q.nuisances and rng.random() < 0.3:
        j = int(rng.integers(len(q.nuisances)))
        g, v = q.nuisances[j]
        nuis = list(q.nuisances)
        nuis[j] = (g, _other(W.NUISANCES[g], v, rng))
        return describe(Query(q.path, tuple(nuis), q.shape_noun))
    full_path = W.taxonomy_path(s.main)
    level = len(q.path) - 1  # the finest level the query names goes to a sibling
    return describe(Query(sibling(full_path, level, rng)[: len(q.path)], q.nuisances, q.shape_noun))


def match_matrix(query_QW, is_full_Q, caption_id_Q, scene_IOW, caption_id_I) -> torch.Tensor:
    """[Q, I] bool: is text q true of image i. Full captions match equal captions; partial queries match an
    image when one of its objects has an allowed value in every attribute group."""
    ok = torch.ones(query_QW.shape[0], scene_IOW.shape[0], scene_IOW.shape[1], dtype=torch.bool)
    for g in _GROUPS:
        sl = slice(_OFFSET[g], _OFFSET[g] + len(_VALUES[g]))
        ok &= torch.einsum("qw,iow->qio", query_QW[:, sl], scene_IOW[:, :, sl]) > 0
    partial = ok.any(-1)
    full = caption_id_Q[:, None] == caption_id_I[None, :]
    return torch.where(is_full_Q[:, None], full, partial)


def soft_clip_loss(logits_per_image_IQ: torch.Tensor, match_QI: torch.Tensor) -> torch.Tensor:
    """Multi-positive InfoNCE both ways; texts true of no image (hard negatives) only enter image->text."""
    m = match_QI.float()
    has = m.sum(1) > 0
    t2i = -(F.log_softmax(logits_per_image_IQ.T[has], -1) * m[has] / m[has].sum(1, keepdim=True)).sum(1).mean()
    mi = m.T
    i2t = -(F.log_softmax(logits_per_image_IQ, -1) * mi / mi.sum(1, keepdim=True)).sum(1).mean()
    return (t2i + i2t) / 2


def lr_at(step: int, cfg) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * p))


def optimizer(model, cfg: ClipTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the weight matrices only (not on embeddings, biases or norms)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def train(cfg: ClipTrainConfig) -> Trained:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.process_time()
    samples = [W.sample(i, cfg.seed) for i in tqdm(range(cfg.n_train), desc="generate", disable=cfg.quiet)]
    pix = T.pixels(W.to_array(samples))
    scenes = torch.from_numpy(scene_onehots(samples))
    captions = [s.caption for s in samples]
    cap_ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cap_id_N = torch.tensor([cap_ids[c] for c in captions])
    tok = T.build_tokenizer(for_clip=True)
    model = build_clip(cfg, len(tok))
    opt = optimizer(model, cfg)
    model.train()
    log = []
    bar = tqdm(range(cfg.steps), desc="train clip", disable=cfg.quiet)
    for step in bar:
        idx = rng.choice(cfg.n_train, cfg.batch_size, replace=False)
        texts, masks, full, tcap = [], [], [], []
        neg_texts, neg_masks, neg_full, neg_cap = [], [], [], []
        for i in idx:
            is_full = bool(rng.random() < cfg.p_full_caption)
            if is_full:
                t, m, spec = captions[i], np.ones(_WIDTH, np.float32), None
            else:
                t, m, spec = random_query(samples[i], rng)
            texts.append(t)
            masks.append(m)
            full.append(is_full)
            tcap.append(cap_id_N[i].item())
            if rng.random() < cfg.p_hard_negative:
                nt, nm = hard_negative(samples[i], is_full, spec, rng)
                neg_texts.append(nt)
                neg_masks.append(nm)
                neg_full.append(is_full)
                neg_cap.append(cap_ids.get(nt, -1))  # a changed caption is (almost always) no image's caption
        enc = tok(texts + neg_texts, padding=True, return_tensors="pt")
        idx_t = torch.from_numpy(idx)
        match = match_matrix(torch.from_numpy(np.stack(masks + neg_masks)), torch.tensor(full + neg_full),
                             torch.tensor(tcap + neg_cap), scenes[idx_t], cap_id_N[idx_t])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        outp = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=pix[idx_t])
        loss = soft_clip_loss(outp.logits_per_image, match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    cpu_s = time.process_time() - t0
    info = {"config": recorded(cfg), "log": log, "cpu_seconds": round(cpu_s, 1)}
    return Trained(save(model, tok, cfg.out or WEIGHTS / "clip", info), log[-1]["loss"], cpu_s)


def save(model, tok, out: str | Path, info: dict) -> Path:
    from transformers import CLIPProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPProcessor(image_processor=T.build_image_processor(), tokenizer=tok).save_pretrained(out)
    return T.finish_shipped(out, info)
