"""Kills mid-write and runs at once. What a killed `evaluate`, `report` or `convert` leaves is whole or absent; the
same command then finishes with the outputs of an unbroken run; five `extract`s on one folder end in one store."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _extract_helpers import make_images, save_tiny_clip
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.io import TEMP_NAME
from sae_vlm.outdir import LOCK

EXE = Path(sys.executable).with_name("sae-vlm")
CLI = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "sae_vlm.cli"]


def files(root: Path) -> dict[str, str]:
    """Finished files by sha256; the lock (it holds the last writer's PID) by presence only."""
    return {p.relative_to(root).as_posix(): "lock" if p.name == LOCK else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not TEMP_NAME.fullmatch(p.name)}


def whole(path: Path) -> None:
    """Open a finished output file the way its reader would; raises on a partial write."""
    if path.suffix == ".json" or path.name == OWNER_FILE:
        json.loads(path.read_text())
    elif path.suffix == ".npz":
        with np.load(path) as z:
            [z[k] for k in z.files]
    elif path.suffix == ".npy":
        np.load(path)
    elif path.suffix == ".safetensors":
        load_file(path)
    elif path.suffix in (".png", ".jpg"):
        from PIL import Image

        Image.open(path).load()
    elif path.suffix in (".html", ".md"):
        text = path.read_text()
        assert text.strip() and (path.suffix == ".md" or text.rstrip().endswith("</html>")), path


OWNER_FILE = ".sae-vlm-owner.json"


def kill_when(args: list[str], out: Path, n_files: int, timeout: float = 120) -> bool:
    """Start the command and SIGKILL it once `out` holds `n_files` finished files; False if it ended first."""
    proc = subprocess.Popen(CLI + args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - t0 < timeout:
            if out.is_dir() and sum(not TEMP_NAME.fullmatch(q.name) for q in out.rglob("*") if q.is_file()) >= n_files:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.005)
        assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
        return False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """120 images → tiny CLIP store → two SAEs (no evaluation yet), and an unbroken evaluation and report."""
    root = tmp_path_factory.mktemp("interrupts")
    make_images(root / "imgs", 60, classes=("a/x", "b/y"), size=(32, 32))
    clip = save_tiny_clip(root / "clip")
    steps = [["extract", "--model", str(clip), "--data", str(root / "imgs"), "--layers", "1", "--tokens", "cls",
              "--out", str(root / "store"), "--quiet", "--workers", "1"],
             ["train", "--data", str(root / "store"), "--arch", "batchtopk,matryoshka", "--width", "2", "--k", "4",
              "--batch-size", "60", "--steps", "10", "--out", str(root / "run"), "--quiet", "--device", "cpu"]]
    for args in steps:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (args[0], r.output)
    return root, clip


def evaluate_args(root: Path, clip: Path, out: Path) -> list[str]:
    return ["evaluate", str(root / "run"), "--data", str(root / "store"), "--embedder", str(clip), "--out", str(out),
            "--quiet", "--device", "cpu"]


def report_args(root: Path, out: Path) -> list[str]:
    return ["report", str(root / "run"), "--eval", str(root / "eval_ref"), "--out", str(out), "--quiet"]


def in_process(args: list[str]) -> None:
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output


def check_kill_then_rerun(args_for, reference: Path, base: Path, fractions=(0.1, 0.7)) -> int:
    """Kill at several points of the write (a new folder each); every finished file then opens, and a rerun
    matches the unbroken run file for file. Returns how many kills landed mid-run."""
    want = files(reference)
    landed = 0
    for i, frac in enumerate(fractions):
        n, out = max(1, int(frac * len(want))), base / str(i)
        landed += kill_when(args_for(out), out, n)
        for rel in files(out):
            whole(out / rel)
        in_process(args_for(out))
        got = files(out)
        assert got.keys() == want.keys(), sorted(set(got) ^ set(want))
        differ = [k for k in want if got[k] != want[k] and not k.endswith((".png", ".html"))]
        assert not differ, differ
        assert not [p for p in out.rglob("*") if TEMP_NAME.fullmatch(p.name)], "a killed run's temp files remain"
    return landed


def test_a_killed_evaluate_or_report_reruns_to_the_unbroken_outputs(run):
    root, clip = run
    in_process(evaluate_args(root, clip, root / "eval_ref"))
    in_process(report_args(root, root / "report_ref"))
    landed = check_kill_then_rerun(lambda out: evaluate_args(root, clip, out), root / "eval_ref", root / "eval")
    landed += check_kill_then_rerun(lambda out: report_args(root, out), root / "report_ref", root / "report")
    assert landed >= 3, "the kills should land while the commands write"


def test_a_killed_convert_reruns_to_the_same_sae(tmp_path):
    torch.manual_seed(0)
    SAE(SAEConfig("batchtopk", 256, 256 * 64, 8)).save_pretrained(tmp_path / "src")  # 32 MB each way
    args = lambda out: ["convert", str(tmp_path / "src"), str(out), "--to", "sae-lens"]  # noqa: E731
    in_process(args(tmp_path / "ref"))
    check_kill_then_rerun(args, tmp_path / "ref", tmp_path / "dst", fractions=(0.3,))


def test_five_extracts_on_one_folder_end_in_one_store(run, tmp_path):
    """Each either finishes or is refused in one line naming the PID holding the folder; the store then equals an
    unbroken one and reruns as a no-op."""
    root, clip = run
    args = ["extract", "--model", str(clip), "--data", str(root / "imgs"), "--layers", "1", "--tokens", "cls",
            "--out", str(tmp_path / "store"), "--quiet", "--workers", "1", "--shard-rows", "16"]
    procs = [subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(5)]
    results = [(p.wait(), *p.communicate()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    assert ok, results
    for rc, _, err in results:
        if rc != 0:
            lines = err.strip().splitlines()
            assert rc == 2 and len(lines) == 1 and "in use by another sae-vlm run (PID" in lines[0], err
    ref = tmp_path / "ref"
    in_process([a if a != str(tmp_path / "store") else str(ref) for a in args])
    got, want = files(tmp_path / "store"), files(ref)
    assert got.keys() == want.keys()
    differ = [k for k in want if got[k] != want[k] and not k.endswith(("extract_config.json", "manifest.json"))]
    assert not differ, differ
    before = files(tmp_path / "store")
    in_process(args)
    assert files(tmp_path / "store") == before
    assert os.path.exists(tmp_path / "store" / LOCK)
