"""A user who runs the paper's recipe gets the paper's pipeline, not just its formulas (issue 12).

Each reference below is written from the description of the paper's scripts (shared/reference/paper.md and the
issue), not from this package's code: inat_depth.py's LCA rules, dictionary_learning's validation, metric.py's
std, steering_score.py's first word and latent choice, imagenet_subset.py's first image per class.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter

import numpy as np
import pytest
import torch
from _extract_helpers import make_images, save_tiny_clip
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.config import INAT_GROUPS, PRESETS, ExtractConfig, TrainConfig, presets_for
from sae_vlm.eval import hierarchy as H
from sae_vlm.eval.classes import class_names
from sae_vlm.eval.ms import summarize_ms
from sae_vlm.eval.recon import reconstruction_metrics
from sae_vlm.sae import trainer
from sae_vlm.sae.groups import group_sizes_from_fractions
from sae_vlm.sae.runs import resolve_sae_dir
from sae_vlm.steer import score as S
from sae_vlm.steer.protocol import first_per_class

# --- 1. the step-100000 snapshot is what a paper run is scored on ----------------------------------------------


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """A run that keeps a snapshot at step 10 of 20 and names it its evaluation step, as the paper presets do."""
    tmp = tmp_path_factory.mktemp("snap")
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    np.save(tmp / "val.npy", x[:200].numpy())
    np.save(tmp / "emb.npy", np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32))
    cfg = TrainConfig(data="x", out=str(tmp / "run"), expansions=(2,), ks=(2,), batch_size=64, steps=20,
                      warmup_steps=2, threshold_start_step=2, keep_steps=(10,), eval_step=10, log_every=10,
                      device="cpu", quiet=True)
    trainer.train(cfg, source=x)
    return tmp


def test_paper_presets_score_the_step_100000_snapshot():
    for name in ("paper-ms", "paper-hierarchy", "paper-steer"):
        fields = PRESETS[name][TrainConfig]
        assert (fields["steps"], fields["keep_steps"], fields["eval_step"]) == (110_000, (100_000,), 100_000)
    with pytest.raises(ValueError, match="eval_step=5 is not among the kept snapshots"):
        TrainConfig(data="x", out="y", keep_steps=(10,), eval_step=5)


def test_evaluate_scores_the_run_s_eval_step_unless_told(snapshot_run):
    run, out = snapshot_run / "run", snapshot_run / "eval"
    args = ["evaluate", str(run), "--data", str(snapshot_run / "val.npy"), "--embeddings",
            str(snapshot_run / "emb.npy"), "--quiet"]
    r = CliRunner().invoke(app, [*args, "--out", str(out / "default")])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "default" / "metrics.json").read_text())
    assert m["step"] == "10" and m["saes"][0]["step"] == 10 and m["saes"][0]["path"].endswith("step-10")
    assert "scored the SAEs at step 10" in r.output
    r = CliRunner().invoke(app, [*args, "--out", str(out / "final"), "--step", "final"])
    m = json.loads((out / "final" / "metrics.json").read_text())
    assert r.exit_code == 0 and m["step"] == "final" and m["saes"][0]["step"] == 20
    r = CliRunner().invoke(app, [*args, "--out", str(out / "x"), "--step", "7"])
    assert r.exit_code == 2 and "no snapshot at step 7" in r.output and "step-10" in r.output
    # steer and steer-score take one SAE directory: the same default applies
    sae_dir = run / "saes" / "batchtopk_x2_k2"
    assert resolve_sae_dir(sae_dir) == sae_dir / "step-10"
    assert resolve_sae_dir(sae_dir, "final") == sae_dir


def test_browse_follows_the_snapshot_the_evaluation_scored(snapshot_run):
    from sae_vlm.browse.data import RunView

    run = snapshot_run / "run"
    r = CliRunner().invoke(app, ["evaluate", str(run), "--data", str(snapshot_run / "val.npy"), "--quiet"])
    assert r.exit_code == 0, r.output
    view = RunView(run)
    assert view.dicts["batchtopk_x2_k2"].sae_dir == run / "saes" / "batchtopk_x2_k2" / "step-10"


# --- 2. paper-hierarchy groups --------------------------------------------------------------------------------

def test_hierarchy_groups_are_the_script_s_fractions():
    # scripts/matryoshka_hierarchy.sh: --group_fractions 0.002 0.009 0.035 0.189 0.765 at F = 1536
    assert PRESETS["paper-hierarchy"][TrainConfig]["group_fractions"] == INAT_GROUPS
    assert group_sizes_from_fractions(INAT_GROUPS, 1536) == (3, 13, 53, 290, 1177)


# --- 3. LCA depth as inat_depth.py computes it -------------------------------------------------------------------

def reference_lca(top_idx_desc, taxa):
    """inat_depth.py: top images in ascending activation order, combinations, round(mean), most_common(1)."""
    ascending = list(reversed(top_idx_desc))
    depths = []
    for a, b in itertools.combinations(ascending, 2):
        depth = 0
        for x, y in zip(taxa[a], taxa[b]):
            if x != y:
                break
            depth += 1
        depths.append(depth)
    return round(sum(depths) / len(depths)), Counter(depths).most_common(1)[0][0]


def test_lca_depth_matches_inat_depth_rounding_and_tie_breaking():
    rng = np.random.default_rng(0)
    taxa = [tuple(f"L{lvl}_{c}" for lvl, c in enumerate(np.minimum.accumulate(rng.integers(0, 2, 7))))
            for _ in range(40)]
    top_idx = np.stack([rng.choice(40, 16, replace=False) for _ in range(400)])
    top_val = np.sort(rng.random((400, 16)) + 0.1, axis=1)[:, ::-1]
    got = H.latent_lca_depths(top_idx, top_val, taxa)
    ref = np.array([reference_lca(row, taxa) for row in top_idx], dtype=float)
    np.testing.assert_array_equal(got["mean"], ref[:, 0])
    np.testing.assert_array_equal(got["mode"], ref[:, 1])
    # both rules were exercised: half-way means and tied majorities occur in this sample
    assert np.any(got["raw_mean"] % 1 == 0.5)
    counts = [Counter(_pair_depths(row, taxa)).values() for row in top_idx]
    assert any(list(c).count(max(c)) > 1 for c in counts)


def _pair_depths(row, taxa):
    return [sum(1 for _ in itertools.takewhile(lambda p: p[0] == p[1], zip(taxa[a], taxa[b])))
            for a, b in itertools.combinations(list(reversed(row)), 2)]


def test_levels_average_latents_whose_16th_activation_is_not_zero():
    taxa = [("A", "B", str(i % 3)) for i in range(20)]
    top_idx = np.tile(np.arange(16), (4, 1))
    top_val = np.ones((4, 16))
    top_val[1, -1] = 0.0  # latent 1: its 16th highest activation is 0, so it is left out
    lca = H.latent_lca_depths(top_idx, top_val, taxa)
    levels = H.per_level(lca["mean"], (2, 2))
    assert [lv["count"] for lv in levels] == [1, 2]


# --- 4. the steering score as steering_score.py and similarity_baseline.py compute it ---------------------------

def test_first_word_keeps_punctuation_and_latents_include_dead_ones():
    assert S.paper_first_word("Pencil. Writing") == "Pencil." and S.first_word("Pencil. Writing") == "Pencil"
    alive = np.array([True, False] * 8)
    assert S.select_latents("paper", alive, paper_count=10) == list(range(10))  # --neuron_prefix 10
    assert S.select_latents("first:3", alive) == [0, 1, 2]
    assert S.select_latents("0-3", alive) == [0, 2]  # our explicit lists keep only live latents


def test_dead_latents_get_top_images_as_argsort_would_give_them():
    codes = np.zeros((20, 3))
    codes[[2, 5], 1] = [1.0, 2.0]  # latent 1 fires on two images, latent 2 never
    codes[:, 0] = np.arange(20)
    ref = np.stack([np.argsort(codes[:, j], kind="stable")[-4:][::-1] for j in range(3)])  # best first
    top = np.array([[19, 18, 17, 16], [5, 2, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(S.paper_top_indices(top, 20), ref)


def test_imagenet_class_names_come_from_the_synset_mapping(tmp_path):
    data = tmp_path / "train"
    for wnid in ("n01440764", "n01484850"):
        (data / wnid).mkdir(parents=True)
    with pytest.raises(ValueError, match="WordNet id"):
        class_names(["n01440764"], data)
    (tmp_path / "LOC_synset_mapping.txt").write_text(
        "n01440764 tench, Tinca tinca\nn01484850 great white shark, white shark, man-eater\n")
    assert class_names(["n01440764", "n01484850"], data) == ["tench", "great_white_shark"]  # as id_to_name
    assert class_names(["animals/cat"]) == ["cat"]
    assert first_per_class(["a", "a", "b", "c", "c"]) == [0, 2, 3]  # imagenet_subset.py: first image per class


def test_scores_report_the_unbiased_std():
    assert S.mean_std([0.1, 0.3, 0.2])["std"] == pytest.approx(statistics.stdev([0.1, 0.3, 0.2]))


# --- 5. tables A6 / A7 average over validation batches ----------------------------------------------------------

def test_fve_and_l0_per_validation_batch_as_dictionary_learning():
    torch.manual_seed(0)
    x = torch.randn(10_000, 8) * torch.linspace(0.5, 2, 8)
    sae = SAE(SAEConfig(arch="batchtopk", d_in=8, d_sae=16, k=3))
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    m = reconstruction_metrics(sae, x, device="cpu")
    fves, l0s = [], []
    for b in x.split(4096):  # the validation loader: batches of 4096 in order, the last one partial
        with torch.no_grad():
            f = sae.encode(b)
            e = b - sae.decode(f)
        fves.append(1 - (torch.var(e, dim=0).sum() / torch.var(b, dim=0).sum()).item())
        l0s.append((f != 0).float().sum(-1).mean().item())
    assert m["fve_batch_mean"] == pytest.approx(float(np.mean(fves)), abs=1e-6)
    assert m["l0_threshold_batch_mean"] == pytest.approx(float(np.mean(l0s)), abs=1e-6)
    assert m["fve"] != pytest.approx(m["fve_batch_mean"], abs=1e-9)  # the pooled value differs and is kept too


# --- 6. MS summary std ------------------------------------------------------------------------------------------

def test_ms_summary_std_is_unbiased_as_metric_py_prints_it():
    ms = torch.tensor([0.5, 0.7, float("nan"), 0.9, 0.6])
    s = summarize_ms(ms)
    assert s["std"] == pytest.approx(statistics.stdev([0.5, 0.7, 0.9, 0.6])) and s["unscored"] == 1


# --- 7. SigLIP rows: the first token --------------------------------------------------------------------------

def test_first_token_reproduces_cls_only_on_siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from sae_vlm.data.tokens import select_tokens
    from sae_vlm.token_selection import parse_tokens

    torch.manual_seed(0)
    m = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    with torch.no_grad():
        hidden = m(pixel_values=torch.randn(2, 3, 32, 32), output_hidden_states=True).hidden_states[2]
    rows, pos = select_tokens(hidden, parse_tokens("first")[0], ["a", "b"], has_cls=False)
    assert torch.equal(rows, hidden[:, 0]) and pos.tolist() == [0, 0]  # token 0: a patch token on SigLIP
    with pytest.raises(ValueError, match="no CLS token"):
        select_tokens(hidden, parse_tokens("cls")[0], ["a", "b"], has_cls=False)


# --- 8. precision -------------------------------------------------------------------------------------------------

def test_paper_extraction_presets_compute_and_store_fp32():
    for fields in presets_for(ExtractConfig).values():
        assert fields["dtype"] == "fp32" and fields["model_dtype"] == "fp32"
    assert ExtractConfig(model="m", data="d", out="o").dtype == "fp16"  # outside the presets


# --- 9 and 10. folder taxonomies; what "last" is -------------------------------------------------------------------

def test_nested_folders_are_the_taxonomy_and_last_is_unnormalised(tmp_path):
    from sae_vlm.data.store import open_store

    model_dir = save_tiny_clip(tmp_path / "clip")
    classes = ("animals/mammals/rodents", "animals/mammals/cats", "animals/birds/owls", "plants/trees/oaks")
    make_images(tmp_path / "imgs", 6, classes=classes, size=(32, 32))
    r = CliRunner().invoke(app, ["extract", "--model", str(model_dir), "--data", str(tmp_path / "imgs"), "--layers",
                                 "last", "--out", str(tmp_path / "store"), "--quiet", "--workers", "1"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "store" / "last__pooled" / "manifest.json").read_text())
    assert "before L2 normalisation" in manifest["hook_point_note"]
    store = open_store(tmp_path / "store", "last")
    assert not torch.allclose(store.all().norm(dim=1), torch.ones(store.rows), atol=1e-2)  # not normalised

    torch.manual_seed(0)
    SAE(SAEConfig(arch="matryoshka", d_in=16, d_sae=32, k=4, group_sizes=(8, 24), hook_point="last",
                  token_selection="pooled")).save_pretrained(tmp_path / "run" / "saes" / "m")
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "store"), "--embedder",
                                 str(model_dir), "--out", str(tmp_path / "ev"), "--quiet", "--top", "4"])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["taxonomy"]["source"] == "folders" and metrics["taxonomy"]["depth"] == 3
    h = metrics["saes"][0]["hierarchy"]
    assert h["taxonomy_source"] == "folders" and h["taxonomy_depth"] == 3
    tables = (tmp_path / "ev" / "tables.md").read_text()
    assert "### Hierarchy of m" in tables and "LCA depth 0..3 against the folders taxonomy" in tables
    assert "Hierarchy of m" in r.output  # also on stdout
    assert "mean over validation batches of 4096 rows" in tables and "pooled over all rows" in tables
