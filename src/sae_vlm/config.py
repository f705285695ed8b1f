"""Frozen training configs and the paper's presets (paper.md §2.7–2.8)."""

from __future__ import annotations

import dataclasses
import itertools

from sae_vlm.sae.model import ARCHS

PAPER_GROUPS = (1 / 16, 1 / 8, 1 / 4, 9 / 16)
# iNat2021 kingdoms/phyla/classes/orders/families, so each Matryoshka level is sized like a taxonomy level.
INAT_COUNTS = (3, 13, 51, 273, 1103)
INAT_GROUPS = tuple(c / sum(INAT_COUNTS) for c in INAT_COUNTS)


@dataclasses.dataclass(frozen=True)
class SAESpec:
    """One SAE of a sweep; its width is an expansion factor of the data's d_in."""

    arch: str
    expansion: float
    k: int
    group_fractions: tuple[float, ...] = PAPER_GROUPS

    @property
    def name(self) -> str:
        return f"{self.arch}_x{self.expansion:g}_k{self.k}"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    layer: str | None = None
    archs: tuple[str, ...] = ("batchtopk",)
    expansions: tuple[float, ...] = (8,)
    ks: tuple[int, ...] = (20,)
    group_fractions: tuple[float, ...] = PAPER_GROUPS
    batch_size: int = 4096
    steps: int = 10_000
    lr: float | None = None  # None: 2e-4 / sqrt(F / 2^14) per SAE
    warmup_steps: int = 1000
    decay_start: int | None = None
    grad_clip: float = 1.0
    aux_alpha: float = 0.03
    dead_window: int = 10_000_000  # samples without firing before a latent counts as dead
    threshold_start_step: int = 1000
    threshold_beta: float = 0.999
    l1_coeff: float = 0.05
    l0_coeff: float = 1.0
    jumprelu_bandwidth: float = 1e-3
    norm_batches: int = 100  # batches used to estimate the input-norm factor
    seed: int = 0
    bf16: bool = False
    fast: bool = True  # sparse selection/decoder for top-k archs; False runs the straightforward dense path
    device: str = "auto"
    ddp: bool = False  # under torchrun: train every SAE data-parallel instead of spreading the sweep over ranks
    max_device_bytes: int = 8 << 30  # data larger than this streams from the source instead of living on the device
    checkpoint_every: int = 1000
    keep_steps: tuple[int, ...] = ()
    log_every: int = 100
    log_to: str | None = None  # "wandb" or "tensorboard"
    quiet: bool = False

    def __post_init__(self):
        for a in self.archs:
            if a not in ARCHS:
                raise ValueError(f"unknown architecture {a!r}; expected one of {', '.join(ARCHS)}")
        if self.batch_size <= 0 or self.steps <= 0:
            raise ValueError(f"batch_size and steps must be positive, got {self.batch_size} and {self.steps}")
        if self.log_to not in (None, "wandb", "tensorboard"):
            raise ValueError(f"log_to={self.log_to!r}; expected wandb or tensorboard")
        total = sum(self.group_fractions)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"group fractions {self.group_fractions} must sum to 1 (they sum to {total:.6g})")

    def specs(self) -> list[SAESpec]:
        return [SAESpec(a, e, k, self.group_fractions) for a, e, k in itertools.product(self.archs, self.expansions, self.ks)]


PRESETS: dict[str, dict] = {
    # scripts/monosemanticity_score.sh: both architectures, six widths, k=20; downstream uses step 100k.
    "paper-ms": dict(
        archs=("batchtopk", "matryoshka"), expansions=(1, 2, 4, 8, 16, 64), ks=(20,), batch_size=4096,
        steps=110_000, decay_start=109_999, keep_steps=(100_000,),
    ),
    # scripts/matryoshka_hierarchy.sh: Matryoshka x2, levels sized like the iNat taxonomy.
    "paper-hierarchy": dict(
        archs=("matryoshka",), expansions=(2,), ks=(20,), group_fractions=INAT_GROUPS, batch_size=4096,
        steps=110_000, decay_start=109_999, keep_steps=(100_000,),
    ),
    # scripts/mllm_steering.sh: Matryoshka x64 on layer-22 random tokens.
    "paper-steer": dict(
        archs=("matryoshka",), expansions=(64,), ks=(20,), batch_size=4096,
        steps=110_000, decay_start=109_999, keep_steps=(100_000,),
    ),
}
