"""Without fcntl (Windows) and without posix_fadvise or preadv (macOS, Windows): the package imports, commands run,
an output folder is still held by one run at a time (an exclusive-create lock file), and rows read the same.

The absence is simulated in this Linux process: `fcntl` blocked in sys.modules or set to None in `sae_vlm.outdir`,
and the `os` functions deleted for the test."""

from __future__ import annotations

import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from _adversarial import make_work, refused, tree
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae_vlm import outdir
from sae_vlm.cli import app
from sae_vlm.data.loader import FileRows, RowFile, npy_layout

TRAIN = ["train", "--data", "acts.npy", "--width", "2", "--k", "4", "--batch-size", "32", "--steps", "6",
         "--log-every", "3", "--quiet"]
STALE_PID = "987654321"  # no such process: what a run killed on Windows leaves in its lock file


@pytest.fixture
def work(tmp_path, monkeypatch):
    return make_work(tmp_path, monkeypatch)


@pytest.fixture
def no_posix(monkeypatch):
    """This process as on Windows: no flock, no fadvise, no positioned reads."""
    monkeypatch.setattr(outdir, "fcntl", None)
    for name in ("posix_fadvise", "preadv"):
        monkeypatch.delattr(os, name, raising=False)


def ok(args: list) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def sae_weights(run) -> dict[str, torch.Tensor]:
    (folder,) = (run / "saes").iterdir()
    return load_file(folder / "model.safetensors")


def test_import_and_a_command_that_takes_no_lock_work_without_fcntl_and_fadvise(work, monkeypatch):
    saved = {name: mod for name, mod in sys.modules.items() if name == "sae_vlm" or name.startswith("sae_vlm.")}
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    for name in ("posix_fadvise", "preadv"):
        monkeypatch.delattr(os, name, raising=False)
    for name in saved:
        del sys.modules[name]
    try:
        fresh_outdir = importlib.import_module("sae_vlm.outdir")
        fresh_cli = importlib.import_module("sae_vlm.cli")
        importlib.import_module("sae_vlm")
        assert fresh_outdir.fcntl is None
        r = CliRunner().invoke(fresh_cli.app, ["compare", "sae", "sae", "--data", "acts.npy", "--out", "cmp.json"])
    finally:
        for name in [n for n in sys.modules if n == "sae_vlm" or n.startswith("sae_vlm.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    assert r.exit_code == 0, r.output
    summary = json.loads((work / "cmp.json").read_text())
    latents = summary["latents"]  # an SAE matched with itself: each latent with itself, cosine and correlation 1
    assert summary["matched"] == 32 and summary["rows"] == 256 and latents["b_of_a"] == list(range(32))
    assert np.allclose(latents["cos_a"], 1.0, atol=1e-5) and np.allclose(latents["corr_a"], 1.0, atol=1e-5)
    assert not (work / outdir.LOCK).exists()


def test_training_without_flock_or_positioned_reads_gives_the_same_weights(work, monkeypatch):
    streamed = ["--max-memory", "1e-9"]  # read in pieces through the loader's FileRows
    ok(TRAIN + streamed + ["--out", "linux"])
    monkeypatch.setattr(outdir, "fcntl", None)
    for name in ("posix_fadvise", "preadv"):
        monkeypatch.delattr(os, name)
    ok(TRAIN + streamed + ["--out", "windows"])
    assert not (work / "windows" / outdir.LOCK).exists(), "the lock file must go with the run"
    linux, windows = sae_weights(work / "linux"), sae_weights(work / "windows")
    assert linux.keys() == windows.keys() and all(torch.isfinite(v).all() for v in windows.values())
    assert all(torch.equal(linux[k], windows[k]) for k in linux)
    rows = [json.loads(line) for line in (work / "windows" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6] and all(np.isfinite(r["loss"]) for r in rows), rows
    ok(TRAIN + streamed + ["--out", "windows", "--resume", "--steps", "9"])  # its own folder again: no self-lock


@pytest.mark.parametrize("args, kind", [
    (TRAIN + ["--out", "theirs"], "train"),
    (["evaluate", "sae", "--data", "acts.npy", "--out", "theirs", "--quiet"], "evaluate"),
], ids=["train", "evaluate"])
def test_a_folder_held_by_a_live_run_is_refused_with_its_pid(work, no_posix, args, kind):
    with outdir.claim(work / "theirs", kind):
        assert (work / "theirs" / outdir.LOCK).read_text() == str(os.getpid())
        refused(work, args, f"in use by another sae-vlm run (PID {os.getpid()})")
    assert not (work / "theirs" / outdir.LOCK).exists()
    ok(args)  # released: the same command now runs and leaves no lock behind
    assert not (work / "theirs" / outdir.LOCK).exists()
    assert (work / "theirs" / ("train_config.json" if kind == "train" else "metrics.json")).is_file()


@pytest.mark.parametrize("owned", [True, False], ids=["own-output", "empty"])
def test_a_lock_left_by_a_killed_run_is_refused_naming_pid_and_file_until_removed(work, no_posix, owned):
    (work / "r").mkdir()
    if owned:
        (work / "r" / outdir.OWNER).write_text(json.dumps({"kind": "train", "tool": "sae-vlm"}))
    (work / "r" / outdir.LOCK).write_text(STALE_PID)
    line = refused(work, TRAIN + ["--out", "r"], f"PID {STALE_PID}")
    assert str(work / "r" / outdir.LOCK) in line or os.path.join("r", outdir.LOCK) in line, line
    (work / "r" / outdir.LOCK).unlink()
    ok(TRAIN + ["--out", "r"])
    assert sae_weights(work / "r") and not (work / "r" / outdir.LOCK).exists()


def test_a_run_that_fails_leaves_no_folder_and_no_lock(work, no_posix):
    before = tree(work)
    r = CliRunner().invoke(app, TRAIN[:2] + ["missing.npy"] + TRAIN[3:] + ["--out", "new"])
    assert r.exit_code == 2 and "missing.npy" in r.output, r.output
    assert tree(work) == before

    with pytest.raises(RuntimeError, match="boom"):
        with outdir.claim(work / "fresh", "train"):
            raise RuntimeError("boom")
    assert not (work / "fresh").exists()
    with pytest.raises(RuntimeError, match="boom"):
        with outdir.claim(work / "kept", "train"):
            (work / "kept" / "result.txt").write_text("written before the failure")
            raise RuntimeError("boom")
    assert sorted(p.name for p in (work / "kept").iterdir()) == [outdir.OWNER, "result.txt"]  # lock released


def test_a_lock_file_that_another_run_took_over_is_not_removed_by_us(work, no_posix):
    with outdir.claim(work / "r", "train"):
        (work / "r" / outdir.LOCK).write_text(STALE_PID)  # someone removed ours and a new run locked it
    assert (work / "r" / outdir.LOCK).read_text() == STALE_PID


def two_files(tmp_path, d: int = 5) -> tuple[list[RowFile], np.ndarray]:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, d)).astype(np.float32), rng.normal(size=(11, d)).astype(np.float32)
    files, start = [], 0
    for name, arr in (("a.npy", a), ("b.npy", b)):
        np.save(tmp_path / name, arr)
        offset, shape, _ = npy_layout(tmp_path / name)
        files.append(RowFile(tmp_path / name, offset, shape[0], start))
        start += shape[0]
    return files, np.concatenate([a, b])


@pytest.mark.parametrize("missing", [(), ("posix_fadvise",), ("posix_fadvise", "preadv")],
                         ids=["linux", "macos", "windows"])
def test_rows_read_the_same_without_fadvise_or_preadv(tmp_path, monkeypatch, missing):
    for name in missing:
        monkeypatch.delattr(os, name)
    files, want = two_files(tmp_path)
    rows = FileRows(files, 5, np.dtype(np.float32))
    try:
        for r0, r1 in [(0, 18), (5, 9), (7, 8), (3, 17), (17, 18)]:  # across the two files' boundary too
            np.testing.assert_array_equal(rows.read(r0, r1), want[r0:r1])
        assert rows.bytes_read == sum(r1 - r0 for r0, r1 in [(0, 18), (5, 9), (7, 8), (3, 17), (17, 18)]) * 20
    finally:
        rows.close()


@pytest.mark.parametrize("missing", [(), ("posix_fadvise", "preadv")], ids=["linux", "windows"])
def test_a_truncated_file_is_named_without_preadv_too(tmp_path, monkeypatch, missing):
    for name in missing:
        monkeypatch.delattr(os, name)
    files, _ = two_files(tmp_path)
    with open(files[1].path, "r+b") as f:
        f.truncate(files[1].offset + 4 * 20)  # 4 of b's 11 rows left
    rows = FileRows(files, 5, np.dtype(np.float32))
    try:
        with pytest.raises(ValueError, match=r"b\.npy ends early: rows 4\.\.11 of the file \(rows 11\.\.18"):
            rows.read(0, 18)
    finally:
        rows.close()
