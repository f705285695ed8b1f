"""SAELens (6.x, and older configs it still reads): `cfg.json` + `sae_weights.safetensors`; and the export to it.

Inference architectures read: standard (ReLU), topk (incl. rescale_acts_by_decoder_norm, folded) and jumprelu.
`expected_average_only_in` normalisation is folded into the weights when SAELens saves, so it is the identity here;
per-input normalisations (constant_norm_rescale, layer_norm) and whitening are not linear maps of one SAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sae_vlm.io import atomic_save_safetensors, atomic_write_text
from sae_vlm.sae.formats.common import Hints, Parts, field, load_safetensors, read_json, tensor, unsupported
from sae_vlm.sae.model import SAE

CFG, WEIGHTS = "cfg.json", "sae_weights.safetensors"
FORMAT_VERSION = "6.0.0"  # the cfg.json layout written below (SAELens ≥ 6 reads it without its pre-6 shims)


def recognises(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def read(path: Path, hints: Hints) -> Parts:
    cfg = read_json(path / CFG)
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and cfg.get("activation_fn", cfg.get("activation_fn_str")) == "topk":  # pre-6 configs
        arch, cfg = "topk", {**cfg, "k": (cfg.get("activation_fn_kwargs") or {}).get("k")}
    if arch not in ("standard", "topk", "jumprelu"):
        raise unsupported(f"{path}: SAELens architecture {arch!r}")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise unsupported(f"{path}: SAELens normalize_activations={norm!r} (a per-input normalisation)")
    if cfg.get("finetuning_scaling_factor"):
        raise unsupported(f"{path}: SAELens finetuning_scaling_factor")
    d, f = field(cfg, "d_in", path / CFG), field(cfg, "d_sae", path / CFG)
    state = load_safetensors(path / WEIGHTS)  # after the config's checks: a refused SAE is not read
    W_enc, b_enc = tensor(state, "W_enc", path / WEIGHTS, (d, f)), tensor(state, "b_enc", path / WEIGHTS, (f,))
    W_dec, b_dec = tensor(state, "W_dec", path / WEIGHTS, (f, d)), tensor(state, "b_dec", path / WEIGHTS, (d,))
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    parts = Parts(ours, W_enc, b_enc, W_dec, b_dec, subtracts_b_dec=bool(cfg.get("apply_b_dec_to_input", True)))
    if arch == "topk":
        parts.k = field(cfg, "k", path / CFG)
        if cfg.get("rescale_acts_by_decoder_norm"):  # codes h·‖W_dec‖, decoded by W_dec/‖W_dec‖: fold both
            norms = W_dec.norm(dim=-1)
            # a zero row's latent has code 0 and adds nothing: its row stays zero instead of 0/0
            divisor = torch.where(norms > 0, norms, torch.ones_like(norms))
            parts.W_enc_DF, parts.b_enc_F, parts.W_dec_FD = W_enc * norms, b_enc * norms, W_dec / divisor[:, None]
    if arch == "jumprelu":
        parts.threshold = tensor(state, "threshold", path / WEIGHTS, (f,))
    meta = cfg.get("metadata") or {}
    parts.hook_point = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    parts.model_id = meta.get("model_name") or cfg.get("model_name")
    parts.source = {"format": "sae-lens", "path": str(path), "architecture": arch}
    return parts


def write(sae: SAE, dst: Path) -> None:
    """`dst/cfg.json` + `dst/sae_weights.safetensors` that SAELens's `SAE.load_from_disk` opens.

    By inference rule: ReLU → standard, per-row top-k → topk, a threshold gate → jumprelu. BatchTopK and Matryoshka
    gate with one learned θ at inference, which is SAELens's jumprelu with θ for every latent (Matryoshka groups
    only matter in training; they are kept in the metadata)."""
    c = sae.cfg
    arch = {"relu": "standard", "topk": "topk", "threshold": "jumprelu"}[sae.arch.inference]
    state = {n: getattr(sae, n).detach().float().cpu().contiguous() for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
    cfg: dict = {"architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae, "dtype": "float32", "device": "cpu",
                 "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none"}
    if arch == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=False)
    if arch == "jumprelu":
        state["threshold"] = sae.threshold.detach().float().cpu().expand(c.d_sae).contiguous()
    cfg["metadata"] = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": FORMAT_VERSION,
                       "model_name": c.model_id, "hook_name": c.hook_point, "exported_from": "sae-vlm",
                       "sae_vlm_arch": c.arch, "k": c.k, "matryoshka_group_sizes": c.group_sizes}
    dst.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(dst / WEIGHTS, state)
    atomic_write_text(dst / CFG, json.dumps(cfg, indent=2))


def threshold_note(sae: SAE) -> str | None:
    if sae.arch.inference == "threshold" and float(sae.threshold.max()) < 0:
        return "this SAE's threshold was never learned (θ < 0): SAELens's jumprelu will keep every positive latent"
    return None
