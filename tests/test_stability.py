"""Dictionary stability: latent matching against planted answers, the sparse path against the dense one, the
correlation of matched pairs, a seed sweep through `evaluate`, `sae-vlm compare`, and the browser's stable column."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from test_train import sparse_dictionary_data
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.config import TrainConfig
from sae_vlm.data.store import as_source
from sae_vlm.eval.stability import match_latents, matched_correlation, stable_per_latent

BASE = "topk_x1_k3"
NAMES = [f"{BASE}_s{s}" for s in (0, 1, 2)]


def _unit(rng, n, d):
    w = rng.normal(size=(n, d))
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def _cos(a, b):
    a, b = (w / np.linalg.norm(w, axis=1, keepdims=True) for w in (a, b))
    return a @ b.T


def test_planted_permutation_is_recovered():
    """B's decoder = A's rows permuted, rescaled and slightly perturbed: the match is the permutation, cos ≈ 1."""
    rng = np.random.default_rng(0)
    A = _unit(rng, 200, 24)
    perm = rng.permutation(200)  # B row i is A row perm[i]
    B = (A[perm] + 0.02 * rng.normal(size=A.shape)) * rng.uniform(0.5, 3, (200, 1))
    m = match_latents(A, B)
    assert m.method == "dense"
    assert np.array_equal(m.a_of_b, perm) and np.array_equal(m.b_of_a[perm], np.arange(200))
    assert m.cos_a.min() > 0.99 and np.allclose(m.cos_a[perm], m.cos_b)
    np.testing.assert_allclose(m.cos_b, np.diag(_cos(A[perm], B)), atol=1e-6)
    with pytest.raises(ValueError, match="decoders have widths 24 and 23"):
        match_latents(A, B[:, :23])


@pytest.mark.parametrize("dense_max", [10_000, 0])  # the dense solver, and the candidate-pair path
def test_rectangular_match(dense_max):
    """A narrower B (a subset of A's latents): each B latent finds its source and the rest of A stays unmatched;
    a wider B (A's latents plus unrelated ones): every A latent finds its copy, the extra B latents none."""
    rng = np.random.default_rng(1)
    A = _unit(rng, 120, 32)
    pick = rng.permutation(120)[:70]
    m = match_latents(A, A[pick] + 0.01 * rng.normal(size=(70, 32)), dense_max=dense_max)
    assert np.array_equal(m.a_of_b, pick) and m.cos_b.min() > 0.99
    unmatched = np.setdiff1d(np.arange(120), pick)
    assert (m.b_of_a[unmatched] == -1).all() and np.isnan(m.cos_a[unmatched]).all()
    wide = np.concatenate([A, _unit(rng, 50, 32)])[perm := rng.permutation(170)]
    m = match_latents(A, wide, dense_max=dense_max)
    assert np.array_equal(perm[m.b_of_a], np.arange(120)) and m.cos_a.min() > 0.999
    assert (m.a_of_b[perm >= 120] == -1).all() and np.isnan(m.cos_b[perm >= 120]).all()


def test_sparse_path_agrees_with_dense():
    """Two seeds' worth of dictionary: half the latents shared (noisy), half unrelated. Forcing the candidate-pair
    path on a size both can solve: every shared latent gets the same partner, and the total cosine is the
    optimum's (unrelated latents, whose cosines are all small and close, may pair differently at no loss)."""
    rng = np.random.default_rng(2)
    F, d = 1500, 32
    A = _unit(rng, F, d)
    B = A.copy()
    B[F // 2 :] = _unit(rng, F - F // 2, d)
    perm = rng.permutation(F)
    B = B[perm] + 0.1 * rng.normal(size=(F, d))
    dense = match_latents(A, B)
    sparse = match_latents(A, B, dense_max=1000)  # the default 32 candidates a latent
    assert (dense.method, sparse.method) == ("dense", "sparse")
    shared = np.flatnonzero(perm < F // 2)  # B rows that copy an A row
    assert np.array_equal(sparse.a_of_b[shared], dense.a_of_b[shared]) and np.array_equal(perm[shared],
                                                                                         dense.a_of_b[shared])
    assert np.sort(sparse.b_of_a).tolist() == list(range(F))  # one to one
    assert sparse.cos_a.sum() == pytest.approx(dense.cos_a.sum(), rel=1e-4)
    r, c = linear_sum_assignment(_cos(A, B), maximize=True)  # the optimum, straight from scipy
    assert dense.cos_a.sum() == pytest.approx(_cos(A, B)[r, c].sum(), rel=1e-7)  # float32 cosines


def test_leftover_rounds_complete_the_matching():
    """Candidates that admit no full matching (all of A points at one B latent, m = 1): further rounds with a
    doubled m still match every latent one to one, and the shared direction's pair is kept."""
    rng = np.random.default_rng(3)
    u = _unit(rng, 1, 16)
    A = u + 0.05 * rng.normal(size=(40, 16))
    B = np.concatenate([_unit(rng, 39, 16), u])
    m = match_latents(A, B, dense_max=4, top_m=1)
    assert m.method == "sparse" and sorted(m.b_of_a.tolist()) == list(range(40))
    assert m.a_of_b[39] >= 0 and m.cos_b[39] > 0.9


def test_without_scipy_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(ValueError, match=r"needs scipy: pip install 'sae-vlm\[stability\]'"):
        match_latents(np.eye(3), np.eye(3))


def _saes(d=16, seed=0):
    torch.manual_seed(seed)
    a = SAE(SAEConfig(arch="topk", d_in=d, d_sae=48, k=6)).eval()
    b = SAE(SAEConfig(arch="relu", d_in=d, d_sae=32)).eval()
    return a, b


def test_matched_correlation_is_pearson_of_the_codes():
    """Against numpy's corrcoef of each matched pair's codes (inference mode), on all rows and on a row cap."""
    a, b = _saes()
    x = torch.randn(300, 16)
    m = match_latents(a.W_dec.detach(), b.W_dec.detach())
    with torch.no_grad():
        ca, cb = a.encode(x).double().numpy(), b.encode(x).double().numpy()

    def ref(rows):
        out = np.full(48, np.nan)
        for i in np.flatnonzero(m.b_of_a >= 0):
            u, v = ca[rows, i], cb[rows, m.b_of_a[i]]
            if u.std() > 0 and v.std() > 0:
                out[i] = np.corrcoef(u, v)[0, 1]
        return out

    got = matched_correlation(a, b, m, as_source(x), chunk_rows=64)
    want = ref(np.arange(300))
    assert np.isnan(got[m.b_of_a < 0]).all() and (m.b_of_a >= 0).sum() == 32
    np.testing.assert_allclose(got, want, atol=1e-6, equal_nan=True)  # float32 codes, encoded in other chunks
    assert np.isfinite(want).sum() > 10
    rows = np.unique(np.linspace(0, 299, 50).round().astype(int))
    np.testing.assert_allclose(matched_correlation(a, b, m, as_source(x), rows=50, chunk_rows=16), ref(rows),
                               atol=1e-6, equal_nan=True)  # float32 codes, encoded in other chunks


# --- a seed sweep, trained and evaluated ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def seed_run(tmp_path_factory, one_thread):
    """topk x1, k=3 trained with seeds 0,1,2 on data exactly 3-sparse in 32 directions (d=32), then `evaluate`
    with embeddings (MS) and a taxonomy (hierarchy)."""
    from sae_vlm.sae import trainer

    root = tmp_path_factory.mktemp("seeds")
    x, dirs_KD = sparse_dictionary_data(rows=4096, d=32, n_dirs=32, active=3, seed=0)
    cfg = TrainConfig(data="synthetic", out=str(root / "run"), archs=("topk",), expansions=(1,), ks=(3,),
                      batch_size=512, steps=600, lr=0.01, warmup_steps=20, threshold_start_step=50, log_every=100,
                      device="cpu", quiet=True, seeds=(0, 1, 2))
    trainer.train(cfg, source=x)
    np.save(root / "x.npy", x[:1024].numpy())
    rng = np.random.default_rng(0)
    np.save(root / "emb.npy", rng.normal(size=(1024, 8)).astype(np.float32) + 0.5)
    (root / "tax.json").write_text(json.dumps({str(i): f"A/B/C/D/E/F{i % 3}/g{i % 5}" for i in range(1024)}))
    r = CliRunner().invoke(app, ["evaluate", str(root / "run"), "--data", str(root / "x.npy"), "--embeddings",
                                 str(root / "emb.npy"), "--taxonomy", str(root / "tax.json"), "--quiet",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return root, r.output, dirs_KD


def _spread(values):
    return {"mean": pytest.approx(float(np.mean(values))), "min": pytest.approx(min(values)),
            "max": pytest.approx(max(values))}


def test_evaluate_summarises_seeds(seed_run):
    root, output, _ = seed_run
    m = json.loads((root / "run" / "eval" / "metrics.json").read_text())
    by = {r["name"]: r for r in m["saes"]}
    assert sorted(by) == NAMES
    s = m["seeds"][BASE]
    assert s["seeds"] == [0, 1, 2] and s["saes"] == NAMES
    rs = [by[n] for n in NAMES]
    assert s["ms"] == _spread([r["ms"]["mean"] for r in rs])
    for key in ("fve", "l0", "dead_frac"):
        assert s[key] == _spread([r["recon"][key] for r in rs]), key
    assert s["stable_share"] == _spread([r["stable_share"] for r in rs])
    [level] = s["hierarchy"]["lca_mean_per_level"]  # one level: a plain top-k SAE
    assert level == {"level": 0, **_spread([r["hierarchy"]["lca_mean_per_level"][0]["mean"] for r in rs])}
    line = next(ln for ln in output.splitlines() if ln.startswith(f"{BASE} over seeds 0,1,2: MS "))
    assert f"FVE {100 * s['fve']['mean']:.1f}% [{100 * s['fve']['min']:.1f}..{100 * s['fve']['max']:.1f}]" in line


def test_stable_is_the_minimum_matched_cosine_over_other_seeds(seed_run):
    """`stable` in each npz against an independent recomputation (scipy on the full cosine matrix of each pair of
    seeds); stable_share is its share ≥ 0.9. On this easy data most latents are stable: measured 0.56-0.75 over
    data seeds 0-5 (0.5625 for seed 0, the one used here), and never fewer stable latents than planted directions
    that all three seeds recover at cos ≥ 0.975 (pairwise ≥ 0.90). Unrelated dictionaries: 0."""
    from safetensors.torch import load_file

    root, _, dirs_KD = seed_run
    W = [load_file(root / "run" / "saes" / n / "model.safetensors")["W_dec"].double().numpy() for n in NAMES]
    by = {r["name"]: r for r in json.loads((root / "run" / "eval" / "metrics.json").read_text())["saes"]}
    for a, name in enumerate(NAMES):
        ref = np.full(len(W[a]), np.inf)
        for b in range(3):
            if b != a:
                c = _cos(W[a], W[b])
                r, col = linear_sum_assignment(c, maximize=True)
                ref[r] = np.minimum(ref[r], c[r, col])
        lat = np.load(root / "run" / "eval" / "latents" / f"{name}.npz")
        np.testing.assert_allclose(lat["stable"], ref, atol=1e-5)
        assert {"ms", "top_indices", "fire_freq"} <= set(lat.files)  # the other arrays are kept
        assert by[name]["stable_share"] == pytest.approx(np.mean(ref >= 0.9))
        assert by[name]["stable_share"] >= 0.45
    common = np.all([(_cos(w, dirs_KD.double().numpy()).max(0) >= 0.975) for w in W], axis=0).sum()
    assert min((np.load(root / "run" / "eval" / "latents" / f"{n}.npz")["stable"] >= 0.9).sum() for n in NAMES) >= (
        common - 2)
    rng = np.random.default_rng(5)
    unrelated = stable_per_latent([W[0], _unit(rng, 32, 32), _unit(rng, 32, 32)])
    assert (unrelated[0] < 0.9).all()


def test_compare_cli(seed_run, tmp_path):
    root, _, _ = seed_run
    sa, sb = (root / "run" / "saes" / n for n in NAMES[:2])
    out = tmp_path / "cmp.json"
    args = ["compare", str(sa), str(sb), "--data", str(root / "x.npy"), "--rows", "500", "--out", str(out),
            "--device", "cpu"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    lat = res["latents"]
    stable_a = np.load(root / "run" / "eval" / "latents" / f"{NAMES[0]}.npz")["stable"]
    assert res["matched"] == 32 and res["method"] == "dense" and res["rows"] == 500
    assert np.all(np.asarray(lat["cos_a"]) >= stable_a - 1e-6)  # stable is a minimum over seeds 1 and 2
    share = np.mean(np.asarray(lat["cos_a"]) >= 0.9)
    assert res["cosine"]["share_at_least"]["0.9"] == pytest.approx(share)
    assert "decoder cosine: min" in r.output and f"≥ 0.9: {100 * share:.1f}%" in r.output
    assert "activation correlation over 500 rows" in r.output
    corr = np.array([np.nan if v is None else v for v in lat["corr_a"]])
    assert np.nanmedian(corr) > 0.8  # directions that match also fire together
    assert [lat["corr_b"][j] for j in lat["b_of_a"]] == lat["corr_a"]
    assert CliRunner().invoke(app, args).exit_code == 0  # its own earlier output is replaced

    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    r = CliRunner().invoke(app, ["compare", str(sa), str(sb), "--out", str(foreign)])
    assert r.exit_code == 2 and "is not an earlier sae-vlm compare result" in r.output
    assert foreign.read_text() == '{"mine": 1}'
    r = CliRunner().invoke(app, ["compare", str(sa), str(tmp_path / "nope")])
    assert r.exit_code == 2 and "nope is not an SAE directory" in r.output
    SAE(SAEConfig(arch="topk", d_in=16, d_sae=32, k=2)).save_pretrained(tmp_path / "narrow")
    r = CliRunner().invoke(app, ["compare", str(sa), str(tmp_path / "narrow")])
    assert r.exit_code == 2 and "SAE_A reads d_in=32 and SAE_B d_in=16" in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_browser_stable_column_and_filter(seed_run, tmp_path):
    from fastapi.testclient import TestClient

    from sae_vlm.browse.app import create_app
    from sae_vlm.browse.data import RunView, TableQuery
    from sae_vlm.browse.report import write_report

    root, _, _ = seed_run
    view = RunView(root / "run")
    name = NAMES[1]
    stable = np.load(root / "run" / "eval" / "latents" / f"{name}.npz")["stable"]
    c = TestClient(create_app(view))
    page = c.get(f"/sae/{name}", params={"show": "all", "sort": "stable", "order": "desc", "stable_min": "0.9"})
    assert page.status_code == 200 and f"{int((stable >= 0.9).sum())} latents match" in page.text
    assert 'id="sort-stable"' in page.text and 'name="stable_min" value="0.9"' in page.text
    ids = view.get(name).select(TableQuery.parse({"show": "all", "sort": "stable"}))
    assert np.all(np.diff(stable[ids]) <= 0)
    assert "in every other seed at cosine ≥ 0.9" in c.get("/").text  # the index's stable share column
    assert 'id="stable"' in c.get(f"/sae/{name}/latent/0").text
    write_report(view, tmp_path / "report", top=5)
    assert '<th data-key="stable">' in (tmp_path / "report" / "s" / f"{name}.html").read_text()


def test_tables_without_seeds_are_unchanged():
    """A dictionary with no `stable` array keeps the columns and filters it had before seeds existed."""
    from types import SimpleNamespace

    from sae_vlm.browse.data import Dictionary, TableQuery
    from sae_vlm.browse.render import COLUMNS, Links, make_env, table_context

    arrays = {"ms": np.linspace(0, 1, 8), "support": np.full(8, 20.0), "freq": np.full(8, 0.2), "max_act": np.ones(8)}
    plain = Dictionary("plain", "sae", "layer.1", 8, arrays, np.zeros(8, np.int64), None, np.ones((8, 16)))
    view = SimpleNamespace(embedder=None)
    ctx = table_context(view, plain, Links(), TableQuery())  # type: ignore[arg-type]
    assert ctx["columns"] == COLUMNS and ctx["values"] == ["ms", "freq", "support", "max_act"]
    html = make_env().get_template("table.html").render(**ctx)
    assert "stable" not in html and "8 latents match" in html
    plain.arrays["stable"] = np.linspace(0.5, 1, 8)
    ctx = table_context(view, plain, Links(), TableQuery.parse({"stable_min": "0.9"}))  # type: ignore[arg-type]
    assert ctx["columns"][-1] == ("stable", "stable") and ctx["total"] == int((plain.arrays["stable"] >= 0.9).sum())
