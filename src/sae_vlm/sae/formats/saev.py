"""saev: one file, a JSON line with the SAE config followed by a torch-saved state dict (`saev.nn.dump`).

saev's data loader subtracts a dataset mean and rescales activations (DataLoad.scale_mean / scale_norm) before the
SAE sees them; the checkpoint does not hold those numbers. Given (--input-mean, --input-scale) they are folded in,
else the converted SAE, like saev's, expects inputs normalised that way (the conversion notes say so).
"""

from __future__ import annotations

import json
from pathlib import Path

from sae_vlm.sae.formats.common import Hints, Parts, load_state, starts_with_json, tensor, unsupported

RESAVE = "saev.nn.dump('sae.pt', sae)"


def _file(path: Path) -> Path | None:
    if path.is_file():
        return path
    candidates = [p for p in sorted(path.glob("*.pt")) if starts_with_json(p)] if path.is_dir() else []
    return candidates[0] if len(candidates) == 1 else None


def recognises(path: Path) -> bool:
    file = _file(path)
    return file is not None and starts_with_json(file)


def read(path: Path, hints: Hints) -> Parts:
    file = _file(path)
    if file is None:
        raise ValueError(f"{path} holds no single saev checkpoint (a .pt file starting with a JSON line)")
    with open(file, "rb") as f:
        head, body = f.readline(), f.read()
    try:
        cfg = json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: the first line is not saev's JSON config ({e})") from None
    activation = cfg.get("activation", "relu") if isinstance(cfg, dict) else None
    if activation not in ("relu", None) and not (isinstance(activation, dict) and activation.get("key") == "relu"):
        raise unsupported(f"{file}: saev activation {activation!r}")
    state = load_state(file, "saev", RESAVE, data=body)
    d, f = tensor(state, "W_enc", file, (None, None)).shape
    parts = Parts("relu", tensor(state, "W_enc", file), tensor(state, "b_enc", file, (f,)),
                  tensor(state, "W_dec", file, (f, d)), tensor(state, "b_dec", file, (d,)))
    parts.source = {"format": "saev", "path": str(file), "config": cfg}
    if hints.input_mean is None and hints.input_scale is None:
        parts.notes.append("saev trains on activations its loader mean-centres and rescales (scale_mean, "
                           "scale_norm); without --input-mean/--input-scale this SAE expects inputs normalised so")
    return parts

