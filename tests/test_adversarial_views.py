"""Taxonomy credit and the views (report, browse) given broken evaluation outputs.

A `--taxonomy` file that matches no row, or that is malformed, is one `error:` line naming it (and the CSV line);
a partial match is counted, and metrics.json, tables.md and the report credit the file with that count. A report or
browser over an evaluation folder with a truncated, foreign or malformed file refuses at start-up in one line
naming that file, and writes nothing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _adversarial import refused, tree
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.eval import hierarchy as H
from sae_vlm.eval.report import paper_tables

BIRD = "00002_Animalia_Chordata_Aves_Corvi_Corvidae_Corvus_corax"  # iNat-style: never credited to a file
TAX = "label,path\ncats,animal/mammal/cat\ndogs,animal/mammal/dog\n"
N_PER_CLASS = 6


@pytest.fixture(scope="module")
def views(tmp_path_factory, one_thread):
    """Images of cats, dogs and an iNat-labelled bird → tiny CLIP store → an untrained Matryoshka SAE → `evaluate`
    with a taxonomy file that lists cats and dogs only. Returns (root, what evaluate printed)."""
    from _extract_helpers import make_images, save_tiny_clip

    root = tmp_path_factory.mktemp("views")
    make_images(root / "imgs", N_PER_CLASS, classes=("cats", "dogs", BIRD), size=(32, 32))
    clip = save_tiny_clip(root / "clip")
    r = CliRunner().invoke(app, ["extract", "--model", str(clip), "--data", str(root / "imgs"), "--layers", "1",
                                 "--tokens", "cls", "--out", str(root / "store"), "--quiet", "--workers", "1"])
    assert r.exit_code == 0, r.output
    torch.manual_seed(0)
    SAE(SAEConfig("matryoshka", 32, 64, 4, group_sizes=(8, 56), hook_point="layer.1", token_selection="cls")
        ).save_pretrained(root / "run" / "saes" / "m")
    np.save(root / "emb.npy", np.random.default_rng(0).normal(size=(3 * N_PER_CLASS, 6)).astype(np.float32))
    (root / "tax.csv").write_text(TAX)
    r = CliRunner().invoke(app, ["evaluate", str(root / "run"), "--data", str(root / "store"), "--embeddings",
                                 str(root / "emb.npy"), "--taxonomy", str(root / "tax.csv"), "--out",
                                 str(root / "eval"), "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return root, r.output


def _evaluate(root: Path, tmp: Path, taxonomy) -> list[str]:
    return ["evaluate", str(root / "run"), "--data", str(root / "store"), "--taxonomy", str(taxonomy),
            "--out", str(tmp / "out"), "--quiet", "--device", "cpu"]


def _auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Mann-Whitney by all pairs: P(a positive scores above a negative), ties counting half."""
    pos, neg = scores[positive], scores[~positive]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


# --- the taxonomy is credited to the source used, with its count ---------------------------------------------------

def test_a_partial_file_is_counted_and_its_unmatched_rows_are_left_out(views):
    root, printed = views
    assert "matched 12 of 18 rows" in printed and BIRD in printed  # said, not only stored
    m = json.loads((root / "eval" / "metrics.json").read_text())
    t = m["taxonomy"]
    assert t["source"] == "file" and t["file"] == str(root / "tax.csv")
    assert (t["matched_rows"], t["rows"], t["unmatched_labels"], t["images_missing"]) == (12, 18, [BIRD], 6)
    h = m["saes"][0]["hierarchy"]
    assert h["taxonomy_source"] == "file" and h["taxonomy_depth"] == 3  # the bird's 7 iNat levels are not mixed in
    assert h["taxonomy_rows"] == {"matched_rows": 12, "rows": 18}
    assert "against the file taxonomy (12 of 18 rows matched)" in (root / "eval" / "tables.md").read_text()
    # node detection ranks only the 12 matched rows: the bird is neither a positive nor a negative
    from sae_vlm.data.store import as_source

    src = as_source(root / "store", layer="layer.1__cls")
    codes = SAE.from_pretrained(root / "run" / "saes" / "m").encode(src.get(torch.arange(src.rows))).detach().numpy()
    labels = np.array(src.labels())
    kept = labels != BIRD
    nodes = {n["node"]: n for n in json.loads((root / "eval" / "nodes" / "m.json").read_text())}
    assert set(nodes) == {"animal/mammal/cat", "animal/mammal/dog"}  # all matched rows are animal/mammal: no negatives
    cat = nodes["animal/mammal/cat"]
    best = max(_auroc(codes[kept, f], labels[kept] == "cats") for f in range(codes.shape[1]))
    assert cat["auroc"] == pytest.approx(_auroc(codes[kept, cat["latent"]], labels[kept] == "cats")) == best


def test_the_report_credits_the_same_source(views, tmp_path):
    root, _ = views
    r = CliRunner().invoke(app, ["report", str(root / "run"), "--eval", str(root / "eval"), "--out",
                                 str(tmp_path / "rep"), "--all", "--quiet"])
    assert r.exit_code == 0, r.output
    index = (tmp_path / "rep" / "index.html").read_text()
    assert "taxonomy from the file tax.csv: 12 of 18 rows matched" in index
    assert "against the file taxonomy (12 of 18 rows matched)" in index
    cat = next(n for n in json.loads((root / "eval" / "nodes" / "m.json").read_text())
               if n["node"] == "animal/mammal/cat")
    assert "animal/mammal/cat" in (tmp_path / "rep" / "s" / "m" / f"{cat['latent']}.html").read_text()


def test_a_file_that_matches_no_label_is_refused_naming_both_sides(views, tmp_path):
    root, _ = views
    (tmp_path / "tax.json").write_text(json.dumps({"lion": "a/b/c", "tiger": "a/b/d"}))
    line = refused(tmp_path, _evaluate(root, tmp_path, tmp_path / "tax.json"), str(tmp_path / "tax.json"))
    assert "matches none of the 18 rows" in line and "lion" in line and "cats" in line


def test_a_file_keyed_by_label_on_npy_data_says_rows_are_numbers(views, tmp_path):
    root, _ = views
    np.save(tmp_path / "acts.npy", np.random.default_rng(1).normal(size=(20, 32)).astype(np.float32))
    (tmp_path / "tax.json").write_text(json.dumps({"cats": "a/b"}))
    args = _evaluate(root, tmp_path, tmp_path / "tax.json")
    args[args.index("--data") + 1] = str(tmp_path / "acts.npy")
    assert "row numbers 0..19" in refused(tmp_path, args, str(tmp_path / "tax.json"))


BAD_TAXONOMIES = [  # (file name, bytes, what the line says besides the file)
    ("latin1.csv", b"label,path\ncats,anim\xe9l/mammal/cat\n", "line 2"),
    ("latin1.json", b'{"cats": "anim\xe9l/m/c"}', "not UTF-8"),
    ("extra.csv", b"label,path\ncats,animal/mammal/cat\ndogs,animal/mammal/dog,oops\n", "line 3: 3 fields"),
    ("short.csv", b"label,path\ncats\n", "line 2: 1 fields"),
    ("header.csv", b"name,taxon\ncats,a/b\n", "columns"),
    ("only_header.csv", b"label,path\n", "maps no label"),
    ("twice.csv", b"label,path\ncats,a/b/c\ncats,a/b/d\n", "line 3"),
    ("ragged.csv", b"label,path\ncats,animal/mammal/cat\ndogs,animal/dog\n", "line 3: 2 levels"),
    ("ragged.json", b'{"cats": ["a", "b", "c"], "dogs": ["a", "b"]}', "2 levels"),
    ("list.json", b'["cats", "dogs"]', "holds a list"),
    ("number.json", b'{"cats": 5}', "'cats'"),
    ("nested.json", b'{"cats": [["a"], "b"]}', "'cats'"),
    ("nolevels.json", b'{"cats": "///"}', "no levels"),
    ("empty.json", b"", "is empty"),
    ("blank.csv", b"\n  \n", "is empty"),
    ("cut.json", b'{"cats": "a/b', "not valid JSON"),
    ("nothing.json", b"{}", "maps no label"),
    ("tax.txt", b"cats a/b\n", "expected .csv or .json"),
]


@pytest.mark.parametrize("name,content,says", BAD_TAXONOMIES, ids=[b[0] for b in BAD_TAXONOMIES])
def test_a_malformed_taxonomy_file_is_one_line_naming_it(views, tmp_path, name, content, says):
    root, _ = views
    (tmp_path / name).write_bytes(content)
    assert says in refused(tmp_path, _evaluate(root, tmp_path, tmp_path / name), str(tmp_path / name))


def test_a_folder_given_as_taxonomy_is_named(views, tmp_path):
    root, _ = views
    (tmp_path / "tax.csv").mkdir()
    assert "not a file" in refused(tmp_path, _evaluate(root, tmp_path, tmp_path / "tax.csv"), "tax.csv")


def test_a_bom_csv_as_excel_writes_it_reads_the_same():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "t.csv").write_bytes(b"\xef\xbb\xbf" + TAX.encode())
        assert H.load_taxonomy_file(Path(d) / "t.csv") == {"cats": ("animal", "mammal", "cat"),
                                                             "dogs": ("animal", "mammal", "dog")}


# --- report and browse over broken evaluation outputs ---------------------------------------------------------------

def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _edit_metrics(change):
    def edit(ev: Path) -> None:
        m = json.loads((ev / "metrics.json").read_text())
        (ev / "metrics.json").write_text(json.dumps(change(m)))

    return edit


def _resave_latents(ev: Path) -> None:
    z = dict(np.load(ev / "latents" / "m.npz"))
    np.savez(ev / "latents" / "m.npz", **(z | {"ms": z["ms"][:-1]}))


BREAKS = [  # (id, how the copied eval folder is broken, the culprit the one line names)
    ("latents-truncated", lambda ev: _truncate(ev / "latents" / "m.npz"), "latents/m.npz"),
    ("latents-empty", lambda ev: (ev / "latents" / "m.npz").write_bytes(b""), "latents/m.npz"),
    ("latents-npy", lambda ev: np.save(open(ev / "latents" / "m.npz", "wb"), np.zeros(3)), "latents/m.npz"),
    ("latents-short-ms", _resave_latents, "latents/m.npz"),
    ("latents-missing", lambda ev: (ev / "latents" / "m.npz").unlink(), "latents/m.npz"),
    ("baseline-truncated", lambda ev: _truncate(ev / "latents" / "baseline__layer.1.npz"), "baseline__layer.1.npz"),
    ("metrics-truncated", lambda ev: _truncate(ev / "metrics.json"), "metrics.json"),
    ("metrics-not-utf8", lambda ev: (ev / "metrics.json").write_bytes(b'{"saes": "\xff"}'), "metrics.json"),
    ("metrics-list", lambda ev: (ev / "metrics.json").write_text("[1, 2]"), "metrics.json"),
    ("metrics-no-saes", _edit_metrics(lambda m: {k: v for k, v in m.items() if k != "saes"}), "metrics.json"),
    ("metrics-empty-saes", _edit_metrics(lambda m: m | {"saes": []}), "metrics.json"),
    ("metrics-nameless", _edit_metrics(lambda m: m | {"saes": [{"arch": "topk"}]}), "metrics.json"),
    ("metrics-step", _edit_metrics(lambda m: m | {"step": {"at": 3}}), "metrics.json"),
    ("metrics-data", _edit_metrics(lambda m: m | {"data": 5}), "metrics.json"),
    ("metrics-taxonomy", _edit_metrics(lambda m: m | {"taxonomy": "file"}), "metrics.json"),
    ("other-run", _edit_metrics(lambda m: m | {"saes": [{"name": "foreign_x2"}]}), "foreign_x2"),
    ("no-metrics", lambda ev: (ev / "metrics.json").unlink(), "metrics.json"),
    ("top-values-missing", lambda ev: (ev / "top" / "m" / "top_values.npy").unlink(), "top_values.npy"),
    ("top-indices-truncated", lambda ev: _truncate(ev / "top" / "m" / "top_indices.npy"), "top_indices.npy"),
    ("top-indices-1d", lambda ev: np.save(ev / "top" / "m" / "top_indices.npy", np.arange(64)), "top/m"),
    ("nodes-truncated", lambda ev: _truncate(ev / "nodes" / "m.json"), "nodes/m.json"),
    ("nodes-object", lambda ev: (ev / "nodes" / "m.json").write_text('{"node": "a"}'), "nodes/m.json"),
    ("nodes-latent-range",
     lambda ev: (ev / "nodes" / "m.json").write_text('[{"node": "a", "latent": 64, "auroc": 1}]'), "nodes/m.json"),
    ("tables-not-utf8", lambda ev: (ev / "tables.md").write_bytes(b"### \xff\n"), "tables.md"),
]


@pytest.fixture
def broken(views, tmp_path, request):
    """A copy of the evaluation with one file broken, and the culprit."""
    root, _ = views
    shutil.copytree(root / "eval", tmp_path / "eval")
    _, brk, culprit = request.param
    brk(tmp_path / "eval")
    return root, tmp_path, culprit


@pytest.mark.parametrize("broken", BREAKS, ids=[b[0] for b in BREAKS], indirect=True)
def test_report_refuses_a_broken_evaluation_and_writes_nothing(broken):
    root, tmp, culprit = broken
    refused(tmp, ["report", root / "run", "--eval", tmp / "eval", "--out", tmp / "rep", "--quiet"], culprit)


@pytest.mark.parametrize("broken", BREAKS, ids=[b[0] for b in BREAKS], indirect=True)
def test_browse_refuses_at_start_up(broken, monkeypatch):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: served.append(a))  # never blocks, even if not refused
    root, tmp, culprit = broken
    refused(tmp, ["browse", root / "run", "--eval", tmp / "eval", "--port", "8799"], culprit)
    assert not served


def test_a_failed_report_leaves_the_earlier_report_whole(views, tmp_path):
    root, _ = views
    shutil.copytree(root / "eval", tmp_path / "eval")
    args = ["report", root / "run", "--eval", tmp_path / "eval", "--out", tmp_path / "rep", "--quiet"]
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    good = tree(tmp_path / "rep")
    _truncate(tmp_path / "eval" / "latents" / "m.npz")
    refused(tmp_path, args, "latents/m.npz")
    assert tree(tmp_path / "rep") == good and "index.html" in good


def test_nan_is_never_printed_as_a_result(views, tmp_path):
    """NaN in metrics.json and tables.md: shown as the tables' "–" marker, and the report still builds."""
    root, _ = views
    shutil.copytree(root / "eval", tmp_path / "eval")
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    entry = m["saes"][0]
    entry["recon"] |= {"fve": float("nan"), "fve_batch_mean": float("nan")}
    entry["ms"] |= {"mean": float("nan"), "std": float("nan")}
    entry["hierarchy"]["nodes_detected"] = float("nan")
    entry["hierarchy"]["node_detection_per_depth"] = [
        {"depth": 1, "nodes": 0, "mean_auroc": float("nan"), "detected": float("nan"), "mean_best_level": float("nan")}]
    tables = paper_tables([entry], m["baselines"])
    assert not re.search(r"\bnan\b", tables, re.IGNORECASE) and "| – |" in tables
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(m))  # NaN literals, as json.dumps writes them
    (tmp_path / "eval" / "tables.md").write_text("### old\n\n| a | b | c |\n|---|---|---|\n| x | nan | nan% |\n")
    r = CliRunner().invoke(app, ["report", str(root / "run"), "--eval", str(tmp_path / "eval"), "--out",
                                 str(tmp_path / "rep"), "--quiet"])
    assert r.exit_code == 0, r.output
    index = (tmp_path / "rep" / "index.html").read_text()
    assert not re.search(r"\bnan\b", index, re.IGNORECASE) and "<td>–</td>" in index


def test_a_run_sae_missing_from_the_evaluation_is_noted(views, tmp_path):
    """The other direction of a foreign evaluation: the run holds an SAE the evaluation did not score."""
    root, _ = views
    shutil.copytree(root / "run", tmp_path / "run")
    torch.manual_seed(1)
    SAE(SAEConfig("topk", 32, 32, 4, hook_point="layer.1", token_selection="cls")).save_pretrained(
        tmp_path / "run" / "saes" / "later")
    r = CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--eval", str(root / "eval"), "--out",
                                 str(tmp_path / "rep"), "--quiet"])
    assert r.exit_code == 0, r.output
    index = (tmp_path / "rep" / "index.html").read_text()
    assert "SAE later of the run is not in this evaluation" in index and not (tmp_path / "rep" / "s" / "later.html"
                                                                                ).exists()
