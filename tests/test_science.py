"""The paper's claims, checked on the toy world's ground truth with the shipped tiny CLIP and toy LLaVA.

One `sae-vlm demo --quick` run (about 30 s) feeds every test. Numbers measured on the reference 2-core
machine (quick run; the full `make demo` run in brackets) are quoted where a test leaves a margin.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sae_vlm.cli import app


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "metrics.json").read_text()), result.output


def sae_rows(metrics):
    for layer, v in metrics["layers"].items():
        for name, r in v["saes"].items():
            yield layer, name, r, v["no_sae"]


def test_demo_writes_metrics_plots_and_report(demo):
    out, metrics, printed = demo
    assert set(metrics["layers"]) == {"layer.1", "layer.2", "last"}
    assert (out / "report" / "index.html").is_file()
    assert list((out / "eval" / "last" / "clip" / "plots").glob("*.png"))
    assert str(out / "metrics.json") in printed and "report" in printed


def test_sae_latents_are_more_monosemantic_than_neurons_under_both_embedders(demo):
    # measured: SAE 0.67–0.77 (CLIP) and 0.61–0.64 (truth) against neurons 0.45 and 0.48
    _, metrics, _ = demo
    for layer, name, r, neurons in sae_rows(metrics):
        assert r["ms_clip"]["mean"] > neurons["clip"]["mean"] + 0.1, (layer, name)
        assert r["ms_truth"]["mean"] > neurons["truth"]["mean"] + 0.05, (layer, name)


def test_top16_images_of_batchtopk_latents_are_purer_than_neurons(demo):
    """Purity: the largest share of a unit's top-16 images whose objects share one shape, colour or pattern.

    Measured for BatchTopK: 0.95 / 0.93 / 0.94 at layer.1 / layer.2 / last against neurons 0.89 / 0.85 / 0.90
    (full run: 0.99 / 0.95 / 0.96 against 0.94 / 0.92 / 0.95). Matryoshka is mixed (0.88 / 0.93 / 0.90; full
    run 0.98 / 0.96 / 0.92), so only BatchTopK and the mean over all SAEs are asserted.
    """
    _, metrics, _ = demo
    sae, neuron = [], []
    for layer, name, r, neurons in sae_rows(metrics):
        sae.append(r["top16_purity"])
        neuron.append(neurons["top16_purity"])
        if name.startswith("batchtopk"):
            assert r["top16_purity"] > neurons["top16_purity"], layer
    assert np.mean(sae) > np.mean(neuron)


def test_ms_under_tiny_clip_tracks_ms_under_ground_truth(demo):
    # the project's counterpart of the paper's user study; measured 0.59–0.92 across SAEs (full run 0.64–0.77)
    _, metrics, _ = demo
    for layer, name, r, _ in sae_rows(metrics):
        assert r["ms_correlation"] > 0.4, (layer, name)


def test_matryoshka_lca_depth_per_level_is_reported(demo):
    """The paper expects a shallower LCA (more general concepts) in early Matryoshka levels. The toy run does
    not show it clearly: mean LCA depth per level 1.11 / 1.25 / 1.00 / – at layer.1, 1.10 / 1.33 / 1.14 / 1.00 at
    layer.2, 1.54 / 1.40 / 1.00 / – at last (full run at last: 2.14 / 1.17 / 1.10 / 2.25), with few latents alive in
    the late levels (each needs 16 positive images). So this test checks the measurement, not the trend."""
    _, metrics, _ = demo
    for layer, name, r, _ in sae_rows(metrics):
        if not name.startswith("matryoshka"):
            continue
        levels = r["hierarchy"]
        assert [lv["level"] for lv in levels] == [0, 1, 2, 3]
        assert levels[0]["count"] > 0
        for lv in levels:
            if lv["count"]:
                assert 0 <= lv["mean"] <= 7


def test_clamping_a_colour_latent_makes_the_toy_llava_name_that_colour(demo):
    """Measured on blank images: unsteered 0 of 3 answers name any colour; steered, the chosen latent of
    yellow, blue and green names its colour in 9/9 answers each, red, orange and purple in none (mean 50%;
    full run 48%). Asserted: more than unsteered on average, and at least two colours steer reliably."""
    _, metrics, _ = demo
    st = metrics["steering"]
    assert st["mean_hit_rate"] > st["mean_unsteered_hit_rate"] + 0.2
    assert sum(v["hit_rate"] >= 2 / 3 for v in st["per_colour"].values()) >= 2


def test_zero_shot_accuracy_with_the_sae_spliced_in(demo):
    """Accuracy recovered: the tiny CLIP's zero-shot colour / shape / pattern accuracy with each SAE's
    reconstruction in place of its hook point. Measured: colour 100% of 100% everywhere; shape 37–48% of 52%,
    pattern 50–69% of 79% (the SAEs keep colour, which the CLIP is sure of, and lose some of the rest)."""
    _, metrics, _ = demo
    assert len(metrics["zero_shot"]) == 6
    for key, per in metrics["zero_shot"].items():
        assert set(per) == {"colour", "shape", "pattern"}
        assert per["colour"]["accuracy_spliced"] >= 0.9 * per["colour"]["accuracy"], key
        for v in per.values():
            assert 0 <= v["accuracy_spliced"] <= 1 and v["accuracy"] > 0
