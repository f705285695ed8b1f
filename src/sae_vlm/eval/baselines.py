"""The cheap bases concept alignment compares SAEs with, fit on a hook point's training activations: PCA, k-means
(Lloyd's algorithm from k-means++ seeds) and NMF (Lee & Seung's multiplicative updates)."""

from __future__ import annotations

import torch

BLOCK_CELLS = 1 << 24  # [rows, units] cells materialised at once
KMEANS_ITERS, NMF_ITERS, NMF_FIT_ROWS = 25, 200, 8192


def pca(X_ND: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W [D, k] (the top-k principal axes, by the eigenvectors of the covariance) and b = −μW: codes (x − μ)W."""
    X = X_ND.double()
    mu = X.mean(0)
    evals, evecs = torch.linalg.eigh((X - mu).T @ (X - mu) / max(len(X) - 1, 1))
    W = evecs[:, evals.argsort(descending=True)[:k]]
    return W, -(mu @ W)


def kmeans(X_ND: torch.Tensor, k: int, seed: int = 0, iters: int = KMEANS_ITERS) -> torch.Tensor:
    """k centroids [k, D] by Lloyd's algorithm from k-means++ seeds; an emptied cluster takes the worst-fit row."""
    X = X_ND.double()
    g = torch.Generator().manual_seed(seed)
    cent = X[torch.randint(len(X), (1,), generator=g)]
    d2 = ((X - cent[0]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: the next seed drawn in proportion to the squared distance
        nxt = X[torch.multinomial(d2 + 1e-12, 1, generator=g)]
        cent = torch.cat([cent, nxt])
        d2 = torch.minimum(d2, ((X - nxt[0]) ** 2).sum(1))
    for _ in range(iters):
        assign, dist = _nearest(X, cent)
        count = torch.bincount(assign, minlength=k).double()
        sums = torch.zeros_like(cent).index_add_(0, assign, X)
        cent = torch.where(count[:, None] > 0, sums / count.clamp(min=1)[:, None], cent)
        for j in (count == 0).nonzero()[:, 0].tolist():
            far = int(dist.argmax())
            cent[j], dist[far] = X[far], 0.0
    return cent


def _nearest(X: torch.Tensor, cent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's nearest centroid and its squared distance, in row blocks."""
    assign, dist = torch.empty(len(X), dtype=torch.int64), torch.empty(len(X), dtype=torch.float64)
    c2 = (cent * cent).sum(1)
    block = max(1, BLOCK_CELLS // max(len(cent), 1))
    for r0 in range(0, len(X), block):
        x = X[r0 : r0 + block]
        d = (x * x).sum(1, keepdim=True) - 2 * x @ cent.T + c2
        dist[r0 : r0 + block], assign[r0 : r0 + block] = d.min(1)
    return assign, dist.clamp(min=0)


def nmf_codes(X_ND: torch.Tensor, H_KD: torch.Tensor, iters: int = NMF_ITERS) -> torch.Tensor:
    """Non-negative codes W [N, K] with X ≈ W H for a fixed dictionary, by multiplicative updates, in row blocks."""
    X, H = X_ND.double(), H_KD.double()
    HHt = H @ H.T
    out = torch.empty(len(X), len(H), dtype=torch.float64)
    block = max(1, BLOCK_CELLS // max(len(H), 1))
    for r0 in range(0, len(X), block):
        x = X[r0 : r0 + block]
        XHt = x @ H.T
        w = torch.full((len(x), len(H)), float(x.mean().clamp(min=1e-6) / max(len(H), 1)) ** 0.5,
                       dtype=torch.float64)
        for _ in range(iters):
            w = w * XHt / (w @ HHt).clamp(min=1e-12)
        out[r0 : r0 + block] = w
    return out


def nmf(X_ND: torch.Tensor, k: int, seed: int = 0, iters: int = NMF_ITERS) -> torch.Tensor:
    """Dictionary H [k, D] of Lee & Seung's multiplicative updates (Frobenius) on at most NMF_FIT_ROWS rows."""
    X = X_ND[torch.linspace(0, len(X_ND) - 1, min(len(X_ND), NMF_FIT_ROWS)).long()].double()
    g = torch.Generator().manual_seed(seed)
    scale = float(X.mean().clamp(min=1e-6) / k) ** 0.5
    W = torch.rand(len(X), k, generator=g, dtype=torch.float64) * scale
    H = torch.rand(k, X.shape[1], generator=g, dtype=torch.float64) * scale
    for _ in range(iters):
        H = H * (W.T @ X) / (W.T @ W @ H).clamp(min=1e-12)
        W = W * (X @ H.T) / (W @ H @ H.T).clamp(min=1e-12)
    return H
