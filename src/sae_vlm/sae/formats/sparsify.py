"""sparsify (EleutherAI): one folder per hook point, each with `cfg.json` + `sae.safetensors` (`SparseCoder`).

TopK coders map onto ours (encoder nn.Linear weights are [F, d]); groupmax activations, transcoders and skip
connections do not.
"""

from __future__ import annotations

from pathlib import Path

from sae_vlm.sae.formats.common import Hints, Parts, field, load_safetensors, read_json, tensor, unsupported

CFG, WEIGHTS = "cfg.json", "sae.safetensors"


def recognises(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / CFG).is_file() and (path / WEIGHTS).is_file() or any(path.glob(f"*/{WEIGHTS}"))


def read(path: Path, hints: Hints) -> Parts:
    if not (path / CFG).is_file():
        points = sorted(p.parent.name for p in path.glob(f"*/{WEIGHTS}"))
        raise ValueError(f"{path} holds sparsify SAEs for {len(points)} hook points ({', '.join(points[:8])}); "
                         f"convert one of them, e.g. {path / points[0]}")
    cfg, state = read_json(path / CFG), load_safetensors(path / WEIGHTS)
    if cfg.get("activation", "topk") != "topk":
        raise unsupported(f"{path}: sparsify activation {cfg.get('activation')!r}")
    for flag, what in (("transcode", "a transcoder"), ("skip_connection", "a skip connection (W_skip)")):
        if cfg.get(flag):
            raise unsupported(f"{path}: sparsify {what}")
    d, k = field(cfg, "d_in", path / CFG), field(cfg, "k", path / CFG)
    W_enc = tensor(state, "encoder.weight", path / WEIGHTS, (None, d)).T
    f = W_enc.shape[1]
    parts = Parts("topk", W_enc, tensor(state, "encoder.bias", path / WEIGHTS, (f,)),
                  tensor(state, "W_dec", path / WEIGHTS, (f, d)), tensor(state, "b_dec", path / WEIGHTS, (d,)), k=k)
    parts.hook_point = path.name
    parts.source = {"format": "sparsify", "path": str(path), "config": cfg}
    return parts
