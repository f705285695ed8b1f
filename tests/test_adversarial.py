"""A careless or hostile user: bad flags, foreign output folders, two runs at once, other data on resume, broken files.

Every probe asserts exit code 2, one `error:` line naming the culprit, and that nothing under the test's folder
changed: no file written, changed or deleted, no folder created (the tree is hashed before and after).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _adversarial import D, make_work, refused
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app


@pytest.fixture
def work(tmp_path, monkeypatch):
    return make_work(tmp_path, monkeypatch)


TRAIN = ["train", "--data", "acts.npy", "--width", "2", "--k", "4", "--batch-size", "32", "--steps", "4", "--quiet"]

FLAG_PROBES = [
    (TRAIN + ["--out", "r", "--checkpoint-every", "0"], "--checkpoint-every 0"),
    (TRAIN + ["--out", "r", "--log-every", "0"], "--log-every 0"),
    (TRAIN + ["--out", "r", "--log-every", "-5"], "--log-every -5"),
    (TRAIN + ["--out", "r", "--aux-alpha", "nan"], "--aux-alpha nan"),
    (TRAIN + ["--out", "r", "--lr", "inf"], "--lr inf"),
    (TRAIN + ["--out", "r", "--threshold-beta", "-inf"], "--threshold-beta -inf"),
    (TRAIN + ["--out", "r", "--steps", "0"], "--steps 0"),
    (TRAIN + ["--out", "r", "--batch-size", "-1"], "--batch-size -1"),
    (TRAIN + ["--out", "r", "--max-memory", "0"], "--max-memory 0"),
    (TRAIN + ["--out", "r", "--dead-window", "0"], "--dead-window 0"),
    (TRAIN + ["--out", "r", "--arch", "gated"], "'gated'"),
    (TRAIN + ["--out", "r", "--width", "2,x"], "--width"),
    (TRAIN + ["--out", "r", "--device", "gpu"], "--device 'gpu'"),
    (TRAIN + ["--out", "r", "--log-to", "mlflow"], "mlflow"),
    (TRAIN + ["--out", "r", "--jumprelu-bandwidth", "nan"], "--jumprelu-bandwidth nan"),
    (TRAIN + ["--out", "r", "--l1-coeff", "inf"], "--l1-coeff inf"),
    (TRAIN + ["--out", "r", "--l0-coeff", "-inf"], "--l0-coeff -inf"),
    (TRAIN + ["--out", "r", "--width", "nan"], "nan"),
    (TRAIN + ["--out", "r", "--norm-batches", "0"], "--norm-batches 0"),
    (["evaluate", "sae", "--data", "acts.npy", "--top", "0"], "--top 0"),
    (["evaluate", "sae", "--data", "acts.npy", "--top", "-3"], "--top -3"),
    (["evaluate", "sae", "--data", "acts.npy", "--batch-rows", "0"], "--batch-rows 0"),
    (["evaluate", "sae", "--data", "acts.npy", "--heldout-frac", "nan"], "--heldout-frac nan"),
    (["evaluate", "sae", "--data", "acts.npy", "--dense-cutoff", "inf"], "--dense-cutoff inf"),
    (["evaluate", "sae", "--data", "acts.npy", "--step", "latest"], "--step 'latest'"),
    (["report", "sae", "--out", "rep", "--top", "-1"], "--top -1"),
    (["extract", "--model", "m", "--data", "imgs", "--out", "s", "--tokens", "bogus"], "'bogus'"),
    (["extract", "--model", "m", "--data", "imgs", "--out", "s", "--batch-size", "0"], "--batch-size 0"),
    (["extract", "--model", "m", "--data", "imgs", "--out", "s", "--shard-rows", "0"], "--shard-rows 0"),
    (["extract", "--model", "m", "--data", "imgs", "--out", "s", "--workers", "0"], "--workers 0"),
    (["extract", "--model", "m", "--data", "imgs", "--out", "s", "--dtype", "fp8"], "--dtype 'fp8'"),
    (["convert", "sae", "c", "--k", "0"], "--k 0"),
    (["convert", "sae", "c", "--input-scale", "nan"], "--input-scale nan"),
    (["convert", "sae", "c", "--input-scale", "-2"], "--input-scale -2"),
    (["convert", "sae", "c", "--from", "pickle"], "--from 'pickle'"),
    (["convert", "sae", "c", "--to", "onnx"], "--to 'onnx'"),
    (["convert", "sae", "c", "--arch", "gated"], "--arch 'gated'"),
    (["convert", "sae", "sae"], "the source itself"),
    (["convert", "nothing/here.pt", "c"], "nothing/here.pt"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "1", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "1", "--op", "explode"], "--op 'explode'"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "1,a"], "--latents"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "1", "--alpha", "0,nan"], "nan"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "1", "--batch-size", "0"], "--batch-size 0"),
    (["convert", "sae", "c", "--threshold", "inf"], "--threshold inf"),
    (["push", "sae", "no-owner", "--dry-run", "stage"], "no-owner"),
    (["push", "acts.npy", "me/x", "--dry-run", "stage"], "acts.npy"),
]


@pytest.mark.parametrize("args, culprit", FLAG_PROBES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in FLAG_PROBES])
def test_bad_flags_are_one_line_and_touch_nothing(work, args, culprit):
    refused(work, args, culprit)


def _foreign(folder: Path) -> None:
    """A user's folder that happens to look like ours in places."""
    (folder / "parts").mkdir(parents=True)
    (folder / "parts" / "shard_000000.json").write_text("{}")
    (folder / ".draft.tmp1").write_text("my notes")
    (folder / ".manifest.json.tmp1.0123abcd").write_text("not ours either: no marker")
    for name in ("manifest.json", "log.jsonl", "index.html", "notes.txt"):
        (folder / name).write_text(f"the user's {name}")
    (folder / "saes" / "mine").mkdir(parents=True)
    (folder / "saes" / "mine" / "config.json").write_text("{}")


OWN_PROBES = [
    (TRAIN + ["--out", "theirs"], "train"),
    (["evaluate", "sae", "--data", "acts.npy", "--out", "theirs"], "evaluate"),
    (["report", "sae", "--out", "theirs"], "report"),
    (["convert", "sae", "theirs"], "convert"),
    (["demo", "--out", "theirs", "--quick"], "demo"),
    (["extract", "--model", "m", "--data", "imgs", "--out", "theirs"], "extract"),
]


@pytest.mark.parametrize("args, kind", OWN_PROBES, ids=[k for _, k in OWN_PROBES])
def test_a_folder_of_someone_elses_files_is_refused_untouched(work, args, kind):
    _foreign(work / "theirs")
    line = refused(work, args, "output folder theirs holds")
    assert kind in line


@pytest.mark.parametrize("args, kind", OWN_PROBES[:4], ids=[k for _, k in OWN_PROBES[:4]])
def test_an_output_path_that_is_a_file_is_refused(work, args, kind):
    (work / "theirs").write_text("a file")
    refused(work, args, "is a file")


@pytest.mark.parametrize("args, kind", OWN_PROBES[:4], ids=[k for _, k in OWN_PROBES[:4]])
def test_a_second_run_on_the_same_folder_is_refused_with_the_first_ones_pid(work, args, kind):
    from sae_vlm.outdir import claim

    if kind == "report":  # a report needs an evaluated run
        r = CliRunner().invoke(app, ["evaluate", "sae", "--data", "acts.npy", "--quiet"])
        assert r.exit_code == 0, r.output
    code = (f"import sys, time\nfrom sae_vlm.outdir import claim\nwith claim({str(work / 'theirs')!r}, {kind!r}):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        refused(work, args, f"in use by another sae-vlm run (PID {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    with claim(work / "theirs", kind):  # the kernel released the lock with the process
        pass


BF16_PROBES = [
    (TRAIN + ["--out", "r", "--bf16", "--device", "cpu"], "--bf16: this CPU"),
    (["extract", "--model", "m", "--data", "acts.npy", "--out", "s", "--model-dtype", "bf16", "--device", "cpu"],
     "--model-dtype bf16: this CPU"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "1", "--dtype", "bf16", "--device", "cpu"],
     "--dtype bf16: this CPU"),
]


@pytest.mark.parametrize("args, culprit", BF16_PROBES, ids=[a[0] for a, _ in BF16_PROBES])
def test_bf16_on_a_cpu_without_it_is_refused(work, monkeypatch, args, culprit):
    """On a CPU without AVX512-BF16 or AMX, torch emulates bf16 10-100x slower than fp32: refused, naming why."""
    from sae_vlm import device

    monkeypatch.setattr(device, "cpu_flags", lambda: {"AVX2": True, "AVX-512": False, "AVX512-BF16": False,
                                                      "AMX": False})
    line = refused(work, args, culprit)
    assert "no native bf16 (neither AVX512-BF16 nor AMX)" in line and "use fp32" in line


def test_cleanup_removes_only_its_own_temp_files(work):
    from sae_vlm.io import remove_stale_temps

    folder = work / "store"
    folder.mkdir()
    ours, theirs = folder / ".manifest.json.tmp4242.0123abcd", folder / ".notes.tmp.txt"
    ours.write_text("half written")
    theirs.write_text("keep me")
    (folder / "sub").mkdir()
    (folder / "sub" / ".x.tmp1.0123abcd").write_text("not in a folder we write")
    remove_stale_temps(folder)
    assert not ours.exists() and theirs.exists() and (folder / "sub" / ".x.tmp1.0123abcd").exists()


def test_resume_with_other_data_is_refused_and_a_moved_copy_is_not(work):
    r = CliRunner().invoke(app, TRAIN + ["--out", "run", "--checkpoint-every", "2", "--steps", "2"])
    assert r.exit_code == 0, r.output
    rng = np.random.default_rng(1)
    np.save(work / "other.npy", rng.normal(size=(256, D)).astype(np.float32))
    args = [a if a != "acts.npy" else "other.npy" for a in TRAIN] + ["--out", "run", "--resume"]
    refused(work, args, "other data: other.npy")
    (work / "moved").mkdir()
    (work / "moved" / "acts.npy").write_bytes((work / "acts.npy").read_bytes())
    args = [a if a != "acts.npy" else "moved/acts.npy" for a in TRAIN] + ["--out", "run", "--resume"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output


def test_nan_embeddings_are_refused(work):
    emb = np.load(work / "emb.npy")
    emb[17, 2] = np.nan
    np.save(work / "emb_nan.npy", emb)
    refused(work, ["evaluate", "sae", "--data", "acts.npy", "--embeddings", "emb_nan.npy", "--out", "ev"],
            "NaN or inf in 1 rows (first: row 17)")
    (work / "emb_txt.npy").write_text("not an array")
    refused(work, ["evaluate", "sae", "--data", "acts.npy", "--embeddings", "emb_txt.npy", "--out", "ev"],
            "emb_txt.npy is not a readable .npy array")


def test_a_killed_holder_leaves_no_lock_behind(work):
    code = (f"from sae_vlm.outdir import claim\nimport time\nwith claim({str(work / 'run')!r}, 'train'):\n"
            "    print('held', flush=True)\n    time.sleep(60)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, 9)
    holder.wait()
    r = CliRunner().invoke(app, TRAIN + ["--out", "run"])
    assert r.exit_code == 0, r.output
    assert json.loads((work / "run" / ".sae-vlm-owner.json").read_text())["kind"] == "train"


def test_one_broken_sae_is_named_and_the_others_are_scored(work):
    run = work / "run" / "saes"
    torch.manual_seed(1)
    for name in ("good", "truncated", "bad_config"):
        SAE(SAEConfig("topk", D, 32, 4)).save_pretrained(run / name)
    weights = run / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    (run / "bad_config" / "config.json").write_text('{"arch": "topk", "d_in": "sixteen", "d_sae": 32, "k": 4}')
    r = CliRunner().invoke(app, ["evaluate", "run", "--data", "acts.npy", "--embeddings", "emb.npy", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    assert [s["name"] for s in m["saes"]] == ["good"]
    assert {b["name"] for b in m["broken"]} == {"truncated", "bad_config"}
    assert "model.safetensors does not hold" in next(b["error"] for b in m["broken"] if b["name"] == "truncated")
    assert "skipped SAE truncated" in r.output and "skipped SAE bad_config" in r.output
    for name in ("truncated", "bad_config"):  # the CLI on the broken SAE alone: one line naming its file
        refused(work, ["evaluate", run / name, "--data", "acts.npy", "--out", "ev_" + name], str(run / name))


def test_a_run_shorter_than_the_threshold_start_still_gets_a_threshold(work):
    """θ < 0 (never learned) would keep every positive pre-activation at inference: it is set from the last batches
    and the run says so."""
    r = CliRunner().invoke(app, TRAIN + ["--out", "short", "--threshold-start-step", "100"])
    assert r.exit_code == 0, r.output
    assert "θ was never learned (it is updated after step 100, the threshold start; --steps 4)" in r.output
    sae = SAE.from_pretrained(work / "short" / "saes" / "batchtopk_x2_k4")
    x = torch.from_numpy(np.load(work / "acts.npy"))
    l0, l0_relu = ((sae.encode(x, mode=m) > 0).sum(1).float().mean() for m in ("threshold", "relu"))
    assert float(sae.threshold) > 0 and l0 < 2 * 4 < l0_relu
    r = CliRunner().invoke(app, TRAIN + ["--out", "default"])  # unset, the start moves to steps/4: learned
    assert r.exit_code == 0 and "never learned" not in r.output
    assert float(SAE.from_pretrained(work / "default" / "saes" / "batchtopk_x2_k4").threshold) > 0


def test_a_file_name_that_is_not_utf8_goes_through_extract_evaluate_and_report(tmp_path, monkeypatch):
    from PIL import Image

    from sae_vlm import toyworld

    monkeypatch.chdir(tmp_path)
    clip = toyworld.clip_path()
    for i in range(24):
        (tmp_path / "imgs" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), (i * 9, 80, 160)).save(tmp_path / "imgs" / "ab"[i % 2] / f"{i}.png")
    Image.new("RGB", (24, 24), (1, 2, 3)).save(os.fsencode(tmp_path / "imgs" / "a") + b"/caf\xe9.png")
    cli = CliRunner()

    def ok(*args):
        r = cli.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    assert "25 images kept" in ok("extract", "--model", clip, "--data", "imgs", "--layers", "1", "--tokens",
                                  "cls,random-2", "--out", "st", "--quiet")
    ok("train", "--data", "st", "--layer", "layer.1__cls", "--out", "run", "--width", "2", "--k", "4",
       "--batch-size", "8", "--steps", "6", "--quiet")
    ok("evaluate", "run", "--data", "st", "--embedder", clip, "--quiet")
    ok("report", "run", "--out", "rep", "--quiet")
    assert (tmp_path / "rep" / "index.html").stat().st_size > 0


def _broken_inputs(work: Path) -> None:
    (work / "fake.tar").write_text("not a tar")
    (work / "text.npy").write_text("hello")
    (work / "trunc.npy").write_bytes((work / "acts.npy").read_bytes()[:1000])
    np.save(work / "cube.npy", np.zeros((4, 4, 4), np.float32))
    store = work / "store" / "last__pooled"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text("{bad json")


BROKEN_INPUTS = [
    (["extract", "--model", "m", "--data", "fake.tar", "--out", "x"], "fake.tar is not a readable tar archive"),
    (TRAIN + ["--data", "text.npy", "--out", "x"], "text.npy is not a readable .npy array of numbers"),
    (TRAIN + ["--data", "trunc.npy", "--out", "x"], "trunc.npy is not a readable .npy array"),
    (TRAIN + ["--data", "cube.npy", "--out", "x"], "2-D"),
    (TRAIN + ["--data", "store", "--out", "x"], "manifest.json is not valid JSON"),
    (TRAIN + ["--data", "missing.npy", "--out", "x"], "missing.npy"),
    (["evaluate", "sae", "--data", "text.npy", "--out", "x"], "text.npy"),
]


@pytest.mark.parametrize("args, culprit", BROKEN_INPUTS, ids=[c.split()[0] for _, c in BROKEN_INPUTS])
def test_broken_input_files_are_named(work, args, culprit):
    _broken_inputs(work)
    refused(work, args, culprit)


def _convert_inputs(work: Path) -> None:
    torch.save(torch.zeros(3), work / "tensor.pt")
    torch.save({"a": torch.zeros(3)}, work / "dict.pt")
    torch.save([1, 2], work / "list.pt")
    lens = work / "lens"
    lens.mkdir()
    (lens / "cfg.json").write_text('{"architecture": "topk", "d_in": "x", "d_sae": 8}')
    (lens / "sae_weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    bad = work / "lens_json"
    bad.mkdir()
    (bad / "cfg.json").write_text("not json")
    (bad / "sae_weights.safetensors").write_bytes(b"")
    trunc = work / "lens_trunc"
    trunc.mkdir()
    (trunc / "cfg.json").write_text('{"architecture": "standard", "d_in": 16, "d_sae": 32}')
    (trunc / "sae_weights.safetensors").write_bytes(b"\x00" * 100)
    (work / "sae_bad").mkdir()
    (work / "sae_bad" / "config.json").write_text('{"arch": "topk", "d_in": 16}')
    (work / "sae_bad" / "model.safetensors").write_bytes((work / "sae" / "model.safetensors").read_bytes())


MORE_PROBES = [
    (["convert", "tensor.pt", "c"], "tensor.pt is not an SAE"),
    (["convert", "dict.pt", "c"], "dict.pt is not an SAE"),
    (["convert", "--from", "dictionary-learning", "dict.pt", "c"], "not a dictionary_learning SAE state dict"),
    (["convert", "--from", "overcomplete", "list.pt", "c"], "list.pt holds a list"),
    (["convert", "lens", "c"], "field 'd_in' is 'x'"),
    (["convert", "lens_json", "c"], "cfg.json is not valid JSON"),
    (["convert", "lens_trunc", "c"], "sae_weights.safetensors is not a readable safetensors file"),
    (["convert", "--from", "sae-lens", "sae", "c"], "cfg.json is missing"),
    (["convert", "sae_bad", "c"], "config.json is not a valid SAE config"),
    (["evaluate", "sae_bad", "--data", "acts.npy", "--out", "x"], "sae_bad"),
    (["evaluate", "sae", "--data", "acts.npy", "--embeddings", "missing.npy", "--out", "x"], "missing.npy"),
    (["evaluate", "sae", "--data", "acts.npy", "--embeddings", "acts.npy", "--step", "7", "--out", "x"], "step 7"),
    (["evaluate", "nowhere", "--data", "acts.npy"], "nowhere"),
    (["evaluate", "sae", "--data", "missing.npy", "--out", "x"], "missing.npy"),
    (["report", "sae", "--out", "rep"], "metrics.json is missing"),
    (["push", "sae", "me/x", "--dry-run", "lens"], "--dry-run folder lens is not empty"),
    (["steer", "--llava", "l", "--sae", "sae", "--latents", "1", "--out", "acts.npy"], "--out acts.npy exists"),
    (["steer-score", "--llava", "l", "--sae", "sae", "--clip", "c", "--out", "lens/cfg.json"], "--out lens/cfg.json"),
    (["push", "sae", "me/x", "--metrics", "missing.json", "--dry-run", "st"], "missing.json"),
    (TRAIN + ["--out", "x", "--width", "0"], "--width 0"),
    (TRAIN + ["--out", "x", "--group-fractions", "0.5,0.2", "--arch", "matryoshka"], "must sum to 1"),
    (TRAIN + ["--out", "x", "--eval-step", "3"], "eval_step=3"),
    (TRAIN + ["--out", "x", "--keep-steps", "a"], "--keep-steps"),
    (["extract", "--model", "m", "--data", "no_such_folder/", "--out", "x"], "no_such_folder"),
    (["steer-score", "--llava", "l", "--sae", "sae", "--clip", "c", "--batch-size", "0"], "--batch-size 0"),
    (["steer-score", "--llava", "l", "--sae", "sae", "--clip", "c", "--word", "x"], "--word 'x'"),
    (["steer-score", "--llava", "l", "--sae", "sae", "--clip", "c", "--max-new-tokens", "-1"], "--max-new-tokens -1"),
]


@pytest.mark.parametrize("args, culprit", MORE_PROBES, ids=[" ".join(a[:2]) + " " + c[:20] for a, c in MORE_PROBES])
def test_more_bad_inputs_are_one_line_and_touch_nothing(work, args, culprit):
    _convert_inputs(work)
    refused(work, args, culprit)


def test_a_folder_holding_another_kind_of_our_output_is_refused(work):
    r = CliRunner().invoke(app, TRAIN + ["--out", "run"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["evaluate", "run", "--data", "acts.npy", "--out", "ev", "--quiet"])
    assert r.exit_code == 0, r.output
    refused(work, ["convert", "sae", "run"], "holds sae-vlm train output")
    refused(work, ["report", "run", "--out", "run"], "holds sae-vlm train output")
    refused(work, TRAIN + ["--out", "ev"], "holds sae-vlm evaluate output")
    refused(work, ["evaluate", "run", "--data", "acts.npy", "--out", "run"], "holds sae-vlm train output")
    refused(work, ["demo", "--out", "ev", "--quick"], "holds sae-vlm evaluate output")
    refused(work, TRAIN + ["--out", "run", "--resume", "--lr", "0.5"], "--resume with different settings")
    refused(work, TRAIN + ["--out", "run"], "already holds a run; pass --resume")
