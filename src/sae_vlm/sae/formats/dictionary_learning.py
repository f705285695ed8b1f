"""dictionary_learning (the paper's trainer): `ae.pt` state dicts, with the trainer's config.json beside them.

Its training loop saves with the input norm factor folded into the biases, so checkpoints take raw activations.
BatchTopKSAE and AutoEncoderTopK share their keys; config.json's `dict_class` tells them apart.
"""

from __future__ import annotations

from pathlib import Path

from sae_vlm.sae.formats.common import (
    Hints,
    Parts,
    checkpoint_keys,
    load_state,
    read_json,
    starts_with_json,
    tensor,
    unsupported,
)

RESAVE = "torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, 'ae.pt')"


def recognises(path: Path) -> bool:
    if path.is_dir():
        return (path / "ae.pt").is_file()
    if path.suffix not in (".pt", ".pth") or starts_with_json(path):
        return False
    keys = checkpoint_keys(path)
    if keys is None:  # unreadable or unsafe: claimed, so that the reader names the problem
        return True
    return bool(keys & {"encoder.weight", "W_enc", "r_mag"}) and "dictionary._weights" not in keys


def trainer_config(file: Path) -> dict:
    """The trainer section of the config.json next to the checkpoint (or next to its checkpoints/ folder)."""
    for folder in (file.parent, file.parent.parent):
        if (folder / "config.json").is_file():
            return read_json(folder / "config.json").get("trainer") or {}
    return {}


def read(path: Path, hints: Hints) -> Parts:
    file = path / "ae.pt" if path.is_dir() else path
    state = load_state(file, "dictionary_learning", RESAVE)
    cfg = trainer_config(file)
    dict_class = cfg.get("dict_class") or {"topk": "AutoEncoderTopK"}.get(hints.arch or "", None)
    if "r_mag" in state or "gate_bias" in state:
        raise unsupported(f"{file}: dictionary_learning GatedAutoEncoder (gated SAE)")
    if "encoder.weight" in state and "b_dec" in state:  # BatchTopKSAE / AutoEncoderTopK: nn.Linear layouts
        W_enc = tensor(state, "encoder.weight", file, (None, None)).T
        d, f = W_enc.shape
        arch = "topk" if dict_class == "AutoEncoderTopK" else "batchtopk"
        parts = Parts(arch, W_enc, tensor(state, "encoder.bias", file, (f,)),
                      tensor(state, "decoder.weight", file, (d, f)).T, tensor(state, "b_dec", file, (d,)),
                      k=int(tensor(state, "k", file, ())), threshold=tensor(state, "threshold", file, ()))
        if not dict_class:
            parts.notes.append(f"no config.json beside {file.name}: read as BatchTopKSAE (pass --arch topk for "
                               "AutoEncoderTopK)")
    elif "W_enc" in state and "group_sizes" in state:  # MatryoshkaBatchTopKSAE
        d, f = tensor(state, "W_enc", file, (None, None)).shape
        parts = Parts("matryoshka", tensor(state, "W_enc", file), tensor(state, "b_enc", file, (f,)),
                      tensor(state, "W_dec", file, (f, d)), tensor(state, "b_dec", file, (d,)),
                      k=int(tensor(state, "k", file, ())), threshold=tensor(state, "threshold", file, ()),
                      group_sizes=tuple(int(g) for g in state["group_sizes"].tolist()))
    elif "W_enc" in state and "threshold" in state:  # JumpReluAutoEncoder: encodes x, not x − b_dec
        d, f = tensor(state, "W_enc", file, (None, None)).shape
        parts = Parts("jumprelu", tensor(state, "W_enc", file), tensor(state, "b_enc", file, (f,)),
                      tensor(state, "W_dec", file, (f, d)), tensor(state, "b_dec", file, (d,)),
                      threshold=tensor(state, "threshold", file, (f,)), subtracts_b_dec=False)
    elif "encoder.weight" in state and ("bias" in state or "decoder.bias" in state):  # AutoEncoder / AutoEncoderNew
        W_enc = tensor(state, "encoder.weight", file, (None, None)).T
        d, f = W_enc.shape
        new = "decoder.bias" in state  # AutoEncoderNew: relu(encoder(x)), decoder(f) with its own bias
        parts = Parts("relu", W_enc, tensor(state, "encoder.bias", file, (f,)),
                      tensor(state, "decoder.weight", file, (d, f)).T,
                      tensor(state, "decoder.bias" if new else "bias", file, (d,)), subtracts_b_dec=not new)
    else:
        raise ValueError(f"{file} is not a dictionary_learning SAE state dict; keys: {', '.join(sorted(state)[:8])}")
    layer = cfg.get("layer")
    parts.hook_point = f"layer.{layer}" if isinstance(layer, int) else None
    parts.model_id = cfg.get("lm_name") if isinstance(cfg.get("lm_name"), str) else None
    parts.source = {"format": "dictionary-learning", "path": str(file), "dict_class": dict_class}
    return parts
