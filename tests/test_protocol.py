"""One data protocol and typed results (#26): every source answers the same questions, results are dataclasses,
and the files they are written to keep their layout byte for byte."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.data.source import ActivationSource, NumpySource, StoreMeta, TensorSource, sequential_chunks
from sae_vlm.data.store import StoreWriter, as_source
from sae_vlm.eval.run import EvalMetrics, SAEResult, evaluate_run
from sae_vlm.sae.trainer import source_meta

GOLDEN = Path(__file__).parent / "data" / "evaluate_golden.json"
D = 16


def evaluated(root: Path) -> str:
    """`sae-vlm evaluate` over two seeds of one SAE, a Matryoshka SAE, an unreadable one, embeddings and a
    taxonomy (every optional part of metrics.json); returns what it printed."""
    rng = np.random.default_rng(0)
    np.save(root / "acts.npy", (rng.normal(size=(60, D)) + 0.2).astype(np.float32))
    np.save(root / "emb.npy", rng.normal(size=(60, 8)).astype(np.float32) + 0.5)
    (root / "tax.json").write_text(json.dumps({str(i): f"A/B{i % 2}/c{i % 4}" for i in range(60) if i != 7}))
    torch.manual_seed(0)
    for name, cfg in [("btk_s0", SAEConfig("batchtopk", D, 32, 4, hook_point="layer.1", token_selection="cls")),
                      ("btk_s1", SAEConfig("batchtopk", D, 32, 4, hook_point="layer.1", token_selection="cls")),
                      ("mat", SAEConfig("matryoshka", D, 32, 4, group_sizes=(8, 24), hook_point="layer.1",
                                        token_selection="cls"))]:
        sae = SAE(cfg)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)
        sae.save_pretrained(root / "run" / "saes" / name)
    (root / "run" / "saes" / "zz_broken").mkdir()
    (root / "run" / "saes" / "zz_broken" / "config.json").write_text("[1, 2]")
    r = CliRunner().invoke(app, ["evaluate", str(root / "run"), "--data", str(root / "acts.npy"), "--embeddings",
                                 str(root / "emb.npy"), "--taxonomy", str(root / "tax.json"), "--out",
                                 str(root / "out"), "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    return r.output


def normalised(root: Path) -> str:
    return (root / "out" / "metrics.json").read_text().replace(str(root), "<tmp>")


def _same(got, want, where="metrics.json"):
    """Same keys in the same order, same types, numbers equal to float rounding (the golden was written on
    another machine's BLAS)."""
    assert type(got) is type(want), (where, got, want)
    if isinstance(want, dict):
        assert list(got) == list(want), (where, list(got), list(want))
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7, nan_ok=True), where
    else:
        assert got == want, where


# --- results: metrics.json, tables.md and what evaluate prints keep their layout ------------------------------------

@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    return root, evaluated(root)


def test_metrics_json_keeps_the_pre_refactor_layout(evaluation):
    """Generated on the pre-refactor code (dict results) by the same `evaluated`: same keys in the same order at
    every depth, the same numbers; the optional parts (broken, embeddings, seeds, taxonomy, hierarchy,
    stable_share, ms_per_level) are all there."""
    root, _ = evaluation
    got, want = json.loads(normalised(root)), json.loads(GOLDEN.read_text())
    assert list(want) == ["run", "data", "saes", "baselines", "step", "broken", "embeddings", "rows",
                          "chance_similarity", "seeds", "taxonomy"]
    _same(got, want)
    assert (root / "out" / "tables.md").read_text() == (GOLDEN.parent / "evaluate_golden_tables.md").read_text()


def test_evaluate_prints_what_it_printed_before(evaluation):
    root, printed = evaluation
    want = GOLDEN.with_suffix(".txt").read_text()
    number = re.compile(r"\d+\.\d+")
    assert number.sub("#", printed.replace(str(root), "<tmp>")) == number.sub("#", want)
    assert [float(x) for x in number.findall(printed)] == pytest.approx([float(x) for x in number.findall(want)],
                                                                        abs=1.5e-3)


def test_evaluate_run_returns_typed_results_that_serialise_to_the_file(evaluation, tmp_path):
    root, _ = evaluation
    cfg_args = dict(run_dir=str(root / "run"), data=str(root / "acts.npy"), embeddings=str(root / "emb.npy"),
                    out=str(tmp_path / "out"), device="cpu", quiet=True)
    from sae_vlm.config import EvaluateConfig

    m = evaluate_run(EvaluateConfig(**cfg_args))
    assert isinstance(m, EvalMetrics) and all(isinstance(r, SAEResult) for r in m.saes)
    assert [r.name for r in m.saes] == ["btk_s0", "btk_s1", "mat"] and [b.name for b in m.broken] == ["zz_broken"]
    assert m.saes[2].group_sizes == [8, 24] and m.saes[0].stable_share is not None and m.saes[2].stable_share is None
    assert m.taxonomy is None and all(r.hierarchy is None for r in m.saes)  # no taxonomy given: none written
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert json.loads(json.dumps(m.to_json(), default=float)) == on_disk
    assert "hierarchy" not in on_disk["saes"][0] and "taxonomy" not in on_disk and on_disk["rows"] == 60
    z = np.load(tmp_path / "out" / "latents" / "mat.npz")
    assert z.files == ["ms", "support", "max_act", "freq", "fire_freq", "top_values", "top_indices"]


def test_results_without_embeddings_leave_their_parts_out(tmp_path):
    r = SAEResult("a", "p", None, "relu", "last", 4, 8, None, None, recon={"fve": 0.5})
    assert r.to_json() == {"name": "a", "path": "p", "step": None, "arch": "relu", "hook_point": "last", "d_in": 4,
                           "d_sae": 8, "k": None, "group_sizes": None, "ms": None, "recon": {"fve": 0.5}}
    r.ms, r.ms_support_median = {"scored": 0}, None  # an MS with nothing scored keeps its null median
    assert list(r.to_json())[9:12] == ["ms", "ms_per_level", "ms_support_median"]
    m = EvalMetrics("run", "data", step="final")
    assert m.to_json() == {"run": "run", "data": "data", "saes": [], "baselines": {}, "step": "final"}
    assert dataclasses.asdict(m)["broken"] == []


# --- sources: one protocol -----------------------------------------------------------------------------------------

def _store(root: Path, rows_per_image: int = 1) -> Path:
    """A two-image store written by the real writer: 2 * rows_per_image rows of width 3."""
    sub = {"layer.1__cls": {"hook_point": "layer.1", "tokens": "cls", "rows_per_image": rows_per_image,
                            "width": 3, "note": ""}}
    w = StoreWriter(root / "s", {"dtype": "fp32"}, sub)
    w.prepare()
    x = np.arange(6 * rows_per_image, dtype=np.float32).reshape(-1, 3)
    imgs = [{"id": f"i{j}", "path": str(root / "imgs" / f"f{j}" / f"i{j}.png"), "label": f"f{j}"} for j in range(2)]
    w.write_shard(0, {"layer.1__cls": x}, {"layer.1__cls": np.zeros(len(x), np.int32)}, imgs, [])
    w.finalize(1, {"model_id": "tiny/clip", "revision": "r"})
    return root / "s"


def test_every_source_answers_the_whole_protocol(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.save(tmp_path / "x.npy", x)
    sources = [TensorSource(torch.from_numpy(x)), NumpySource(x), as_source(tmp_path / "x.npy"),
               as_source(_store(tmp_path))]
    for src in sources[:3] + [as_source(tmp_path / "s")]:
        assert isinstance(src, ActivationSource)
    for src in sources[:3]:
        assert src.meta is None
        np.testing.assert_array_equal(src.all().numpy(), x)
        np.testing.assert_array_equal(src.read_rows(1, 3).numpy(), x[1:3])
        np.testing.assert_array_equal(src.get(torch.tensor([3, 0])).numpy(), x[[3, 0]])
        assert source_meta(src) == {"hook_point": None, "model_id": None, "token_selection": None}
    assert sources[0].files is None and sources[1].files is None and sources[2].files is not None
    store = sources[3]
    assert isinstance(store.meta, StoreMeta) and store.files is not None and store.rows == 2
    assert store.meta.image_ids() == ["i0", "i1"] and store.meta.labels() == ["f0", "f1"]
    assert store.meta.paths(resolve=False)[1].endswith("f1/i1.png") and store.meta.rows_per_image == 1
    assert source_meta(store) == {"hook_point": "layer.1", "model_id": "tiny/clip", "token_selection": "cls"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        store.meta.rows_per_image = 2  # type: ignore[misc]


def test_a_source_that_declares_only_get_reads_in_runs_through_it():
    class Squares(ActivationSource):
        rows, d_in = 5, 2

        def get(self, idx_N):
            return torch.stack([idx_N.float() ** 2, -idx_N.float()], 1)

    src = Squares()
    assert as_source(src) is src and src.meta is None and src.files is None
    chunks = [(r0, x.tolist()) for r0, x in sequential_chunks(src, 2)]
    assert chunks == [(0, [[0, 0], [1, -1]]), (2, [[4, -2], [9, -3]]), (4, [[16, -4]])]
    assert src.all()[:, 0].tolist() == [0, 1, 4, 9, 16]


def test_no_source_is_probed_by_attribute_name():
    """No getattr/hasattr on a source, a store or an src anywhere in the package."""
    src = Path(__file__).parents[1] / "src" / "sae_vlm"
    out = subprocess.run(["grep", "-rnE", r"(getattr|hasattr)\((src|source|store|inp\.src|d\.source)\b", str(src)],
                         capture_output=True, text=True)
    assert out.stdout == "", out.stdout


# --- what a store-only command says about a source without a store -------------------------------------------------

@pytest.fixture
def tokens_store(tmp_path):
    store = _store(tmp_path, rows_per_image=2)
    torch.manual_seed(0)
    SAE(SAEConfig("relu", 3, 4, hook_point="layer.1", token_selection="cls")).save_pretrained(tmp_path / "run" /
                                                                                           "saes" / "a")
    np.save(tmp_path / "emb.npy", np.ones((4, 2), np.float32))
    return tmp_path, store


def test_a_token_store_refused_for_ms_names_the_store_subdir(tokens_store):
    root, store = tokens_store
    from _adversarial import refused

    line = refused(root, ["evaluate", root / "run", "--data", store, "--embeddings", root / "emb.npy", "--out",
                          root / "out", "--device", "cpu", "--quiet"], str(store / "layer.1__cls"))
    assert "2 rows per image" in line


def test_an_embedder_on_a_npy_names_the_missing_store(tmp_path):
    from _adversarial import refused

    np.save(tmp_path / "x.npy", np.ones((4, 3), np.float32))
    SAE(SAEConfig("relu", 3, 4)).save_pretrained(tmp_path / "run" / "saes" / "a")
    refused(tmp_path, ["evaluate", tmp_path / "run", "--data", tmp_path / "x.npy", "--embedder", "some/model",
                       "--out", tmp_path / "out", "--device", "cpu", "--quiet"], "--embedder some/model")


def demo_layout(m) -> list[str]:
    """metrics.json's keys in order, three levels deep (four under `layers`, the typed per-SAE summaries), with the
    kind of each value; a number and null count as one kind (a finding can be undefined on another machine)."""
    out = []

    def walk(x, path: str, depth: int):
        if depth > (4 if path.startswith("/layers") else 3):
            return
        if isinstance(x, dict):
            out.append(f"{path} {{{','.join(x)}}}")
            for k, v in x.items():
                walk(v, f"{path}/{k}", depth + 1)
        elif isinstance(x, list):
            out.append(f"{path} [list]")
            if x:
                walk(x[0], f"{path}[]", depth)
        else:
            out.append(f"{path} {'number' if x is None or type(x) in (int, float) else type(x).__name__}")

    walk(m, "", 0)
    return out


def test_the_demo_metrics_layout_is_the_one_before_the_typed_results(quick_demo):
    """Recorded from `sae-vlm demo --quick` at commit 2d67c4f, before its summaries became dataclasses; since then
    only added to: `localisation` and `findings.localisation` (the heatmaps, #27); `naming`, `alignment` and their
    findings (#28)."""
    golden = (Path(__file__).parent / "data" / "demo_quick_layout.txt").read_text().splitlines()
    assert demo_layout(quick_demo[1]) == golden
