"""Peer SAE libraries, for side-by-side throughput (benchmarks/) and format-exactness tests (tests/test_formats.py).

dictionary_learning 0.1.0 (the paper's trainer), sparsify 1.3.3, SAELens 6.54.12, saev 0.1.0 and overcomplete 0.3.0
are installed into a side folder, never as package dependencies, pinned and without their dependencies:

    pip install --no-deps --target benchmarks/.peers <PINS below>

Their SAE and trainer modules are imported directly. Imports they only use elsewhere (nnsight, accelerate, natsort,
schedulefree, wandb, scipy, timm, ...) are stubbed; overcomplete's package __init__ (sklearn, opencv, timm) is
skipped by importing its submodules from a bare package.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
PINS = ["dictionary-learning==0.1.0", "eai-sparsify==1.3.3", "einops==0.8.2", "sae-lens==6.54.12",
        "transformer-lens==3.9.0", "saev==0.1.0", "overcomplete==0.3.0", "jaxtyping==0.3.11", "wadler-lindig==0.1.8",
        "beartype==0.23.1", "fancy-einsum==0.0.3", "typeguard==4.6.1", "better-abc==0.0.3", "simple-parsing==0.1.9",
        "docstring-parser==0.18.0", "platformdirs==4.14.8", "requests==2.32.5", "charset-normalizer==3.4.4"]


def _dist_info(pin: str) -> str:
    name, version = pin.split("==")
    return f"{name.replace('-', '_')}-{version}.dist-info"


def ensure_installed(target: Path = PEERS_DIR) -> None:
    """Import path for the peers; installs missing pins with pip unless SAE_VLM_NO_PIP=1 (a box without an index)."""
    missing = [pin for pin in PINS if not (target / _dist_info(pin)).is_dir()]
    if missing:
        if os.environ.get("SAE_VLM_NO_PIP") == "1":
            raise SystemExit(f"error: peers missing from {target}; create them where pip works with "
                             f"`pip install --no-deps --target {target} {' '.join(PINS)}` and carry that folder")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target",
                        str(target), *missing], check=True)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    _stub_unused_imports(target)


def unload(target: Path = PEERS_DIR) -> None:
    """Forget the peers and the stubs (sys.modules, sys.path), so later code in the process sees the real state."""
    tops = {p.name for p in target.iterdir() if p.is_dir()} | {n.split(".")[0] for n in _STUBS}
    for name in [n for n in sys.modules if n.split(".")[0] in tops]:
        del sys.modules[name]
    _STUBS.clear()
    while str(target) in sys.path:
        sys.path.remove(str(target))


_STUBS: list[str] = []


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent is missing
        return False


def _stub(name: str, **attrs) -> None:
    if name in sys.modules or _importable(name):
        return
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    _STUBS.append(name)


def _bare_package(name: str, path: Path, **attrs) -> None:
    """`name` as a package whose submodules import from `path` without running its __init__."""
    if name in sys.modules:
        return
    mod = types.ModuleType(name)
    mod.__path__ = [str(path)]
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    _STUBS.append(name)


def _stub_unused_imports(target: Path) -> None:
    import transformers  # noqa: F401  (import first: it probes for accelerate and must see the real state)

    _stub("nnsight", LanguageModel=object)
    _stub("accelerate")
    _stub("accelerate.utils", send_to_device=lambda x, device: x)
    _stub("natsort", natsorted=sorted)
    _stub("schedulefree", ScheduleFreeWrapper=object)
    _stub("wandb")
    _stub("scipy")
    _stub("scipy.optimize", linear_sum_assignment=None)
    _bare_package("overcomplete", target / "overcomplete")
    _bare_package("overcomplete.optimization", target / "overcomplete" / "optimization", batched_matrix_nnls=None)

    def list_field(*default):
        return dataclasses.field(default_factory=lambda: list(default))

    _stub("simple_parsing", Serializable=object, list_field=list_field, field=dataclasses.field, parse=None)


def dictionary_learning_step(arch: str, d_in: int, expansion: int, k: int, device: torch.device, steps: int):
    """A callable (step, x) running one BatchTopKTrainer / MatryoshkaBatchTopKTrainer.update."""
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    common = dict(steps=steps, activation_dim=d_in, dict_size=expansion * d_in, k=k, layer=0, lm_name="bench",
                  device=str(device), threshold_start_step=0, seed=0)
    if arch == "batchtopk":
        trainer = BatchTopKTrainer(**common)
    elif arch == "matryoshka":
        trainer = MatryoshkaBatchTopKTrainer(**common, group_fractions=[1 / 16, 1 / 8, 1 / 4, 9 / 16])
    else:
        raise ValueError(f"dictionary_learning peer has no {arch!r} trainer in this benchmark")
    return trainer.update


def sparsify_step(d_in: int, expansion: int, k: int, device: torch.device, bf16: bool):
    """A callable (step, x) running one sparsify TopK SparseCoder training step with Adam (its trainer's loop)."""
    from sparsify.config import SparseCoderConfig
    from sparsify.sparse_coder import SparseCoder

    sae = SparseCoder(d_in, SparseCoderConfig(expansion_factor=expansion, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4)

    def step(_step: int, x: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae(x)
            loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()

    return step
