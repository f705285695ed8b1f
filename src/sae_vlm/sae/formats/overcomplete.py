"""overcomplete: `torch.save(sae.state_dict())` of an SAE with the default linear encoder.

The state dict does not record the SAE class or its top_k: TopKSAE needs --arch topk --k K, BatchTopKSAE
--arch batchtopk --k K --threshold T (its running_threshold, not in the state dict either), the plain SAE
--arch relu; JumpSAE is recognised by its thresholds. The dictionary at inference is the row-L2-normalised
weights times exp(multiplier) (DictionaryLayer's default 'l2' normalisation); there is no decoder bias.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_vlm.sae.formats.common import Hints, Parts, checkpoint_keys, load_state, tensor, unsupported

RESAVE = "torch.save(sae.state_dict(), 'sae.pt')"
ENC_W, ENC_B, DICT = "encoder.final_block.0.weight", "encoder.final_block.0.bias", "dictionary._weights"
KNOWN = {ENC_W, ENC_B, DICT, "dictionary.multiplier", "thresholds"}


def _file(path: Path) -> Path | None:
    if path.is_file():
        return path
    files = [p for p in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth"))] if path.is_dir() else []
    return files[0] if len(files) == 1 else None


def recognises(path: Path) -> bool:
    file = _file(path)
    if file is None:
        return False
    keys = checkpoint_keys(file)
    return keys is not None and DICT in keys


def read(path: Path, hints: Hints) -> Parts:
    file = _file(path)
    if file is None:
        raise ValueError(f"{path} holds no single overcomplete state dict (.pt/.pth)")
    state = load_state(file, "overcomplete", RESAVE)
    other = sorted(k for k in state if k not in KNOWN)
    if other:
        raise unsupported(f"{file}: an overcomplete SAE whose encoder or dictionary has {', '.join(other[:4])} "
                          "(hidden MLP blocks, normalisation layers, attention/ResNet encoders, archetypal "
                          "dictionaries)")
    W = tensor(state, DICT, file, (None, None))
    f, d = W.shape
    scale = torch.exp(tensor(state, "dictionary.multiplier", file, ())) if "dictionary.multiplier" in state else 1.0
    W_dec = W / (W.norm(dim=1, keepdim=True) + 1e-8) * scale
    parts = Parts("relu", tensor(state, ENC_W, file, (f, d)).T, tensor(state, ENC_B, file, (f,)), W_dec, torch.zeros(d))
    if "thresholds" in state:  # JumpSAE: θ = exp(thresholds), applied to ReLU codes
        parts.arch, parts.threshold = "jumprelu", torch.exp(tensor(state, "thresholds", file, (f,)))
    elif hints.arch == "relu":
        pass
    elif hints.arch in ("topk", "batchtopk") and hints.k and (hints.arch == "topk" or hints.threshold is not None):
        parts.arch, parts.k = hints.arch, hints.k
        parts.threshold = torch.tensor(hints.threshold) if hints.arch == "batchtopk" else None
    else:
        raise ValueError(f"{file}: an overcomplete state dict does not record its SAE class or top_k; pass --arch relu "
                         "(SAE), --arch topk --k K (TopKSAE) or --arch batchtopk --k K --threshold T (BatchTopKSAE: "
                         "K = its top_k / batch size, T = its running_threshold)")
    parts.source = {"format": "overcomplete", "path": str(file), "class": parts.arch}
    return parts
