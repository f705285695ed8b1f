"""MS closed form against the O(N²) pair loop of paper.md §4, on small random data."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sae_vlm
from sae_vlm.eval.ms import (
    RotatedSource,
    chance_similarity,
    ms_stats,
    random_rotation,
    summarize_ms,
)


def direct_ms(acts_NK: np.ndarray, emb_ND: np.ndarray) -> np.ndarray:
    """Literal definition: min-max normalise, pair weights ã_n ã_m, cosine similarity, n≠m."""
    a = acts_NK.astype(np.float64)
    e = emb_ND.astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    n, k = a.shape
    out = np.full(k, np.nan)
    for j in range(k):
        lo, hi = a[:, j].min(), a[:, j].max()
        if hi == lo:
            continue
        at = (a[:, j] - lo) / (hi - lo)
        num = den = 0.0
        for p in range(n):
            for q in range(n):
                if p != q:
                    w = at[p] * at[q]
                    num += w * float(e[p] @ e[q])
                    den += w
        out[j] = num / den if den > 0 else np.nan
    return out


def sparse_acts(rng, n, k, topk):
    """Dense [n, k] matrix with `topk` positive entries per row, plus its (indices, values) form."""
    idx = np.stack([rng.choice(k, topk, replace=False) for _ in range(n)]).astype(np.int32)
    val = rng.uniform(0.1, 3.0, size=(n, topk)).astype(np.float16)
    dense = np.zeros((n, k), np.float32)
    np.put_along_axis(dense, idx.astype(np.int64), val.astype(np.float32), axis=1)
    return dense, idx, val


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    n, k, d = 30, 7, 5
    acts = rng.normal(size=(n, k)).astype(np.float32)
    acts[:, 2] = 1.5  # constant -> NaN
    acts[:, 3] = np.maximum(acts[:, 3], 0)  # ReLU-like, min 0
    emb = rng.normal(size=(n, d)).astype(np.float32) + 0.5
    return acts, emb


def test_matches_pair_loop_with_nan(data):
    acts, emb = data
    ref = direct_ms(acts, emb)
    got = sae_vlm.monosemanticity_score(torch.from_numpy(acts), emb, device="cpu").numpy()
    assert np.isnan(got[2]) and np.isnan(ref[2])
    np.testing.assert_allclose(got, ref, atol=1e-6, equal_nan=True)


def test_chunking_invariance(data):
    acts, emb = data
    full = sae_vlm.monosemanticity_score(acts, emb, device="cpu")
    chunked = sae_vlm.monosemanticity_score(acts, emb, device="cpu", chunk_rows=4, chunk_latents=3)
    torch.testing.assert_close(full, chunked, atol=1e-12, rtol=0, equal_nan=True)


def test_sparse_latents_dense_and_store_input():
    rng = np.random.default_rng(1)
    n, k, d = 25, 12, 6
    dense, idx, val = sparse_acts(rng, n, k, 3)
    dense[:, 0] = 0.0  # never fires: dead
    dense[:, 1] = 0.0
    dense[4, 1] = 2.0  # fires on one image only: no weighted pair, undefined
    emb = rng.normal(size=(n, d)).astype(np.float32)
    ref = direct_ms(dense, emb)
    got = sae_vlm.monosemanticity_score(dense, emb, device="cpu").numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, equal_nan=True)
    assert np.isnan(got[0]) and np.isnan(got[1])

    # the same codes as a top-k store: re-derive idx/val from the edited dense matrix
    idx2 = np.argsort(-dense, axis=1, kind="stable")[:, :4].astype(np.int32)
    val2 = np.take_along_axis(dense, idx2.astype(np.int64), axis=1).astype(np.float16)
    store = SimpleNamespace(rows=n, d_sae=k, indices=idx2, values=val2)
    res = ms_stats(store, emb, device="cpu", chunk_rows=7)
    np.testing.assert_allclose(res.ms.numpy(), ref, atol=1e-6, equal_nan=True)
    assert res.support.tolist() == (dense > 0).sum(0).tolist()
    np.testing.assert_allclose(res.max_act.numpy(), dense.max(0), rtol=1e-3)


def test_store_latent_firing_on_every_row():
    # a latent listed in every row has min = its smallest value, not 0
    rng = np.random.default_rng(2)
    n, k, d = 20, 5, 4
    dense = np.zeros((n, k), np.float32)
    dense[:, 0] = rng.uniform(1, 2, n).astype(np.float16)
    dense[np.arange(n), 1 + np.arange(n) % 4] = rng.uniform(0.5, 1, n).astype(np.float16)
    idx = np.argsort(-dense, axis=1, kind="stable")[:, :2].astype(np.int32)
    val = np.take_along_axis(dense, idx.astype(np.int64), axis=1).astype(np.float16)
    emb = rng.normal(size=(n, d))
    ref = direct_ms(dense, emb)
    got = ms_stats(SimpleNamespace(indices=idx, values=val, d_sae=k), emb, device="cpu").ms.numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, equal_nan=True)


def test_chance_level_and_raw_neuron_baseline(data):
    _, emb = data
    e = emb.astype(np.float64)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = e @ e.T
    n = len(e)
    assert math.isclose(chance_similarity(emb), (s.sum() - n) / (n * (n - 1)), abs_tol=1e-9)
    summary = summarize_ms(torch.tensor([0.5, float("nan"), 0.7], dtype=torch.float64), chance=0.4)
    assert summary["unscored"] == 1 and summary["scored"] == 2
    assert math.isclose(summary["mean"], 0.6) and math.isclose(summary["mean_minus_chance"], 0.2)
    assert summary["best"][0] == [2, 0.7]


def test_rotation_baseline(data):
    acts, emb = data
    q = random_rotation(acts.shape[1], seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(acts.shape[1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(q, random_rotation(acts.shape[1], seed=3))
    rot = RotatedSource(acts, seed=3)
    ref = direct_ms(acts @ q.numpy(), emb)
    got = sae_vlm.monosemanticity_score(rot, emb, device="cpu").numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6, equal_nan=True)


def test_device_argument_cpu(data, monkeypatch):
    acts, emb = data
    seen = []
    orig = torch.Tensor.to

    def spy(self, *a, **kw):
        if a and isinstance(a[0], torch.device):
            seen.append(a[0].type)
        return orig(self, *a, **kw)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    sae_vlm.monosemanticity_score(acts, emb, device="cpu")
    assert seen and set(seen) == {"cpu"}
    from sae_vlm.device import resolve_device as _device

    assert _device("cpu").type == "cpu"
    assert _device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_bad_input_messages(data):
    acts, emb = data
    with pytest.raises(ValueError, match="embeddings have 29 rows but activations have 30"):
        sae_vlm.monosemanticity_score(acts, emb[:29])
    with pytest.raises(ValueError, match="empty"):
        sae_vlm.monosemanticity_score(np.zeros((0, 3), np.float32), np.zeros((0, 4)))
    bad = emb.copy()
    bad[5] = 0
    with pytest.raises(ValueError, match="row 5 is all zeros"):
        sae_vlm.monosemanticity_score(acts, bad)


@pytest.mark.parametrize("cut", [0.0, 1.01])
def test_dense_input_sparse_and_matmul_paths(cut, monkeypatch):
    from sae_vlm.eval import ms as ms_mod

    rng = np.random.default_rng(4)
    dense, _, _ = sparse_acts(rng, 40, 16, 2)
    dense[:, 5] -= 1.0  # min -1: zeros are not the minimum here
    emb = rng.normal(size=(40, 3))
    monkeypatch.setattr(ms_mod, "SPARSE_BELOW", cut)
    got = ms_mod.monosemanticity_score(dense, emb, device="cpu", chunk_rows=9, chunk_latents=5).numpy()
    np.testing.assert_allclose(got, direct_ms(dense, emb), atol=1e-6, equal_nan=True)
