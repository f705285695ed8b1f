"""The sparse autoencoder: one module for all five architectures, and its on-disk format.

h = ReLU((x − b_dec) W_enc + b_enc);  codes = select(h);  x̂ = codes W_dec + b_dec.
The architectures differ only in how `select` works in training and at inference (see ARCHS).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from sae_vlm.io import atomic_save_safetensors, atomic_write_text
from sae_vlm.sae import activations as act
from sae_vlm.sae import sparse
from sae_vlm.sae.sparse import SparseCodes

# arch -> default inference mode. Training uses `train_select` below.
ARCHS = {
    "relu": "relu",  # ReLU + L1 penalty
    "topk": "topk",  # per-row top-k
    "batchtopk": "threshold",  # batch top-k in training, learned global θ at inference
    "matryoshka": "threshold",  # BatchTopK with nested prefix losses
    "jumprelu": "threshold",  # learned per-latent θ, straight-through estimator
}
MODES = ("relu", "topk", "batchtopk", "threshold")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    arch: str
    d_in: int
    d_sae: int
    k: int | None = None
    group_sizes: tuple[int, ...] | None = None  # Matryoshka levels, contiguous latent groups
    hook_point: str | None = None
    model_id: str | None = None
    token_selection: str | None = None

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.arch in ("topk", "batchtopk", "matryoshka", "jumprelu"):
            if self.k is None or not 0 < self.k <= self.d_sae:
                raise ValueError(f"k={self.k} is invalid for d_sae={self.d_sae}; expected 1 <= k <= d_sae")
        if self.arch == "matryoshka":
            if not self.group_sizes or sum(self.group_sizes) != self.d_sae or min(self.group_sizes) <= 0:
                raise ValueError(f"group_sizes {self.group_sizes} must be positive and sum to d_sae={self.d_sae}")
        if self.group_sizes is not None:
            object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))


def group_sizes_from_fractions(fractions, d_sae: int) -> tuple[int, ...]:
    """int(f·F) for every group but the last, which takes the remainder (as the paper's trainer does)."""
    fractions = [float(f) for f in fractions]
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"group fractions {fractions} must be positive and sum to 1 (they sum to {sum(fractions):.6g})")
    sizes = [int(f * d_sae) for f in fractions[:-1]]
    sizes.append(d_sae - sum(sizes))
    if min(sizes) <= 0:
        raise ValueError(f"group fractions {fractions} give an empty group at d_sae={d_sae}: sizes {sizes}")
    return tuple(sizes)


SPARSE_ARCHS = ("topk", "batchtopk", "matryoshka")  # archs with a fast sparse training path


class EncoderOutput(NamedTuple):
    h_NF: torch.Tensor  # post-ReLU pre-activations (what the aux loss reads)
    codes: torch.Tensor | SparseCodes  # selected codes: dense [N, F], or sparse entries on the fast path


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_in, cfg.d_sae
        W_dec_FD = nn.init.kaiming_uniform_(torch.empty(f, d))
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        # Contiguous: fused Adam is ~8x slower on a transposed parameter (it copies it every step).
        self.W_enc = nn.Parameter(W_dec_FD.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if cfg.arch == "jumprelu":
            self.threshold = nn.Parameter(torch.full((f,), 1e-3))
        else:
            # θ < 0 means "not learned yet": the gate then passes every positive value.
            init = 0.0 if cfg.arch == "relu" else -1.0
            self.register_buffer("threshold", torch.tensor(init))
        self.meta: dict = {}  # extra config.json fields (training summary, data path)

    # --- forward pieces ---
    def _check(self, x_ND: torch.Tensor) -> None:
        if x_ND.shape[-1] != self.cfg.d_in:
            raise ValueError(f"activation width {x_ND.shape[-1]} does not match the SAE's d_in={self.cfg.d_in}")

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        self._check(x_ND)
        return nn.functional.linear(x_ND - self.b_dec, self.W_enc.T, self.b_enc).relu_()

    def select(self, h_NF: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "relu":
            return h_NF
        if mode == "threshold":
            return act.threshold(h_NF, self.threshold)
        if mode in ("topk", "batchtopk"):
            if self.cfg.k is None:
                raise ValueError(f"mode {mode!r} needs k, but this {self.cfg.arch} SAE has k=None")
            return act.topk(h_NF, self.cfg.k) if mode == "topk" else act.batch_topk(h_NF, self.cfg.k)
        raise ValueError(f"unknown encode mode {mode!r}; expected one of {', '.join(MODES)}")

    def encode(self, x_ND: torch.Tensor, mode: str | None = None) -> torch.Tensor:
        """Dense codes for raw activations, by default in the architecture's inference mode."""
        return self.select(self.pre_acts(x_ND), mode or ARCHS[self.cfg.arch])

    def decode(self, codes: torch.Tensor | SparseCodes) -> torch.Tensor:
        if isinstance(codes, SparseCodes):
            return sparse.decode(codes, self.W_dec) + self.b_dec
        return codes @ self.W_dec + self.b_dec

    def decode_groups(self, codes: torch.Tensor | SparseCodes) -> list[torch.Tensor]:
        """Each Matryoshka group's contribution to the reconstruction (no bias), in order."""
        if isinstance(codes, SparseCodes):
            return sparse.decode_groups(codes, self.W_dec, self.cfg.group_sizes)
        bounds = torch.tensor((0, *self.cfg.group_sizes)).cumsum(0).tolist()
        return [codes[:, lo:hi] @ self.W_dec[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def values_at(self, x_ND, h_NF, rows_M, cols_M) -> torch.Tensor:
        """h at chosen entries, differentiable: by indexing when h carries a graph, else sparsely."""
        if h_NF.requires_grad:
            return h_NF[rows_M, cols_M]
        return sparse.selected_values(self, x_ND, h_NF, rows_M, cols_M)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_ND))

    def train_encode(self, x_ND: torch.Tensor, bandwidth: float = 1e-3, fast: bool = False) -> EncoderOutput:
        """The training-time selection: batch top-k, per-row top-k, ReLU, or JumpReLU with an STE.

        `fast` (top-k archs only) selects without a graph over the N×F pre-activations and returns sparse
        codes whose gradients touch only the selected entries; the function computed is the same.
        """
        arch = self.cfg.arch
        if fast and arch in SPARSE_ARCHS:
            with torch.no_grad():
                h = self.pre_acts(x_ND)
            pick = sparse.topk_indices if arch == "topk" else sparse.batch_topk_indices
            rows, cols = pick(h, self.cfg.k)
            values = sparse.selected_values(self, x_ND, h, rows, cols)
            return EncoderOutput(h, SparseCodes(values, rows, cols, x_ND.shape[0]))
        h = self.pre_acts(x_ND)
        if arch == "jumprelu":
            return EncoderOutput(h, act.jumprelu(h, self.threshold, bandwidth))
        mode = {"relu": "relu", "topk": "topk"}.get(arch, "batchtopk")
        return EncoderOutput(h, self.select(h, mode))

    # --- scaling and I/O ---
    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Make an SAE trained on x/s take raw x: biases and θ scale by s, weights stay (paper §2.2)."""
        self.b_enc.mul_(s)
        self.b_dec.mul_(s)
        if self.threshold.ndim > 0 or self.threshold > 0:
            self.threshold.mul_(s)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write model.safetensors, then config.json; config.json appearing marks the directory complete."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: t.detach().float().cpu().contiguous() for n, t in self.state_dict().items()}
        atomic_save_safetensors(out / "model.safetensors", tensors)
        atomic_write_text(out / "config.json", json.dumps({**dataclasses.asdict(self.cfg), **self.meta}, indent=2))

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, revision: str | None = None, device="cpu") -> "SAE":
        path = Path(path_or_id)
        if not path.is_dir():
            if path.exists() or str(path_or_id).startswith((".", "/")):
                raise FileNotFoundError(f"SAE directory {path} does not exist or is not a directory")
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=["*.json", "*.safetensors"]))
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is missing; an SAE directory holds config.json and model.safetensors")
        raw = json.loads(cfg_file.read_text())
        fields = {f.name for f in dataclasses.fields(SAEConfig)}
        sae = cls(SAEConfig(**{k: v for k, v in raw.items() if k in fields}))
        sae.meta = {k: v for k, v in raw.items() if k not in fields}
        state = load_file(weights)
        state["threshold"] = state["threshold"].reshape(sae.threshold.shape)
        sae.load_state_dict(state)
        return sae.to(device)

