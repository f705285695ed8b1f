"""The shared helpers: atomic writes (sae_vlm.io), image opening, dtype/device resolution, the running top-k,
and `evaluate`'s per-source embeddings with its refusal of token stores for MS."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.io import (
    atomic_save_npy,
    atomic_save_npz,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


def test_atomic_writers_round_trip_and_leave_no_temporaries(tmp_path):
    atomic_write_bytes(tmp_path / "a" / "b.bin", b"xy")
    atomic_write_text(tmp_path / "t.txt", "héllo")
    atomic_write_json(tmp_path / "j.json", {"a": 1}, indent=2)
    atomic_save_npy(tmp_path / "x.npy", np.arange(3))
    atomic_save_npz(tmp_path / "z.npz", a=[1, 2], b=np.ones(2))
    atomic_save_safetensors(tmp_path / "m.safetensors", {"w": torch.ones(2)}, metadata={"step": "3"})
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"xy"
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": 1}
    assert np.load(tmp_path / "x.npy").tolist() == [0, 1, 2]
    assert np.load(tmp_path / "z.npz")["a"].tolist() == [1, 2]
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"step": "3"} and f.get_tensor("w").tolist() == [1.0, 1.0]
    atomic_write_text(tmp_path / "t.txt", "again")  # replaces
    assert (tmp_path / "t.txt").read_text() == "again"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_open_image_decodes_like_extraction(tmp_path):
    from PIL import Image

    from sae_vlm.data.images import open_image

    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(tmp_path / "a.png")
    im = open_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (255, 255, 255)  # transparency over white
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image"):
        open_image(tmp_path / "bad.png")
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="tar shard or dataset"):
        open_image(str(tmp_path / "x.tar") + "::a/b.png")


def test_embedder_and_grids_refuse_tar_and_dataset_paths(tmp_path):
    from sae_vlm.eval.embed import backbone_embedder
    from sae_vlm.eval.top import render_grid

    for p in (f"{tmp_path}/x.tar::k.png", "cifar10[3]"):
        with pytest.raises(ValueError, match="--embedder needs a folder or path-list store; pass --embeddings"):
            backbone_embedder("any/model", [p])
        with pytest.raises(ValueError, match="folder or path-list store"):
            render_grid([0], lambda i, p=p: p, tmp_path / "g.png")


def test_resolve_dtype_and_device():
    from sae_vlm.backbones import load_backbone
    from sae_vlm.device import resolve_device, resolve_dtype

    assert resolve_dtype("bf16", "cuda") is torch.bfloat16 and resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("auto", "cuda") is torch.float16
    with pytest.raises(ValueError, match="'fp8' is not understood"):
        resolve_dtype("fp8")
    with pytest.raises(ValueError, match="'fp8' is not understood"):  # before any file is read
        load_backbone("/nonexistent/model", dtype="fp8")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == auto
    assert resolve_device("cpu") == torch.device("cpu")


def test_running_top_matches_a_full_sort():
    from sae_vlm.topk import running_top

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g)
    v, i = running_top(((None, x[r : r + 7]) for r in range(0, 50, 7)), 5)
    ref_v, ref_i = x.T.topk(5, dim=1)
    assert torch.equal(v, ref_v) and torch.equal(i, ref_i)
    v0, i0 = running_top(iter(()), 3, fill=0.0, width=4)
    assert torch.equal(v0, torch.zeros(4, 3)) and (i0 == -1).all()


def test_evaluate_refuses_token_store_for_ms(tmp_path):
    from _extract_helpers import make_images, save_tiny_clip

    model_dir = save_tiny_clip(tmp_path / "clip")
    make_images(tmp_path / "imgs", 4, size=(32, 32))
    r = CliRunner().invoke(app, ["extract", "--model", str(model_dir), "--data", str(tmp_path / "imgs"),
                                 "--layers", "1", "--tokens", "random-2", "--out", str(tmp_path / "store"), "--quiet",
                                 "--workers", "1"])
    assert r.exit_code == 0, r.output
    SAE(SAEConfig(arch="batchtopk", d_in=32, d_sae=64, k=4, hook_point="layer.1", token_selection="random-2")
        ).save_pretrained(tmp_path / "run" / "saes" / "tok")
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "store"), "--embedder",
                                 str(model_dir), "--out", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 2 and "2 rows per image" in r.output and "CLS, mean or pooled store" in r.output
    # without MS the token store still evaluates (reconstruction, top images)
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "store"),
                                 "--out", str(tmp_path / "out2"), "--quiet"])
    assert r.exit_code == 0, r.output


def test_evaluate_two_hook_points_gets_embeddings_per_source(tmp_path):
    from _extract_helpers import make_images, save_tiny_clip

    model_dir = save_tiny_clip(tmp_path / "clip")
    make_images(tmp_path / "imgs", 4, size=(32, 32))
    r = CliRunner().invoke(app, ["extract", "--model", str(model_dir), "--data", str(tmp_path / "imgs"),
                                 "--layers", "0,1", "--tokens", "cls", "--out", str(tmp_path / "store"), "--quiet",
                                 "--workers", "1"])
    assert r.exit_code == 0, r.output
    for hp in ("layer.0", "layer.1"):
        SAE(SAEConfig(arch="batchtopk", d_in=32, d_sae=64, k=4, hook_point=hp, token_selection="cls")
            ).save_pretrained(tmp_path / "run" / "saes" / hp.replace(".", "_"))
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "store"), "--embedder",
                                 str(model_dir), "--out", str(tmp_path / "out"), "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [s["hook_point"] for s in m["saes"]] == ["layer.0", "layer.1"]
    assert all(s["ms"] is not None and "mean" in s["ms"] for s in m["saes"])
    assert set(m["baselines"]) == {"layer.0", "layer.1"}
    assert len(list((tmp_path / "out" / "embeddings").glob("embeddings__*.npy"))) == 1  # same images: one cache
    assert not list((tmp_path / "store").glob("embeddings__*"))
