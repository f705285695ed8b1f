"""`sae-vlm evaluate` reads each source once, for every SAE at once; the one-pass MS against its pairwise definition."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_vlm import SAE, SAEConfig
from sae_vlm.config import EvaluateConfig
from sae_vlm.data.source import ActivationSource
from sae_vlm.eval import hierarchy as H
from sae_vlm.eval import ms as ms_mod
from sae_vlm.eval import run as run_mod
from sae_vlm.eval.recon import heldout_rows, reconstruction_metrics
from sae_vlm.eval.top import EncodedSource, top_activating


class CountingSource(ActivationSource):
    """An activation source that counts how often each row is read, through `get` or `read_rows`."""

    def __init__(self, src):
        self.src, self.rows, self.d_in = src, src.rows, src.d_in
        self.reads_N = np.zeros(src.rows, np.int64)

    def get(self, idx_N: torch.Tensor) -> torch.Tensor:
        np.add.at(self.reads_N, np.asarray(idx_N), 1)
        return self.src.get(idx_N)

    def read_rows(self, r0: int, r1: int) -> torch.Tensor:
        self.reads_N[r0:r1] += 1
        return self.src.get(torch.arange(r0, r1))


def _run(tmp_path, d_in=16):
    """Three SAEs: two read layer.1, the one between them (by name) reads layer.2."""
    torch.manual_seed(0)
    for name, cfg in [
        ("a_batchtopk", SAEConfig(arch="batchtopk", d_in=d_in, d_sae=2 * d_in, k=4, hook_point="layer.1",
                                  token_selection="cls")),
        ("b_relu", SAEConfig(arch="relu", d_in=d_in, d_sae=2 * d_in, hook_point="layer.2", token_selection="cls")),
        ("c_matryoshka", SAEConfig(arch="matryoshka", d_in=d_in, d_sae=4 * d_in, k=4, group_sizes=(8, 24, 32),
                                   hook_point="layer.1", token_selection="cls")),
    ]:
        sae = SAE(cfg)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)  # some latents fire on most rows, some on few
        sae.save_pretrained(tmp_path / "run" / "saes" / name)
    return tmp_path / "run"


def test_every_row_is_read_once_per_source(tmp_path, monkeypatch, one_thread):
    run = _run(tmp_path)
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(70, 16)).astype(np.float32)
    np.save(tmp_path / "acts.npy", acts)
    np.save(tmp_path / "emb.npy", rng.normal(size=(70, 8)).astype(np.float32) + 0.5)
    (tmp_path / "tax.json").write_text(json.dumps({str(i): f"A/B{i % 3}/c{i % 5}" for i in range(70) if i != 4}))
    opened: list[CountingSource] = []
    open_data = run_mod.open_data

    def counting(*args):
        opened.append(CountingSource(open_data(*args)))
        return opened[-1]

    monkeypatch.setattr(run_mod, "open_data", counting)
    # 16-row chunks against 7-row validation batches: held-out batches span chunk boundaries
    cfg = EvaluateConfig(run_dir=str(run), data=str(tmp_path / "acts.npy"), embeddings=str(tmp_path / "emb.npy"),
                         taxonomy=str(tmp_path / "tax.json"), out=str(tmp_path / "out"), heldout_frac=0.6,
                         batch_rows=7, chunk_rows=16, device="cpu", quiet=True)
    m = run_mod.evaluate_run(cfg).to_json()

    assert len(opened) == 2  # one source per hook point, each opened once
    for src in opened:
        assert src.reads_N.tolist() == [1] * 70
    assert [r["name"] for r in m["saes"]] == ["a_batchtopk", "b_relu", "c_matryoshka"]
    assert list(m["baselines"]) == ["layer.1", "layer.2"] and "rotated" in m["baselines"]["layer.1"]
    assert all(r["ms"]["scored"] > 0 and "hierarchy" in r for r in m["saes"])

    # the accumulators give what the one-metric functions give
    rows = heldout_rows(70, 0.6)
    for r in m["saes"]:
        sae = SAE.from_pretrained(run / "saes" / r["name"])
        ref = reconstruction_metrics(sae, acts, rows=rows, device="cpu", batch_rows=7)
        assert set(ref) - set(r["recon"]) == {"fire_freq"}
        for key, value in r["recon"].items():
            assert value == (None if ref[key] is None else pytest.approx(ref[key], rel=1e-6, abs=1e-9)), key
        lat = np.load(tmp_path / "out" / "latents" / f"{r['name']}.npz")
        tv, ti = top_activating(EncodedSource(sae, acts, device="cpu"), top=16, device="cpu")
        np.testing.assert_allclose(lat["top_values"], tv.numpy(), rtol=1e-6)
        nodes = H.node_detection([sae.encode(torch.from_numpy(acts)).detach()], [
            tuple(f"A/B{i % 3}/c{i % 5}".split("/")) if i != 4 else None for i in range(70)], sae.cfg.group_sizes)
        saved = json.loads((tmp_path / "out" / "nodes" / f"{r['name']}.json").read_text())
        assert [x["node"] for x in saved] == [x["node"] for x in nodes["nodes"]]
        np.testing.assert_allclose([x["auroc"] for x in saved], [x["auroc"] for x in nodes["nodes"]], atol=1e-9)


def pairwise_ms(acts_NF: np.ndarray, emb_ND: np.ndarray) -> np.ndarray:
    """The two-pass definition: min and max first, then ã = (a − min)/(max − min) and the weighted mean cosine over
    pairs n ≠ m; NaN where no pair carries weight."""
    a = acts_NF.astype(np.float64)
    e = emb_ND / np.linalg.norm(emb_ND, axis=1, keepdims=True)
    cos_NN = e @ e.T
    out = np.full(a.shape[1], np.nan)
    for j in range(a.shape[1]):
        lo, hi = a[:, j].min(), a[:, j].max()
        if hi == lo:
            continue
        w_NN = np.outer((a[:, j] - lo) / (hi - lo), (a[:, j] - lo) / (hi - lo))
        np.fill_diagonal(w_NN, 0.0)
        if w_NN.sum() > 0:
            out[j] = (w_NN * cos_NN).sum() / w_NN.sum()
    return out


@pytest.mark.parametrize("sparse_below", [0.0, 0.05, 1.01])  # the matmul path, the default, the sparse product
def test_one_pass_ms_matches_pairwise_definition(monkeypatch, sparse_below):
    monkeypatch.setattr(ms_mod, "SPARSE_BELOW", sparse_below)
    rng = np.random.default_rng(3)
    n = 45
    acts = rng.normal(size=(n, 8)) * np.linspace(0.5, 4, 8) - 2.0  # dense neurons, mostly negative
    acts[:, 1] -= 300.0  # a large offset must not cancel the closed form
    acts[:, 2] = -1.25  # constant: NaN
    acts[:, 3] = -7.3
    acts[17, 3] = -6.4  # above its minimum on one image only: no weighted pair, NaN (rounding makes den ≠ 0)
    acts[:, 4] = np.where(rng.random(n) < 0.8, 0.0, rng.normal(size=n))  # mostly 0, minimum below 0
    acts[:, 5] = -3.0
    acts[[2, 40], 5] = [-1.0, 2.0]  # exactly one pair
    acts = acts.astype(np.float32)
    emb = rng.normal(size=(n, 5)) + 0.3
    ref = pairwise_ms(acts, emb)
    assert np.isnan(ref[[2, 3]]).all() and not np.isnan(ref[[0, 1, 4, 5]]).any()
    res = ms_mod.ms_stats(acts, emb, device="cpu", chunk_rows=8, chunk_latents=3)
    np.testing.assert_allclose(res.ms.numpy(), ref, atol=1e-9, equal_nan=True)
    np.testing.assert_array_equal(res.min_act.numpy(), acts.min(0))
    np.testing.assert_array_equal(res.max_act.numpy(), acts.max(0))
    assert res.support.tolist() == (acts > 0).sum(0).tolist()
