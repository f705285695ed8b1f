"""Peer trainers for side-by-side throughput: dictionary_learning 0.1.0 (the paper's trainer) and sparsify 1.3.3.

They are installed into a benchmark-only folder, never as package dependencies:

    pip install --no-deps --target benchmarks/.peers dictionary-learning==0.1.0 eai-sparsify==1.3.3 einops

Their trainer modules are imported directly; imports they only use outside training (nnsight, accelerate,
natsort, simple_parsing) are stubbed.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import os
import subprocess
import sys
import types
from pathlib import Path

import torch

PEERS_DIR = Path(__file__).resolve().parent / ".peers"
PINS = ["dictionary-learning==0.1.0", "eai-sparsify==1.3.3", "einops"]


def ensure_installed(target: Path = PEERS_DIR) -> None:
    """Import path for the peers; installs them with pip unless SAE_VLM_NO_PIP=1 (a GPU box without an index)."""
    if not (target / "dictionary_learning").is_dir() or not (target / "sparsify").is_dir():
        if os.environ.get("SAE_VLM_NO_PIP") == "1":
            raise SystemExit(f"error: peers missing from {target}; create them where pip works with "
                             f"`pip install --no-deps --target {target} {' '.join(PINS)}` and carry that folder")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *PINS],
                       check=True)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    _stub_unused_imports()


def _stub(name: str, **attrs) -> None:
    if name in sys.modules:
        return
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod


def _stub_unused_imports() -> None:
    import transformers  # noqa: F401  (import first: it probes for accelerate and must see the real state)

    _stub("nnsight", LanguageModel=object)
    _stub("accelerate")
    _stub("accelerate.utils", send_to_device=lambda x, device: x)
    _stub("natsort", natsorted=sorted)
    _stub("schedulefree", ScheduleFreeWrapper=object)

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
