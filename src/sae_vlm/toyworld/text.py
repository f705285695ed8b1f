"""The toy world's word-level tokenizer and image processor, built offline (no hub).

One lowercase vocabulary covers captions, partial descriptions ("a dark red object"), questions, answers and
the prompt words. Ids 0-4 are `<pad> <unk> <s> </s> <image>`; `</s>` is 3, not 2, because CLIP's text model
treats eos id 2 as a legacy marker and then pools at the largest token id.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import PreTrainedTokenizerFast

from sae_vlm.toyworld import world as W

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
PAD, UNK, BOS, EOS, IMAGE = range(len(SPECIALS))
CLIP_MAX_LEN = 24  # a caption is 16 tokens with <s> and </s>
LLAVA_MAX_LEN = 256

# CLIP's usual normalisation; the images are already IMAGE_SIZE, so resize and crop are no-ops for them and
# only bring other images (a blank canvas for steering, a photo) to the same 48x48 input.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def words() -> list[str]:
    """The vocabulary (without specials), in a fixed order."""
    ws: list[str] = []
    for text in [
        "a an and in the on background object of",
        " ".join(W.KINGDOMS + W.SHAPES + W.COLOURS + W.SHADES + W.PATTERNS + W.SIZES + W.BACKGROUNDS),
        " ".join(W.POSITION_WORDS.values()),
        *W.QUESTIONS.values(),
        "user assistant : .",
    ]:
        for w in _split(text):
            if w not in ws:
                ws.append(w)
    return ws


def _split(text: str) -> list[str]:
    out, cur = [], ""
    for ch in text.lower():
        if ch.isalnum():
            cur += ch
        else:
            if cur:
                out.append(cur)
            cur = ""
            if not ch.isspace():
                out.append(ch)
    return out + ([cur] if cur else [])


def build_tokenizer(for_clip: bool) -> PreTrainedTokenizerFast:
    """CLIP: `<s> text </s>` (CLIP pools at </s>); LLaVA (Llama-style): `<s> text`, the answer ends with </s>."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {t: i for i, t in enumerate(list(SPECIALS) + words())}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIALS))
    single = "<s> $A </s>" if for_clip else "<s> $A"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=single + " $B", special_tokens=[("<s>", BOS), ("</s>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=CLIP_MAX_LEN if for_clip else LLAVA_MAX_LEN,
        padding_side="right" if for_clip else "left",  # left padding for batched generation
        clean_up_tokenization_spaces=False,
    )


def build_image_processor():
    """A CLIP image processor on the PIL backend (torchvision is optional)."""
    try:  # transformers >= 5
        from transformers import CLIPImageProcessorPil as cls
    except ImportError:  # transformers 4.x: CLIPImageProcessor is PIL/numpy based
        from transformers import CLIPImageProcessor as cls
    s = W.IMAGE_SIZE
    return cls(
        do_resize=True, size={"shortest_edge": s}, resample=3, do_center_crop=True, crop_size={"height": s, "width": s},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD), do_convert_rgb=True,
    )


def pixels(images_NHW3):
    """uint8 [N, H, W, 3] (IMAGE_SIZE images) -> float32 pixel_values [N, 3, H, W], as the image processor gives."""
    import numpy as np
    import torch

    x = torch.as_tensor(np.asarray(images_NHW3)).float().div_(255.0).permute(0, 3, 1, 2)
    mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def finish_shipped(out: Path, info: dict) -> Path:
    """Write the training record beside a saved model and make every file world-readable (save_pretrained
    leaves 0600 temp-file modes, and the files ship inside the package)."""
    (out / "training.json").write_text(json.dumps(info, indent=1))
    for f in out.iterdir():
        f.chmod(0o644)
    return out
