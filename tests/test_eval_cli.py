"""`sae-vlm evaluate` end to end: on .npy data, and on a real store with an embedder and iNat folder taxonomy."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.eval.embed import cache_paths, cached_embeddings


def _run(tmp_path, d_in=16, hook="layer.1"):
    torch.manual_seed(0)
    for name, cfg in [
        ("batchtopk_x2_k4", SAEConfig(arch="batchtopk", d_in=d_in, d_sae=2 * d_in, k=4, hook_point=hook,
                                      token_selection="cls")),
        ("matryoshka_x4_k4", SAEConfig(arch="matryoshka", d_in=d_in, d_sae=4 * d_in, k=4,
                                       group_sizes=(8, 24, 4 * d_in - 32), hook_point=hook, token_selection="cls")),
    ]:
        SAE(cfg).save_pretrained(tmp_path / "run" / "saes" / name)
    return tmp_path / "run"


def test_evaluate_npy(tmp_path):
    run = _run(tmp_path)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", rng.normal(size=(60, 16)).astype(np.float32))
    np.save(tmp_path / "emb.npy", rng.normal(size=(60, 8)).astype(np.float32) + 0.5)
    tax = {str(i): f"A/B/C/D/E/F{i % 2}/g{i % 4}" for i in range(60) if i != 7}
    (tmp_path / "tax.json").write_text(json.dumps(tax))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(tmp_path / "acts.npy"), "--embeddings",
                                   str(tmp_path / "emb.npy"), "--taxonomy", str(tmp_path / "tax.json"),
                                   "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert [r["name"] for r in m["saes"]] == ["batchtopk_x2_k4", "matryoshka_x4_k4"]
    mat = m["saes"][1]
    assert len(mat["ms_per_level"]) == 3 and len(mat["hierarchy"]["lca_mean_per_level"]) == 3
    assert m["baselines"]["layer.1"]["no_sae"]["latents"] == 16 and "rotated" in m["baselines"]["layer.1"]
    assert m["taxonomy"]["images_missing"] == 1
    lat = np.load(out / "latents" / "matryoshka_x4_k4.npz")
    assert lat["ms"].shape == (64,) and lat["top_indices"].shape == (64, 16) and lat["lca_mean"].shape == (64,)
    # the per-latent MS is the public function's
    import sae_vlm
    from sae_vlm.eval.top import EncodedSource

    sae = SAE.from_pretrained(run / "saes" / "matryoshka_x4_k4")
    ref = sae_vlm.monosemanticity_score(EncodedSource(sae, np.load(tmp_path / "acts.npy"), device="cpu"),
                                        np.load(tmp_path / "emb.npy"), device="cpu")
    np.testing.assert_allclose(lat["ms"], ref.numpy(), atol=1e-9, equal_nan=True)
    table = (out / "tables.md").read_text()
    assert "| matryoshka | layer.1 |" in table and "No SAE" in table and "×4" in table
    for p in ("fve_vs_width.png", "lca_per_level.png", "ms_levels__matryoshka_x4_k4.png"):
        assert (out / "plots" / p).stat().st_size > 0
    assert not list(out.rglob("*.tmp"))


def test_evaluate_bad_inputs(tmp_path):
    run = _run(tmp_path)
    np.save(tmp_path / "acts.npy", np.ones((10, 16), np.float32))
    np.save(tmp_path / "emb.npy", np.ones((9, 8), np.float32))
    np.save(tmp_path / "empty.npy", np.ones((0, 16), np.float32))
    r = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(tmp_path / "acts.npy"), "--embeddings",
                                 str(tmp_path / "emb.npy"), "--out", str(tmp_path / "o1"), "--quiet"])
    assert r.exit_code == 2 and "emb.npy have shape (9, 8) but the activations have 10 rows" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(tmp_path / "empty.npy"),
                                 "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "evaluation set is empty" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "nothing"), "--data", str(tmp_path / "acts.npy")])
    assert r.exit_code == 2 and "holds no SAEs" in r.output
    assert not (tmp_path / "o1" / "metrics.json").exists()


def test_embedding_cache(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(12, dtype=np.float32).reshape(4, 3)

    a = cached_embeddings(tmp_path, "org/model", 4, compute)
    b = cached_embeddings(tmp_path, "org/model", 4, compute)
    assert len(calls) == 1 and np.array_equal(a, b)
    meta = json.loads(cache_paths(tmp_path, "org/model")[1].read_text())
    assert meta == {"model_id": "org/model", "rows": 4, "dim": 3}
    with pytest.raises(ValueError, match="shape \\(4, 3\\) but the dataset has 5 rows"):
        cached_embeddings(tmp_path, "org/model", 5, compute)


def test_evaluate_store_with_embedder_and_folder_taxonomy(tmp_path):
    from _extract_helpers import make_images, save_tiny_clip

    model_dir = save_tiny_clip(tmp_path / "clip")
    classes = ("00000_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax",
               "00001_Animalia_Chordata_Aves_Passeriformes_Corvidae_Pica_pica", "misc")
    make_images(tmp_path / "imgs", 8, classes=classes, size=(32, 32))
    r = CliRunner().invoke(app, ["extract", "--model", str(model_dir), "--data", str(tmp_path / "imgs"),
                                 "--layers", "1", "--tokens", "cls", "--out", str(tmp_path / "store"), "--quiet",
                                 "--workers", "1"])
    assert r.exit_code == 0, r.output
    run = _run(tmp_path, d_in=32)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(tmp_path / "store"), "--embedder", str(model_dir),
                                 "--out", str(out), "--grids", "2", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "metrics.json").read_text())
    assert m["rows"] == 24 and m["taxonomy"]["images_missing"] == 8  # the "misc" folder has no taxonomy
    miss = m["saes"][0]["hierarchy"]["missing_taxonomy"]
    assert all("misc" in n for n in miss["names"]) and miss["count"] == len(miss["names"])
    assert list((out / "embeddings").glob("embeddings__*.npy"))  # cached in the eval output
    assert not list((tmp_path / "store").glob("embeddings__*"))  # the input store is never written to
    assert len(list((out / "grids" / "batchtopk_x2_k4").glob("*.png"))) == 2
    # embeddings whose sidecar lists other image ids than the store's: a one-line error naming both
    from sae_vlm.data.store import as_source

    ids = [str(i) for i in as_source(tmp_path / "store").image_ids()]
    np.save(tmp_path / "e.npy", np.ones((24, 8), np.float32))
    (tmp_path / "e.json").write_text(json.dumps({"image_ids": ids[::-1]}))
    r = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(tmp_path / "store"), "--embeddings",
                                 str(tmp_path / "e.npy"), "--out", str(tmp_path / "o3"), "--quiet"])
    assert r.exit_code == 2 and "image ids differ at row 0" in r.output and ids[0] in r.output
