"""Parity of the SAE core with the paper's training recipe (paper.md §2).

Every check compares the package against a reference written here from the paper's text: plain Python
loops for the selection rules, explicit formulas for the losses, and a hand-written Adam step for training.
The reference side never calls the package's helpers.
"""

from __future__ import annotations

import math

import pytest
import torch

from sae_vlm import SAE, SAEConfig
from sae_vlm.config import TrainConfig
from sae_vlm.sae import losses, mechanics, trainer
from sae_vlm.sae.model import EncoderOutput

D, F, B, K = 8, 32, 16, 3
GROUPS = (2, 4, 8, 18)  # int(f·32) for the paper's 1/16, 1/8, 1/4 and the remainder for 9/16
ATOL = 1e-5
ARCH_LIST = ("relu", "topk", "batchtopk", "matryoshka", "jumprelu")


# ---------------------------------------------------------------- reference side (paper §2, from scratch)


def ref_pre_acts(x, W_enc, b_enc, b_dec):
    """h = ReLU((x − b_dec) W_enc + b_enc), as nested loops over Python floats."""
    X, W, be, bd = x.tolist(), W_enc.tolist(), b_enc.tolist(), b_dec.tolist()
    d, f = len(W), len(W[0])
    rows = []
    for xn in X:
        centred = [xn[i] - bd[i] for i in range(d)]
        rows.append([max(0.0, be[j] + sum(centred[i] * W[i][j] for i in range(d))) for j in range(f)])
    return torch.tensor(rows, dtype=torch.float64)


def ref_decode(codes, W_dec, b_dec):
    C, W, bd = codes.tolist(), W_dec.tolist(), b_dec.tolist()
    f, d = len(W), len(W[0])
    return torch.tensor([[bd[i] + sum(cn[j] * W[j][i] for j in range(f)) for i in range(d)] for cn in C],
                        dtype=torch.float64)


def mask_batch_topk(h, k):
    """Flatten the B×F batch, keep its top k·B entries (paper §2.3)."""
    H = h.tolist()
    entries = sorted(((v, n, j) for n, row in enumerate(H) for j, v in enumerate(row)), reverse=True)
    mask = torch.zeros(h.shape, dtype=torch.float64)
    for _, n, j in entries[: k * len(H)]:
        mask[n, j] = 1.0
    return mask


def mask_row_topk(h, k, allowed=None):
    """Per sample, the k largest entries among the `allowed` latents (all latents when None)."""
    H = h.tolist()
    mask = torch.zeros(h.shape, dtype=torch.float64)
    for n, row in enumerate(H):
        cand = [j for j in range(len(row)) if allowed is None or allowed[j]]
        for j in sorted(cand, key=lambda j: -row[j])[:k]:
            mask[n, j] = 1.0
    return mask


def mask_threshold(h, theta):
    H = h.tolist()
    th = theta.tolist() if theta.ndim else [float(theta)] * h.shape[1]
    return torch.tensor([[1.0 if v > th[j] else 0.0 for j, v in enumerate(row)] for row in H], dtype=torch.float64)


def ref_sq_err(x, x_hat):
    """mean_b ‖x − x̂‖²: squared error summed over dimensions, averaged over the batch."""
    return ((x - x_hat) ** 2).sum(dim=1).mean()


def ref_matryoshka(x, codes, W_dec, b_dec, groups):
    """mean over g of ℓ_g, ℓ_g = (1/G)·mean_b‖x − x̂_(g)‖², x̂_(g) = b_dec + Σ_{i≤g} f[:, G_i] W_dec[G_i]."""
    G = len(groups)
    ells = []
    for g in range(G):
        stop = sum(groups[: g + 1])
        x_hat_g = b_dec + torch.einsum("nf,fd->nd", codes[:, :stop], W_dec[:stop])
        ells.append(ref_sq_err(x, x_hat_g) / G)
    return sum(ells) / G


def ref_aux(x, x_hat, h, W_dec, dead, d_in):
    """AuxK with the OpenAI normalisation (paper §2.6); zero when nothing is dead."""
    n_dead = sum(bool(v) for v in dead)
    if n_dead == 0:
        return torch.zeros((), dtype=torch.float64)
    k_aux = min(d_in // 2, n_dead)
    e = (x - x_hat).detach()
    codes = h * mask_row_topk(h.detach(), k_aux, allowed=[bool(v) for v in dead])
    e_hat = torch.einsum("nf,fd->nd", codes, W_dec)  # no b_dec
    num = ((e - e_hat) ** 2).sum(dim=1).mean()
    den = ((e - e.mean(dim=0, keepdim=True)) ** 2).sum(dim=1).mean()
    return num / den


def rect(h, theta, eps):
    """Rectangle kernel K((h − θ)/ε) = 1[|h − θ| < ε/2]."""
    return ((h - theta).abs() < eps / 2).double()


def ref_weiszfeld(points, max_iter, tol):
    pts = points.tolist()
    n, d = len(pts), len(pts[0])
    y = [sum(p[i] for p in pts) / n for i in range(d)]
    for _ in range(max_iter):
        w = [1.0 / math.sqrt(sum((p[i] - y[i]) ** 2 for i in range(d))) for p in pts]
        y_new = [sum(w[m] * pts[m][i] for m in range(n)) / sum(w) for i in range(d)]
        moved = math.sqrt(sum((a - b) ** 2 for a, b in zip(y_new, y)))
        y = y_new
        if moved < tol:
            break
    return torch.tensor(y, dtype=torch.float64)


# ---------------------------------------------------------------- fixtures


def data(seed=0, n=B, d=D):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def make_sae(arch, seed=1, theta=None):
    """A float64 SAE with every parameter perturbed off its init, so transposes and biases show up."""
    k = None if arch == "relu" else K
    sae = SAE(SAEConfig(arch, D, F, k, GROUPS if arch == "matryoshka" else None)).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=g, dtype=torch.float64) * 0.5)
        sae.W_dec.copy_(torch.randn(F, D, generator=g, dtype=torch.float64) * 0.5)  # rows NOT unit norm
        sae.b_enc.copy_(torch.randn(F, generator=g, dtype=torch.float64) * 0.3)
        sae.b_dec.copy_(torch.randn(D, generator=g, dtype=torch.float64) * 0.3)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(F, generator=g, dtype=torch.float64) * 0.8 + 0.1)
        elif theta is not None:
            sae.threshold.fill_(theta)
    return sae


def params(sae):
    return sae.W_enc.detach(), sae.b_enc.detach(), sae.b_dec.detach(), sae.W_dec.detach()


def close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


# ---------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_encode_decode_default_mode(arch):
    """Default encode = the architecture's inference rule; decode = f W_dec + b_dec; forward = both."""
    sae = make_sae(arch, theta=0.4)
    x = data()
    W_enc, b_enc, b_dec, W_dec = params(sae)
    h = ref_pre_acts(x, W_enc, b_enc, b_dec)
    if arch == "relu":
        ref = h
    elif arch == "topk":
        ref = h * mask_row_topk(h, K)
    else:  # batchtopk / matryoshka: global θ; jumprelu: per-latent θ
        ref = h * mask_threshold(h, sae.threshold)
    codes = sae.encode(x)
    close(codes, ref)
    close(sae.decode(codes), ref_decode(ref, W_dec, b_dec))
    close(sae(x), ref_decode(ref, W_dec, b_dec))
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert 0 < int((ref > 0).sum()) < int((h > 0).sum())  # the rule really removed something


@pytest.mark.parametrize("arch", ("batchtopk", "matryoshka", "jumprelu", "topk"))
def test_encode_every_mode(arch):
    sae = make_sae(arch, theta=0.4)
    x = data(seed=3)
    h = ref_pre_acts(x, *params(sae)[:3])
    refs = {
        "relu": h,
        "topk": h * mask_row_topk(h, K),
        "batchtopk": h * mask_batch_topk(h, K),
        "threshold": h * mask_threshold(h, sae.threshold),
    }
    for mode, ref in refs.items():
        close(sae.encode(x, mode=mode), ref)
    # batch top-k keeps exactly k·B entries over the batch, with varying per-row counts
    bt = sae.encode(x, mode="batchtopk")
    assert int((bt > 0).sum()) == K * B
    with pytest.raises(ValueError, match="mode"):
        sae.encode(x, mode="nope")


def test_threshold_unset_passes_all_positive_and_mode_errors():
    sae = make_sae("batchtopk")  # θ = −1: not learned yet
    assert float(sae.threshold) < 0
    x = data(seed=4)
    close(sae.encode(x), ref_pre_acts(x, *params(sae)[:3]))
    relu = make_sae("relu")
    with pytest.raises(ValueError, match="k"):
        relu.encode(x, mode="topk")


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_width_mismatch_raises(arch):
    sae = make_sae(arch)
    with pytest.raises(ValueError, match=f"d_in={D}"):
        sae.encode(torch.randn(4, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=f"d_in={D}"):
        sae(torch.randn(4, D - 1, dtype=torch.float64))


SPARSE = ("topk", "batchtopk", "matryoshka")  # archs with the trainer's fast sparse path


def dense_of(codes):
    """Codes as a dense [N, F] tensor, whether train_encode returned dense or sparse (fast path) codes."""
    return codes.dense(F) if hasattr(codes, "dense") else codes


def ref_graph(sae, x):
    """Leaf copies of the SAE's parameters and the reference h on its own autograd graph."""
    P = dict(zip(("W_enc", "b_enc", "b_dec", "W_dec"), (p.clone().requires_grad_(True) for p in params(sae))))
    h = torch.relu(torch.einsum("nd,df->nf", x - P["b_dec"], P["W_enc"]) + P["b_enc"])
    return P, h


def grad_of(sae, name):
    """A parameter's gradient in the paper's layout (W_enc [d, F] is a view of the latent-major W_enc_FD)."""
    g = (sae.W_enc_FD if name == "W_enc" else getattr(sae, name)).grad
    return g.T if name == "W_enc" and g is not None else g


def close_grads(sae, P, atol=ATOL):
    for n, p_ref in P.items():
        g_pkg = grad_of(sae, n)
        g_ref = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
        close(g_pkg if g_pkg is not None else torch.zeros_like(p_ref), g_ref, atol)


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("arch", ARCH_LIST)
def test_train_encode_selection(arch, fast):
    """Training selection: global batch top-k (BatchTopK and Matryoshka alike), per-row top-k, ReLU, JumpReLU.

    With fast=True (the trainer's default sparse path for top-k archs) the codes, the decode and the
    gradients through both must equal the dense reference.
    """
    sae = make_sae(arch)
    x = data(seed=5)
    h = ref_pre_acts(x, *params(sae)[:3])
    enc = sae.train_encode(x, bandwidth=0.1, fast=fast)
    close(enc.h_NF, h)
    ref = {
        "relu": h,
        "topk": h * mask_row_topk(h, K),
        "batchtopk": h * mask_batch_topk(h, K),
        "matryoshka": h * mask_batch_topk(h, K),  # same global selection, not per group
        "jumprelu": h * mask_threshold(h, sae.threshold),
    }[arch]
    close(dense_of(enc.codes), ref)
    if arch not in SPARSE:
        return
    # gradients of an arbitrary function of codes and reconstruction, package vs reference graph
    g = torch.Generator().manual_seed(21)
    U, V = torch.randn(B, F, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    x_hat = sae.decode(enc.codes)
    close(x_hat, ref_decode(ref, sae.W_dec.detach(), sae.b_dec.detach()))
    ((dense_of(enc.codes) * U).sum() + (x_hat * V).sum() + (x_hat**2).sum()).backward()
    P, h_ref = ref_graph(sae, x)
    codes_ref = h_ref * (ref > 0)
    x_hat_ref = torch.einsum("nf,fd->nd", codes_ref, P["W_dec"]) + P["b_dec"]
    ((codes_ref * U).sum() + (x_hat_ref * V).sum() + (x_hat_ref**2).sum()).backward()
    close_grads(sae, P)


def test_fast_path_selection_indices():
    """The sparse path's batch top-k is exact on its candidate shortcut and on its full fallback."""
    from sae_vlm.sae import sparse

    g = torch.Generator().manual_seed(22)
    h = torch.relu(torch.randn(B, F, generator=g, dtype=torch.float64))
    skewed = h.clone()
    skewed[0] += 10.0  # row 0 holds all F of the winners' top slots: more than any candidate list
    for hh in (h, skewed):
        for m in (None, 4, F):
            rows, cols = sparse.batch_topk_indices(hh, K, m)
            got = torch.zeros(B, F, dtype=torch.float64)
            got[rows, cols] = 1.0
            assert torch.equal(got, mask_batch_topk(hh, K)), m
            assert torch.equal(rows, rows.sort().values)  # row-sorted, as the sparse decoder needs
        rows, cols = sparse.topk_indices(hh, K)
        got = torch.zeros(B, F, dtype=torch.float64)
        got[rows, cols] = 1.0
        assert torch.equal(got, mask_row_topk(hh, K))


# ---------------------------------------------------------------- loss terms


@pytest.mark.parametrize("fast", [False, True])
def test_mse_and_matryoshka_mse(fast):
    for arch in ("batchtopk", "matryoshka"):
        sae = make_sae(arch)
        x = data(seed=6)
        W_enc, b_enc, b_dec, W_dec = params(sae)
        h = ref_pre_acts(x, W_enc, b_enc, b_dec)
        mask = mask_batch_topk(h, K)
        codes = h * mask
        x_hat_ref = ref_decode(codes, W_dec, b_dec)
        enc = sae.train_encode(x, fast=fast)
        x_hat = sae.decode(enc.codes)
        close(losses.mse(x, x_hat, enc, sae), ref_sq_err(x, x_hat_ref))
        if arch != "matryoshka":
            continue
        got = losses.matryoshka_mse(x, x_hat, enc, sae)
        ref = ref_matryoshka(x, codes, W_dec, b_dec, GROUPS)
        close(got, ref)
        # the same thing written as (1/G²) Σ_g mean_b‖x − x̂_(g)‖², with explicit loops
        G, total, X = len(GROUPS), 0.0, x.tolist()
        C, Wd, bd = codes.tolist(), W_dec.tolist(), b_dec.tolist()
        for g in range(G):
            stop = sum(GROUPS[: g + 1])
            for n in range(B):
                for i in range(D):
                    xh = bd[i] + sum(C[n][j] * Wd[j][i] for j in range(stop))
                    total += (X[n][i] - xh) ** 2 / B
        assert abs(ref.item() - total / G**2) < 1e-10
        # and its gradients
        got.backward()
        P, h_ref = ref_graph(sae, x)
        ref_matryoshka(x, h_ref * mask, P["W_dec"], P["b_dec"], GROUPS).backward()
        close_grads(sae, P)


def test_l1():
    sae = make_sae("relu")
    x = data(seed=7)
    W_enc, b_enc, b_dec, W_dec = params(sae)
    h = ref_pre_acts(x, W_enc, b_enc, b_dec)
    norms = [math.sqrt(sum(v * v for v in row)) for row in W_dec.tolist()]
    ref = sum(abs(v) * norms[j] for row in h.tolist() for j, v in enumerate(row)) / B
    enc = sae.train_encode(x)
    assert abs(losses.l1(x, sae.decode(enc.codes), enc, sae).item() - ref) <= ATOL


def test_l0_deviation_value():
    sae = make_sae("jumprelu")
    x = data(seed=8)
    h = ref_pre_acts(x, *params(sae)[:3])
    th = sae.threshold.tolist()
    l0 = sum(1 for row in h.tolist() for j, v in enumerate(row) if v > th[j]) / B
    ref = (l0 / K - 1) ** 2
    enc = sae.train_encode(x, bandwidth=0.1)
    got = losses.l0_deviation(x, sae.decode(enc.codes), enc, sae, bandwidth=0.1)
    assert abs(got.item() - ref) <= ATOL


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("n_dead", [0, 2, 11])
def test_aux_k_value_and_gradients(n_dead, fast):
    """k_aux = min(d/2, #dead) (2 → k_aux 2, 11 → k_aux 4); residual detached; no b_dec; OpenAI normalisation."""
    sae = make_sae("batchtopk")
    x = data(seed=9)
    g = torch.Generator().manual_seed(10)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F, generator=g)[:n_dead]] = True
    # package side
    enc = sae.train_encode(x, fast=fast)
    x_hat = sae.decode(enc.codes)
    got = losses.aux_k(x, x_hat, enc, sae, dead)
    # reference side on its own graph, from copies of the parameters
    P, h = ref_graph(sae, x)
    x_hat_ref = (h * mask_batch_topk(h.detach(), K)) @ P["W_dec"] + P["b_dec"]
    ref = ref_aux(x, x_hat_ref, h, P["W_dec"], dead.tolist(), D)
    assert abs(got.item() - ref.item()) <= ATOL
    if n_dead == 0:
        assert got.item() == 0.0
        assert losses.aux_k(x, x_hat, enc, sae, None).item() == 0.0
        return
    assert got.item() > 0
    got.backward()
    ref.backward()
    close_grads(sae, P)
    # ê uses only dead latents, so live decoder rows get no aux gradient
    alive_rows = sae.W_dec.grad[~dead]
    assert float(alive_rows.abs().max()) == 0.0


def test_aux_k_residual_is_detached():
    sae = make_sae("batchtopk")
    x = data(seed=11)
    enc = sae.train_encode(x)
    x_hat = sae.decode(enc.codes).detach().requires_grad_(True)
    dead = torch.ones(F, dtype=torch.bool)
    losses.aux_k(x, x_hat, enc, sae, dead).backward()
    assert x_hat.grad is None or float(x_hat.grad.abs().max()) == 0.0


# ---------------------------------------------------------------- θ, dead latents, STE


def test_threshold_update():
    """θ ← 0.999·θ + 0.001·(smallest positive kept value); the first update (θ < 0) sets θ directly."""
    g = torch.Generator().manual_seed(12)
    theta = torch.tensor(-1.0, dtype=torch.float64)
    ref = -1.0
    for t in range(4):
        h = torch.relu(torch.randn(B, F, generator=g, dtype=torch.float64))
        codes = h * mask_batch_topk(h, K)
        smallest = min(v for row in codes.tolist() for v in row if v > 0)
        ref = smallest if ref < 0 else 0.999 * ref + 0.001 * smallest
        mechanics.update_threshold_(theta, codes, 0.999)
        assert abs(float(theta) - ref) <= 1e-6, t  # the package reads kept values in float32
    # a batch with nothing kept pulls θ towards 0
    mechanics.update_threshold_(theta, torch.zeros(B, F, dtype=torch.float64), 0.999)
    assert abs(float(theta) - 0.999 * ref) <= 1e-6


def test_threshold_and_dead_latents_from_fast_path_codes():
    """θ update and dead-latent counts read the trainer's sparse codes the same way as dense ones."""
    sae = make_sae("batchtopk")
    theta = torch.tensor(-1.0, dtype=torch.float64)
    dead = mechanics.IdleLatents(F, 20, "cpu")
    ref_theta, since = -1.0, [0] * F
    for t in range(3):
        x = data(seed=30 + t)
        h = ref_pre_acts(x, *params(sae)[:3])
        codes = (h * mask_batch_topk(h, K)).tolist()
        smallest = min(v for row in codes for v in row if v > 0)
        ref_theta = smallest if ref_theta < 0 else 0.999 * ref_theta + 0.001 * smallest
        fired = [any(row[j] > 0 for row in codes) for j in range(F)]
        since = [0 if fired[j] else since[j] + B for j in range(F)]
        enc = sae.train_encode(x, fast=True)
        assert not isinstance(enc.codes, torch.Tensor)  # really the sparse path
        mechanics.update_threshold_(theta, enc.codes, 0.999)
        dead.update(enc.codes)
        assert abs(float(theta) - ref_theta) <= 1e-6, t
        assert dead.since_fired_F.tolist() == since, t


def test_dead_latents_count_samples():
    window = 40
    dead = mechanics.IdleLatents(F, window, "cpu")
    since = [0] * F
    g = torch.Generator().manual_seed(13)
    for step, n in enumerate((16, 16, 5, 16, 30)):
        codes = torch.relu(torch.randn(n, F, generator=g)) * (torch.rand(n, F, generator=g) < 0.03)
        fired = [any(codes[r, j] > 0 for r in range(n)) for j in range(F)]
        since = [0 if fired[j] else since[j] + n for j in range(F)]
        dead.update(codes)
        assert dead.since_fired_F.tolist() == since, step
        assert dead.mask().tolist() == [s >= window for s in since], step
    assert any(s >= window for s in since) and not all(s >= window for s in since)


def test_jumprelu_straight_through_gradients():
    """d/dθ of h·1[h>θ] is −(θ/ε)·K((h−θ)/ε) and of 1[h>θ] is −(1/ε)·K((h−θ)/ε), K the rectangle kernel."""
    from sae_vlm.sae import activations as act

    eps = 0.2
    g = torch.Generator().manual_seed(14)
    theta = torch.rand(F, generator=g, dtype=torch.float64) * 0.5 + 0.2
    h = (theta + (torch.rand(B, F, generator=g, dtype=torch.float64) - 0.5) * 0.6).clamp_min(0)
    up = torch.randn(B, F, generator=g, dtype=torch.float64)  # upstream gradient
    near = rect(h, theta, eps)
    assert 0 < int(near.sum()) < B * F

    h1, t1 = h.clone().requires_grad_(True), theta.clone().requires_grad_(True)
    y = act.jumprelu(h1, t1, eps)
    close(y.detach(), h * (h > theta))
    (y * up).sum().backward()
    close(t1.grad, (up * (-theta / eps) * near).sum(0), 1e-10)
    close(h1.grad, up * (h > theta), 1e-10)

    h2, t2 = h.clone().requires_grad_(True), theta.clone().requires_grad_(True)
    s = act.step(h2, t2, eps)
    close(s.detach(), (h > theta).double())
    (s * up).sum().backward()
    close(t2.grad, (up * (-1.0 / eps) * near).sum(0), 1e-10)
    assert h2.grad is None or float(h2.grad.abs().max()) == 0.0

    # the L0 penalty's θ-gradient: 2(L0/k − 1)/k · (1/B)·Σ_b −(1/ε)K
    sae = make_sae("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(theta)
    enc = EncoderOutput(h, h * (h > theta))
    loss = losses.l0_deviation(None, None, enc, sae, bandwidth=eps)
    loss.backward()
    l0 = float((h > theta).double().sum(1).mean())
    close(sae.threshold.grad, 2 * (l0 / K - 1) / K * (-(1.0 / eps) * near).sum(0) / B, 1e-10)


# ---------------------------------------------------------------- init, LR


def test_geometric_median():
    x = data(seed=15, n=24) * torch.tensor([1.0, 2, 3, 1, 1, 5, 1, 0.5], dtype=torch.float64)
    x[0] += 40.0  # an outlier the median should resist
    # the paper's recipe (mean start, ≤100 Weiszfeld iterations, tol 1e-5) against the loop version
    close(mechanics.geometric_median(x), ref_weiszfeld(x, 100, 1e-5), 1e-9)
    # run to convergence: the gradient of Σ‖x_i − y‖ vanishes at the median
    y = mechanics.geometric_median(x, max_iter=5000, tol=1e-12)
    grad = sum((y - xi) / (y - xi).norm() for xi in x)
    assert float(grad.norm()) < 1e-6
    close(y, ref_weiszfeld(x, 5000, 1e-12), 1e-8)
    assert float((y - x.mean(0)).norm()) > 0.5  # and it is not just the mean


@pytest.mark.parametrize(
    "d,expansion,table",
    [(1024, 1, 8.0e-4), (1024, 2, 5.66e-4), (1024, 4, 4.0e-4), (1024, 8, 2.83e-4), (1024, 16, 2.0e-4),
     (1024, 64, 1.0e-4), (768, 1, 9.24e-4), (768, 2, 6.53e-4), (768, 4, 4.62e-4), (768, 8, 3.27e-4),
     (768, 16, 2.31e-4), (768, 64, 1.15e-4)],
)
def test_default_lr_table(d, expansion, table):
    f = d * expansion
    lr = mechanics.default_lr(f)
    assert abs(lr - 2e-4 * math.sqrt(2**14 / f)) <= 1e-15
    assert abs(lr - table) / table < 5e-3  # the table is printed to 3 significant digits


def test_lr_factor_warmup_and_decay():
    for step, want in [(0, 0.0), (250, 0.25), (999, 0.999), (1000, 1.0), (50_000, 1.0)]:
        assert abs(mechanics.lr_factor(step, 1000, 110_000, 109_999) - want) < 1e-12, step
    # the paper's schedule: decay_start = 109,999 of 110,000 steps leaves the LR constant until the end
    assert mechanics.lr_factor(109_998, 1000, 110_000, 109_999) == 1.0
    assert mechanics.lr_factor(109_999, 1000, 110_000, 109_999) == 1.0
    assert mechanics.lr_factor(110_000, 1000, 110_000, 109_999) == 0.0
    for step, want in [(60, 1.0), (70, 0.75), (90, 0.25), (100, 0.0)]:
        assert abs(mechanics.lr_factor(step, 10, 100, 60) - want) < 1e-12, step
    assert mechanics.lr_factor(5, 0, 100, None) == 1.0


# ---------------------------------------------------------------- one full optimizer step


class RefTrainer:
    """The paper's update, written out: loss → grads → parallel-grad removal → clip 1.0 → Adam → renorm."""

    def __init__(self, sae, cfg, base_lr):
        self.arch, self.cfg, self.base_lr = sae.cfg.arch, cfg, base_lr
        self.groups = sae.cfg.group_sizes
        names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if self.arch == "jumprelu" else [])
        self.p = {n: getattr(sae, n).detach().clone().double() for n in names}
        self.m = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.v = {n: torch.zeros_like(t) for n, t in self.p.items()}
        self.t = 0
        self.theta = float(sae.threshold) if self.arch != "jumprelu" else None
        self.since = [0] * F

    def lr(self, step):
        c = self.cfg
        if c.warmup_steps > 0 and step < c.warmup_steps:
            return self.base_lr * step / c.warmup_steps
        if c.decay_start is not None and step >= c.decay_start:
            return self.base_lr * (c.steps - step) / (c.steps - c.decay_start)
        return self.base_lr

    def step(self, x, step):
        c, arch = self.cfg, self.arch
        P = {n: t.clone().requires_grad_(True) for n, t in self.p.items()}
        h = torch.relu(torch.einsum("nd,df->nf", x - P["b_dec"], P["W_enc"]) + P["b_enc"])
        hd = h.detach()
        if arch in ("batchtopk", "matryoshka"):
            mask = mask_batch_topk(hd, K)
        elif arch == "topk":
            mask = mask_row_topk(hd, K)
        elif arch == "relu":
            mask = torch.ones_like(hd)
        else:
            mask = mask_threshold(hd, self.p["threshold"])
        codes = h * mask
        codes.retain_grad()
        x_hat = torch.einsum("nf,fd->nd", codes, P["W_dec"]) + P["b_dec"]

        # dead latents: samples since each latent last fired, counted before the aux loss reads them
        C = codes.detach().tolist()
        fired = [any(row[j] > 0 for row in C) for j in range(F)]
        self.since = [0 if fired[j] else self.since[j] + len(C) for j in range(F)]
        dead = [s >= c.dead_window for s in self.since]
        # θ: EMA of the smallest positive kept value, set directly the first time
        if arch in ("topk", "batchtopk", "matryoshka") and step > c.threshold_start_step:
            pos = [v for row in C for v in row if v > 0]
            smallest = min(pos) if pos else 0.0
            beta = c.threshold_beta
            self.theta = smallest if self.theta < 0 else beta * self.theta + (1 - beta) * smallest

        if arch == "matryoshka":
            recon = ref_matryoshka(x, codes, P["W_dec"], P["b_dec"], self.groups)
        else:
            recon = ref_sq_err(x, x_hat)
        aux = ref_aux(x, x_hat, h, P["W_dec"], dead, D)
        loss = recon + c.aux_alpha * aux
        if arch == "relu":
            loss = loss + c.l1_coeff * (codes.abs() * P["W_dec"].norm(dim=1)).sum(1).mean()
        if arch == "jumprelu":
            l0 = float(mask.sum(1).mean())
            loss = loss + c.l0_coeff * (l0 / K - 1) ** 2
        loss.backward()
        grads = {n: t.grad.clone() if t.grad is not None else torch.zeros_like(t) for n, t in P.items()}
        if arch == "jumprelu":  # straight-through θ gradients, by hand (rectangle kernel)
            eps, th = c.jumprelu_bandwidth, self.p["threshold"]
            near = rect(hd, th, eps)
            grads["threshold"] = (codes.grad * (-th / eps) * near).sum(0)
            grads["threshold"] += c.l0_coeff * 2 * (l0 / K - 1) / K * (-(1.0 / eps) * near).sum(0) / len(C)
            self.ste_active = int(near.sum())

        # remove the gradient component along each decoder row
        Wd, gW = self.p["W_dec"].tolist(), grads["W_dec"].tolist()
        for j in range(F):
            nrm = math.sqrt(sum(v * v for v in Wd[j]))
            u = [v / nrm for v in Wd[j]]
            dot = sum(a * b for a, b in zip(gW[j], u))
            gW[j] = [a - dot * b for a, b in zip(gW[j], u)]
        grads["W_dec"] = torch.tensor(gW, dtype=torch.float64)

        # global grad-norm clipping at 1.0 (torch's 1e-6 guard in the denominator)
        total = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
        coef = min(1.0, c.grad_clip / (total + 1e-6))
        grads = {n: g * coef for n, g in grads.items()}
        self.total_norm = total

        # Adam, betas (0.9, 0.999), eps 1e-8, bias-corrected
        lr = self.lr(step)
        self.t += 1
        for n in self.p:
            self.m[n] = 0.9 * self.m[n] + 0.1 * grads[n]
            self.v[n] = 0.999 * self.v[n] + 0.001 * grads[n] ** 2
            m_hat = self.m[n] / (1 - 0.9**self.t)
            v_hat = self.v[n] / (1 - 0.999**self.t)
            self.p[n] = self.p[n] - lr * m_hat / (v_hat.sqrt() + 1e-8)

        # unit-norm decoder rows after the step
        rows = self.p["W_dec"].tolist()
        self.p["W_dec"] = torch.tensor(
            [[v / (math.sqrt(sum(u * u for u in r)) + 1e-8) for v in r] for r in rows], dtype=torch.float64)
        if arch == "jumprelu":
            self.p["threshold"] = self.p["threshold"].clamp_min(0.0)
        self.grads, self.loss, self.lr_used, self.aux = grads, loss.item(), lr, aux.item()


def train_cfg(arch, **kw):
    base = dict(data="unused", out="unused", archs=(arch,), expansions=(F / D,), ks=(K,), batch_size=B, steps=5,
                lr=0.05, warmup_steps=2, decay_start=3, grad_clip=1.0, aux_alpha=0.03, dead_window=B,
                threshold_start_step=1, threshold_beta=0.999, l1_coeff=0.05, l0_coeff=1.0,
                jumprelu_bandwidth=0.5, quiet=True)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize(
    "arch,fast", [(a, False) for a in ARCH_LIST] + [(a, True) for a in SPARSE])
def test_train_step_matches_reference(arch, fast):
    """Four steps through trainer.train_step (warmup, constant, decay LR) against the written-out reference,
    on the dense path and on the fast sparse path the trainer uses for top-k archs."""
    cfg = train_cfg(arch, fast=fast)
    spec = cfg.specs()[0]
    m = trainer.build_member(spec, D, cfg, torch.device("cpu"), {})
    assert m.sae.cfg.d_sae == F and m.base_lr == cfg.lr
    if arch == "matryoshka":
        assert m.sae.cfg.group_sizes == GROUPS
    # float32 as the trainer runs it (train_step casts codes to float32); the reference runs in float64.
    # Parameters are moved off init (b_enc ≠ 0, b_dec like a median, W_enc ≠ W_decᵀ).
    sae = m.sae
    g = torch.Generator().manual_seed(16)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.2)
        sae.b_dec.copy_(torch.randn(D, generator=g) * 0.2)
        sae.W_enc.add_(torch.randn(D, F, generator=g) * 0.2)
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(F, generator=g) * 0.6 + 0.2)
    ref = RefTrainer(sae, cfg, m.base_lr)
    clipped, aux_steps = 0, 0
    for step in (1, 2, 3, 4):
        x = (data(seed=100 + step) * 2.0).float()
        stats = trainer.train_step(m, x, step, cfg)
        ref.step(x.double(), step)
        clipped += ref.total_norm > cfg.grad_clip
        aux_steps += ref.aux > 0
        assert abs(float(stats["aux"]) - ref.aux) <= ATOL, step
        assert abs(float(stats["lr"]) - ref.lr_used) < 1e-15
        # float32 loss of O(10–100): compare relative to its size (1e-5 absolute is about one ulp there)
        assert abs(float(stats["loss"]) - ref.loss) <= ATOL * max(1.0, abs(ref.loss)), step
        for n, want in ref.p.items():
            close(grad_of(sae, n), ref.grads[n])  # the processed (projected, clipped) gradients
            close(getattr(sae, n).detach(), want)
        assert m.idle.since_fired_F.tolist() == ref.since
        if arch != "jumprelu":
            assert abs(float(sae.threshold) - ref.theta) <= ATOL, step
        norms = sae.W_dec.detach().norm(dim=1)
        close(norms, torch.ones(F))
    assert clipped > 0  # clipping was exercised
    if arch != "relu":
        assert aux_steps > 0  # and so was AuxK (ReLU codes fire too densely for any latent to die here)
    assert ref.lr_used == 0.5 * cfg.lr  # the last step was in the decay
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert ref.theta > 0
    if arch == "jumprelu":
        assert ref.ste_active > 0


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_init(arch):
    """Paper §2.5: unit-norm decoder rows, W_enc = W_decᵀ, b_enc = b_dec = 0; θ unset (−1) for BatchTopK-style."""
    sae = SAE(SAEConfig(arch, D, F, None if arch == "relu" else K, GROUPS if arch == "matryoshka" else None))
    close(sae.W_dec.detach().norm(dim=1), torch.ones(F))
    assert torch.equal(sae.W_enc.detach(), sae.W_dec.detach().T)
    assert not sae.b_enc.detach().any() and not sae.b_dec.detach().any()
    if arch in ("topk", "batchtopk", "matryoshka"):
        assert float(sae.threshold) == -1.0


# ---------------------------------------------------------------- input-scale folding, I/O, conversion


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_fold_input_scale(arch):
    """An SAE trained on x/s, folded with s, gives s·f and s·x̂ on raw x (paper §2.2), in every mode."""
    s = 3.7
    sae = make_sae(arch, theta=0.3)
    folded = make_sae(arch, theta=0.3)
    folded.load_state_dict(sae.state_dict())
    folded.fold_input_scale(s)
    x = data(seed=17) * s
    modes = ["relu", "threshold"] + ([] if arch == "relu" else ["topk", "batchtopk"])
    for mode in modes:
        f_train = sae.encode(x / s, mode=mode)
        close(folded.encode(x, mode=mode), s * f_train)
        close(folded.decode(folded.encode(x, mode=mode)), s * sae.decode(f_train))
    close(folded(x), s * sae(x / s))
    # an unset θ (< 0) stays unset
    unset = make_sae("batchtopk")
    unset.fold_input_scale(s)
    assert float(unset.threshold) == -1.0


@pytest.mark.parametrize("arch", ARCH_LIST)
def test_save_load_round_trip_exact(arch, tmp_path):
    src = make_sae(arch, theta=0.25)
    sae = SAE(SAEConfig(arch, D, F, src.cfg.k, src.cfg.group_sizes, "layer.11", "m/id", "cls"))
    sae.load_state_dict({k: v.float() for k, v in src.state_dict().items()})
    sae.meta = {"data": "/some/store", "training": {"step": 7}}
    sae.save_pretrained(tmp_path / "s")
    back = SAE.from_pretrained(tmp_path / "s")
    assert back.cfg == sae.cfg and back.meta == sae.meta
    a, b = sae.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k
    x = data(seed=18).float()
    assert torch.equal(sae.encode(x), back.encode(x)) and torch.equal(sae(x), back(x))
    with pytest.raises(FileNotFoundError):
        SAE.from_pretrained(tmp_path / "missing")

