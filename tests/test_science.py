"""The paper's three findings, checked on the toy world's ground truth with the shipped tiny CLIP and toy LLaVA.

One `sae-vlm demo --quick` run (under 2 minutes) feeds every test. Numbers measured on the reference 2-core
machine (quick run) are quoted where a test leaves a margin; README "What the demo shows" has the full run.
"""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from sae_vlm.cli import app
from sae_vlm.toyworld import world as W


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


def test_demo_writes_metrics_plots_and_a_portable_report(demo):
    out, metrics, printed = demo
    assert set(metrics["layers"]) == {"layer.1", "layer.2", "last"}
    assert list((out / "eval" / "last" / "clip" / "plots").glob("*.png"))
    assert str(out / "metrics.json") in printed and "report" in printed
    html = (out / "report" / "index.html").read_text()
    # the findings come first, then every hook point's tables, as HTML tables
    order = [html.index(h) for h in ("1. SAE latents", "2. Do Matryoshka levels", "3. Clamping", "Every hook point")]
    assert order == sorted(order)
    heads = [html.index(f"<h3>{layer}</h3>") for layer in metrics["layers"]]
    assert heads == sorted(heads) and "<pre>" not in html
    # relative links only: the report opens from any folder and names no directory of this machine
    assert str(out) not in html and str(out.parent) not in html
    for src in re.findall(r'(?:src|href)="([^"#]+)"', html):
        assert not src.startswith("/") and "://" not in src, src
        assert (out / "report" / src).is_file(), src


def test_findings_object_has_the_documented_shape(demo):
    _, metrics, _ = demo
    f = metrics["findings"]
    assert set(f["ms"]) == set(metrics["layers"])
    for v in f["ms"].values():
        assert set(v) == {"sae", "neurons"} and len(v["sae"]) == 2
    assert set(f["hierarchy"]) == {f"{layer}/matryoshka_x1_k8" for layer in metrics["layers"]}
    for h in f["hierarchy"].values():
        assert len(h["mean_lca_by_level"]) == 5 and len(h["best_level_by_depth"]) == 5
        assert 0 <= h["nodes_detected"] <= 1
    assert set(f["steering"]["success_by_concept"]) == set(W.COLOURS)
    assert 0 <= f["steering"]["unsteered"] <= 1


def test_sae_latents_are_more_monosemantic_than_neurons_under_both_embedders(demo):
    # measured: SAE 0.66–0.74 (tiny CLIP) and 0.50–0.59 (truth) against neurons 0.39 and 0.27
    _, metrics, _ = demo
    for layer, name, r, neurons in sae_rows(metrics):
        assert r["ms_clip"]["mean"] > neurons["clip"]["mean"] + 0.15, (layer, name)
        assert r["ms_truth"]["mean"] > neurons["truth"]["mean"] + 0.1, (layer, name)


def test_ms_under_tiny_clip_tracks_ms_under_ground_truth(demo):
    # the project's counterpart of the paper's user study; measured 0.92–0.96 across SAEs
    _, metrics, _ = demo
    for layer, name, r, _ in sae_rows(metrics):
        assert r["ms_correlation"] > 0.6, (layer, name)


def test_coarse_taxa_are_found_in_earlier_matryoshka_groups_than_species(demo):
    """For each taxonomy node the latent that detects it best (AUROC); the mean Matryoshka level of those latents
    per taxonomy depth. Measured: layer.1 0.5 / 1.0 / 1.5 / 1.5 / 1.5 (kingdom .. species), layer.2
    1.0 / 1.2 / 1.2 / 1.7 / 1.4. At `last` (the contrastive projection) there is no order: 1.5 / 0.8 / 1.5 / 0.8 / 1.4,
    and the full run loses it at layer.1 too: the trend is not robust (README "What the demo shows" says why)."""
    _, metrics, _ = demo
    for layer in ("layer.1", "layer.2"):
        best = metrics["findings"]["hierarchy"][f"{layer}/matryoshka_x1_k8"]["best_level_by_depth"]
        assert best[0] < best[-1], (layer, best)


def test_lca_depth_is_higher_at_the_last_matryoshka_level_than_at_the_first(demo):
    """Measured: layer.2 2.50 -> 3.00 and last 2.50 -> 3.00. At layer.1 it falls (4.00 -> 3.20): its level-0
    latents are dense kingdom / phylum directions (AUROC 0.99 for `round`, firing on 99% of images) whose 16 most
    extreme images come from one order, so the top-16 LCA reads them as deep. The full run keeps the rise at `last`
    only; README "What the demo shows"."""
    _, metrics, _ = demo
    for layer in ("layer.2", "last"):
        lca = metrics["findings"]["hierarchy"][f"{layer}/matryoshka_x1_k8"]["mean_lca_by_level"]
        assert lca[-1] > lca[0], (layer, lca)


def test_every_node_is_scored_against_the_truth(demo):
    out, _, _ = demo
    nodes = json.loads((out / "eval" / "layer.2" / "truth" / "nodes" / "matryoshka_x1_k8.json").read_text())
    rows = nodes["nodes"] if isinstance(nodes, dict) else nodes
    assert {r["node"] for r in rows} == {"/".join(n) for n in W.NODES}
    assert all(0 <= r["auroc"] <= 1 and 0 <= r["level"] <= 4 for r in rows)


def test_clamping_a_colour_latent_makes_the_toy_llava_name_that_colour(demo):
    """On 24 held-out images of other colours per colour, latent and α chosen on 12 other images. Measured: 92–100%
    for every colour, unsteered 0%; the difference-of-means baseline 79–100%. (The full run misses green: README.)"""
    _, metrics, _ = demo
    st = metrics["findings"]["steering"]
    assert st["unsteered"] <= 0.1
    for colour, rate in st["success_by_concept"].items():
        assert rate >= 0.8, (colour, rate)
    for v in metrics["steering"]["per_colour"].values():  # the evidence: the colour word goes from unlikely to likely
        assert v["logprob_steered"] > v["logprob_unsteered"] + 5


def test_dead_latents_stay_under_a_fifth_except_in_matryoshka_saes(demo):
    """Dead: never firing on the 1000 eval images (the token SAE: on any token of 1000 images). Measured on a
    2-core Xeon: BatchTopK 8–19% and the token SAE 15%; Matryoshka 12–25% at `layer.1`/`layer.2` and 39% at
    `last`. The CLS activations have rank ~14 (PCA: 99.6% of the variance), so a Matryoshka SAE's last groups find
    little left to reconstruct (README). At 64 latents one latent is 1.6 points, and training changes that only
    move floating-point rounding (issue 18's) moved `layer.1`'s Matryoshka from 19% to 25%: hence the margins."""
    _, metrics, _ = demo
    for key, frac in metrics["findings"]["dead_frac"].items():
        assert frac < (0.45 if "matryoshka_x1" in key else 0.2), (key, frac)


def test_zero_shot_accuracy_with_the_sae_spliced_in(demo):
    """Accuracy recovered: the tiny CLIP's zero-shot shape / colour / pattern accuracy with each SAE's
    reconstruction in place of its hook point. Measured: shape and colour 100% of 100%, pattern 96–98% of 97%."""
    _, metrics, _ = demo
    assert len(metrics["zero_shot"]) == 6
    for key, per in metrics["zero_shot"].items():
        assert set(per) == {"colour", "shape", "pattern"}
        for attr, v in per.items():
            assert v["accuracy_spliced"] >= 0.9 * v["accuracy"] > 0, (key, attr)


def test_a_demo_killed_before_its_first_checkpoint_trains_again_on_rerun(demo, tmp_path):
    """A kill mid-training leaves train_config.json but no checkpoint; rerunning the demo must not stop at
    "already holds a run" (it did), and the trainer restarts that hook point from step 0."""
    import shutil

    from sae_vlm.toyworld.demo import DemoSize, train_sweep

    out, _, _ = demo
    run, size = tmp_path / "run", DemoSize(n_train=0, n_eval=0, steps=20, batch_size=64)
    train_sweep(out / "stores" / "train", "layer.1", run, size, quiet=True, archs=("batchtopk",))
    shutil.rmtree(run / "ckpt")
    shutil.rmtree(run / "saes")
    assert (run / "train_config.json").is_file()
    train_sweep(out / "stores" / "train", "layer.1", run, size, quiet=True, archs=("batchtopk",))
    assert list((run / "saes").glob("batchtopk_*/config.json"))
