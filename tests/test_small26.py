"""Issue 26, the small ones: steer-score's `--latents` is parsed when the config is built (a typo fails before any
model loads), and the toy world's trainers and quality report take their settings from config dataclasses as
`sae-vlm` commands (no argparse mains of their own)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from _adversarial import make_work, refused, tree
from typer.testing import CliRunner

from sae_vlm import config as C
from sae_vlm.cli import app
from sae_vlm.steer import score as S

SRC = Path(__file__).resolve().parents[1] / "src" / "sae_vlm"
SHIPPED = SRC / "toyworld" / "weights"


@pytest.fixture
def work(tmp_path, monkeypatch):
    return make_work(tmp_path, monkeypatch)


# --- --latents ---------------------------------------------------------------------------------------------------

# absolute paths to nothing: transformers refuses them at once (a hub-like id would first retry the network)
STEER_SCORE = ["steer-score", "--llava", "/no/llava", "--sae", "sae", "--clip", "/no/clip", "--out", "s.json"]
BAD_LATENTS = ["rnadom:5", "random:", "random:0", "random:x", "random:-3", "first:0", "first:", "first:2.5",
               "paper:3", "all:5", "level:", "level:x", "level:-1", "level:0:", "level:0:0", "level:0:x",
               "1,x", "1,,b", "5-3", "-1", "1-", "-", "3--5", "1.5", "+3", "1_000", "", " ", ",", "PAPER", "０"]


@pytest.mark.parametrize("spec", BAD_LATENTS)
def test_a_bad_latents_spec_is_refused_before_the_model_is_opened(work, spec):
    line = refused(work, STEER_SCORE + ["--latents", spec], f"--latents {spec!r}")
    assert "/no/llava" not in line and "/no/clip" not in line  # the models were never reached


def test_a_good_latents_spec_gets_past_the_config_to_the_model(work):
    """The control: the same command with a valid spec fails only where it opens the models (the SAE first)."""
    args = [a if a != "sae" else "gone_sae" for a in STEER_SCORE]
    line = refused(work, args + ["--latents", "random:3"], "gone_sae")
    assert "--latents" not in line


@pytest.mark.parametrize("spec, kind, count, level, spans", [
    ("paper", "paper", None, None, ()), (" all ", "all", None, None, ()), ("first:7", "first", 7, None, ()),
    ("random:3", "random", 3, None, ()), ("level:2", "level", None, 2, ()), ("level:0:4", "level", 4, 0, ()),
    ("39,120", "ids", None, None, ((39, 39), (120, 120))), ("0-999, 5", "ids", None, None, ((0, 999), (5, 5))),
    (" 1 - 3 ,", "ids", None, None, ((1, 3),)),
])
def test_the_config_holds_the_parsed_spec(spec, kind, count, level, spans):
    cfg = C.SteerScoreConfig(llava="l", sae="s", clip="c", latents=spec)
    assert cfg.latent_spec == C.LatentSpec(spec, kind, count, level, spans)
    assert cfg.latents == spec  # the text as typed: what the result file records


def test_a_bad_spec_fails_at_construction_naming_the_flag():
    with pytest.raises(ValueError, match=r"^--latents 'random:0': expected random:N with N >= 1$"):
        C.SteerScoreConfig(llava="l", sae="s", clip="c", latents="random:0")


def test_selection_from_the_typed_spec_equals_selection_from_the_text():
    alive = np.ones(64, bool)
    alive[[2, 40]] = False
    for text in ("1,2,3", "0-4,10", "random:5", "level:1", "level:0:4", "all", "first:3", "paper"):
        spec = C.LatentSpec.parse(text)
        assert S.select_latents(spec, alive, (16, 48), seed=3) == S.select_latents(text, alive, (16, 48), seed=3)
    assert S.select_latents("0-3,60-63", alive) == [0, 1, 3, 60, 61, 62, 63]


def test_a_huge_range_is_refused_without_listing_its_ids():
    t0 = time.process_time()
    with pytest.raises(ValueError, match=r"^--latents '0-1000000000000': latent ids 64-1000000000000 are out"):
        S.select_latents("0-1000000000000", np.ones(64, bool))
    assert time.process_time() - t0 < 1  # checked on the range, never expanded
    with pytest.raises(ValueError, match=r"latent ids 70, 64-66 are out of range; the SAE has latents 0..63"):
        S.select_latents("3,70,60-66", np.ones(64, bool))


@pytest.mark.parametrize("spec", ["1.5", "", ",", "1,,x", "a"])
def test_steer_latents_typos_are_one_line_naming_the_flag(work, spec):
    refused(work, ["steer", "--llava", "no/llava", "--sae", "sae", "--latents", spec], "--latents")


# --- the toy world's trainers and quality report ----------------------------------------------------------------

TINY_CLIP = ["--steps", "2", "--n-train", "16", "--batch-size", "8", "--vision-hidden", "8", "--text-hidden", "8",
             "--heads", "2", "--projection-dim", "8", "--quiet"]


@pytest.mark.parametrize("args, culprit", [
    (["toy-train-clip", "--vision-hidden", "10", "--out", "c"], "--vision-hidden 10: expected a multiple of --heads"),
    (["toy-train-clip", "--vision-hidden", "6", "--text-hidden", "64", "--heads", "3", "--out", "c"],
     "--text-hidden 64: expected a multiple of --heads (3)"),
    (["toy-train-clip", "--n-train", "4", "--batch-size", "8", "--out", "c"], "--n-train 4"),
    (["toy-train-clip", "--patch", "49", "--out", "c"], "--patch 49"),
    (["toy-train-clip", "--p-hard-negative", "1.5", "--out", "c"], "--p-hard-negative 1.5"),
    (["toy-train-clip", "--lr", "nan", "--out", "c"], "--lr nan"),
    (["toy-train-clip", "--steps", "x", "--out", "c"], "--steps 'x'"),
    (["toy-train-llava", "--clip", "gone", "--out", "l"], "--clip gone"),
    (["toy-train-llava", "--clip", ".", "--out", "l"], "--clip ."),  # a folder, but no model in it
    (["toy-train-llava", "--text-hidden", "90", "--out", "l"], "--text-hidden 90"),
    (["toy-train-llava", "--seed", "-1", "--out", "l"], "--seed -1"),
    (["toy-quality", "--n-clip", "0", "--out", "q.md"], "--n-clip 0"),
    (["toy-quality", "--clip", "gone", "--out", "q.md"], "--clip gone"),
    (["toy-quality", "--llava", "emb.npy", "--out", "q.md"], "--llava emb.npy"),
    (["toy-quality", "--n-train", "5"], "--n-train"),  # not a setting of this command
])
def test_toy_commands_refuse_bad_settings_in_one_line(work, args, culprit):
    refused(work, args, culprit)


def test_toy_models_train_score_and_record_what_the_shipped_ones_record(work):
    run = CliRunner().invoke(app, ["toy-train-clip", *TINY_CLIP, "--out", "clip"])
    assert run.exit_code == 0, run.output
    assert run.output.startswith("saved clip: final loss ")
    run = CliRunner().invoke(app, ["toy-train-llava", "--steps", "2", "--n-train", "16", "--batch-size", "8",
                                   "--text-hidden", "8", "--heads", "2", "--text-mlp", "16", "--clip", "clip",
                                   "--out", "llava", "--quiet"])
    assert run.exit_code == 0, run.output
    for name in ("clip", "llava"):  # the training record keeps the shipped layout: model settings only
        got = json.loads((work / name / "training.json").read_text())
        shipped = json.loads((SHIPPED / name / "training.json").read_text())
        assert list(got) == list(shipped) and list(got["config"]) == list(shipped["config"]), name
        assert got["config"]["steps"] == 2 and len(got["log"]) == 2 and np.isfinite(got["log"][-1]["loss"])
    assert json.loads((work / "llava" / "training.json").read_text())["clip"] == "clip"
    assert json.loads((work / "clip" / "training.json").read_text())["config"]["vision_hidden"] == 8

    before = tree(work)
    run = CliRunner().invoke(app, ["toy-quality", "--clip", "clip", "--llava", "llava", "--n-clip", "3",
                                   "--n-llava", "2", "--out", "q.md", "--quiet"])
    assert run.exit_code == 0, run.output
    assert set(tree(work)) - set(before) == {"q.md"}
    report = (work / "q.md").read_text()
    assert "sae-vlm toy-quality --out q.md --clip clip --llava llava --n-clip 3 --n-llava 2 --quiet" in report
    assert "`sae-vlm toy-train-clip` (2 steps, batch 8)" in report and "`sae-vlm toy-train-llava`" in report
    assert "zero-shot accuracy on 3 images" in report and "greedy answers on 2 images" in report


def test_toy_quality_without_the_llava_prints_the_clip_scores_and_writes_nothing(work):
    from sae_vlm.toyworld.quality import clip_zero_shot

    before = tree(work)
    run = CliRunner().invoke(app, ["toy-quality", "--n-clip", "3", "--skip-llava", "--quiet"])
    assert run.exit_code == 0, run.output
    assert tree(work) == before
    expected = clip_zero_shot(None, 3)
    assert run.output.splitlines() == ["tiny CLIP: " + ", ".join(
        f"{k} {v:.3f}" for k, v in expected.items() if isinstance(v, float) and not k.endswith("_chance"))]


def test_toy_settings_are_declared_once_in_config():
    """No argparse main is left in the toy world; the old flags are the config's fields."""
    for f in ("train_clip.py", "train_llava.py", "quality.py"):
        text = (SRC / "toyworld" / f).read_text()
        assert "argparse" not in text and "def main" not in text and "__main__" not in text, f
    for flag in ("--out", "--steps", "--n-train", "--seed", "--threads", "--vision-hidden", "--projection-dim",
                 "--heads", "--quiet"):
        help_text = CliRunner().invoke(app, ["toy-train-clip", "--help"], env={"COLUMNS": "300"}).output
        assert flag in help_text, flag
    assert C.ClipTrainConfig().steps == 2000 and C.LlavaTrainConfig().steps == 1500
