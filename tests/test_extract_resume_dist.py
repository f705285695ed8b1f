"""A kill -9 mid-extraction resumes to exactly the uninterrupted store; 2 ranks give the single-process store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _extract_helpers import make_images, save_tiny_clip

from sae_vlm.data.store import list_subdirs, open_store

SAE_VLM = str(Path(sys.executable).with_name("sae-vlm"))


def _run_in_process(args: list[str]) -> None:
    from typer.testing import CliRunner

    from sae_vlm.cli import app

    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)


def _same_store(a: Path, b: Path) -> None:
    assert list_subdirs(a) == list_subdirs(b) and list_subdirs(a)
    skipped_a, skipped_b = (json.loads((d / "manifest.json").read_text())["skipped"] for d in (a, b))
    assert skipped_a == skipped_b
    for name in list_subdirs(a):
        ma, mb = (json.loads((d / name / "manifest.json").read_text()) for d in (a, b))
        assert ma["shards"] == mb["shards"] and ma["rows"] == mb["rows"]  # same files, same sha256
        assert (a / name / "rows.jsonl").read_text() == (b / name / "rows.jsonl").read_text()
        ra, rb = open_store(a, name), open_store(b, name)
        assert np.array_equal(ra.all().numpy(), rb.all().numpy())
        ids = [im["id"] for im in ra.images()]
        assert len(ids) == len(set(ids))  # no duplicated images


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted(tmp_path):
    model = save_tiny_clip(tmp_path / "m")
    make_images(tmp_path / "imgs", 30, size=(16, 16))
    (tmp_path / "imgs" / "zero.png").write_bytes(b"")
    args = ["extract", "--model", str(model), "--data", str(tmp_path / "imgs"), "--layers", "1,last",
            "--tokens", "cls,random-2", "--shard-rows", "10", "--batch-size", "7", "--workers", "1", "--quiet"]
    # batch 7 over 5-image shards: only batches that never span shards make the resumed shards byte-identical
    out = tmp_path / "killed"
    proc = subprocess.Popen([SAE_VLM, *args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "parts" / "shard_000000.json"
    while not first.exists():
        assert proc.poll() is None, "extraction ended before its first shard"
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "run finished before the kill; make it longer"
    n_done = len(list((out / "parts").glob("*.json")))
    assert 1 <= n_done < 13
    res = subprocess.run([SAE_VLM, *args, "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not list(out.glob("**/.*.tmp*"))
    ref = tmp_path / "ref"
    _run_in_process([*args, "--out", str(ref)])
    _same_store(out, ref)
    assert open_store(out, "layer.1__cls").rows == 60


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    model = save_tiny_clip(tmp_path / "m")
    make_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "00000_Animalia_Chordata" / "bad.png").write_text("text")
    args = ["extract", "--model", str(model), "--data", str(tmp_path / "imgs"), "--layers", "2,last",
            "--tokens", "mean,random-3", "--shard-rows", "3", "--batch-size", "2", "--workers", "1", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "sae_vlm.cli", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    _run_in_process([*args, "--out", str(tmp_path / "one")])
    _same_store(tmp_path / "two", tmp_path / "one")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["skipped"][0]["path"].endswith("bad.png")
