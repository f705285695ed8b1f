"""SAEs from other libraries: recognise their files, map what they compute onto our SAE, and write SAELens's format.

Each library module reads its checkpoint into `Parts`: the parameters in our layout (W_enc [d, F], W_dec [F, d]) plus
how that library's encoder uses them (is b_dec subtracted before encoding, were inputs normalised), and `to_sae`
builds the one SAE that computes the same codes and reconstructions. An architecture with no equivalent here is
refused by name. Pickled checkpoints are read with `weights_only=True` only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sae_vlm.names import FORMAT_NAMES
from sae_vlm.outdir import check_owned, claim
from sae_vlm.sae.formats import dictionary_learning, overcomplete, sae_lens, saev, sparsify
from sae_vlm.sae.formats.common import Hints, Parts
from sae_vlm.sae.model import FOREIGN_LOADERS, SAE, SAEConfig, local_or_hub, nonfinite_tensors

__all__ = ["FORMATS", "Hints", "Parts", "detect", "load_foreign", "to_sae"]

READERS = {"dictionary-learning": dictionary_learning.read, "sae-lens": sae_lens.read, "saev": saev.read,
           "sparsify": sparsify.read, "overcomplete": overcomplete.read}
FORMATS = FORMAT_NAMES  # config.py checks --from against these names without loading the readers


def detect(path: Path) -> str:
    """The library that wrote `path` (a folder or a checkpoint file), from its file names and contents."""
    if not path.exists():
        raise FileNotFoundError(f"SAE {path} does not exist")
    for fmt, module in (("sae-lens", sae_lens), ("sparsify", sparsify), ("dictionary-learning", dictionary_learning),
                        ("saev", saev), ("overcomplete", overcomplete)):
        if module.recognises(path):
            return fmt
    raise ValueError(f"{path} is not an SAE any supported library wrote: expected config.json + model.safetensors "
                     "(sae-vlm), cfg.json + sae_weights.safetensors (SAELens), cfg.json + sae.safetensors (sparsify), "
                     "ae.pt (dictionary_learning), a saev .pt, or an overcomplete state dict")


def load_foreign(path: str | Path, source_format: str | None = None, **hints) -> SAE:
    """The SAE in `path`, written by `source_format` (detected when None); `hints` fill what the files lack."""
    path = Path(path)
    fmt = source_format or detect(path)
    if fmt not in READERS:
        raise ValueError(f"unknown source format {fmt!r}; expected one of {', '.join(FORMATS)}")
    given = Hints(**hints)
    sae = to_sae(READERS[fmt](path, given), given)
    sae.path = path
    return sae


FOREIGN_LOADERS.append(load_foreign)  # SAE.from_pretrained hands it what is not in our format


def to_sae(p: Parts, hints: Hints = Hints()) -> SAE:
    """Our SAE computing what the library computed; folds bias placement and input normalisation into the weights."""
    where = p.source.get("path", "the source SAE")
    check_parts_finite(p, where)
    W_enc, b_enc, W_dec, b_dec = (t.detach().to(torch.float64) for t in (p.W_enc_DF, p.b_enc_F, p.W_dec_FD, p.b_dec_D))
    if not p.subtracts_b_dec:  # the library encodes x W + b_enc = (x − b_dec) W + (b_enc + b_dec W)
        b_enc = b_enc + b_dec @ W_enc
    mean, scale = hints.input_mean_D(W_enc.shape[0]), hints.input_scale or 1.0
    if mean is not None or scale != 1.0:  # it saw z = s·(x − μ): encode z by scaling W_enc, decode back to x
        W_enc, W_dec = W_enc * scale, W_dec / scale
        b_dec = (mean if mean is not None else 0.0) + b_dec / scale
    d_in, d_sae = W_enc.shape
    cfg = SAEConfig(p.arch, d_in, d_sae, p.k, p.group_sizes, hints.hook_point or p.hook_point,
                    hints.model_id or p.model_id)
    sae = SAE(cfg)
    with torch.no_grad():
        for param, value in ((sae.W_enc, W_enc), (sae.b_enc, b_enc), (sae.W_dec, W_dec), (sae.b_dec, b_dec)):
            param.copy_(value)
        if p.threshold is not None:
            sae.threshold.copy_(p.threshold.detach().float().expand_as(sae.threshold))
    sae.check_finite(f"{where} (converted)")  # folding can overflow what the source held
    dead = int((W_dec == 0).all(dim=1).sum())
    notes = list(p.notes) + ([f"{dead} of {d_sae} latents have an all-zero decoder row: kept as zero, they are dead "
                              "(they add nothing to any reconstruction)"] if dead else [])
    sae.meta = {"source": {**p.source, **({"input_mean": hints.input_mean, "input_scale": scale}
                                          if mean is not None or scale != 1.0 else {}), "zero_decoder_rows": dead},
                "notes": notes}
    return sae


def check_parts_finite(p: Parts, where: str) -> None:
    """Refuse NaN or inf in a library's weights, naming the tensor: converting would carry them into every code."""
    bad = nonfinite_tensors({"W_enc": p.W_enc_DF, "b_enc": p.b_enc_F, "W_dec": p.W_dec_FD, "b_dec": p.b_dec_D,
                             "threshold": p.threshold})
    if bad:
        raise ValueError(f"{where}: {bad}")


def describe(sae: SAE) -> str:
    c = sae.cfg
    return f"{c.arch} SAE (d_in={c.d_in}, d_sae={c.d_sae}, k={c.k})"


def hints_from(cfg) -> dict:
    """Hints given on the command line (a ConvertConfig), without the unset ones."""
    fields = {f.name for f in dataclasses.fields(Hints)}
    return {k: getattr(cfg, k) for k in fields if getattr(cfg, k, None) is not None}


WRITES = {"sae-vlm": ("config.json", "model.safetensors"), "sae-lens": (sae_lens.CFG, sae_lens.WEIGHTS)}


def convert(cfg) -> tuple[SAE, list[str]]:
    """`sae-vlm convert`: read cfg.src (any format), write cfg.dst in cfg.target_format; (the SAE, notes)."""
    src, dst = Path(cfg.src), Path(cfg.dst)
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise ValueError(f"{dst} is the source itself; choose another output folder")
    check_owned(dst, "convert")  # before a download, so a refusal costs nothing
    hints, path = hints_from(cfg), local_or_hub(cfg.src, cfg.subfolder, cfg.revision)
    if cfg.source_format == "auto":
        sae = SAE.from_pretrained(path, **hints)
    else:
        sae = load_foreign(path, cfg.source_format, **hints)
    overrides = {k: getattr(cfg, k) for k in ("hook_point", "model_id") if getattr(cfg, k)}
    sae.cfg = dataclasses.replace(sae.cfg, **overrides)  # also for an SAE already in our format
    notes = list(sae.meta.get("notes", []))
    with claim(dst, "convert"):
        for other in set(WRITES) - {cfg.target_format}:  # a rerun with the other --to replaces, never mixes
            for name in WRITES[other]:
                (dst / name).unlink(missing_ok=True)
        if cfg.target_format == "sae-lens":
            sae_lens.write(sae, dst)
            notes += [n for n in (sae_lens.threshold_note(sae),) if n]
        else:
            sae.save_pretrained(dst)
    return sae, notes
