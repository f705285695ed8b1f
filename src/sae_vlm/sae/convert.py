"""Import the paper's released checkpoints (dictionary_learning state dicts) into the sae-vlm format."""

from __future__ import annotations

from pathlib import Path

import torch

from sae_vlm.sae.model import SAE, SAEConfig


def from_dictionary_learning(src: str | Path, hook_point: str | None = None, model_id: str | None = None) -> SAE:
    """BatchTopK (`encoder.weight`, `decoder.weight`, ...) or MatryoshkaBatchTopK (`W_enc`, `W_dec`, ...) → SAE."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"checkpoint {src} does not exist")
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe pickle or a corrupt file
        raise ValueError(f"cannot load {src} as a weights-only state dict: {str(e).splitlines()[0]}") from None
    if "encoder.weight" in state:  # BatchTopKSAE: nn.Linear layouts, weights stored [out, in]
        W_enc, b_enc, W_dec = state["encoder.weight"].T, state["encoder.bias"], state["decoder.weight"].T
        arch, groups = "batchtopk", None
    elif "W_enc" in state:  # MatryoshkaBatchTopKSAE
        W_enc, b_enc, W_dec = state["W_enc"], state["b_enc"], state["W_dec"]
        arch, groups = "matryoshka", tuple(int(g) for g in state["group_sizes"].tolist())
    else:
        raise ValueError(f"{src} is not a dictionary_learning BatchTopK/Matryoshka checkpoint; "
                         f"keys: {sorted(state)[:8]}")
    d_in, d_sae = W_enc.shape
    sae = SAE(SAEConfig(arch, d_in, d_sae, int(state["k"]), groups, hook_point, model_id))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(state["b_dec"])
        sae.threshold.copy_(state["threshold"].reshape(()))
    sae.meta = {"converted_from": str(src), "source_format": "dictionary_learning"}
    return sae
