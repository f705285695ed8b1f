"""The sparse autoencoder: one module for all five architectures, and its on-disk format.

h = ReLU((x − b_dec) W_enc + b_enc);  codes = select(h);  x̂ = codes W_dec + b_dec.
The architectures differ only in how `select` works in training and at inference: see their records in arch.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path, PurePosixPath
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from sae_vlm.io import atomic_save_safetensors, atomic_write_text
from sae_vlm.sae import activations as act
from sae_vlm.sae import sparse
from sae_vlm.sae.arch import ARCHS, ArchSpec, arch_spec
from sae_vlm.sae.groups import group_bounds
from sae_vlm.sae.sparse import SparseCodes

__all__ = ["ARCHS", "MODES", "SAE", "EncoderOutput", "SAEConfig"]

MODES = ("relu", "topk", "batchtopk", "threshold")  # what `encode(x, mode=...)` accepts

# Loaders of other libraries' checkpoints, (path, **hints) -> SAE: `sae_vlm.sae.formats` registers its own when
# imported (the sae package imports it), so this module names no library. The latest registered is used.
FOREIGN_LOADERS: list[Callable[..., SAE]] = []


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
        spec = arch_spec(self.arch)
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if (spec.needs_k or self.k is not None) and (self.k is None or not 0 < self.k <= self.d_sae):
            raise ValueError(f"k={self.k} is invalid for d_sae={self.d_sae}; expected 1 <= k <= d_sae")
        if spec.nested_groups:
            if not self.group_sizes or sum(self.group_sizes) != self.d_sae or min(self.group_sizes) <= 0:
                raise ValueError(f"group_sizes {self.group_sizes} must be positive and sum to d_sae={self.d_sae}")
        if self.group_sizes is not None:
            object.__setattr__(self, "group_sizes", tuple(int(g) for g in self.group_sizes))


class EncoderOutput(NamedTuple):
    h_NF: torch.Tensor  # post-ReLU pre-activations (what the aux loss reads)
    codes: torch.Tensor | SparseCodes  # selected codes: dense [N, F], or sparse entries on the fast path


def nonfinite_tensors(named: dict[str, torch.Tensor | None]) -> str:
    """'W_dec has 3 non-finite values, ...' for the tensors holding NaN or inf; "" when all are finite."""
    counts = {n: int((~torch.isfinite(t)).sum()) for n, t in named.items() if t is not None}
    return ", ".join(f"{n} has {c} non-finite values" for n, c in counts.items() if c)


class SAE(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_in, cfg.d_sae
        W_dec_FD = nn.init.kaiming_uniform_(torch.empty(f, d))
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        # The encoder is held latent-major, as nn.Linear holds weights: the sparse backward then writes its gradient
        # in the parameter's layout (no 4·F·d-byte transpose per step) and fused Adam walks contiguous memory.
        # `W_enc` [d, F] is a view of it, and files and state dicts keep W_enc [d, F].
        self.W_enc_FD = nn.Parameter(W_dec_FD.clone())
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if self.arch.learned_threshold:
            self.threshold = nn.Parameter(torch.full((f,), 1e-3))
        else:
            # θ < 0 means "not learned yet": the gate then passes every positive value. Untracked θ stays at 0.
            self.register_buffer("threshold", torch.tensor(-1.0 if self.arch.tracks_threshold else 0.0))
        self.meta: dict = {}  # extra config.json fields (training summary, data path)
        self.path: Path | None = None  # the directory it was loaded from, to name it in messages
        self.register_state_dict_post_hook(_W_enc_to_file_layout)
        self.register_load_state_dict_pre_hook(_W_enc_from_file_layout)

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder as the paper writes it, [d_in, d_sae]: a view of `W_enc_FD`."""
        return self.W_enc_FD.T

    @property
    def arch(self) -> ArchSpec:
        return arch_spec(self.cfg.arch)

    # --- forward pieces ---
    def _check(self, x_ND: torch.Tensor) -> None:
        if x_ND.shape[-1] != self.cfg.d_in:
            raise ValueError(f"activation width {x_ND.shape[-1]} does not match the SAE's d_in={self.cfg.d_in}")

    def pre_acts(self, x_ND: torch.Tensor) -> torch.Tensor:
        self._check(x_ND)
        return nn.functional.linear(x_ND - self.b_dec, self.W_enc_FD, self.b_enc).relu_()

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
        return self.select(self.pre_acts(x_ND), mode or self.arch.inference)

    def decode(self, codes: torch.Tensor | SparseCodes) -> torch.Tensor:
        if isinstance(codes, SparseCodes):
            return sparse.decode(codes, self.W_dec) + self.b_dec
        return codes @ self.W_dec + self.b_dec

    def decode_groups(self, codes: torch.Tensor | SparseCodes) -> list[torch.Tensor]:
        """Each Matryoshka group's contribution to the reconstruction (no bias), in order."""
        groups = self.cfg.group_sizes
        if groups is None:
            raise ValueError(f"this {self.cfg.arch} SAE has no Matryoshka groups to decode")
        if isinstance(codes, SparseCodes):
            return sparse.decode_groups(codes, self.W_dec, groups)
        bounds = group_bounds(groups)
        return [codes[:, lo:hi] @ self.W_dec[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    def values_at(self, x_ND, h_NF, rows_M, cols_M) -> torch.Tensor:
        """h at chosen entries, differentiable: by indexing when h carries a graph, else sparsely."""
        if h_NF.requires_grad:
            return h_NF[rows_M, cols_M]
        return sparse.selected_values(self, x_ND, h_NF, rows_M, cols_M)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x_ND))

    def train_encode(self, x_ND: torch.Tensor, bandwidth: float = 1e-3, fast: bool = False) -> EncoderOutput:
        """The architecture's training selection: batch top-k, per-row top-k, ReLU, or JumpReLU with an STE.

        `fast` (architectures with a fast path) selects without a graph over the N×F pre-activations and returns
        sparse codes whose gradients touch only the selected entries; the function computed is the same.
        """
        rule = self.arch.train_select
        if fast and self.arch.fast_path:
            with torch.no_grad():
                h = self.pre_acts(x_ND)
            pick = sparse.topk_indices if rule == "topk" else sparse.batch_topk_indices
            assert self.cfg.k is not None  # a top-k rule needs k: SAEConfig checks it
            rows, cols = pick(h, self.cfg.k)
            values = sparse.selected_values(self, x_ND, h, rows, cols)
            return EncoderOutput(h, SparseCodes(values, rows, cols, x_ND.shape[0]))
        h = self.pre_acts(x_ND)
        if rule == "jumprelu":
            return EncoderOutput(h, act.jumprelu(h, self.threshold, bandwidth))
        return EncoderOutput(h, self.select(h, rule))

    def nonfinite(self) -> str:
        """Which tensors hold NaN/inf entries, and how many, in words ("" when all are finite)."""
        return nonfinite_tensors(self.state_dict())

    def check_finite(self, where: str) -> None:
        """Refuse an SAE with NaN or inf weights: every code and reconstruction it gives would be wrong."""
        bad = self.nonfinite()
        if bad:
            raise ValueError(f"{where}: {bad}")

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
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, subfolder: str | None = None,
                        revision: str | None = None, device: str | torch.device = "cpu", **hints) -> "SAE":
        """An SAE from a local directory or file, or a hub repo (`subfolder` inside it), in our format or any that
        `sae_vlm.sae.formats` reads (detected by their files). `hints` (arch, k, threshold, input_mean,
        input_scale, hook_point, model_id) supply what a foreign checkpoint does not record."""
        path = local_or_hub(path_or_id, subfolder, revision)
        cfg_file, weights = path / "config.json", path / "model.safetensors"
        if not (cfg_file.is_file() and weights.is_file()):
            return FOREIGN_LOADERS[-1](path, **hints).to(device)
        fields = {f.name for f in dataclasses.fields(SAEConfig)}
        try:
            raw = json.loads(cfg_file.read_text())
            sae = cls(SAEConfig(**{k: v for k, v in raw.items() if k in fields}))
        except (UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:  # bad JSON, fields or values
            raise ValueError(f"{cfg_file} is not a valid SAE config: {_first_line(e)}") from None
        sae.meta = {k: v for k, v in raw.items() if k not in fields}
        try:
            state = load_file(weights)
            state["threshold"] = state["threshold"].reshape(sae.threshold.shape)
            sae.load_state_dict(state)
        except (SafetensorError, RuntimeError, KeyError, OSError) as e:  # truncated, or another SAE's tensors
            raise ValueError(f"{weights} does not hold the weights its config.json describes: "
                             f"{_first_line(e)}") from None
        sae.check_finite(str(weights))
        sae.path = path
        return sae.to(device)


def _W_enc_to_file_layout(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "W_enc"] = state_dict.pop(prefix + "W_enc_FD").T


def _W_enc_from_file_layout(module, state_dict, prefix, *args) -> None:
    if prefix + "W_enc" in state_dict:
        state_dict[prefix + "W_enc_FD"] = state_dict.pop(prefix + "W_enc").T


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def local_or_hub(path_or_id: str | os.PathLike, subfolder: str | None = None, revision: str | None = None) -> Path:
    """A local path as it is, else a hub repo id downloaded: SAE files only, under `subfolder` if given; a
    `subfolder` naming one checkpoint file fetches that file and the trainer config.json beside or above it."""
    path = Path(path_or_id).expanduser()
    looks_local = (str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1
                   or path.suffix in (".pt", ".pth", ".safetensors", ".json"))
    if path.exists() or looks_local:
        if not path.exists():
            raise FileNotFoundError(f"SAE {path} does not exist (neither a local path nor a hub id owner/name)")
        return path / subfolder if subfolder else path
    from huggingface_hub import snapshot_download

    sub = PurePosixPath(subfolder.strip("/")) if subfolder else None
    if sub is not None and sub.suffix in (".pt", ".pth", ".safetensors"):
        files = [str(sub), str(sub.parent / "config.json"), str(sub.parent.parent / "config.json")]
    else:
        files = [f"{sub}/{p}" if sub else p for p in ("*.json", "*.safetensors", "*.pt", "*.pth")]
    try:
        root = Path(snapshot_download(str(path_or_id), revision=revision, allow_patterns=files))
    except Exception as e:  # offline, unknown repo, gated repo: one line naming the repo
        raise OSError(f"cannot download the SAE {path_or_id} from the hub ({_first_line(e)})") from None
    return root / sub if sub else root
