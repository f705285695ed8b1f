"""Steering: the intervention hook, batched LLaVA generation, the steering score and the CLI, on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _steer_helpers import VOCAB, save_tiny_clip_model, save_tiny_llava, tiny_sae
from PIL import Image

import sae_vlm
from sae_vlm.backbones import Backbone
from sae_vlm.steer import score as S
from sae_vlm.steer.generate import Case, build_prompt, generate_cases, load_llava
from sae_vlm.steer.intervene import make_edit_fn

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def llava(llava_dir):
    return load_llava(str(llava_dir), device="cpu", dtype="auto")


@pytest.fixture(scope="module")
def sae():
    return tiny_sae()


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 40), c) for c in COLORS]


def _inputs(processor, imgs, prompts):
    tok = processor.tokenizer
    tok.padding_side = "left"
    return processor(images=list(imgs), text=[build_prompt(processor, p) for p in prompts], return_tensors="pt",
                     padding=True)


def _active_latent(model, sae, img, processor):
    bb = Backbone(model, processor=processor.image_processor)
    x = bb.capture(bb.preprocess([img]), [bb.default_layer])[bb.default_layer]
    codes = sae.encode(x.float().reshape(-1, x.shape[-1]))
    return int(codes.sum(0).argmax()), codes


def _n_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


@torch.no_grad()
def test_hook_changes_logits_then_is_removed(llava, sae, images):
    model, proc = llava
    inp = _inputs(proc, images[:2], ["what is shown", "write me a short love poem"])
    base = model(**inp).logits
    n0 = _n_hooks(model)
    j, _ = _active_latent(model, sae, images[0], proc)
    with sae_vlm.intervene(model, None, sae, {j: ("clamp", 50.0)}):
        assert _n_hooks(model) == n0 + 1
        steered = model(**inp).logits
    assert not torch.allclose(steered, base)
    assert _n_hooks(model) == n0
    assert torch.equal(model(**inp).logits, base)
    with pytest.raises(RuntimeError, match="boom"):  # removed on exceptions too
        with sae_vlm.intervene(model, None, sae, {j: ("add", 5.0)}):
            raise RuntimeError("boom")
    assert _n_hooks(model) == n0
    assert torch.equal(model(**inp).logits, base)


@torch.no_grad()
def test_error_term_without_edits_is_exactly_the_model(llava, sae, images):
    model, proc = llava
    inp = _inputs(proc, images[:3], ["what is shown"] * 3)
    base = model(**inp).logits
    for edits in ({}, [{}, None, {}], None):
        with sae_vlm.intervene(model, None, sae, edits, error_term=True):
            assert torch.equal(model(**inp).logits, base)
    t = torch.randn(2, 5, 32)
    assert make_edit_fn(sae, {})(t) is t  # the input tensor itself, bit-identical
    with sae_vlm.intervene(model, None, sae, {}, error_term=False):  # paper mode: the SAE is spliced in
        assert not torch.allclose(model(**inp).logits, base)


@pytest.mark.parametrize("arch", ["batchtopk", "topk"])
@torch.no_grad()
def test_edit_math_ops_positions_and_modes(arch):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(1)
    m = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)).eval()
    bb = Backbone(m)
    sae = tiny_sae(arch=arch, hook_point="layer.0")
    px = torch.randn(2, 3, 32, 32)
    x = bb.capture(px, ["layer.0"])["layer.0"]  # [2, 17, 32]
    codes = sae.encode(x)
    for op, v in [("clamp", 7.0), ("add", 3.0), ("scale", 2.0), ("zero", None)]:
        edits = {5: (op, v), 9: ("clamp", 1.5)}
        edited = codes.clone()
        col = edited[..., 5]
        edited[..., 5] = {"clamp": 7.0, "add": col + 3.0, "scale": col * 2.0, "zero": 0.0}[op]
        edited[..., 9] = 1.5
        with sae_vlm.intervene(m, "layer.0", sae, edits):
            got = bb.capture(px, ["layer.0"])["layer.0"]
        torch.testing.assert_close(got, sae.decode(edited) + (x - sae.decode(codes)), rtol=1e-5, atol=1e-4)
        with sae_vlm.intervene(m, "layer.0", sae, edits, error_term=False):
            got = bb.capture(px, ["layer.0"])["layer.0"]
        torch.testing.assert_close(got, sae.decode(edited), rtol=1e-5, atol=1e-4)
    with sae_vlm.intervene(m, "layer.0", sae, {5: ("clamp", 9.0)}, positions=[0, -1]):
        got = bb.capture(px, ["layer.0"])["layer.0"]
    assert torch.equal(got[:, 1:-1], x[:, 1:-1])  # untouched tokens are bit-identical
    assert not torch.allclose(got[:, 0], x[:, 0])


@torch.no_grad()
def test_per_item_edits_equal_separate_runs(llava, sae, images):
    model, proc = llava
    prompts = ["what is shown", "write me a short love poem", "describe the image"]
    edits = [{3: ("clamp", 40.0)}, None, {7: ("add", 20.0), 3: ("zero",)}]
    inp = _inputs(proc, images[:3], prompts)
    with sae_vlm.intervene(model, None, sae, edits):
        batched = model(**inp).logits[:, -1]
    for i in range(3):
        one = _inputs(proc, images[i : i + 1], prompts[i : i + 1])
        with sae_vlm.intervene(model, None, sae, [edits[i]]):
            single = model(**one).logits[:, -1]
        torch.testing.assert_close(batched[i : i + 1], single, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 per-item edit sets"):
        with sae_vlm.intervene(model, None, sae, edits[:2]):
            model(**inp)


def test_clear_errors(llava, sae):
    from transformers import CLIPConfig, CLIPModel

    model, _ = llava
    wide = tiny_sae(d_in=48)
    with pytest.raises(ValueError, match=r"d_in=48 .*width 32"):
        with sae_vlm.intervene(model, None, wide, {1: ("clamp", 1.0)}):
            pass
    with pytest.raises(ValueError, match="latent id 64 is out of range"):
        with sae_vlm.intervene(model, None, sae, {64: ("clamp", 1.0)}):
            pass
    with pytest.raises(ValueError, match="unknown edit op 'set'"):
        with sae_vlm.intervene(model, None, sae, {1: ("set", 1.0)}):
            pass
    with pytest.raises(ValueError, match="needs a value"):
        with sae_vlm.intervene(model, None, sae, {1: ("add",)}):
            pass
    clip = CLIPModel(CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, vocab_size=64),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8),
                                projection_dim=16)).eval()
    with pytest.raises(ValueError, match=r"d_in=32 .*width 16 of hook point 'last'"):  # projection dim, not hidden
        with sae_vlm.intervene(clip, "last", sae, {}):
            pass
    with sae_vlm.intervene(clip, "last", tiny_sae(d_in=16, hook_point="last"), {1: ("clamp", 2.0)}):
        pass


def test_batched_generation_equals_one_by_one(llava, sae, images):
    model, proc = llava
    prompts = ["what is shown", "write me a short love poem please"]
    cases = [Case(images[i % 4], prompts[i % 2], None if i == 0 else {i % 5: ("clamp", 30.0 * (i % 3))})
             for i in range(7)]
    batched = generate_cases(model, proc, sae, cases, max_new_tokens=6, batch_size=7)
    single = generate_cases(model, proc, sae, cases, max_new_tokens=6, batch_size=1)
    chunked = generate_cases(model, proc, sae, cases, max_new_tokens=6, batch_size=3, error_term=True)
    assert batched == single == chunked
    assert all(isinstance(t, str) and t for t in batched)


def test_select_latents_and_concepts():
    alive = np.ones(64, bool)
    alive[[2, 40]] = False
    assert S.select_latents("1,2,3", alive) == [1, 3]  # dead excluded
    assert S.select_latents("0-4,10", alive) == [0, 1, 3, 4, 10]
    r1, r2 = S.select_latents("random:5", alive, seed=3), S.select_latents("random:5", alive, seed=3)
    assert r1 == r2 and len(r1) == 5 and 2 not in r1 and 40 not in r1
    assert S.select_latents("level:1", alive, (16, 48)) == [j for j in range(16, 64) if j != 40]
    assert len(S.select_latents("level:0:4", alive, (16, 48))) == 4
    with pytest.raises(ValueError, match="no Matryoshka levels"):
        S.select_latents("level:0", alive, None)
    with pytest.raises(ValueError, match="out of range"):
        S.select_latents("70", alive)
    emb = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_allclose(S.concept_embeddings(np.array([[0, 2, -1]]), emb), [[2.0, 3.0]])
    assert S.first_word("  Pencil. is here") == "Pencil" and S.first_word("") == ""


def test_steering_score_end_to_end(llava, sae, images, tmp_path):
    model, proc = llava
    embedder = S.ClipEmbedder.load(str(save_tiny_clip_model(tmp_path / "clip")))
    vals, idx = S.top_images(model, sae, images, processor=proc, top=4, batch_size=4)
    assert vals.shape == idx.shape == (64, 4)
    alive = S.alive_latents(idx, vals)
    chosen = S.select_latents("random:3", alive, seed=0)
    emb = embedder.images(images)
    concept = S.concept_embeddings(idx[chosen], emb)
    res = S.steering_score(model, proc, sae, embedder, latents=chosen, concept_JD=concept, images=images[:2],
                           alpha=100.0, class_names=["red", "green"], batch_size=4)
    assert res["steered"]["n"] == res["unsteered"]["n"] == len(chosen) * 2
    for key in ("steered", "unsteered"):
        assert np.isfinite(res[key]["mean"])
    assert set(res["bounds"]) == {"upper", "lower"} and np.isfinite(res["bounds"]["upper"]["mean"])
    assert len(res["pairs"]) == len(chosen) * 2 and all(-1 <= p["score"] <= 1 for p in res["pairs"])


def test_cli_steer_and_steer_score(llava_dir, sae, tmp_path):
    from typer.testing import CliRunner

    from sae_vlm.cli import app

    sae.save_pretrained(tmp_path / "sae")
    out = tmp_path / "steer.json"
    r = CliRunner().invoke(app, ["steer", "--llava", str(llava_dir), "--sae", str(tmp_path / "sae"), "--latents",
                                 "3,7", "--alpha", "0,30", "--image", "white", "--prompt", "write me a poem",
                                 "--max-new-tokens", "4", "--batch-size", "3", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 1 + 2 * 2 and all("output" in row for row in rows)
    assert all(row["output"] and 1 <= len(row["token_ids"]) <= 4 and row["batch_seconds"] > 0 for row in rows)
    assert "latent" in r.output and "output" in r.output and rows[-1]["output"][:20] in r.output

    pool = tmp_path / "pool"
    for c in COLORS[:4]:
        (pool / c).mkdir(parents=True)
        for s in (36, 48):
            Image.new("RGB", (s, s), c).save(pool / c / f"{s}.png")
    out2 = tmp_path / "score.json"
    r = CliRunner().invoke(app, ["steer-score", "--llava", str(llava_dir), "--sae", str(tmp_path / "sae"), "--clip",
                                 str(save_tiny_clip_model(tmp_path / "clip")), "--images", "white", "--pool",
                                 str(pool), "--latents", "random:3", "--batch-size", "8", "--out", str(out2),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(out2.read_text())
    assert res["bounds"]["source"] == "pool: first image of each class" and np.isfinite(res["steered"]["mean"])
    assert res["bounds"]["upper"]["n"] == 4  # one image per colour folder, as imagenet_subset.py picks them
    assert "upper bound" in r.output

    # "images × few latents" with a precomputed top table (eval/top.py's files) and bounds from the class folders
    from sae_vlm.data.images import FolderSource
    from sae_vlm.topk import save_top

    src = FolderSource(pool)
    model, proc = load_llava(str(llava_dir))
    vals, idx = S.top_images(model, sae, [Image.open(r.path).convert("RGB") for r in src.records], processor=proc)
    save_top(tmp_path / "top", vals, idx)
    out3 = tmp_path / "score3.json"
    r = CliRunner().invoke(app, ["steer-score", "--llava", str(llava_dir), "--sae", str(tmp_path / "sae"), "--clip",
                                 str(tmp_path / "clip"), "--images", str(pool), "--per-class", "1", "--top",
                                 str(tmp_path / "top" / "top_indices.npy"), "--top-images", str(pool),
                                 "--latents", "0,1,2,3,4,5", "--error-term", "--out", str(out3), "--quiet"])
    assert r.exit_code == 0, r.output
    res = json.loads(out3.read_text())
    assert res["bounds"]["source"] == "steered images" and len(res["settings"]["images"]) == 4
    assert res["steered"]["n"] == 4 * len(res["settings"]["latents"])


@torch.no_grad()
def test_other_backbones_and_pooled_hook_point():
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
    px = torch.randn(2, 3, 32, 32)
    for m in (Dinov2Model(Dinov2Config(**small)).eval(), SiglipVisionModel(SiglipVisionConfig(**small)).eval()):
        sae = tiny_sae(hook_point=None)
        base = m(pixel_values=px).pooler_output
        with sae_vlm.intervene(m, "last", sae, [{}, {3: ("clamp", 5.0)}]):  # pooled [B, D] output, item 0 unedited
            got = m(pixel_values=px).pooler_output
        assert torch.equal(got[0], base[0]) and not torch.allclose(got[1], base[1])
        with sae_vlm.intervene(m, "layer.0", sae, {3: ("clamp", 5.0)}):
            assert not torch.allclose(m(pixel_values=px).pooler_output, base)
        assert torch.equal(m(pixel_values=px).pooler_output, base)


def test_an_answer_that_ends_at_once_is_shown_as_eos(tmp_path, sae):
    """A LLaVA whose generation config suppresses every token but end-of-sequence answers with EOS first: the JSON
    and the printed table say `<eos>` (not a blank cell) and keep that one token id."""
    from transformers import GenerationConfig
    from typer.testing import CliRunner

    from sae_vlm.cli import app

    llava = save_tiny_llava(tmp_path / "llava")
    gen = GenerationConfig.from_pretrained(llava)
    gen.suppress_tokens = [v for v in range(VOCAB) if v != gen.eos_token_id]
    gen.save_pretrained(llava)
    sae.save_pretrained(tmp_path / "sae")
    out = tmp_path / "steer.json"
    r = CliRunner().invoke(app, ["steer", "--llava", str(llava), "--sae", str(tmp_path / "sae"), "--latents", "3",
                                 "--alpha", "0,30", "--image", "white", "--prompt", "say something",
                                 "--max-new-tokens", "4", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 3 and all(row["output"] == "<eos>" and row["token_ids"] == [gen.eos_token_id]
                                  for row in rows)
    assert r.output.count("<eos>") == 3
