"""Shared test fixtures."""

import json
import os
import tempfile

import pytest
import torch


def pytest_configure(config):
    # shard checksums passed are remembered under XDG_CACHE_HOME: keep the tests' out of the user's cache
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="sae-vlm-test-cache-")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core box are ~20x slower with 2 spinning OpenMP threads; one thread also
    matches the OMP_NUM_THREADS=1 subprocesses some tests compare against."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One `sae-vlm demo --quick` run (about two minutes), read by test_science and test_planted:
    (output folder, metrics.json, what it printed)."""
    from typer.testing import CliRunner

    from sae_vlm.cli import app

    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick", "--quiet"])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "metrics.json").read_text()), result.output
