"""The toy world: a deterministic generator with consistent ground truth, and shipped models that load and work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_vlm import toyworld
from sae_vlm.eval.hierarchy import parse_inat_label
from sae_vlm.toyworld import text as T
from sae_vlm.toyworld import world as W


@pytest.fixture(scope="module")
def samples():
    return W.generate(40, seed=3)


def test_generator_is_deterministic(samples):
    again = W.generate(40, seed=3)
    assert [s.caption for s in again] == [s.caption for s in samples]
    assert np.array_equal(W.to_array(again), W.to_array(samples))
    # sample i depends on (seed, i) only: a prefix or an offset run gives the same samples
    assert np.array_equal(W.to_array(W.generate(5, seed=3, start=10)), W.to_array(samples[10:15]))
    other = W.generate(40, seed=4)
    assert [s.caption for s in other] != [s.caption for s in samples]
    assert samples[0].image.size == (W.IMAGE_SIZE, W.IMAGE_SIZE) and samples[0].image.mode == "RGB"


def test_captions_match_labels(samples):
    for s in samples:
        (o,) = s.labels["objects"]
        words = s.caption.split()
        assert words[1:6] == [o["size"], o["pattern"], o["shade"], o["colour"], o["shape"]]
        assert " ".join(words[8:10]) == W.POSITION_WORDS[o["position"]]
        assert s.caption.endswith(f" on a {s.background} background") and s.labels["count"] == 1
        assert o["kingdom"] == W.KINGDOM_OF[o["shape"]] and o["shape"] == W.SHAPE_OF[o["colour"]]
        assert s.answer("one_word") == o["shape"] and s.answer("colour") == o["colour"]
        assert s.answer("shade") == o["shade"] and s.answer("pattern") == o["pattern"]


def test_the_taxonomy_is_a_tree_whose_traits_belong_to_one_subtree():
    # 5 levels, branching 2 at every node: 2 kingdoms, 4 phyla, 8 classes, 16 orders, 32 species
    assert [len({sp[:d] for sp in W.SPECIES}) for d in range(1, 6)] == [2, 4, 8, 16, 32]
    assert len(W.NODES) == 62 and set(W.NODES) == {sp[:d] for sp in W.SPECIES for d in range(1, 6)}
    for level in range(1, 5):  # every node has exactly two children
        for node in {sp[:level] for sp in W.SPECIES}:
            assert len({sp[: level + 1] for sp in W.SPECIES if sp[:level] == node}) == 2
    # a trait value names one node: each shape one kingdom, each hue one shape, each shade of a hue one order
    for depth in (2, 3):
        owners = {}
        for sp in W.SPECIES:
            owners.setdefault(sp[depth - 1], set()).add(sp[: depth - 1])
        assert all(len(v) == 1 for v in owners.values()), depth
    rgb = {(c, sh): tuple(np.round(W.body_rgb(c, sh)).astype(int)) for c in W.COLOURS for sh in W.SHADES}
    assert len(set(rgb.values())) == 16  # 16 order colours, each drawn in one order only


def test_taxonomy_labels_parse_into_levels(samples):
    ids = {}
    for s in samples:
        levels = parse_inat_label(s.taxonomy)
        assert levels == W.taxonomy_path(s.main) and len(levels) == 5
        assert W.parse_taxonomy(s.taxonomy) == dict(zip(W.TAXONOMY_LEVELS, levels))
        cid = s.taxonomy.split("_")[0]
        assert ids.setdefault(levels, cid) == cid  # one class id per species
    assert len(set(ids.values())) == len(ids)
    with pytest.raises(ValueError, match="taxonomy label"):
        W.parse_taxonomy("round_circle")


def test_concept_vectors_are_consistent(samples):
    idx = W.CONCEPT_INDEX
    for s in samples:
        v = s.concepts
        assert v.shape == (len(W.CONCEPTS),) and set(np.unique(v)) <= {0.0, 1.0}
        on = {W.CONCEPTS[i] for i in np.flatnonzero(v)}
        path = W.taxonomy_path(s.main)
        want = {W.node_name(path[:d]) for d in range(1, 6)}
        want |= {f"size:{s.main.size}", f"position:{s.main.position}", f"background:{s.background}"}
        assert on == want
        assert sum(v[idx[f"background:{b}"]] for b in W.BACKGROUNDS) == 1


def test_write_folder_round_trip(samples, tmp_path):
    from sae_vlm.data.images import FolderSource

    W.write_folder(samples[:12], tmp_path)
    src = FolderSource(tmp_path)
    assert len(src.records) == 12
    by_index = {s.index: s for s in samples}
    for rec in src.records:
        s = by_index[int(rec.id.split("/")[-1].split(".")[0])]
        assert rec.label == s.taxonomy and parse_inat_label(rec.label) is not None
    vecs = W.folder_concepts(tmp_path, [r.id for r in src.records])
    assert np.array_equal(vecs, np.stack([by_index[int(r.id[-10:-4])].concepts for r in src.records]))
    with pytest.raises(ValueError, match="not in"):
        W.folder_concepts(tmp_path, ["nope.png"])


def test_image_processor_matches_training_pixels(samples):
    proc = T.build_image_processor()
    got = proc(images=[s.image for s in samples[:4]], return_tensors="np")["pixel_values"]
    assert np.allclose(got, T.pixels(W.to_array(samples[:4])).numpy(), atol=1e-5)


def test_tokenizer_round_trips_captions(samples):
    tok = T.build_tokenizer(for_clip=True)
    for s in samples[:10]:
        ids = tok(s.caption).input_ids
        assert ids[0] == T.BOS and ids[-1] == T.EOS and T.UNK not in ids
        assert tok.decode(ids, skip_special_tokens=True) == s.caption
    assert max(len(tok(s.caption).input_ids) for s in samples) <= T.CLIP_MAX_LEN


# ---- shipped models -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip():
    from transformers import AutoProcessor, CLIPModel

    return CLIPModel.from_pretrained(toyworld.clip_path()).eval(), AutoProcessor.from_pretrained(toyworld.clip_path())


@pytest.fixture(scope="module")
def llava():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = toyworld.llava_path()
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(path)


def test_shipped_clip_loads_and_sees_colours(clip):
    from transformers import AutoImageProcessor, AutoTokenizer

    from sae_vlm.toyworld.quality import ZERO_SHOT, truth_of

    model, proc = clip
    tok = AutoTokenizer.from_pretrained(toyworld.clip_path())
    assert tok.eos_token_id == T.EOS == model.config.text_config.eos_token_id
    ip = AutoImageProcessor.from_pretrained(toyworld.clip_path())
    assert ip.crop_size == {"height": W.IMAGE_SIZE, "width": W.IMAGE_SIZE}
    imgs = W.generate(30, seed=7)
    values, prompt = ZERO_SHOT["colour"]
    enc = proc(text=[prompt(v) for v in values], images=[s.image for s in imgs], return_tensors="pt", padding=True)
    with torch.no_grad():
        pred = model(**enc).logits_per_image.argmax(1)
    acc = (pred == torch.tensor([values.index(truth_of(s, "colour")) for s in imgs])).float().mean().item()
    assert acc > 0.8, acc  # the 8 classes (hues); chance 1/8


def test_shipped_llava_answers_one_word_questions(llava, clip):
    from sae_vlm.toyworld.quality import llava_answer

    model, proc = llava
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    # the vision tower is the tiny CLIP's, unchanged but for the float16 the LLaVA is stored in
    clip_sd = clip[0].vision_model.state_dict()
    tower_sd = model.model.vision_tower.state_dict()
    assert all(torch.equal(v.half().float(), tower_sd[k]) for k, v in clip_sd.items() if k in tower_sd)
    imgs = W.generate(40, seed=7)
    shapes = llava_answer(model, proc, [s.image for s in imgs], W.QUESTIONS["one_word"])
    colours = llava_answer(model, proc, [s.image for s in imgs], W.QUESTIONS["colour"])
    acc_shape = np.mean([a == s.main.shape for a, s in zip(shapes, imgs)])
    acc_colour = np.mean([a == s.main.colour for a, s in zip(colours, imgs)])
    assert acc_shape > 0.8, (acc_shape, shapes)  # chance 1/4
    assert acc_colour > 0.8, (acc_colour, colours)  # chance 1/8


def test_training_scripts_run_and_save_loadable_models(tmp_path):
    from transformers import AutoProcessor, CLIPModel, LlavaForConditionalGeneration

    from sae_vlm.toyworld import train_clip, train_llava

    for out in ("clip", "clip2"):
        train_clip.train(train_clip.ClipTrainConfig(steps=2, n_train=32, batch_size=8, out=str(tmp_path / out),
                                                    quiet=True))
    a, b = CLIPModel.from_pretrained(tmp_path / "clip"), CLIPModel.from_pretrained(tmp_path / "clip2")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded
    cfg = train_llava.LlavaTrainConfig(steps=2, n_train=32, batch_size=8, clip=str(tmp_path / "clip"),
                                       out=str(tmp_path / "llava"), quiet=True)
    train_llava.train(cfg)
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava", dtype=torch.float32)
    proc = AutoProcessor.from_pretrained(tmp_path / "llava")
    enc = proc(images=[W.sample(0).image], text=[W.PROMPT_TEMPLATE.format(question="What is shown in this image?")],
               return_tensors="pt")
    assert (enc["input_ids"] == T.IMAGE).sum() == model.config.image_seq_length
    out = model.generate(**enc, max_new_tokens=2, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 2


def test_steering_auroc_counts_ties_half_as_a_pair_count_does():
    from sae_vlm.toyworld.steering import auroc

    rng = np.random.default_rng(0)
    s_NF = rng.integers(0, 4, size=(60, 3)).astype(float)  # many ties, as codes that are 0 have
    y_N = rng.random(60) < 0.3
    pairs = [[(p > n) + 0.5 * (p == n) for p in s[y_N] for n in s[~y_N]] for s in s_NF.T]
    assert np.allclose(auroc(s_NF, y_N), [np.mean(p) for p in pairs])


def test_a_steering_candidate_detects_its_colour_better_than_any_other():
    from sae_vlm.toyworld.steering import MIN_AUROC, candidates

    auc_CF = np.full((len(W.COLOURS), 4), 0.5)
    auc_CF[W.COLOURS.index("cyan"), :3] = (0.95, 0.92, 0.85)
    auc_CF[W.COLOURS.index("blue"), 1] = 0.97  # latent 1 is a blue latent that also fires on cyan
    assert candidates(auc_CF, "cyan") == [(0, 0.95)]  # latent 2 is below MIN_AUROC
    assert candidates(auc_CF, "blue") == [(1, 0.97)] and candidates(auc_CF, "red") == [] and MIN_AUROC == 0.9


@pytest.mark.parametrize("seeds, why", [("1", "expected at least two distinct"),
                                        ("2,2", "expected at least two distinct"),
                                        ("-1,3", "expected an integer in [0, 4294967295], not -1")])
def test_demo_needs_two_distinct_seeds(tmp_path, seeds, why):
    from typer.testing import CliRunner

    from sae_vlm.cli import app

    r = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--seeds", seeds, "--quick"])
    assert r.exit_code == 2 and r.output.startswith(f"error: --seeds {seeds}: {why}")
    assert not (tmp_path / "d").exists()
