"""Concept alignment (`evaluate --labels`): AP/AUROC against a brute-force computation, the baselines and probes
against their definitions, one run end to end on two tiny stores, and labels files that must be refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _adversarial import refused
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.data import store as S
from sae_vlm.eval import alignment as A
from sae_vlm.eval import baselines as B

D = 8


def brute_ap(s: np.ndarray, y: np.ndarray) -> float:
    """Σ over distinct thresholds t (descending) of (recall(t) − recall(previous)) × precision(t)."""
    ap, prev = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        sel = s >= t
        rec = (y[sel] == 1).sum() / (y == 1).sum()
        ap += (rec - prev) * (y[sel] == 1).sum() / sel.sum()
        prev = rec
    return ap


def brute_auroc(s: np.ndarray, y: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + ½ P(tie), over all pairs."""
    pos, neg = s[y == 1], s[y == 0]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def test_ap_and_auroc_match_brute_force_with_ties(one_thread):
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=(40, 6)), 1)  # rounding makes ties
    s[:, 5] = np.where(rng.random(40) < 0.7, 0.0, rng.random(40))  # sparse, like an SAE latent
    y = (rng.random((40, 6)) < 0.3).astype(np.float32)
    ap, auroc = A.ap_auroc(torch.from_numpy(s).float(), torch.from_numpy(y))
    for j in range(6):
        s32 = torch.from_numpy(s[:, j]).float().numpy()
        assert ap[j] == pytest.approx(brute_ap(s32, y[:, j]), abs=1e-9)
        assert auroc[j] == pytest.approx(brute_auroc(s32, y[:, j]), abs=1e-9)
    y[:, 0] = 0  # no positive: undefined, never a result
    assert A.ap_auroc(torch.from_numpy(s).float(), torch.from_numpy(y))[0][0].isnan()


def codes_and_labels(seed=0, n=120, f=10, c=4):
    g = torch.Generator().manual_seed(seed)
    Y = (torch.rand(n, c, generator=g) < 0.3).float()
    A_NF = torch.relu(torch.randn(n, f, generator=g))
    A_NF[:, :c] += 1.5 * Y  # latent j carries class j, more or less
    return A_NF, Y


def test_sparse_and_dense_codes_agree_and_candidates_find_the_exhaustive_best(one_thread):
    A_NF, Y = codes_and_labels()
    r, f = A_NF.nonzero(as_tuple=True)
    sparse = A.SparseCodes(r.numpy(), f.numpy(), A_NF[r, f].double().numpy(), *A_NF.shape)
    dense = A.LinearCodes(A_NF)
    assert torch.equal(sparse.columns(torch.tensor([3, 0, 3])), A_NF[:, [3, 0, 3]])
    eff = A.effect_sizes(sparse, Y)
    assert torch.allclose(eff, A.effect_sizes(dense, Y))
    j = 2  # against the definition: (mean on the class − mean off it) / std over all rows
    pos = Y[:, 1] > 0
    want = (A_NF[pos, j].double().mean() - A_NF[~pos, j].double().mean()) / A_NF[:, j].double().std(unbiased=False)
    assert float(eff[1, j]) == pytest.approx(float(want), rel=1e-9)
    few = A.best_single(sparse, Y, eff, signed=False, m=3)
    every = A.best_single(sparse, Y, eff, signed=False, m=A_NF.shape[1])
    ap_all = A.ap_auroc(A_NF[:, :, None].expand(-1, -1, 4).reshape(len(A_NF), -1), Y.repeat(1, A_NF.shape[1]))[0]
    assert torch.allclose(every["best_ap"], ap_all.reshape(-1, 4).max(0).values)
    assert torch.equal(few["best_ap_unit"], every["best_ap_unit"]) and torch.equal(few["best_ap_unit"], torch.arange(4))


def test_signed_units_are_read_downwards_and_named_so(one_thread):
    A_NF, Y = codes_and_labels()
    flipped = A.LinearCodes(-A_NF)
    res = A.best_single(flipped, Y, A.effect_sizes(flipped, Y), signed=True)
    assert torch.equal(res["best_ap_unit"], -1 - torch.arange(4))
    up = A.best_single(A.LinearCodes(A_NF), Y, A.effect_sizes(A.LinearCodes(A_NF), Y), signed=True)
    assert torch.allclose(res["best_ap"], up["best_ap"])


def test_pca_reconstructs_and_kmeans_finds_clusters(one_thread):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(200, 3, generator=g).double() @ torch.randn(3, 6, generator=g).double() + 2.0  # rank 3
    W, b = B.pca(X, 3)
    codes = X @ W + b
    assert torch.allclose(codes @ W.T + X.mean(0), X, atol=1e-8)  # 3 axes hold all of a rank-3 cloud
    assert torch.allclose(W.T @ W, torch.eye(3, dtype=torch.float64), atol=1e-10)
    centres = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0]], dtype=torch.float64)
    pts = centres.repeat_interleave(30, 0) + 0.1 * torch.randn(90, 3, generator=g).double()
    found = B.kmeans(pts, 3)
    assert torch.cdist(found, centres).min(0).values.max() < 0.1


def test_ksparse_picks_the_units_of_the_largest_difference_and_probes_them(one_thread):
    A_NF, Y = codes_and_labels(n=300)
    A_te, Y_te = codes_and_labels(seed=1, n=300)
    tr, te = A.LinearCodes(A_NF), A.LinearCodes(A_te)
    eff = A.effect_sizes(tr, Y)
    out = A.ksparse(tr, Y, te, Y_te, eff)
    assert torch.equal(out["units"][:, 0], torch.arange(4))
    assert torch.equal(out["units"], eff.abs().topk(5, dim=1).indices)
    # k = 1: a monotone probe on one unit; its balanced accuracy lies between chance and the unit's best threshold
    s, y = A_te[:, 0].numpy(), Y_te[:, 0].numpy()
    best = max(((s >= t) == y)[y == 1].mean() / 2 + ((s < t) == (1 - y))[y == 0].mean() / 2 for t in s)
    assert 0.75 < float(out["1"][0]) <= best + 1e-9
    assert (out["5"] >= out["1"] - 0.05).all()


def write_store(path: Path, X: np.ndarray, labels, prefix: str) -> None:
    sub = {"layer.0__cls": {"hook_point": "layer.0", "tokens": "cls", "rows_per_image": 1, "width": X.shape[1],
                            "note": ""}}
    w = S.StoreWriter(path, {"dtype": "fp32"}, sub)
    w.prepare()
    ims = [{"id": f"{prefix}/{i}.png", "path": f"/imgs/{prefix}/{i}.png", "label": labels[i]} for i in range(len(X))]
    w.write_shard(0, {"layer.0__cls": S.to_storage(torch.from_numpy(X), "fp32", "layer.0")},
                  {"layer.0__cls": np.full(len(X), -1, np.int32)}, ims, [])
    w.finalize(1, {"model_id": "test"})


def blobs(n: int, seed: int):
    r = np.random.default_rng(seed)
    cls = r.integers(0, 3, n)
    X = (r.normal(size=(n, D)) * 0.3).astype(np.float32)
    X[np.arange(n), cls] += 2
    return X, [f"00001_k{c % 2}_c{c}" for c in cls]


@pytest.fixture
def stores(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    (Xt, lt), (Xe, le) = blobs(150, 1), blobs(100, 2)
    write_store(tmp_path / "train", Xt, lt, "train")
    write_store(tmp_path / "eval", Xe, le, "eval")
    torch.manual_seed(0)
    SAE(SAEConfig("batchtopk", D, 16, 4, hook_point="layer.0", token_selection="cls")).save_pretrained(tmp_path / "sae")
    rows = [f"train/{i}.png,{lab.split('_')[2]}" for i, lab in enumerate(lt)]
    rows += [f"/imgs/eval/{i}.png,{lab.split('_')[2]},{lab.split('_')[1]}" for i, lab in enumerate(le)]
    (tmp_path / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    return tmp_path


EVAL = ["evaluate", "sae", "--data", "eval", "--train-data", "train", "--out", "ev", "--quiet"]


def test_evaluate_labels_scores_every_basis_on_the_labelled_rows(stores):
    r = CliRunner().invoke(app, [*EVAL, "--labels", "labels.csv"])
    assert r.exit_code == 0, r.output
    rec = json.loads((stores / "ev" / "metrics.json").read_text())["alignment"]["layer.0"]
    # eval rows carry k0/k1 besides c0..c2, the training rows only c*: k* have no training positives
    assert rec["classes"] == 3 and rec["classes_left_out"]["count"] == 2
    assert (rec["train_rows"], rec["eval_rows"]) == (150, 100)
    assert set(rec["bases"]) == {"sae/sae", "neurons", "rotation", "pca", "kmeans", "nmf"}
    assert rec["bases"]["neurons"]["mean_best_ap"] > 0.95  # class j sits on neuron j
    side = json.loads((stores / "ev" / "alignment" / "layer.0.json").read_text())
    assert side["classes"] == ["c0", "c1", "c2"] and sum(side["positives_eval"]) == 100
    neurons = side["bases"]["neurons"]
    assert neurons["best_ap_unit"] == [0, 1, 2]
    assert rec["bases"]["neurons"]["coverage"] == np.mean([ap >= 0.5 for ap in neurons["best_ap"]])
    assert rec["bases"]["neurons"]["mean_best_ap"] == pytest.approx(np.mean(neurons["best_ap"]))
    assert "Concept alignment at layer.0" in (stores / "ev" / "tables.md").read_text()
    assert (stores / "ev" / "plots" / "alignment.png").stat().st_size > 0


def test_evaluate_labels_store_uses_the_taxonomy_nodes(stores):
    r = CliRunner().invoke(app, [*EVAL, "--labels", "store"])
    assert r.exit_code == 0, r.output
    side = json.loads((stores / "ev" / "alignment" / "layer.0.json").read_text())
    assert sorted(side["classes"]) == ["k0", "k0/c0", "k0/c2", "k1", "k1/c1"]


@pytest.mark.parametrize("text, culprit", [
    ("", "labels.csv is empty"),
    ("image,label\n", "labels.csv is empty"),
    ("image,label\ntrain/0.png\n", "labels.csv line 2"),
    ("image,label\n,c0\n", "labels.csv line 2"),
    ("train/0.png,c0\nnope/1.png,c1\nnope/2.png,c1\nnope/3.png,c1\nnope/4.png,c1\n",
     "names 4 of its 5 images that are not in"),
    ("x.png,c0\ny.png,c1\n", "names 2 of its 2 images that are not in"),  # matching nothing
    ("train/0.png,c0\ntrain/1.png,c0\n", "no class both positive and negative"),
])
def test_bad_labels_files_are_refused(stores, text, culprit):
    (stores / "bad.csv").write_text(text)
    culprit = culprit.replace("labels.csv", "bad.csv")
    line = refused(stores, [*EVAL, "--labels", "bad.csv"], culprit)
    assert "bad.csv" in line


def test_unmatched_images_are_counted_and_the_first_few_named(stores):
    rows = "\n".join(f"gone/{i}.png,c0" for i in range(7))
    (stores / "bad.csv").write_text("train/0.png,c0\n" + rows + "\n")
    line = refused(stores, [*EVAL, "--labels", "bad.csv"], "names 7 of its 8 images")
    assert "gone/0.png, gone/1.png, gone/2.png, …" in line and "gone/3.png" not in line


def test_labels_that_are_not_utf8_missing_or_without_training_data_are_refused(stores):
    (stores / "latin.csv").write_bytes(b"image,label\ntrain/0.png,caf\xe9\n")
    refused(stores, [*EVAL, "--labels", "latin.csv"], "latin.csv line 2")
    refused(stores, [*EVAL, "--labels", "absent.csv"], "absent.csv")
    no_train = [a for a in EVAL if a not in ("--train-data", "train")]
    refused(stores, [*no_train, "--labels", "labels.csv"], "--train-data")
    refused(stores, [*EVAL[:-1], "--train-data", "elsewhere", "--labels", "labels.csv"], "elsewhere")
    np.save(stores / "acts.npy", np.zeros((20, D), np.float32))
    refused(stores, ["evaluate", "sae", "--data", "acts.npy", "--train-data", "acts.npy", "--out", "ev",
                     "--labels", "store"], "--labels store")


def test_logistic_probe_is_at_the_minimum_of_its_objective(one_thread):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 80, 2, generator=g, dtype=torch.float64)
    Y = ((X[:, :, 0] + 0.8 * torch.randn(3, 80, generator=g, dtype=torch.float64)) > 0.7).double()
    w, b = A.fit_logistic(X, Y, l2=1e-3)
    theta = torch.cat([w, b[:, None]], 1).requires_grad_(True)
    P = Y.sum(1, keepdim=True)
    weight = torch.where(Y > 0, 1 / (2 * P), 1 / (2 * (80 - P)))  # class-balanced
    logit = (X * theta[:, None, :2]).sum(2) + theta[:, None, 2]
    loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(logit, Y, reduction="none")).sum() \
        + 1e-3 * (theta[:, :2] ** 2).sum()
    loss.backward()
    assert theta.grad is not None and theta.grad.abs().max() < 1e-8
