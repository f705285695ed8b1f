"""Flags checked against their meaning, ports, hub repo ids, usage errors, a closed stdout, --quiet.

Refusals assert exit code 2, one `error:` line naming the culprit and an unchanged tree; successes assert their
result (finite weights, the rows a warning counts, a listening port)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _adversarial import make_work, refused, tree
from typer.testing import CliRunner

from sae_vlm import SAE
from sae_vlm.cli import EXIT_BROKEN_PIPE, app


@pytest.fixture
def work(tmp_path, monkeypatch):
    return make_work(tmp_path, monkeypatch)


TRAIN = ["train", "--data", "acts.npy", "--out", "r", "--width", "2", "--k", "4", "--batch-size", "32", "--steps",
         "4", "--quiet"]
EVAL = ["evaluate", "sae", "--data", "acts.npy", "--quiet"]

PROBES = [
    (TRAIN + ["--grad-clip", "-1"], "--grad-clip -1"),
    (TRAIN + ["--threshold-beta", "1.5"], "--threshold-beta 1.5"),
    (TRAIN + ["--threshold-beta", "1"], "--threshold-beta 1"),
    (TRAIN + ["--threshold-beta", "0"], "--threshold-beta 0"),
    (TRAIN + ["--warmup-steps", "-1"], "--warmup-steps -1"),
    (TRAIN + ["--decay-start", "-5"], "--decay-start -5"),
    (TRAIN + ["--decay-start", "4"], "--decay-start 4"),
    (TRAIN + ["--threshold-start-step", "-1"], "--threshold-start-step -1"),
    (TRAIN + ["--keep-steps", "2,5"], "--keep-steps 5: not before the end of the run (--steps 4)"),
    (TRAIN + ["--keep-steps", "0"], "--keep-steps 0"),
    (TRAIN + ["--eval-step", "-2", "--keep-steps", "2"], "--eval-step -2"),
    (TRAIN + ["--jumprelu-bandwidth", "0", "--arch", "jumprelu"], "--jumprelu-bandwidth 0"),
    (TRAIN + ["--group-fractions", "0,1"], "--group-fractions 0.0,1.0"),
    (TRAIN + ["--lr", "0"], "--lr 0"),
    (TRAIN + ["--aux-alpha", "-0.1"], "--aux-alpha -0.1"),
    (TRAIN + ["--l1-coeff", "-1"], "--l1-coeff -1"),
    (TRAIN + ["--seed", "-1"], "--seed -1"),
    (TRAIN + ["--seed", "4294967296"], "--seed 4294967296"),
    (TRAIN + ["--seeds", "0,-3"], "--seeds 0,-3"),
    (TRAIN + ["--k", "0"], "--k 0"),
    (TRAIN + ["--steps", "abc"], "--steps 'abc'"),
    (TRAIN + ["--steps", "2.5"], "--steps '2.5'"),
    (TRAIN + ["--batch-size", "1e30"], "--batch-size 1000000000000000019884624838656"),
    (TRAIN + ["--bogus", "1"], "--bogus"),
    (TRAIN[:1] + ["--out", "r"], "--data"),
    (["frobnicate"], "frobnicate"),
    (EVAL + ["--heldout-frac", "0"], "--heldout-frac 0"),
    (EVAL + ["--heldout-frac", "1.5"], "--heldout-frac 1.5"),
    (EVAL + ["--heldout-frac", "-inf"], "--heldout-frac -inf"),
    (EVAL + ["--dense-cutoff", "1.5"], "--dense-cutoff 1.5"),
    (EVAL + ["--rotation-seed", "-2"], "--rotation-seed -2"),
    (EVAL + ["--grids", "-1"], "--grids -1"),
    (["extract", "--model", "m", "--data", "d", "--out", "s", "--max-pixels", "0"], "--max-pixels 0"),
    (["extract", "--model", "m", "--data", "d", "--out", "s", "--max-pixels", "-5"], "--max-pixels -5"),
    (["extract", "--model", "m", "--data", "d", "--out", "s", "--seed", "-1"], "--seed -1"),
    (["planted", "--root-prob", "0"], "--root-prob 0"),
    (["planted", "--child-prob", "1.01"], "--child-prob 1.01"),
    (["planted", "--d", "1"], "--d 1"),
    (["planted", "--world-seed", "-1"], "--world-seed -1"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "3,-1"], "--latents 3,-1"),
    (["steer-score", "--llava", "l", "--sae", "sae", "--clip", "c", "--max-images", "0"], "--max-images 0"),
    (["steer-score", "--llava", "l", "--sae", "sae", "--clip", "c", "--alpha", "nan"], "--alpha nan"),
    (["report", "sae", "--out", "rep", "--top", "0"], "--top 0"),
    (["convert", "sae", "c", "--threshold", "-0.5"], "--threshold -0.5"),
    (["compare", "sae", "sae", "--rows", "-4"], "--rows -4"),
    (["browse", "sae", "--port", "70000"], "--port 70000"),
    (["browse", "sae", "--port", "-1"], "--port -1"),
    (["browse", "sae", "--port", "0"], "--port 0"),
    (["browse", "sae", "--port", "http"], "--port 'http'"),
    (["push", "sae", "me/x y", "--dry-run", "stage"], "'me/x y'"),
    (["push", "sae", "../../etc", "--dry-run", "stage"], "'../../etc'"),
    (["push", "sae", "a/b/c", "--dry-run", "stage"], "'a/b/c'"),
    (["push", "sae", "x", "--dry-run", "stage"], "'x'"),
    (["push", "sae", "", "--dry-run", "stage"], "repo id ''"),
    (["push", "sae", "me/a--b", "--dry-run", "stage"], "'me/a--b'"),
    (["push", "sae", "me/model.git", "--dry-run", "stage"], "'me/model.git'"),
]


@pytest.mark.parametrize("args, culprit", PROBES, ids=[f"{a[0]} {culprit}" for a, culprit in PROBES])
def test_a_value_against_the_flags_meaning_is_one_line(work, args, culprit):
    refused(work, args, culprit)


def test_grad_clip_0_turns_clipping_off_and_trains_finite_weights(work, monkeypatch):
    calls = []
    real = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda p, m, t: calls.append(m) or real(p, m, t))
    for clip, out, clipped in (("0", "r0", False), ("0.5", "r1", True)):
        calls.clear()
        r = CliRunner().invoke(app, [a if a != "r" else out for a in TRAIN] + ["--grad-clip", clip])
        assert r.exit_code == 0, r.output
        assert bool(calls) == clipped and set(calls) <= {0.5}  # the first steps' gradients exceed 0.5
        sae = SAE.from_pretrained(work / out / "saes" / "batchtopk_x2_k4")
        assert all(torch.isfinite(p).all() for p in sae.parameters())


def test_a_heldout_fraction_that_leaves_few_rows_warns_and_still_scores(work):
    r = CliRunner().invoke(app, EVAL + ["--heldout-frac", "0.25"])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --heldout-frac 0.25 leaves 64 of 256 rows for the reconstruction metrics, fewer "
                        "than 200: FVE and L0 will be noisy"]
    recon = json.loads((work / "sae" / "eval" / "metrics.json").read_text())["saes"][0]["recon"]
    assert np.isfinite(recon["fve"]) and np.isfinite(recon["l0"])
    r = CliRunner().invoke(app, EVAL + ["--heldout-frac", "1", "--out", "all"])
    assert r.exit_code == 0 and "warning" not in r.output, r.output


def _no_run_view(monkeypatch):
    """browse without a built run: these probes are about the socket."""
    from types import SimpleNamespace

    from sae_vlm.browse import app as browse_app

    monkeypatch.setattr(browse_app, "RunView", lambda run, *a: SimpleNamespace(run_dir=Path(run)))
    monkeypatch.setattr(browse_app, "create_app", lambda *a: None)


def test_a_port_in_use_is_one_line_before_anything_is_announced(work, monkeypatch):
    _no_run_view(monkeypatch)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        line = refused(work, ["browse", "sae", "--port", port], f"--port {port}")
    assert "serving" not in line and "cannot listen" in line


def test_browse_binds_before_it_announces(work, monkeypatch):
    import uvicorn

    from sae_vlm.browse.app import serve
    from sae_vlm.config import BrowseConfig

    _no_run_view(monkeypatch)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.extend(s.getsockname() for s in sockets))

    def announce(line: str) -> None:
        assert f"http://127.0.0.1:{port}/" in line
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # already listening

    serve(BrowseConfig(run_dir="sae", port=port), announce=announce)
    assert served == [("127.0.0.1", port)]


def test_push_without_a_network_is_one_line_naming_the_hub(work, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    client_error = HfHubHTTPError.__mro__[1]
    connect_error = next((c for c in client_error.__subclasses__() if "Request" in c.__name__), client_error)

    def offline(*a, **k):
        raise connect_error("[Errno -2] Name or service not known")

    monkeypatch.setattr(HfApi, "create_repo", offline)
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("uploaded after a failed create"))
    line = refused(work, ["push", "sae", "me/clip-sae"], "could not push me/clip-sae to https://")
    assert "Name or service not known" in line and "nothing was uploaded" in line


def test_a_valid_repo_id_stages_the_upload(work):
    r = CliRunner().invoke(app, ["push", "sae", "me/clip-l22.x_1", "--dry-run", "stage"])
    assert r.exit_code == 0, r.output
    assert (work / "stage" / "README.md").read_text().count("me/clip-l22.x_1") >= 1
    assert SAE.from_pretrained(work / "stage").cfg.d_sae == 32


def test_a_closed_stdout_ends_quietly(work):
    """`sae-vlm ... | head` with the reader gone before anything is written: no traceback, no 'Exception
    ignored', exit 141; the command itself still did its work."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "sae_vlm.cli", "push", "sae", "me/x", "--dry-run", "stage"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=work)
    assert p.stdout is not None and p.stderr is not None
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == EXIT_BROKEN_PIPE and err == "", err
    assert (work / "stage" / "model.safetensors").is_file()


def test_quiet_silences_the_model_loaders_bars_and_only_for_the_command(capsys):
    from transformers import CLIPModel
    from transformers.utils import logging as hf_logging

    from sae_vlm import toyworld
    from sae_vlm.cli import _library_bars_off

    assert hf_logging.is_progress_bar_enabled()
    with _library_bars_off(True):
        CLIPModel.from_pretrained(toyworld.clip_path())
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # set back for what runs next
    CLIPModel.from_pretrained(toyworld.clip_path())
    assert "Loading weights" in capsys.readouterr().err


def test_extract_quiet_prints_no_bar_and_loud_still_does(work):
    from _extract_helpers import make_images, save_tiny_clip

    save_tiny_clip(work / "clip")
    make_images(work / "imgs", 2)
    base = ["extract", "--model", "clip", "--data", "imgs", "--device", "cpu", "--batch-size", "2", "--workers", "1"]
    quiet = CliRunner().invoke(app, base + ["--out", "q", "--quiet"])
    assert quiet.exit_code == 0, quiet.output
    assert "%|" not in quiet.output and "Loading" not in quiet.output
    assert quiet.output.startswith("wrote q: 4 images kept")
    before = tree(work / "q")
    loud = CliRunner().invoke(app, base + ["--out", "l"])
    assert loud.exit_code == 0 and "extract: 100%|" in loud.output, loud.output
    assert tree(work / "q") == before
