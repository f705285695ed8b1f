"""An architecture is one record in sae/arch.py: a new one registers there and trains, saves and reloads with no
other change. The records of the five shipped ones drive the model, trainer and steering."""

from __future__ import annotations

import json

import pytest
import torch

from sae_vlm import SAE
from sae_vlm.config import TrainConfig
from sae_vlm.sae import arch, losses, trainer


@pytest.fixture
def topk_l1():
    """A sixth architecture: per-row top-k selection plus an L1 penalty on the kept codes."""
    spec = arch.register(arch.ArchSpec("topk_l1", "topk", "topk",
                                       {"recon": arch.RECON, "aux": arch.AUX, "l1": arch.Term(losses.l1, "l1_coeff")}))
    yield spec
    del arch.ARCHS["topk_l1"]


def test_a_registered_architecture_trains_saves_and_reloads(tmp_path, topk_l1, one_thread):
    torch.manual_seed(0)
    x = torch.randn(2048, 16) @ torch.randn(16, 16)
    cfg = TrainConfig(data="synthetic", out=str(tmp_path), archs=("topk_l1",), expansions=(2,), ks=(3,),
                      batch_size=256, steps=60, lr=0.01, warmup_steps=5, l1_coeff=0.2, log_every=20, device="cpu",
                      quiet=True)
    sae = trainer.train(cfg, source=x)["topk_l1_x2_k3"]
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [20, 40, 60]
    for r in rows:  # the record's terms, weighted by the config fields it names
        assert r["loss"] == pytest.approx(r["recon"] + cfg.aux_alpha * r["aux"] + 0.2 * r["l1"], rel=1e-5)
    assert rows[-1]["fve"] > rows[0]["fve"] and rows[-1]["fve"] > 0.5

    with torch.no_grad():
        codes = sae.encode(x)  # the record's inference mode: top-k per row
    assert int((codes > 0).sum(1).max()) <= 3
    assert float(sae.threshold) == 0.0  # θ is not tracked for this record: the untracked gate at 0
    again = SAE.from_pretrained(tmp_path / "saes" / "topk_l1_x2_k3")
    assert again.cfg.arch == "topk_l1" and torch.equal(again.encode(x), codes)


def test_unknown_architecture_names_the_registered_ones():
    with pytest.raises(ValueError, match="unknown architecture 'gated'; expected one of relu, topk, batchtopk"):
        TrainConfig(data="x", out="y", archs=("gated",))


def test_records_drive_the_shared_mechanisms():
    specs = arch.ARCHS
    assert [n for n, s in specs.items() if s.tracks_threshold] == ["topk", "batchtopk", "matryoshka"]
    assert [n for n, s in specs.items() if s.fast_path] == ["topk", "batchtopk", "matryoshka"]
    assert [n for n, s in specs.items() if s.nested_groups] == ["matryoshka"]
    assert [n for n, s in specs.items() if not s.elementwise] == ["topk"]
    with pytest.raises(ValueError, match="fast path needs a top-k selection"):
        arch.ArchSpec("bad", "relu", "relu", {"recon": arch.RECON}, fast_path=True)
