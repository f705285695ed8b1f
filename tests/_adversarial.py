"""What every adversarial probe checks: exit code 2, one `error:` line naming the culprit, and an unchanged tree
(no file written, changed or deleted, no folder created)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app

D = 16  # the width of the probes' activations


def make_work(tmp_path: Path, monkeypatch) -> Path:
    """A folder with activations, embeddings and one trained-looking SAE, as the working directory."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.normal(size=(256, D)) + 0.3).astype(np.float32))
    np.save(tmp_path / "emb.npy", rng.normal(size=(256, 6)).astype(np.float32))
    torch.manual_seed(0)
    SAE(SAEConfig("batchtopk", D, 32, 4)).save_pretrained(tmp_path / "sae")
    return tmp_path


def tree(root: Path) -> dict[str, str]:
    """Every folder and file under root, files by the sha256 of their bytes (a lock file by its presence: each run
    that takes a lock writes its PID there)."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else "lock" if p.name == ".sae-vlm.lock"
            else hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))}


def refused(root: Path, args: list, culprit: str) -> str:
    before = tree(root)
    r = CliRunner().invoke(app, [str(a) for a in args])
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert culprit in lines[0], lines[0]
    assert tree(root) == before, "a refused command touched files"
    return lines[0]
