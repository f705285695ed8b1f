"""Concept alignment: how well single latents and k-sparse probes pick out labelled classes, against cheaper bases.

Per class (a CSV `image,label[,label…]`, or the stores' own labels and taxonomy nodes) and per basis of a hook point
(each SAE, the raw neurons, a random rotation, PCA, k-means, NMF):
- 1-D probe: the best single unit's average precision (AP, sklearn's step-wise definition, ties grouped) and AUROC
  (rank-sum, ties averaged) on the evaluation store; coverage = share of classes with a unit at AP ≥ 0.5.
- k-sparse probe (k = 1, 2, 5): the k units with the largest class-mean difference on the training store, a
  class-balanced logistic regression on them, its balanced accuracy on the evaluation store.

Units are ranked by their class-mean difference in units of their standard deviation (bases of any scale compare).
AP and AUROC are exact for each class's CANDIDATES best-ranked units, so 65,536 latents × 50,000 images never form a
dense [images, latents] matrix: SAE codes are kept as their positive entries, the linear bases as the activations
and a [d, units] matrix. Signed bases (neurons, rotation, PCA) are scored in the direction of the difference;
SAE, k-means (code x·c − ‖c‖²/2: larger is nearer) and NMF codes only upwards. Baselines are fit once per hook
point on at most MAX_TRAIN_ROWS evenly spaced rows of the training store. Images without a label (with a CSV: the
images it does not list) are left out, as neither positives nor negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sae_vlm.eval.baselines import BLOCK_CELLS, kmeans, nmf, nmf_codes, pca
from sae_vlm.eval.labels import AlignLabels, ClassMatrix
from sae_vlm.eval.ms import random_rotation
from sae_vlm.eval.seeds import SEED_NAME

CANDIDATES = 32  # units per class scored exactly for AP and AUROC
KS = (1, 2, 5)
COVERED_AP = 0.5
MAX_TRAIN_ROWS = 50_000


# --- codes: the units of a basis over the labelled rows of one store --------------------------------------------

class Codes:
    """Units [N, F] over N rows: `columns` materialises some of them, `class_sums` and `moments` summarise all."""

    n: int
    width: int

    def columns(self, cols: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def class_sums(self, Y_NC: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class LinearCodes(Codes):
    """x W + b of activations x (the neurons, a rotation, PCA, k-means scores), or given codes when W is None."""

    def __init__(self, X_ND: torch.Tensor, W_DF: torch.Tensor | None = None, b_F: torch.Tensor | None = None):
        self.X, self.W = X_ND.double(), None if W_DF is None else W_DF.double()
        self.n, self.width = X_ND.shape[0], X_ND.shape[1] if W_DF is None else W_DF.shape[1]
        self.b = torch.zeros(self.width, dtype=torch.float64) if b_F is None else b_F.double()

    def columns(self, cols):
        return ((self.X[:, cols] if self.W is None else self.X @ self.W[:, cols]) + self.b[cols]).float()

    def class_sums(self, Y_NC):
        S = Y_NC.double().T @ self.X
        return (S if self.W is None else S @ self.W) + Y_NC.sum(0).double()[:, None] * self.b

    def moments(self):
        s_D, G_DD = self.X.sum(0), self.X.T @ self.X
        if self.W is None:
            s, sq = s_D, G_DD.diagonal()
        else:
            s, sq = s_D @ self.W, ((G_DD @ self.W) * self.W).sum(0)
        return s + self.n * self.b, sq + 2 * self.b * s + self.n * self.b**2


class SparseCodes(Codes):
    """SAE codes as their positive entries (SAE codes are non-negative), sorted by unit."""

    def __init__(self, rows_M: np.ndarray, cols_M: np.ndarray, vals_M: np.ndarray, n: int, width: int):
        order = np.argsort(cols_M, kind="stable")
        self.rows, self.cols = torch.from_numpy(rows_M[order]), torch.from_numpy(cols_M[order])
        self.vals = torch.from_numpy(vals_M[order].astype(np.float64))
        self.ptr = torch.from_numpy(np.searchsorted(cols_M[order], np.arange(width + 1)))
        self.n, self.width = n, width

    def columns(self, cols):
        out = torch.zeros(self.n, len(cols))
        for j, c in enumerate(cols.tolist()):
            a, b = int(self.ptr[c]), int(self.ptr[c + 1])
            out[self.rows[a:b], j] = self.vals[a:b].float()
        return out

    def class_sums(self, Y_NC):
        A_FN = torch.sparse_coo_tensor(torch.stack([self.cols, self.rows]), self.vals, (self.width, self.n),
                                       check_invariants=False)
        return torch.sparse.mm(A_FN, Y_NC.double()).T.contiguous()

    def moments(self):
        s = torch.zeros(self.width, dtype=torch.float64).index_add_(0, self.cols, self.vals)
        return s, torch.zeros(self.width, dtype=torch.float64).index_add_(0, self.cols, self.vals**2)


class SparseCollector:
    """The positive code entries of chosen rows, fed chunk by chunk during evaluate's one pass."""

    def __init__(self, rows_N: torch.Tensor, total: int):
        self.slot = torch.full((total,), -1, dtype=torch.int64)
        self.slot[rows_N] = torch.arange(len(rows_N))
        self.n, self.parts, self.width = len(rows_N), [], 0

    def add(self, codes_RF: torch.Tensor, r0: int) -> None:
        slot_R = self.slot[r0 : r0 + codes_RF.shape[0]].to(codes_RF.device)
        r, f = ((codes_RF > 0) & (slot_R >= 0)[:, None]).nonzero(as_tuple=True)
        self.parts.append((slot_R[r].cpu().numpy(), f.cpu().numpy(), codes_RF[r, f].double().cpu().numpy()))
        self.width = codes_RF.shape[1]

    def codes(self) -> SparseCodes:
        rows, cols, vals = (np.concatenate(x) if self.parts else np.zeros(0, t)
                            for x, t in zip(zip(*self.parts) if self.parts else ((), (), ()),
                                            (np.int64, np.int64, np.float64)))
        return SparseCodes(rows, cols, vals, self.n, self.width)


def effect_sizes(codes: Codes, Y_NC: torch.Tensor) -> torch.Tensor:
    """[C, F] (mean over a class's rows − mean over the others) / the unit's std over all rows; 0 for a constant."""
    n, P_C = codes.n, Y_NC.sum(0).double()
    s_F, sq_F = codes.moments()
    S_CF = codes.class_sums(Y_NC)
    diff = S_CF / P_C[:, None] - (s_F[None] - S_CF) / (n - P_C)[:, None]
    std_F = (sq_F / n - (s_F / n) ** 2).clamp(min=0).sqrt()
    return torch.where(std_F > 1e-12 * (1 + (s_F / n).abs()), diff / std_F.clamp(min=1e-300), 0.0)


# --- the 1-D probe: exact AP and AUROC of scores against labels, ties grouped --------------------------------------

def ap_auroc(s_NB: torch.Tensor, y_NB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column: average precision (Σ over thresholds of Δrecall × precision, tied scores one threshold, as
    sklearn) and AUROC (rank-sum, ties averaged) of scores `s` for 0/1 labels `y`. NaN without both classes."""
    n = s_NB.shape[0]
    s, order = s_NB.double().sort(0, descending=True)
    y = y_NB.double().gather(0, order)
    idx = torch.arange(n)[:, None].expand_as(s)
    new = torch.ones_like(s, dtype=torch.bool)
    new[1:] = s[1:] != s[:-1]
    last = torch.ones_like(new)
    last[:-1] = new[1:]
    start = torch.where(new, idx, 0).cummax(0).values
    end = torch.where(last, idx, n - 1).flip(0).cummin(0).values.flip(0)
    P = y.sum(0)
    Q = n - P
    tp_end = y.cumsum(0).gather(0, end)
    ap = (y * tp_end / (end + 1)).sum(0) / P
    rank = n - (start + end).double() / 2  # ascending 1-based rank, averaged over ties
    auroc = ((y * rank).sum(0) - P * (P + 1) / 2) / (P * Q)
    bad = (P == 0) | (Q == 0)
    return ap.masked_fill(bad, float("nan")), auroc.masked_fill(bad, float("nan"))


def candidates(effect_CF: torch.Tensor, signed: bool, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, m] units with the largest class-mean difference (its size for a signed basis) and their direction."""
    key = effect_CF.abs() if signed else effect_CF
    units = key.topk(min(m, key.shape[1]), dim=1).indices
    sign = effect_CF.gather(1, units).sign() if signed else torch.ones(units.shape, dtype=effect_CF.dtype)
    return units, torch.where(sign == 0, 1.0, sign)


def best_single(codes: Codes, Y_NC: torch.Tensor, effect_CF: torch.Tensor, signed: bool,
                m: int = CANDIDATES) -> dict[str, torch.Tensor]:
    """Per class, over its `m` candidate units: the best AP and the best AUROC, and which unit (negative id −1−u:
    unit u read downwards) gives each."""
    units, sign = candidates(effect_CF, signed, m)
    C, M = units.shape
    pair_c = torch.arange(C).repeat_interleave(M)
    pair_u, pair_s = units.reshape(-1), sign.reshape(-1).float()
    ap, auroc = torch.empty(C * M, dtype=torch.float64), torch.empty(C * M, dtype=torch.float64)
    block = max(1, BLOCK_CELLS // max(codes.n, 1))
    for p0 in range(0, C * M, block):
        sl = slice(p0, min(C * M, p0 + block))
        ap[sl], auroc[sl] = ap_auroc(codes.columns(pair_u[sl]) * pair_s[sl], Y_NC[:, pair_c[sl]])
    signed_id = torch.where(pair_s > 0, pair_u, -1 - pair_u).reshape(C, M)
    ap, auroc = ap.reshape(C, M).nan_to_num(-1.0), auroc.reshape(C, M).nan_to_num(-1.0)
    j_ap, j_auc = ap.argmax(1), auroc.argmax(1)
    ar = torch.arange(C)
    return {"best_ap": ap[ar, j_ap], "best_ap_unit": signed_id[ar, j_ap],
            "best_auroc": auroc[ar, j_auc], "best_auroc_unit": signed_id[ar, j_auc]}


# --- the k-sparse probe -------------------------------------------------------------------------------------------

def fit_logistic(X_CNK: torch.Tensor, Y_CN: torch.Tensor, l2: float = 1e-3,
                 iters: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """One class-balanced, L2-regularised logistic regression per class, by Newton's method on all classes at once
    (k + 1 parameters each): weights [C, K] and biases [C] on standardised features."""
    C, N, K = X_CNK.shape
    Xa = torch.cat([X_CNK.double(), torch.ones(C, N, 1, dtype=torch.float64)], 2)
    Y = Y_CN.double()
    P = Y.sum(1, keepdim=True)
    weight_CN = torch.where(Y > 0, 1 / (2 * P), 1 / (2 * (N - P)))  # each class half of the loss
    ridge = torch.full((K + 1,), 2 * l2, dtype=torch.float64)
    ridge[K] = 1e-9  # the bias is not shrunk
    theta = torch.zeros(C, K + 1, dtype=torch.float64)
    for _ in range(iters):
        p = torch.sigmoid((Xa * theta[:, None, :]).sum(2))
        grad = (Xa * (weight_CN * (p - Y))[:, :, None]).sum(1) + ridge * theta
        hess = torch.einsum("cnk,cn,cnl->ckl", Xa, weight_CN * p * (1 - p), Xa) + torch.diag(ridge)
        step = torch.linalg.solve(hess, grad)
        theta = theta - step
        if float(step.abs().max()) < 1e-10:
            break
    return theta[:, :K], theta[:, K]


def balanced_accuracy(logit_CN: torch.Tensor, Y_CN: torch.Tensor) -> torch.Tensor:
    pred = logit_CN > 0
    pos = Y_CN > 0
    tpr = (pred & pos).sum(1) / pos.sum(1).clamp(min=1)
    tnr = (~pred & ~pos).sum(1) / (~pos).sum(1).clamp(min=1)
    return (tpr + tnr).double() / 2


def _features(codes: Codes, units_CK: torch.Tensor) -> torch.Tensor:
    """[C, N, K] the chosen units' values, class by class."""
    flat = codes.columns(units_CK.reshape(-1)).double()  # [N, C·K]
    return flat.reshape(codes.n, *units_CK.shape).permute(1, 0, 2)


def ksparse(train: Codes, Y_train: torch.Tensor, test: Codes, Y_test: torch.Tensor,
            effect_CF: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per class and k in KS: balanced accuracy on `test` of a probe fit on `train` on the k units with the
    largest class-mean difference (on `train`); also the units chosen."""
    k_max = min(max(KS), effect_CF.shape[1])
    units_CK = effect_CF.abs().topk(k_max, dim=1).indices
    out: dict[str, torch.Tensor] = {"units": units_CK}
    P = Y_train.sum(0)
    fit = ((P > 0) & (P < train.n)).nonzero()[:, 0]  # a class the training rows hold one side of only: NaN
    per_block = max(1, BLOCK_CELLS // max(k_max * max(train.n, test.n), 1))
    for k in (k for k in KS if k <= k_max):
        acc = torch.full((units_CK.shape[0],), float("nan"), dtype=torch.float64)
        for c0 in range(0, len(fit), per_block):
            cs = fit[c0 : c0 + per_block]
            Xtr, Xte = _features(train, units_CK[cs, :k]), _features(test, units_CK[cs, :k])
            mu, sd = Xtr.mean(1, keepdim=True), Xtr.std(1, keepdim=True).clamp(min=1e-8)
            w, b = fit_logistic((Xtr - mu) / sd, Y_train[:, cs].T.double())
            logit = (((Xte - mu) / sd) * w[:, None, :]).sum(2) + b[:, None]
            acc[cs] = balanced_accuracy(logit, Y_test[:, cs].T)
        out[str(k)] = acc
    return out


# --- baselines, fit on the training store (eval/baselines.py) ---------------------------------------------------

@dataclass
class Basis:
    """One basis over the labelled rows of both stores, and whether its units read both ways."""

    train: Codes
    eval: Codes
    signed: bool
    note: str = ""


def baselines(Xtr: torch.Tensor, Xev: torch.Tensor, width: int, rotation_seed: int) -> dict[str, Basis]:
    """The raw neurons, a random rotation, PCA (min(width, d) axes), k-means (min(width, rows / 4) centroids) and
    NMF (min(width, d) parts) of the activations, fit on the training rows `Xtr`; `Xev` are evaluation rows."""
    d = Xtr.shape[1]
    out = {"neurons": Basis(LinearCodes(Xtr), LinearCodes(Xev), True)}
    if rotation_seed >= 0:
        Q = random_rotation(d, rotation_seed)
        out["rotation"] = Basis(LinearCodes(Xtr, Q), LinearCodes(Xev, Q), True, f"seed {rotation_seed}")
    W, b = pca(Xtr, min(width, d))
    out["pca"] = Basis(LinearCodes(Xtr, W, b), LinearCodes(Xev, W, b), True, f"{W.shape[1]} components")
    cent = kmeans(Xtr, max(1, min(width, len(Xtr) // 4)))
    Wk, bk = cent.T, -(cent * cent).sum(1) / 2
    out["kmeans"] = Basis(LinearCodes(Xtr, Wk, bk), LinearCodes(Xev, Wk, bk), False, f"{len(cent)} centroids")
    lo = Xtr.min(0).values.clamp(max=0)  # non-negative data as it is; else shifted by the training minimum
    H = nmf(Xtr - lo, min(width, d))
    note = f"{len(H)} parts" + ("" if bool((lo == 0).all()) else "; inputs shifted by the training minimum per "
                                "dimension (evaluation rows clamped at 0)")
    out["nmf"] = Basis(LinearCodes(nmf_codes(Xtr - lo, H)), LinearCodes(nmf_codes((Xev - lo).clamp(min=0), H)),
                       False, note)
    return out


# --- one hook point: collected during evaluate's pass, scored after it ----------------------------------------

def _nanmean(t: torch.Tensor) -> float | None:
    v = t[~t.isnan()]
    return float(v.mean()) if v.numel() else None


class HookAlignment:
    """The labelled evaluation rows of one source (their activations, and each SAE's codes on them), gathered
    chunk by chunk; `result` fits the baselines and probes and scores every basis."""

    def __init__(self, labels: AlignLabels, total_rows: int):
        self.labels, self.total = labels, total_rows
        self.slot = torch.full((total_rows,), -1, dtype=torch.int64)
        self.slot[labels.eval.rows_N] = torch.arange(len(labels.eval.rows_N))
        self.x_parts: list[torch.Tensor] = []
        self.saes: dict[str, SparseCollector] = {}

    def add_rows(self, x_RD: torch.Tensor, r0: int) -> None:
        keep = self.slot[r0 : r0 + x_RD.shape[0]] >= 0
        self.x_parts.append(x_RD[keep.to(x_RD.device)].double().cpu())

    def collector(self, name: str) -> SparseCollector:
        self.saes[name] = SparseCollector(self.labels.eval.rows_N, self.total)
        return self.saes[name]

    def train_rows(self, saes: dict, chunk: int, device) -> tuple[torch.Tensor, ClassMatrix, dict[str, SparseCodes]]:
        """At most MAX_TRAIN_ROWS evenly spaced labelled training rows, and each SAE's codes on them."""
        tr = self.labels.train
        pick = torch.linspace(0, len(tr.rows_N) - 1, min(len(tr.rows_N), MAX_TRAIN_ROWS)).round().long().unique()
        rows, Y = tr.rows_N[pick], tr.Y_NC[pick]
        col = {name: SparseCollector(torch.arange(len(rows)), len(rows)) for name in saes}
        parts = []
        for r0 in range(0, len(rows), chunk):
            x = self.labels.train_src.get(rows[r0 : r0 + chunk])
            parts.append(x.double())
            for name, sae in saes.items():
                col[name].add(sae.encode(x.to(device)).float(), r0)
        return torch.cat(parts), ClassMatrix(rows, Y), {k: c.codes() for k, c in col.items()}

    @torch.no_grad()
    def result(self, saes: dict, rotation_seed: int, chunk: int, device) -> tuple[dict, dict]:
        """(metrics.json's record of this hook point, the per-class arrays of alignment/<hook>.json)."""
        Xtr, train, sae_train = self.train_rows(saes, chunk, device)
        Xev = torch.cat(self.x_parts)
        width = max((s.cfg.d_sae for s in saes.values()), default=Xev.shape[1])
        bases = {f"sae/{k}": Basis(sae_train[k], self.saes[k].codes(), False) for k in saes}
        bases |= baselines(Xtr, Xev, width, rotation_seed)
        Y_ev = self.labels.eval.Y_NC
        summary = {"labels": self.labels.source, "classes": len(self.labels.classes),
                   "classes_left_out": self.labels.skipped, "train_data": self.labels.train_data,
                   "train_rows": len(Xtr), "eval_rows": len(Xev), "bases": {}}
        per_class: dict = {"classes": self.labels.classes, "positives_eval": Y_ev.sum(0).int().tolist(),
                           "positives_train": train.Y_NC.sum(0).int().tolist(), "bases": {}}
        for name, b in bases.items():
            single = best_single(b.eval, Y_ev, effect_sizes(b.eval, Y_ev), b.signed)
            probe = ksparse(b.train, train.Y_NC, b.eval, Y_ev, effect_sizes(b.train, train.Y_NC))
            summary["bases"][name] = {
                "units": b.eval.width, "signed": b.signed, **({"note": b.note} if b.note else {}),
                "mean_best_ap": _nanmean(single["best_ap"]), "mean_best_auroc": _nanmean(single["best_auroc"]),
                "coverage": float((single["best_ap"] >= COVERED_AP).double().mean()),
                "ksparse": {k: _nanmean(v) for k, v in probe.items() if k != "units"}}
            per_class["bases"][name] = {k: v.tolist() for k, v in single.items()} | {
                "ksparse": {k: v.tolist() for k, v in probe.items() if k != "units"},
                "ksparse_units": probe["units"].tolist()}
        return summary, per_class


def alignment_finding(alignment: dict) -> dict:
    """metrics.json's `alignment` as the demo's finding: per hook point, each SAE configuration's mean best-latent
    AP as the median over its seeds, and each baseline's; `range` holds each SAE configuration's [min, max]."""
    out = {}
    for hook, rec in alignment.items():
        by_base: dict[str, list[float]] = {}
        row: dict = {}
        for name, b in rec["bases"].items():
            if name.startswith("sae/"):
                m = SEED_NAME.fullmatch(name[4:])
                by_base.setdefault(f"sae/{m['base'] if m else name[4:]}", []).append(b["mean_best_ap"])
            else:
                row[name] = b["mean_best_ap"]
        row = {k: float(np.median(v)) for k, v in by_base.items()} | row
        out[hook] = row | {"range": {k: [min(v), max(v)] for k, v in by_base.items()}}
    return out
