"""The planted-feature world (data/planted.py), its metrics (eval/planted.py) and `sae-vlm planted`: each metric
against an independent computation, and what the default setting shows on every seed."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae_vlm.cli import app
from sae_vlm.config import PlantedConfig
from sae_vlm.eval import planted as P
from sae_vlm.sae.groups import group_sizes_from_fractions
from sae_vlm.sae.model import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world():
    return P.world_of(PlantedConfig())


def test_the_default_world_is_a_deep_tree_in_superposition(world):
    assert len(world.branching) >= 4 and world.n_features >= 4 * world.d
    assert world.level_sizes == (4, 12, 36, 108)
    assert np.allclose(np.linalg.norm(world.directions_CD, axis=1), 1, atol=1e-6)
    roots = world.parent_C < 0
    assert (world.depth_C[roots] == 0).all()
    assert (world.depth_C[~roots] == world.depth_C[world.parent_C[~roots]] + 1).all()


def test_a_child_fires_only_with_its_parent_and_without_its_siblings(world):
    x_ND, active_NC = world.sample(20_000, 0)
    assert x_ND.shape == (20_000, world.d) and x_ND.dtype == np.float32
    child = np.flatnonzero(world.parent_C >= 0)
    assert not (active_NC[:, child] & ~active_NC[:, world.parent_C[child]]).any()
    for p in np.unique(world.parent_C[child]):
        assert active_NC[:, child[world.parent_C[child] == p]].sum(1).max() <= 1
    # the documented rates: roots at root_prob, a firing parent passes to one child at child_prob
    assert abs(active_NC[:, :4].mean() - world.root_prob) < 0.01
    assert abs(active_NC.sum(1).mean() - world.expected_active) < 0.05


def test_the_world_is_deterministic_by_seed(world):
    again = P.world_of(PlantedConfig())
    assert np.array_equal(world.directions_CD, again.directions_CD)
    a, b, c = world.sample(500, 3), again.sample(500, 3), world.sample(500, 4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    other = P.world_of(PlantedConfig(world_seed=1))
    assert not np.allclose(world.directions_CD, other.directions_CD)


def test_the_rows_are_the_sum_of_the_firing_directions_plus_noise(world):
    quiet = dataclasses.replace(world, noise=0.0)
    x_ND, active_NC = quiet.sample(2000, 0)
    # with no noise, each row's least-squares fit on its firing directions is exact, with magnitudes in [0.5, 1.5]
    for x, on in zip(x_ND[:200], active_NC[:200]):
        if on.any():
            m, *_ = np.linalg.lstsq(world.directions_CD[on].T.astype(np.float64), x, rcond=None)
            assert np.allclose(world.directions_CD[on].T @ m, x, atol=1e-4) and m.min() > 0.5 - 1e-4
            assert m.max() < 1.5 + 1e-4
        else:
            assert np.abs(x).max() == 0


def ranks_by_counting(x):
    x = np.asarray(x, float)
    return np.array([(x < v).sum() + ((x == v).sum() + 1) / 2 for v in x])


def test_spearman_by_hand_and_against_counted_ranks():
    assert P.average_ranks([10, 20, 20, 5]).tolist() == [2, 3.5, 3.5, 1]
    # ranks 1.5,1.5,3.5,3.5,5 and 1,2.5,2.5,4.5,4.5: covariance 7.25, variances 9 and 9
    assert P.spearman([0, 0, 1, 1, 2], [0, 1, 1, 2, 2]) == pytest.approx(29 / 36)
    assert P.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1)
    assert np.isnan(P.spearman([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, 200), rng.integers(0, 6, 200)
    assert P.spearman(a, b) == pytest.approx(np.corrcoef(ranks_by_counting(a), ranks_by_counting(b))[0, 1])


def test_depth_level_spearman_reads_the_matryoshka_group_of_the_best_latent():
    depth_C = np.array([0, 0, 1, 1, 1, 1])
    assert P.depth_level_spearman(np.arange(6), depth_C, None, 6) is None  # BatchTopK: no groups
    assert P.depth_level_spearman(np.arange(6), depth_C, (2, 4), 6) == pytest.approx(1)
    assert P.depth_level_spearman(np.array([5, 4, 0, 1, 2, 3]), depth_C, (4, 2), 6) == pytest.approx(-1)
    assert P.depth_level_spearman(np.arange(6), depth_C, (6,), 6) is None  # one group: undefined


@pytest.mark.parametrize("sizes", [(4, 12, 36, 108), (2, 4, 8), (3, 9, 27, 81, 243), (1, 7), (5, 10, 20, 40)])
def test_level_fractions_give_matryoshka_groups_exactly_the_size_of_the_levels(sizes):
    assert group_sizes_from_fractions(P.level_fractions(sizes), sum(sizes)) == sizes


def dictionary_sae(world, W_enc_CD: np.ndarray) -> SAE:
    """A BatchTopK SAE whose decoder is the true dictionary; encoder rows as given, θ = 0.25."""
    sae = SAE(SAEConfig("batchtopk", world.d, world.n_features, k=2))
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(world.directions_CD))
        sae.W_enc_FD.copy_(torch.from_numpy(W_enc_CD.astype(np.float32)))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.threshold.fill_(0.25)
    return sae


@pytest.fixture(scope="module")
def orthogonal_world():
    """A tree whose directions are orthonormal and noise 0: an encoder equal to the dictionary reads every
    magnitude exactly, so whether a latent fires is decided by the test, not by interference."""
    w = P.make_world((2, 2, 2, 2), d=32, root_prob=0.5, child_prob=0.8, noise=0.0, seed=0)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 32)))
    return dataclasses.replace(w, directions_CD=q[: w.n_features].astype(np.float32))


def absorption_by_loops(codes_NF, active_NC, parent_C, best_latent_C) -> float:
    events = absorbed = 0
    for codes, active in zip(codes_NF, active_NC):
        for c in range(len(parent_C)):
            if parent_C[c] >= 0 and active[c]:
                events += 1
                absorbed += codes[best_latent_C[parent_C[c]]] == 0
    return absorbed / events


def test_the_true_dictionary_recovers_every_feature_and_absorbs_nothing(world, orthogonal_world):
    sae = dictionary_sae(world, world.directions_CD)
    best_cos_C, best_latent_C = P.best_latents(sae.W_dec.detach().numpy(), world.directions_CD)
    assert np.allclose(best_cos_C, 1, atol=1e-6) and (best_latent_C == np.arange(world.n_features)).all()
    assert P.recovery_by_depth(best_cos_C, world.depth_C)["recovered"] == [1.0] * 4
    w = orthogonal_world
    x_ND, active_NC = w.sample(3000, 0)
    m = P.score_sae(dictionary_sae(w, w.directions_CD), w, x_ND, active_NC)
    assert m["recovery_by_depth"] == [1.0] * 4 and m["absorption"] == 0 and m["parent_silent_alone"] == 0
    assert m["depth_level_spearman"] is None and m["fve"] == pytest.approx(1, abs=1e-5)
    # some latents silenced: the pooled share is what counting the events one by one gives
    codes_NF = dictionary_sae(w, w.directions_CD).encode(torch.from_numpy(x_ND)).detach().numpy()
    codes_NF[:, np.random.default_rng(0).permutation(w.n_features)[:7]] = 0
    best = np.arange(w.n_features)
    expected = absorption_by_loops(codes_NF, active_NC, w.parent_C, best)
    assert 0 < expected < 1 and P.absorption(codes_NF, active_NC, w.parent_C, best) == pytest.approx(expected)


def test_a_parent_latent_silenced_by_every_child_absorbs_all(orthogonal_world):
    w = orthogonal_world
    enc_CD = w.directions_CD.astype(np.float64).copy()
    for c in np.flatnonzero(w.parent_C >= 0):  # a firing child (magnitude >= 0.5) pulls its parent's latent below 0
        enc_CD[w.parent_C[c]] -= 4 * w.directions_CD[c]
    sae = dictionary_sae(w, enc_CD)
    x_ND, active_NC = w.sample(3000, 1)
    m = P.score_sae(sae, w, x_ND, active_NC)
    assert m["absorption"] == 1 and m["absorption_by_child_depth"] == [1.0, 1.0, 1.0]
    assert m["parent_silent_alone"] == 0  # without a child the parent's latent still fires
    codes_NF = sae.encode(torch.from_numpy(x_ND)).detach().numpy()
    best = np.arange(w.n_features)
    assert absorption_by_loops(codes_NF, active_NC, w.parent_C, best) == 1


# --- the command -----------------------------------------------------------------------------------------------

TINY = ["--branching", "2,2,2", "--d", "6", "--n-train", "2000", "--n-eval", "500", "--steps", "40",
        "--batch-size", "128", "--seeds", "0,1", "--device", "cpu", "--quiet"]


def test_planted_end_to_end_on_a_tiny_world(tmp_path):
    out = tmp_path / "planted"
    for _ in range(2):  # a rerun into its own folder replaces the result
        r = CliRunner().invoke(app, ["planted", "--out", str(out), *TINY])
        assert r.exit_code == 0, r.output
    res = json.loads((out / "planted.json").read_text())
    assert (out / "planted.png").stat().st_size > 1000 and str(out / "planted.json") in r.output
    assert set(res["summary"]) == {"batchtopk", "matryoshka"}
    for arch, s in res["summary"].items():
        assert set(s) == {"depth_level_spearman", "absorption", "recovery_by_depth"}
        assert len(s["recovery_by_depth"]) == 3 and 0 <= s["absorption"] <= 1
        assert set(res["by_seed"][arch]) == {"0", "1"}
    assert res["summary"]["batchtopk"]["depth_level_spearman"] is None
    assert isinstance(res["summary"]["matryoshka"]["depth_level_spearman"], float)
    assert res["train"]["width"] == 14 and sorted(p.name for p in (out / "run" / "saes").iterdir()) == [
        f"{a}_x2.33333_k{res['train']['k']}_s{s}" for a in ("batchtopk", "matryoshka") for s in (0, 1)]
    assert "matryoshka: depth/group Spearman" in r.output and "recovered (cos>=0.9)" in r.output


@pytest.mark.parametrize("flags, culprit", [
    (["--branching", "4,0,3"], "--branching 4,0,3"), (["--branching", "4"], "--branching 4"),
    (["--d", "1"], "--d 1"), (["--k", "0"], "--k 0"), (["--child-prob", "1.5"], "--child-prob 1.5"),
    (["--noise", "-1"], "--noise -1"), (["--seeds", "1,1"], "--seeds 1,1"), (["--arch", "nope"], "nope"),
    (["--n-train", "100"], "--n-train 100"), (["--branching", "100,100,100"], "expected at most"),
])
def test_planted_refuses_nonsense_with_one_error_line(tmp_path, flags, culprit):
    r = CliRunner().invoke(app, ["planted", "--out", str(tmp_path / "p"), *flags])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and culprit in lines[0], r.output
    assert not (tmp_path / "p").exists()


def test_planted_refuses_a_foreign_folder_untouched(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    r = CliRunner().invoke(app, ["planted", "--out", str(tmp_path / "theirs"), *TINY])
    assert r.exit_code == 2 and r.output.startswith("error: output folder") and "planted" in r.output, r.output
    assert [p.name for p in (tmp_path / "theirs").iterdir()] == ["notes.txt"]


def test_non_finite_weights_stop_the_run_with_one_line(tmp_path, monkeypatch):
    def diverged(cfg, source):
        saes = {}
        for spec in cfg.specs():
            sae = SAE(SAEConfig(spec.arch, 6, 14, 2, (2, 4, 8) if spec.arch == "matryoshka" else None))
            with torch.no_grad():
                sae.W_dec[0, 0] = float("nan")
            saes[spec.name] = sae
        return saes

    monkeypatch.setattr(P, "train", diverged)
    r = CliRunner().invoke(app, ["planted", "--out", str(tmp_path / "p"), *TINY])
    assert r.exit_code == 2 and r.output.startswith("error: training batchtopk_") and "non-finite" in r.output
    assert not (tmp_path / "p" / "planted.json").exists()


# --- what the default setting shows ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_run(quick_demo):
    """The demo runs `sae-vlm planted` at its defaults (seeds 0,1,2): its output, read back from metrics.json."""
    out, metrics, _ = quick_demo
    return out / "planted", metrics["planted"]


@pytest.mark.slow
def test_the_default_world_shows_its_hierarchy_on_every_seed(default_run):
    """Measured 2026-12-02 on the 2-core AMD EPYC (AVX-512, no AMX), default world (seed 0), SAE seeds 0-4, each
    under OMP_NUM_THREADS=1, + MKL_CBWR=COMPATIBLE, + ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
    ONEDNN_MAX_CPU_ISA=AVX2, both, and 2 threads (all identical but for Matryoshka seed 3, Spearman 0.566-0.591):
    - every root's best decoder cosine: BatchTopK >= 0.999, Matryoshka 0.978-0.986 (asserted >= 0.9);
    - Matryoshka depth/group Spearman 0.507-0.623 (asserted >= 0.3); mean group of the best latent by depth
      0.25-0.5 / 1.08-1.25 / 2.19-2.36 / 2.63-2.80, smallest rise 0.34 (asserted >= 0.15);
    - absorption over parent_silent_alone (silent parents with no child to blame): BatchTopK 4.9-14x, Matryoshka
      2.6-5.0x (asserted > 1.5x): the silences are the children's doing;
    - mean best cosine at depth 2, BatchTopK minus Matryoshka: 0.062-0.109 (asserted >= 0.02).
    Not asserted, as it does not hold: Matryoshka absorbing less than BatchTopK (0.159-0.202 against 0.146-0.232;
    less on seed 0 only)."""
    out, res = default_run
    world = P.world_of(PlantedConfig())
    for d in sorted((out / "run" / "saes").iterdir()):
        best_cos_C, _ = P.best_latents(SAE.from_pretrained(d).W_dec.detach().numpy(), world.directions_CD)
        assert best_cos_C[world.depth_C == 0].min() >= 0.9, d.name
    btk, mat = res["by_seed"]["batchtopk"], res["by_seed"]["matryoshka"]
    assert set(btk) == set(mat) == {"0", "1", "2"}
    for seed, m in mat.items():
        assert m["depth_level_spearman"] >= 0.3, seed
        assert min(np.diff(m["best_level_by_depth"])) >= 0.15, (seed, m["best_level_by_depth"])
        assert btk[seed]["mean_cos_by_depth"][2] - m["mean_cos_by_depth"][2] >= 0.02, seed
        for r in (m, btk[seed]):
            assert r["absorption"] > 1.5 * r["parent_silent_alone"], (seed, r)
    rhos = sorted(m["depth_level_spearman"] for m in mat.values())
    assert res["summary"]["matryoshka"]["depth_level_spearman"] == pytest.approx(rhos[1])
