"""Train the toy LLaVA: the tiny CLIP's vision tower (frozen) + a projector + a small Llama, all from HF classes.

    sae-vlm toy-train-llava            # settings: config.LlavaTrainConfig; reads and writes the shipped weights

Like llava-1.5 the language model reads the vision tower's second-to-last layer (`vision_feature_layer=-2`)
without the CLS token (`vision_feature_select_strategy="default"`): 16 image tokens for a 48 px image with
12 px patches. Prompt format (also saved as the processor's chat template):

    USER: <image>\\n{question} ASSISTANT: {answer}</s>

It learns to caption ("What is shown in this image?") and to answer one-word questions about the main object
(`world.QUESTIONS`). Because the tower is frozen its features are computed once; the training step then runs
exactly what `LlavaForConditionalGeneration.forward` does after `get_image_features` (projector, merge into
the `<image>` positions, Llama, lm_head), so `generate` on the saved model answers the same way.

Model (589k parameters, 1.2 MB stored in float16): the CLIP vision tower (229k, frozen), a 2-layer GELU
projector 64 -> 96 -> 96 (16k), a Llama with hidden 96, 3 layers, 4 heads, MLP 256, untied lm_head (346k).
Default run: 20k images, 1500 steps of batch 64, about 5 CPU minutes on one thread.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sae_vlm.config import LlavaTrainConfig
from sae_vlm.toyworld import WEIGHTS
from sae_vlm.toyworld import text as T
from sae_vlm.toyworld import world as W
from sae_vlm.toyworld.train_clip import Trained, lr_at, recorded

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s> "
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_llava(cfg: LlavaTrainConfig, clip_dir: str | Path, vocab_size: int):
    """A fresh LLaVA whose vision tower is a copy of the CLIP's (weights loaded, frozen)."""
    from transformers import CLIPModel, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    clip = CLIPModel.from_pretrained(clip_dir)
    # CLIPConfig types vision_config as `dict | CLIPVisionConfig | None`; after init it is always a CLIPVisionConfig.
    vcfg = cast(CLIPVisionConfig, clip.config.vision_config)
    image_size, patch_size = vcfg.image_size, vcfg.patch_size
    if not isinstance(image_size, int) or not isinstance(patch_size, int):
        raise TypeError(
            f"the CLIP in {clip_dir} must have integer image_size and patch_size, got {image_size!r} and {patch_size!r}"
        )
    n_img = (image_size // patch_size) ** 2
    tcfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.text_hidden, intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=T.LLAVA_MAX_LEN, bos_token_id=T.BOS, eos_token_id=T.EOS, pad_token_id=T.PAD,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(), image_token_index=T.IMAGE, image_seq_length=n_img,
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    tower = model.model.vision_tower
    src = clip.vision_model.state_dict()
    missing, unexpected = tower.load_state_dict(src, strict=False)
    if unexpected or any("position_ids" not in k for k in missing):  # 4.x towers nest under vision_model.
        missing, unexpected = tower.load_state_dict({f"vision_model.{k}": v for k, v in src.items()}, strict=True)
    tower.requires_grad_(False)
    model.generation_config.eos_token_id = T.EOS
    model.generation_config.pad_token_id = T.PAD
    model.generation_config.bos_token_id = T.BOS
    return model, n_img


@torch.no_grad()
def tower_features(model, pix_NCHW: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Selected vision features [N, n_img, D] exactly as LLaVA selects them (layer -2, CLS dropped)."""
    tower = model.model.vision_tower.eval()
    out = []
    for b in range(0, len(pix_NCHW), batch):
        hs = tower(pixel_values=pix_NCHW[b : b + batch], output_hidden_states=True).hidden_states
        out.append(hs[model.config.vision_feature_layer][:, 1:])
    return torch.cat(out)


def prompt_ids(tok, question: str, n_img: int) -> list[int]:
    text = W.PROMPT_TEMPLATE.format(question=question).replace("<image>", "<image>" * n_img)
    return tok(text).input_ids


def lm_loss(model, ids_BL, am_BL, labels_BL, feats_BND) -> torch.Tensor:
    """LlavaForConditionalGeneration.forward after get_image_features: project, merge, Llama, lm_head, CE."""
    emb = model.get_input_embeddings()(ids_BL)
    img = model.model.multi_modal_projector(feats_BND).to(emb.dtype)
    is_img = ids_BL == model.config.image_token_index
    emb = emb.masked_scatter(is_img[..., None], img.reshape(-1, img.shape[-1]))
    h = model.model.language_model(inputs_embeds=emb, attention_mask=am_BL).last_hidden_state
    logits = model.lm_head(h[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels_BL[:, 1:].reshape(-1), ignore_index=-100)


def train(cfg: LlavaTrainConfig) -> Trained:
    clip_dir = cfg.clip or WEIGHTS / "clip"
    if not (Path(clip_dir) / "config.json").is_file():  # named by its flag, before transformers tries the hub
        raise FileNotFoundError(f"--clip {clip_dir}: no CLIP there (no config.json)")
    torch.set_num_threads(cfg.threads)
    t0 = time.process_time()
    rng = np.random.default_rng(cfg.seed)
    tok = T.build_tokenizer(for_clip=False)
    model, n_img = build_llava(cfg, clip_dir, len(tok))
    samples = [W.sample(i, cfg.seed) for i in tqdm(range(cfg.n_train), desc="generate", disable=cfg.quiet)]
    feats = tower_features(model, T.pixels(W.to_array(samples)))
    kinds = [k for k, _ in cfg.question_mix]
    probs = np.array([p for _, p in cfg.question_mix], np.float64)
    probs /= probs.sum()
    prompts = {k: prompt_ids(tok, W.QUESTIONS[k], n_img) for k in kinds}
    answer_cache: dict[str, list[int]] = {}

    def answer_ids(a: str) -> list[int]:
        if a not in answer_cache:
            answer_cache[a] = tok(a, add_special_tokens=False).input_ids + [T.EOS]
        return answer_cache[a]

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=cfg.weight_decay)
    model.train()
    model.model.vision_tower.eval()
    log = []
    bar = tqdm(range(cfg.steps), desc="train llava", disable=cfg.quiet)
    for step in bar:
        idx = rng.choice(cfg.n_train, cfg.batch_size, replace=False)
        ks = rng.choice(len(kinds), cfg.batch_size, p=probs)
        seqs, labs = [], []
        for i, k in zip(idx, ks):
            p, a = prompts[kinds[k]], answer_ids(samples[i].answer(kinds[k]))
            seqs.append(p + a)
            labs.append([-100] * len(p) + a)
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), T.PAD)
        labels = torch.full((len(seqs), L), -100)
        am = torch.zeros((len(seqs), L), dtype=torch.long)
        for r, (s, lab) in enumerate(zip(seqs, labs)):
            ids[r, : len(s)] = torch.tensor(s)
            labels[r, : len(s)] = torch.tensor(lab)
            am[r, : len(s)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = lm_loss(model, ids, am, labels, feats[torch.from_numpy(idx)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4)})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    cpu_s = time.process_time() - t0
    info = {"config": recorded(cfg), "clip": str(clip_dir), "log": log, "cpu_seconds": round(cpu_s, 1)}
    return Trained(save(model, tok, n_img, cfg.out or WEIGHTS / "llava", info), log[-1]["loss"], cpu_s)


def save(model, tok, n_img: int, out: str | Path, info: dict) -> Path:
    from transformers import LlavaProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)  # half the size (1.2 MB); loaders ask for float32 on CPU
    proc = LlavaProcessor(
        image_processor=T.build_image_processor(), tokenizer=tok, patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy, num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    proc.save_pretrained(out)
    return T.finish_shipped(out, info)
