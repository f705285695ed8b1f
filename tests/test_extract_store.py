"""Extraction end to end: CLI from a saved model dir, store contents and metadata, dtypes, fp16 overflow, codes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _extract_helpers import make_images, save_tiny_clip
from PIL import Image
from typer.testing import CliRunner

from sae_vlm.backbones import load_backbone
from sae_vlm.cli import app
from sae_vlm.config import ExtractConfig
from sae_vlm.data import extract as extract_mod
from sae_vlm.data.extract import run_extract
from sae_vlm.data.store import as_source, open_store, to_storage


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model_dir = save_tiny_clip(root / "tinyclip")
    make_images(root / "imgs", 5)
    (root / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    Image.new("CMYK", (30, 20), (10, 20, 30, 0)).save(root / "imgs" / "cmyk.jpg")
    out = root / "store"
    res = CliRunner().invoke(app, ["extract", "--model", str(model_dir), "--data", str(root / "imgs"),
                                   "--layers", "1,2,last", "--tokens", "cls,mean,random-2,all", "--out", str(out),
                                   "--shard-rows", "4", "--batch-size", "3", "--workers", "2", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return root, model_dir, out, res.output


def test_cli_store_matches_direct_capture(setup):
    root, model_dir, out, output = setup
    assert "11 images kept, 1 skipped" in output
    man = json.loads((out / "manifest.json").read_text())
    assert man["rows"] == 11 and man["revision"] == "local"
    assert man["skipped"] == [
        {"path": str(root / "imgs" / "broken.jpg"), "reason": "not an image (unidentified format)"}
    ]
    subdirs = [f"layer.{i}__{t}" for i in (1, 2) for t in ("cls", "mean", "random-2", "all")] + ["last__pooled"]
    assert sorted(man["subdirs"]) == sorted(subdirs)

    bb = load_backbone(str(model_dir))
    r = open_store(out, layer="layer.2__all")
    ims = r.images()
    assert [im["id"] for im in ims][:2] == [
        "00000_Animalia_Chordata/img_0000.png", "00000_Animalia_Chordata/img_0001.png"
    ]
    assert ims[0]["label"] == "00000_Animalia_Chordata" and ims[-1]["label"] is None  # cmyk.jpg sits at the root
    px = bb.preprocess([Image.open(im["path"]).convert("RGB") for im in ims])
    # --shard-rows 4 makes every image its own shard, and a batch never spans shards: one image per forward
    per_image = [bb.capture(px[i : i + 1], ["layer.1", "layer.2", "last"]) for i in range(len(ims))]
    ref = {k: torch.cat([c[k] for c in per_image]) for k in per_image[0]}
    f16 = lambda t: t.half().float()  # noqa: E731
    T = ref["layer.2"].shape[1]
    assert r.rows == 11 * T and r.d_in == 32 and r.rows_per_image == T
    torch.testing.assert_close(r.all(), f16(ref["layer.2"].reshape(-1, 32)), rtol=0, atol=0)
    torch.testing.assert_close(open_store(out, "layer.1__cls").all(), f16(ref["layer.1"][:, 0]), rtol=0, atol=0)
    torch.testing.assert_close(open_store(out, "1__mean").all(), f16(ref["layer.1"][:, 1:].mean(1)),
                               rtol=1e-3, atol=1e-3)
    last = open_store(out, "last")
    torch.testing.assert_close(last.all(), f16(ref["last"]), rtol=0, atol=0)
    # "last" is the projection (16 wide), not the residual (32): the manifest's width is what rows are read with
    assert last.d_in == 16 and last.manifest["shape"] == [11, 16]
    torch.testing.assert_close(last.get(torch.tensor([3, 0])), f16(ref["last"][[3, 0]]), rtol=0, atol=0)
    rr = open_store(out, "layer.1__random-2")
    tok = rr.token_index()
    want = ref["layer.1"][np.repeat(np.arange(11), 2), torch.from_numpy(tok).long()]
    torch.testing.assert_close(rr.all(), f16(want), rtol=0, atol=0)
    assert rr.image_ids()[:4] == [ims[0]["id"]] * 2 + [ims[1]["id"]] * 2
    assert rr.labels()[0] == "00000_Animalia_Chordata" and rr.paths()[1] == ims[0]["path"]

    # ActivationSource behaviour: get, as_source, shuffled batches cover every row once
    idx = torch.tensor([5, 0, 21, 5])
    torch.testing.assert_close(rr.get(idx), rr.all()[idx])
    src = as_source(out / "layer.1__random-2")
    assert src.rows == 22 and src.d_in == 32
    torch.testing.assert_close(rr.read_rows(3, 17), rr.all()[3:17], rtol=0, atol=0)
    rr.verify()


def test_open_store_errors_and_rerun_is_noop(setup):
    root, model_dir, out, _ = setup
    with pytest.raises(ValueError, match="several layers"):
        open_store(out)
    with pytest.raises(ValueError, match="layer.1__cls"):
        open_store(out, layer="layer.1")  # several token selections at layer.1
    with pytest.raises(ValueError, match="different settings"):
        run_extract(ExtractConfig(model=str(model_dir), data=str(root / "imgs"), out=str(out), layers=("1",),
                                  quiet=True))


def test_dtypes_and_fp16_overflow(setup, tmp_path):
    root, model_dir, _, _ = setup
    bb = load_backbone(str(model_dir))
    for dt in ("bf16", "fp32"):
        out = tmp_path / dt
        run_extract(ExtractConfig(model=str(model_dir), data=str(root / "imgs"), out=str(out), layers=("2",),
                                  tokens=("cls",), dtype=dt, shard_rows=5, quiet=True), backbone=bb)
        r = open_store(out)
        assert r.manifest["dtype"] == dt and r.rows == 11
        ims = r.images()
        px = bb.preprocess([Image.open(im["path"]).convert("RGB") for im in ims])
        ref = bb.capture(px, ["layer.2"])["layer.2"][:, 0]
        got = r.all()
        # the reference runs all 11 images in one batch, extract in per-shard batches: the GEMMs may round
        # differently (they do under MKL's AVX2 kernels), by 1e-6 in fp32 and so by at most one bf16 step
        if dt == "bf16":
            assert torch.equal(got, got.to(torch.bfloat16).float())  # stored as bf16, read back exactly
            torch.testing.assert_close(got, ref, rtol=2**-8, atol=1e-6)
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer.7.*65504"):
        to_storage(torch.tensor([[1.0, 7e4]]), "fp16", "layer.7")
    # through a real run: scale the model's output so the store would overflow
    with bb.patch("layer.2", lambda t: t * 1e5), pytest.raises(ValueError, match="layer.2.*fp16"):
        run_extract(ExtractConfig(model=str(model_dir), data=str(root / "imgs"), out=str(tmp_path / "ovf"),
                                  layers=("2",), tokens=("cls",), quiet=True), backbone=bb)
    assert not (tmp_path / "ovf" / "manifest.json").exists()


def test_code_store_round_trip(setup, tmp_path):
    from sae_vlm.data.codes import CodeStore, write_codes

    _, _, out, _ = setup
    src = open_store(out, "layer.1__all")

    class TinySAE(torch.nn.Module):  # any module with encode(x) -> dense codes works
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.enc = torch.nn.Linear(32, 48)
            self.W_dec = torch.nn.Parameter(torch.randn(48, 32))

        def encode(self, x):
            h = torch.relu(self.enc(x))
            v, i = h.topk(6, dim=1)
            return torch.zeros_like(h).scatter(1, i, v)

    sae = TinySAE()
    cs = write_codes(sae, src, tmp_path / "codes", k=6, batch_size=7, quiet=True)
    dense = sae.encode(src.all()).detach()
    assert isinstance(cs, CodeStore) and cs.rows == src.rows and cs.d_sae == 48
    assert cs.indices.dtype == np.int32 and cs.values.dtype == np.float16 and cs.indices.shape == (src.rows, 6)
    torch.testing.assert_close(CodeStore(tmp_path / "codes").dense(), dense.half().float(), rtol=0, atol=0)
    torch.testing.assert_close(cs.dense(3, 9), dense[3:9].half().float(), rtol=0, atol=0)
    i, v = cs.topk(0, 2)
    assert i.shape == (2, 6) and torch.equal(torch.zeros(2, 48).scatter(1, i, v), cs.dense(0, 2))
    # per-token codes mean-pooled per image
    T = src.rows_per_image
    pooled = write_codes(sae, src, tmp_path / "pooled", k=48, rows_per_group=T, quiet=True)
    assert pooled.rows == 11
    torch.testing.assert_close(pooled.dense(), dense.reshape(11, T, 48).mean(1).half().float(), rtol=0, atol=1e-3)


def test_code_store_with_project_sae(setup, tmp_path):
    sae_mod = pytest.importorskip("sae_vlm.sae.model")
    from sae_vlm.data.codes import write_codes

    _, _, out, _ = setup
    src = open_store(out, "layer.2__cls")
    torch.manual_seed(0)
    sae = sae_mod.SAE(sae_mod.SAEConfig(arch="topk", d_in=32, d_sae=64, k=4))
    with torch.no_grad():
        dense = sae.encode(src.all())
    cs = write_codes(sae, src, tmp_path / "c", batch_size=4, quiet=True)
    assert cs.k == 4
    torch.testing.assert_close(cs.dense(), dense.half().float(), rtol=0, atol=0)


def test_llava_tower_defaults_to_projector_layer(setup, tmp_path):
    from _extract_helpers import tiny_clip_config, tiny_clip_processor
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from sae_vlm.backbones import Backbone

    root, _, _, _ = setup
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=tiny_clip_config(num_hidden_layers=4),
                      text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
                      image_token_index=63)
    bb = Backbone(LlavaForConditionalGeneration(cfg).eval(), tiny_clip_processor(), model_id="tiny-llava")
    s = run_extract(ExtractConfig(model="tiny-llava", data=str(root / "imgs"), out=str(tmp_path / "llava"),
                                  tokens=("random-2",), quiet=True), backbone=bb)
    assert s.store is not None and s.store.subdirs == ["layer.2__random-2"]
    assert open_store(tmp_path / "llava").rows == 22


def test_store_that_does_not_fit_the_disk_is_refused_then_resumes(setup, tmp_path, monkeypatch):
    root, model_dir, _, _ = setup
    out = tmp_path / "store"
    args = ["extract", "--model", str(model_dir), "--data", str(root / "imgs"), "--layers", "1", "--tokens", "all",
            "--out", str(out), "--device", "cpu", "--quiet"]
    real = shutil.disk_usage
    monkeypatch.setattr(extract_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "needs about" in r.stderr and "GB are free" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (out / "manifest.json").exists()
    monkeypatch.setattr(extract_mod.shutil, "disk_usage", real)
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert open_store(out).rows > 0


def test_a_resumed_shard_is_computed_from_the_same_batches(setup, tmp_path, monkeypatch):
    """Batches never span shards, so the shards a resume redoes see exactly the batches of an uninterrupted run
    (whatever --batch-size), and their bytes cannot depend on where the run started."""
    root, model_dir, _, _ = setup
    seen: list[tuple[int, ...]] = []
    run_batch = extract_mod.ShardWriter._run_batch

    def record(self):
        if self.batch:
            seen.append(tuple(i for _, i in self.batch))
        run_batch(self)

    monkeypatch.setattr(extract_mod.ShardWriter, "_run_batch", record)
    out = tmp_path / "s"
    cfg = ExtractConfig(model=str(model_dir), data=str(root / "imgs"), out=str(out), layers=("1",), tokens=("cls",),
                        shard_rows=5, batch_size=3, quiet=True)
    run_extract(cfg)
    full = list(seen)
    assert all(len({i // 5 for i in b}) == 1 for b in full) and max(map(len, full)) == 3
    for p in sorted((out / "parts").glob("shard_*.json"))[1:]:  # as if killed after shard 0
        p.unlink()
    seen.clear()
    run_extract(cfg)
    assert seen == [b for b in full if min(b) >= 5]
    with pytest.raises(ValueError, match="different settings \\(batch_size\\)"):
        run_extract(dataclasses.replace(cfg, batch_size=4))


def test_non_image_files_are_counted_by_extension(setup, tmp_path):
    root, model_dir, _, _ = setup
    shutil.copytree(root / "imgs", tmp_path / "imgs")
    for i in range(3):
        (tmp_path / "imgs" / f"drawing{i}.svg").write_text("<svg/>")
    (tmp_path / "imgs" / "README").write_text("about these images")
    res = CliRunner().invoke(app, ["extract", "--model", str(model_dir), "--data", str(tmp_path / "imgs"), "--layers",
                                   "1", "--tokens", "cls", "--out", str(tmp_path / "s"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "4 files in the folder are not images and were not read (.svg 3, (no extension) 1)" in res.output
    man = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert man["ignored_files"] == {".svg": 3, "(no extension)": 1} and man["rows"] == 11


def test_progress_counts_images_through_the_model(setup, tmp_path, monkeypatch):
    """The bar moves when a batch has been through the model (skipped images at once), not as images decode."""
    root, model_dir, _, _ = setup
    steps: list[int] = []

    class Bar:
        def __init__(self, total, **kw):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            steps.append(n)

    monkeypatch.setattr(extract_mod, "tqdm", Bar)
    run_extract(ExtractConfig(model=str(model_dir), data=str(root / "imgs"), out=str(tmp_path / "s"), layers=("1",),
                              tokens=("cls",), batch_size=4, quiet=False))
    assert sum(steps) == 12 and steps.count(1) >= 1 and max(steps) == 4  # 11 images in batches of 4, 1 skipped


def test_a_store_from_before_batch_size_was_recorded_still_reruns(setup, tmp_path, monkeypatch):
    """A finished store whose config lacks batch_size and holds --data as typed (relative) is the same extraction;
    an unfinished one is not resumed with batches it may not have used."""
    root, model_dir, _, _ = setup
    monkeypatch.chdir(root)
    cfg = ExtractConfig(model=str(model_dir), data="imgs", out=str(tmp_path / "s"), layers=("1",), tokens=("cls",),
                        quiet=True)
    run_extract(cfg)
    cfg_file = tmp_path / "s" / "extract_config.json"
    old = json.loads(cfg_file.read_text())
    del old["batch_size"]
    cfg_file.write_text(json.dumps({**old, "data": "imgs"}))
    assert run_extract(cfg).store.rows == 11
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"different settings \(batch_size\)"):
        run_extract(cfg)


def test_relative_paths_of_an_old_store_resolve_against_the_store_not_the_working_directory(setup, tmp_path,
                                                                                          monkeypatch):
    """Stores before #16 recorded paths relative to where extract ran. They resolve against the nearest folder above
    the store that holds them, so same-named files under the working directory are never read; a store moved away
    from its images is one error naming the store."""
    root, _, out, _ = setup
    proj, decoy = tmp_path / "proj", tmp_path / "elsewhere"
    shutil.copytree(root / "imgs", proj / "imgs")
    shutil.copytree(root / "imgs", decoy / "imgs")
    shutil.copytree(out, proj / "stores" / "s")
    sub = proj / "stores" / "s" / "layer.1__cls"
    rows_file = sub / json.loads((sub / "manifest.json").read_text())["rows_file"]
    recs = [json.loads(line) for line in rows_file.read_text().splitlines() if line]
    for r in recs:
        r["path"] = str(Path(r["path"]).relative_to(root))  # "imgs/…", as an old store run from `root` held it
    rows_file.write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.chdir(decoy)
    reader = open_store(proj / "stores" / "s", "layer.1__cls")
    want = [str(proj / r["path"]) for r in recs for _ in range(reader.rows // len(recs))]
    assert reader.paths() == want and all(Path(p).is_file() for p in want)
    assert reader.paths(resolve=False)[0].startswith("imgs")
    shutil.move(proj / "stores", tmp_path / "moved")
    with pytest.raises(ValueError, match=r"moved/s/layer\.1__cls: image paths are relative .* under no folder above"):
        open_store(tmp_path / "moved" / "s", "layer.1__cls").paths()
