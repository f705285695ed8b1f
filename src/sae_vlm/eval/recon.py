"""How well an SAE reconstructs held-out activations, and whether CLIP still works with it spliced in.

FVE = 1 − Σ_d Var(x_d − x̂_d) / Σ_d Var(x_d), per-dimension variances over the split (streaming, float64,
merged chunk by chunk with Chan's formula so large means do not cancel). Also MSE, mean cosine(x, x̂),
L0 in threshold and top-k mode, and the number and fraction of dead latents (no positive activation on any row
of the split: the one meaning of 'dead' in this package) and the fraction of dense (fire on > `dense_cutoff`
of rows) latents, under the SAE's default inference mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from sae_vlm.data.store import as_source
from sae_vlm.device import resolve_device

F64 = torch.float64


class _Moments:
    """Streaming per-dimension mean and sum of squared deviations (Chan et al. merge), float64."""

    def __init__(self):
        self.n = 0
        self.mean = self.m2 = torch.zeros((), dtype=F64)  # replaced by the first batch's

    def add(self, x_RD: torch.Tensor) -> None:
        x = x_RD.double()
        nb, mb = x.shape[0], x.mean(0)
        m2b = ((x - mb) ** 2).sum(0)
        if self.n == 0:
            self.n, self.mean, self.m2 = nb, mb, m2b
            return
        n = self.n + nb
        delta = mb - self.mean
        self.mean = self.mean + delta * nb / n
        self.m2 = self.m2 + m2b + delta**2 * self.n * nb / n
        self.n = n

    def var(self) -> torch.Tensor:
        return self.m2 / self.n


class ReconAccumulator:
    """Reconstruction metrics of one SAE, fed consecutive chunks of rows with their codes (one encode serves every
    metric); rows outside `keep_N` (bool, all rows) are left out, and None keeps every row.

    The pooled sums and moments are merged per chunk; the paper's per-batch FVE and L0 take `batch_rows`
    consecutive kept rows at a time, so kept rows wait across chunk boundaries until a batch is full."""

    def __init__(self, sae, keep_N: torch.Tensor | None = None, *, batch_rows: int = 4096, dense_cutoff: float = 0.1):
        dev = sae.W_dec.device
        self.sae, self.keep_N, self.batch_rows, self.dense_cutoff = sae, keep_N, batch_rows, dense_cutoff
        self.x_mom, self.r_mom = _Moments(), _Moments()
        self.n, self.has_k = 0, sae.cfg.k is not None
        # sq_err, cos_sum, l0 (inference mode), l0_thr, l0_topk: on the device, so a chunk does not wait for a sync
        self.sums_5 = torch.zeros(5, dtype=F64, device=dev)
        self.fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=dev)
        self.pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (x, x − x̂, L0) of a batch
        self.batch_fve: list[torch.Tensor] = []
        self.batch_l0: list[torch.Tensor] = []

    @torch.no_grad()
    def add(self, x_RD: torch.Tensor, codes_RF: torch.Tensor, r0: int = 0) -> None:
        """Rows r0.. of the data [R, d_in] and their codes [R, F] in the SAE's inference mode."""
        if self.keep_N is not None:
            keep_R = self.keep_N[r0 : r0 + x_RD.shape[0]].to(x_RD.device)
            x_RD, codes_RF = x_RD[keep_R], codes_RF[keep_R]
        if x_RD.shape[0] == 0:
            return
        sae, x = self.sae, x_RD.float()
        x_hat = sae.decode(codes_RF)
        resid = x - x_hat
        self.x_mom.add(x)
        self.r_mom.add(resid)
        self.n += x.shape[0]
        active_RF = codes_RF > 0
        self.fired_F += active_RF.sum(0)
        thr_R = (sae.encode(x, mode="threshold") > 0).sum(1)  # ReLU SAEs: θ = 0, the ReLU codes
        topk = (sae.encode(x, mode="topk") > 0).sum() if self.has_k else thr_R.new_zeros(())
        cos = torch.nn.functional.cosine_similarity(x.double(), x_hat.double(), dim=1).sum()
        self.sums_5 += torch.stack([(resid.double() ** 2).sum(), cos, active_RF.sum().double(), thr_R.sum().double(),
                                    topk.double()])
        self.pending.append((x, resid, thr_R))
        self._full_batches()

    def _full_batches(self) -> None:
        size = self.batch_rows
        if sum(p[0].shape[0] for p in self.pending) < size:
            return
        x, resid, thr_R = (torch.cat(parts) for parts in zip(*self.pending))
        cut = x.shape[0] - x.shape[0] % size
        for b0 in range(0, cut, size):
            self._batch(x[b0 : b0 + size], resid[b0 : b0 + size], thr_R[b0 : b0 + size])
        self.pending = [(x[cut:], resid[cut:], thr_R[cut:])] if cut < x.shape[0] else []

    def _batch(self, x, resid, thr_R) -> None:
        """dictionary_learning's `validation` per batch: FVE with unbiased per-dimension variances, and L0."""
        if x.shape[0] > 1:
            self.batch_fve.append(1.0 - resid.double().var(0).sum() / x.double().var(0).sum())
            self.batch_l0.append(thr_R.sum().double() / x.shape[0])

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError("evaluation set is empty: 0 held-out rows, expected at least 1")
        if self.pending:  # the last, short batch
            self._batch(*(torch.cat(parts) for parts in zip(*self.pending)))
            self.pending = []
        n, d_in = self.n, self.sae.cfg.d_in
        sq_err, cos_sum, l0, l0_thr, l0_topk = self.sums_5.tolist()
        var_x = float(self.x_mom.var().sum())
        fve = 1.0 - float(self.r_mom.var().sum()) / var_x if var_x > 0 else float("nan")
        freq_F = self.fired_F.double().cpu() / n
        return {
            "rows": n,
            "fve": fve,
            "fve_batch_mean": float(torch.stack(self.batch_fve).mean()) if self.batch_fve else float("nan"),
            "mse": sq_err / (n * d_in),
            "cosine": cos_sum / n,
            "l0": l0 / n,  # active latents per row in the SAE's inference mode (the codes FVE and dead_frac use)
            "l0_threshold": l0_thr / n,
            "l0_threshold_batch_mean": float(torch.stack(self.batch_l0).mean()) if self.batch_l0 else float("nan"),
            "l0_topk": l0_topk / n if self.has_k else None,
            "batch_rows": self.batch_rows,
            "dead": int((self.fired_F == 0).sum()),
            "dead_frac": float((self.fired_F == 0).double().mean()),
            "dense_frac": float((freq_F > self.dense_cutoff).double().mean()),
            "dense_cutoff": self.dense_cutoff,
            "fire_freq": freq_F,  # per latent [F]; callers move it to the per-latent file
        }


@torch.no_grad()
def reconstruction_metrics(
    sae, data, *, rows: torch.Tensor | None = None, device=None, batch_rows: int = 4096,
    dense_cutoff: float = 0.1, quiet: bool = True,
) -> dict:
    """FVE, MSE, cosine, L0 (threshold / top-k), dead and dense fractions of `sae` on `data` (rows `rows`).

    FVE and the threshold-mode L0 are given twice: pooled over all rows, and as the paper's validation computes
    them (dictionary_learning's `validation`): per batch of `batch_rows` rows in the data's order, FVE with unbiased
    per-dimension variances, then the mean over batches (batches of fewer than 2 rows are left out)."""
    dev = resolve_device(device)
    src = as_source(data)
    if src.d_in != sae.cfg.d_in:
        raise ValueError(f"activations have width {src.d_in} but the SAE expects d_in={sae.cfg.d_in}")
    rows_N = torch.arange(src.rows) if rows is None else torch.as_tensor(rows).long()
    if rows_N.numel() == 0:
        raise ValueError("evaluation set is empty: 0 held-out rows, expected at least 1")
    sae = sae.to(dev).eval()
    acc = ReconAccumulator(sae, batch_rows=batch_rows, dense_cutoff=dense_cutoff)
    for r0 in tqdm(range(0, rows_N.numel(), batch_rows), desc="reconstruction", disable=quiet, leave=False):
        x = src.get(rows_N[r0 : r0 + batch_rows]).to(dev).float()
        acc.add(x, sae.encode(x))
    return acc.result()


def heldout_rows(n: int, fraction: float = 0.1, seed: int = 0) -> torch.Tensor:
    """A seeded random `fraction` of row indices (sorted), at least one row."""
    if not 0 < fraction <= 1:
        raise ValueError(f"held-out fraction {fraction} must be in (0, 1]")
    g = torch.Generator().manual_seed(seed)
    m = max(1, int(round(n * fraction)))
    return torch.randperm(n, generator=g)[:m].sort().values


# --- downstream: CLIP zero-shot with the reconstruction spliced in ------------------------------------------


@contextlib.contextmanager
def splice_sae(model, hook_point: str, sae, token_selection: str = "cls") -> Iterator[None]:
    """Replace the activation at `hook_point` ("layer.<i>" residual after layer i, or "last" = image_embeds)
    by the SAE reconstruction. At a layer, only the CLS token (token 0) is replaced for a "cls" SAE.

    The hook point is resolved and patched by `Backbone.patch` (the extraction code's layer lookup)."""
    from sae_vlm.backbones import Backbone

    was_training = model.training
    bb = Backbone(model)  # puts the model in eval mode; restored below so splicing has no side effect
    model.train(was_training)

    def recon(t):
        if t.ndim == 2:
            return sae(t.float()).to(t.dtype)
        t = t.clone()
        if token_selection == "cls":
            t[:, 0] = sae(t[:, 0].float()).to(t.dtype)
        else:
            t = sae(t.float()).to(t.dtype)
        return t

    with bb.patch(hook_point, recon):
        yield


@torch.no_grad()
def image_features(model, pixel_values, batch_size: int = 64) -> torch.Tensor:
    """[N, D] L2-normalised CLIP image embeddings, float32 on the CPU."""
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for b0 in range(0, pixel_values.shape[0], batch_size):
        img = model.get_image_features(pixel_values=pixel_values[b0 : b0 + batch_size].to(dev))
        out.append(torch.nn.functional.normalize(getattr(img, "pooler_output", img).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def text_features(model, text_inputs: dict) -> torch.Tensor:
    """[C, D] L2-normalised CLIP text embeddings of tokenised class prompts, float32 on the CPU."""
    dev = next(model.parameters()).device
    text = model.get_text_features(**{k: v.to(dev) for k, v in text_inputs.items()})
    text = getattr(text, "pooler_output", text)  # 5.x may return an output object
    return torch.nn.functional.normalize(text.float(), dim=-1).cpu()


def _check_labels(labels: Sequence[int], n_images: int) -> torch.Tensor:
    labels_N = torch.as_tensor(labels).long()
    if labels_N.numel() != n_images:
        raise ValueError(f"{labels_N.numel()} labels for {n_images} images; expected one label per image")
    if labels_N.numel() == 0:
        raise ValueError("evaluation set is empty: 0 images for zero-shot accuracy")
    return labels_N


def _accuracy(img_ND: torch.Tensor, text_CD: torch.Tensor, labels_N: torch.Tensor) -> float:
    return int(((img_ND @ text_CD.T).argmax(1) == labels_N).sum()) / labels_N.numel()


def zero_shot_accuracy(model, pixel_values, labels: Sequence[int], text_inputs: dict, *, batch_size: int = 64) -> float:
    """Top-1 accuracy of CLIP zero-shot classification; `text_inputs` are tokenised class prompts."""
    labels_N = _check_labels(labels, pixel_values.shape[0])
    return _accuracy(image_features(model, pixel_values, batch_size), text_features(model, text_inputs), labels_N)


def accuracies_recovered(model, sae, hook_point: str, pixel_values, tasks: dict, *, token_selection="cls",
                         batch_size: int = 64) -> dict:
    """{task: zero-shot accuracy with and without the SAE spliced in, and their ratio} for tasks {name: (labels,
    text_inputs)} on the same images: each image is embedded once with and once without the SAE."""
    checked = {name: (_check_labels(labels, pixel_values.shape[0]), text) for name, (labels, text) in tasks.items()}
    base = image_features(model, pixel_values, batch_size)
    with splice_sae(model, hook_point, sae, token_selection):
        spliced = image_features(model, pixel_values, batch_size)
    out = {}
    for name, (labels_N, text_inputs) in checked.items():
        text = text_features(model, text_inputs)
        a, b = _accuracy(base, text, labels_N), _accuracy(spliced, text, labels_N)
        out[name] = {"accuracy": a, "accuracy_spliced": b, "recovered": b / a if a > 0 else float("nan")}
    return out


def accuracy_recovered(model, sae, hook_point: str, pixel_values, labels, text_inputs, *, token_selection="cls",
                       batch_size: int = 64) -> dict:
    """Zero-shot accuracy with and without the SAE spliced in, and their ratio."""
    return accuracies_recovered(model, sae, hook_point, pixel_values, {"task": (labels, text_inputs)},
                                token_selection=token_selection, batch_size=batch_size)["task"]
