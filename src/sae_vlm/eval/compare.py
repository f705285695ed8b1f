"""`sae-vlm compare`: two SAEs' latents matched one to one (eval/stability.py), and how alike the pairs are.

The result (and the --out JSON) holds the distribution of the matched decoder cosines and, with data, of the
matched pairs' activation correlations, plus per-latent arrays for both SAEs: `b_of_a` / `a_of_b` (the partner,
-1 for none), `cos_a` / `cos_b`, `corr_a` / `corr_b` (null for none or undefined).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_vlm.config import CompareConfig
from sae_vlm.device import resolve_device
from sae_vlm.eval.stability import STABLE_COS, Match, match_latents, matched_correlation
from sae_vlm.io import atomic_write_json
from sae_vlm.outdir import check_result_file
from sae_vlm.sae.model import SAE
from sae_vlm.sae.runs import resolve_sae_dir

QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
SHARES = (STABLE_COS, 0.7, 0.5)
OUT_KEYS = ("sae_a", "sae_b", "cosine", "latents")  # what marks a file as an earlier compare output


def distribution(values, matched: int) -> dict:
    """Quantiles and mean over the finite values; shares at or above each of `SHARES` out of the `matched` pairs
    (a pair whose value is undefined, such as a never-firing latent's correlation, counts as below)."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    out: dict = {"pairs": matched, "defined": int(v.size)}
    if v.size:
        out["mean"] = float(v.mean())
        out["quantiles"] = {f"{q:g}": float(x) for q, x in zip(QUANTILES, np.quantile(v, QUANTILES))}
    out["share_at_least"] = {f"{t:g}": float((v >= t).sum() / matched) if matched else float("nan") for t in SHARES}
    return out


def _json_floats(a: np.ndarray) -> list:
    return [float(x) if np.isfinite(x) else None for x in a]


def _source(cfg: CompareConfig, a: SAE, b: SAE):
    """The activations both SAEs encode: --layer of the store, else the hook point (and tokens) they read."""
    from sae_vlm.data.store import as_source
    from sae_vlm.eval.sources import open_data

    assert cfg.data is not None
    if cfg.layer is not None:
        src = as_source(cfg.data, layer=cfg.layer)
    else:
        reads = [(s.cfg.hook_point, s.cfg.token_selection) for s in (a, b)]
        if reads[0] != reads[1] and Path(cfg.data).is_dir():
            raise ValueError(f"SAE_A reads {reads[0][0]} ({reads[0][1]}) and SAE_B {reads[1][0]} ({reads[1][1]}); "
                             "pass --layer to choose the activations both encode")
        src = open_data(cfg.data, *reads[0])
    if src.d_in != a.cfg.d_in:
        raise ValueError(f"{cfg.data} has width {src.d_in} but the SAEs expect d_in={a.cfg.d_in}")
    if src.rows < 2:
        raise ValueError(f"{cfg.data} has {src.rows} rows; a correlation needs at least 2")
    return src


def _per_latent(match: Match, corr_a: np.ndarray | None) -> dict:
    out = {"b_of_a": match.b_of_a.tolist(), "cos_a": _json_floats(match.cos_a),
           "a_of_b": match.a_of_b.tolist(), "cos_b": _json_floats(match.cos_b)}
    if corr_a is not None:
        corr_b = np.full(len(match.a_of_b), np.nan)
        has = match.a_of_b >= 0
        corr_b[has] = corr_a[match.a_of_b[has]]
        out |= {"corr_a": _json_floats(corr_a), "corr_b": _json_floats(corr_b)}
    return out


def compare_saes(cfg: CompareConfig) -> dict:
    """Match `cfg.sae_a`'s latents with `cfg.sae_b`'s, summarise, and write `cfg.out` when given."""
    if cfg.out is not None:
        check_result_file(cfg.out, OUT_KEYS, "sae-vlm compare")
    dev = resolve_device(cfg.device)
    paths = [resolve_sae_dir(p, cfg.step) for p in (cfg.sae_a, cfg.sae_b)]
    a, b = (SAE.from_pretrained(p, device=dev).eval() for p in paths)
    if a.cfg.d_in != b.cfg.d_in:
        raise ValueError(f"SAE_A reads d_in={a.cfg.d_in} and SAE_B d_in={b.cfg.d_in}; expected SAEs of one width")
    src = _source(cfg, a, b) if cfg.data is not None else None  # a bad store is refused before the matching
    match = match_latents(a.W_dec, b.W_dec, device=dev)
    matched = int((match.b_of_a >= 0).sum())
    res: dict = {"sae_a": str(paths[0]), "sae_b": str(paths[1]), "d_in": a.cfg.d_in, "d_sae_a": a.cfg.d_sae,
                 "d_sae_b": b.cfg.d_sae, "method": match.method, "matched": matched,
                 "cosine": distribution(match.cos_a, matched), "correlation": None}
    corr = None
    if src is not None:
        corr = matched_correlation(a, b, match, src, rows=cfg.rows, device=dev)
        res |= {"data": str(cfg.data), "rows": min(cfg.rows or src.rows, src.rows),
                "correlation": distribution(corr, matched)}
    res["latents"] = _per_latent(match, corr)
    if cfg.out is not None:
        atomic_write_json(cfg.out, res)
    return res


def _dist_line(d: dict, what: str) -> str:
    q = d.get("quantiles")
    spread = (f"min {q['0']:.3f}, 10% {q['0.1']:.3f}, 25% {q['0.25']:.3f}, median {q['0.5']:.3f}, "
              f"75% {q['0.75']:.3f}, 90% {q['0.9']:.3f}, max {q['1']:.3f}" if q else "undefined for every pair")
    shares = ", ".join(f"≥ {t}: {100 * s:.1f}%" for t, s in d["share_at_least"].items())
    return f"{what}: {spread}; {shares}"


def summary_lines(res: dict) -> list[str]:
    """What `sae-vlm compare` prints."""
    how = "Hungarian assignment" if res["method"] == "dense" else "assignment over top candidates"
    lines = [f"matched {res['matched']} pairs of {res['d_sae_a']} (A) and {res['d_sae_b']} (B) latents by decoder "
             f"cosine ({how})", _dist_line(res["cosine"], "decoder cosine")]
    if res["correlation"] is not None:
        c = res["correlation"]
        lines.append(_dist_line(c, f"activation correlation over {res['rows']} rows"))
        if c["defined"] < c["pairs"]:
            lines.append(f"  {c['pairs'] - c['defined']} pairs have no correlation (a latent constant on these rows)")
    return lines
