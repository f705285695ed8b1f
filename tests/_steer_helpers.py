"""Tiny offline LLaVA (+ processor) and CLIPModel (+ tokenizer), saved and reloaded like users' checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("what is shown in this image ? use exactly one word ! write me a short love poem describe the "
         "cat dog pencil car tree house red blue white green ship rainbow panda dots").split()
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", "<image>", "USER:", "ASSISTANT:"]
VOCAB = 256


def tiny_tokenizer(n_vocab: int = VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + WORDS
    words += [f"w{i}" for i in range(n_vocab - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece()  # joins word tokens with spaces
    tk.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def save_tiny_llava(path: Path, seed: int = 0, n_layers: int = 3) -> Path:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tiny_tokenizer()
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16),
        text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=1, bos_token_id=2,
                                eos_token_id=3),
        image_token_index=4, vision_feature_layer=-2, pad_token_id=1)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # larger projector output so image edits visibly move the text
        model.model.multi_modal_projector.linear_2.weight.mul_(8)
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return Path(path)


def save_tiny_clip_model(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_tokenizer()
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=VOCAB, max_position_embeddings=32, pad_token_id=1, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(cfg).eval().save_pretrained(path)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(path)
    return Path(path)


def tiny_sae(d_in: int = 32, d_sae: int = 64, seed: int = 0, arch: str = "batchtopk",
             hook_point: str | None = "layer.1"):
    from sae_vlm import SAE, SAEConfig

    torch.manual_seed(seed)
    gs = (16, 48) if arch == "matryoshka" else None
    sae = SAE(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=8, group_sizes=gs, hook_point=hook_point))
    with torch.no_grad():
        sae.threshold.fill_(0.05)
        sae.W_dec.mul_(4)
    return sae
