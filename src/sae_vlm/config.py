"""Every setting of every command, in one place: frozen dataclasses whose fields carry the default and the help.

The `sae-vlm` command line is generated from these fields (cli.py), the library functions take these objects,
and runs save them. `option(...)` holds a field's help text and how it appears on the command line; `PRESETS` are
the paper's recipes, by config class.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from sae_vlm.names import ARCH_NAMES, FORMAT_NAMES, check_arch
from sae_vlm.token_selection import parse_tokens

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's warning limit; larger images are refused as decompression bombs


SEED_RANGE = f"[0, {2**32 - 1}]"  # what every RNG here accepts (numpy's legacy seeding stops at 2^32)
ROTATION_SEED_RANGE = f"[-1, {2**32 - 1}]"
INT_MAX = 2**63 - 1  # ints reach torch and numpy as int64: larger ones overflow there


@dataclass(frozen=True)
class Interval:
    """A field's valid values, written as in mathematics: "(0, 1)", "[1, inf)", "[1, 65535]"."""

    text: str
    lo: float
    hi: float
    lo_open: bool
    hi_open: bool

    @classmethod
    def parse(cls, text: str) -> Interval:
        left, right = text[0], text[-1]
        lo, hi = (float(v) for v in text[1:-1].split(","))
        if left not in "[(" or right not in "])" or not lo <= hi:
            raise ValueError(f"range {text!r}: expected an interval such as (0, 1] or [1, inf)")
        return cls(text, lo, hi, left == "(", right == ")")

    def holds(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below and math.isfinite(v) and (isinstance(v, float) or v <= INT_MAX)

    def expected(self, v: float) -> str:
        if isinstance(v, float):
            return f"expected a finite number in {self.text}"
        return f"expected an integer in {self.text}" + (" (at most 2^63-1)" if v > INT_MAX else "")


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None, positional: bool = False,
           repeat: bool = False, cli: bool = True, within: str | None = None) -> Any:
    """A config field. `flag`: its command-line name(s) when not `--<field-name>` (`"--from"`,
    `"--replace/--error-term"`); `positional`: an argument rather than an option; `repeat`: a tuple given by
    repeating the flag (values may hold commas) rather than as a comma list; `cli=False`: library-only;
    `within`: the interval every value of a numeric field lies in (every number field declares one)."""
    meta = {"help": help, "flag": flag, "positional": positional, "repeat": repeat, "cli": cli,
            "within": None if within is None else Interval.parse(within)}
    return dataclasses.field(default=default, metadata=meta)


def checked(cls):
    """Class decorator, placed under @dataclass: __post_init__ first refuses a number outside its field's
    `within` interval (non-finite floats always), naming the flag, the value and the range, then runs the class's
    own checks."""
    own = cls.__dict__.get("__post_init__")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                within = f.metadata.get("within") or Interval("(-inf, inf)", -math.inf, math.inf, True, True)
                if not within.holds(v):
                    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                    if isinstance(value, tuple):  # the list as typed, then the value at fault
                        raise ValueError(f"{flag} {','.join(map(str, value))}: {within.expected(v)}, not {v}")
                    raise ValueError(f"{flag} {v}: {within.expected(v)}")
        if own is not None:
            own(self)

    cls.__post_init__ = __post_init__
    return cls


def _choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r}: expected one of {', '.join(map(str, choices))}")


# Options several commands share, written once.
def device_option(default: str = "auto") -> Any:
    return option(default, "cpu, cuda, cuda:1 or auto (cuda when available).")


def quiet_option() -> Any:
    return option(False, "No progress bars.")


def llava_hook_option() -> Any:
    return option(None, "Vision-tower layer to edit; default: the one LLaVA's projector reads.")


def replace_option(default: bool) -> Any:
    return option(default, "Replace the residual by the SAE reconstruction (paper) or keep the error term.",
                  flag="--replace/--error-term")


def model_dtype_option() -> Any:
    return option("auto", "Model compute dtype: auto (fp16 on GPU, fp32 on CPU), fp32, fp16 or bf16.")


def run_dir_option() -> Any:
    return option(help="Training run directory (RUN/saes/<name>/) or one SAE directory.", positional=True)


def step_option() -> Any:
    return option(None, "Which snapshot of the SAEs: a step number or final; unset: the run's eval_step (the "
                        "paper presets: 100000), else final.")


def eval_dir_option() -> Any:
    return option(None, "Output of `sae-vlm evaluate`; default RUN/eval.", flag="--eval")


def view_data_option() -> Any:
    return option(None, "Activation store the evaluation read; default: the one metrics.json names.")


# --- extract ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
@checked
class ExtractConfig:
    """`sae-vlm extract`: images -> activations at several hook points and token selections, in one pass."""

    model: str = option(help="Hub id or local directory that transformers' from_pretrained loads.")
    data: str = option(help="Image folder (a .tar inside it is named and skipped), `datasets` folder or hub id, "
                       "webdataset shards (a .tar, a glob or brace pattern like 'shards/{000..009}.tar', or a folder "
                       "holding only .tar files), or a .txt path list.")
    out: str = option(help="Store directory; rerun the same command to resume.")
    layers: tuple[str, ...] = option((), "Comma list of hook points: 11 (= layer.11), last; default: the layer a "
                                         "LLaVA projector reads, else last.")
    tokens: tuple[str, ...] = option(("cls",), "Comma list of token selections: cls, first (token 0, also on SigLIP "
                                               "where it is a patch), mean, all, random-<k>.")
    dtype: str = option("fp16", "Storage dtype: fp16, bf16 or fp32.")
    model_dtype: str | None = option(None, "Model compute dtype: fp32, fp16 or bf16; unset: fp16 on CUDA, fp32 on CPU.")
    batch_size: int = option(64, "Images per forward pass.", within="[1, inf)")
    shard_rows: int = option(4096, "Rows per shard (of the token selection with most rows per image).",
                             within="[1, inf)")
    workers: int = option(4, "Image decoding threads.", within="[1, inf)")
    device: str = option("cpu", "cpu, cuda or cuda:1 (under torchrun: one GPU per local rank).")
    seed: int = option(0, "Seed of the random-k token draws.", within=SEED_RANGE)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "Larger images are skipped as decompression bombs.", within="[1, inf)")
    quiet: bool = quiet_option()

    def __post_init__(self):
        _choice(self.dtype, ("fp16", "bf16", "fp32"), "--dtype")
        if not self.tokens:
            raise ValueError("--tokens is empty; expected cls, mean, all or random-<k>")
        parse_tokens(list(self.tokens))  # a bad selection is refused before any model loads


@dataclass(frozen=True, kw_only=True)
@checked
class VerifyConfig:
    """`sae-vlm verify`: read a whole store and check every shard against its manifest (block crc32s, or the
    sha256 of a store written before them); the first mismatch is an error naming the shard and its rows."""

    store: str = option(help="Store directory (its root, or one hook point's subdir).", positional=True)
    layer: str | None = option(None, "Check only this subdir, e.g. layer.22 or layer.22__cls.")


# --- train -----------------------------------------------------------------------------------------------------

PAPER_GROUPS = (1 / 16, 1 / 8, 1 / 4, 9 / 16)
# iNat2021 kingdoms/phyla/classes/orders/families, so each Matryoshka level is sized like a taxonomy level. The
# paper's script passes these counts over their sum rounded to 3 decimals; at F=1536: groups 3/13/53/290/1177.
INAT_COUNTS = (3, 13, 51, 273, 1103)
INAT_GROUPS = (0.002, 0.009, 0.035, 0.189, 0.765)


@dataclass(frozen=True)
@checked
class SAESpec:
    """One SAE of a sweep; its width is an expansion factor of the data's d_in."""

    arch: str
    expansion: float = option(flag="--width", within="(0, inf)")
    k: int = option(flag="--k", within="[1, inf)")
    group_fractions: tuple[float, ...] = option(PAPER_GROUPS, within="(0, 1]")
    seed: int | None = option(None, "Set in a seed sweep (--seeds): the name then ends in _s<seed>.", flag="--seeds",
                              within=SEED_RANGE)

    @property
    def base_name(self) -> str:
        """The configuration's name, the same for every seed of it."""
        return f"{self.arch}_x{self.expansion:g}_k{self.k}"

    @property
    def name(self) -> str:
        return self.base_name if self.seed is None else f"{self.base_name}_s{self.seed}"


@dataclass(frozen=True, kw_only=True)
@checked
class TrainConfig:
    """`sae-vlm train`: a sweep of SAEs (every arch × width × k) trained on one pass over the data.

    Several GPUs: `torchrun --nproc_per_node N --no-python sae-vlm train ...` spreads the sweep's SAEs over the
    ranks (same results as one process); add --ddp to split every batch over the ranks instead.
    """

    data: str = option(help="Activation store directory or a .npy file of shape (rows, d_in).")
    out: str = option(help="Run directory (SAEs go to OUT/saes/<name>/).")
    layer: str | None = option(None, "Hook point subfolder of a store with several, e.g. layer.22.")
    archs: tuple[str, ...] = option(("batchtopk",), f"Comma list of architectures: {', '.join(ARCH_NAMES)}.",
                                    flag="--arch")
    expansions: tuple[float, ...] = option((8,), "Comma list of expansion factors (d_sae / d_in), e.g. 8,16,64.",
                                           flag="--width", within="(0, inf)")
    ks: tuple[int, ...] = option((20,), "Comma list of k (mean active latents; JumpReLU's target L0).", flag="--k",
                                 within="[1, inf)")
    group_fractions: tuple[float, ...] = option(PAPER_GROUPS, "Matryoshka group fractions, summing to 1.",
                                                within="(0, 1]")
    batch_size: int = option(4096, "Activations per step.", within="[1, inf)")
    steps: int = option(10_000, "Optimizer steps.", within="[1, inf)")
    lr: float | None = option(None, "Learning rate; unset: 2e-4/sqrt(F/2^14) per SAE (the paper's trainer).",
                              within="(0, inf)")
    warmup_steps: int = option(1000, "Linear LR warmup steps.", within="[0, inf)")
    decay_start: int | None = option(None, "Step from which the LR decays linearly to 0 (before --steps); unset: no "
                                                  "decay.", within="[0, inf)")
    grad_clip: float = option(1.0, "Gradient norm clip; 0 turns clipping off.", within="[0, inf)")
    aux_alpha: float = option(0.03, "AuxK loss weight.", within="[0, inf)")
    dead_window: int = option(10_000_000, "Samples without firing before a latent counts as idle (AuxK trains "
                              "idle latents on the residual; the log's idle_frac).",
                              within="[1, inf)")
    threshold_start_step: int | None = option(None, "Step after which θ tracks the batch's smallest kept "
                                                    "activation; unset: 1000 (the paper's), or steps/4 if sooner.",
                                      within="[0, inf)")
    threshold_beta: float = option(0.999, "EMA factor of θ.", within="(0, 1)")
    l1_coeff: float = option(0.05, "ReLU SAEs: L1 penalty weight.", within="[0, inf)")
    l0_coeff: float = option(1.0, "JumpReLU: weight of the (L0/k − 1)² sparsity term.", within="[0, inf)")
    jumprelu_bandwidth: float = option(1e-3, "JumpReLU: width of the straight-through estimator's kernel.",
                                       within="(0, inf)")
    norm_batches: int = option(100, "Batches used to estimate the input-norm factor.", within="[1, inf)")
    seed: int = option(0, "Seed for init and data order.", within=SEED_RANGE)
    seeds: tuple[int, ...] = option((), "Comma list of SAE seeds: every SAE of the sweep is trained once per seed, "
                                        "on the same batches (their order still comes from --seed), and named "
                                        "<arch>_x<width>_k<k>_s<seed>; evaluate then reports each metric's mean, "
                                        "min and max over seeds and how stable each latent is.", within=SEED_RANGE)
    bf16: bool = option(False, "bf16 autocast for the forward pass (GPUs, and CPUs with AVX512-BF16 or AMX; "
                               "refused on other CPUs, where torch emulates bf16 far slower than fp32).")
    fast: bool = option(True, "Sparse selection and decoder for top-k architectures; --no-fast: the plain dense path.")
    device: str = option("auto", "cpu, cuda, cuda:1 or auto (under torchrun: cuda:LOCAL_RANK).")
    ddp: bool = option(False, "Under torchrun: train each SAE data-parallel (rows rank::N of every batch per rank; "
                              "batch top-k then keeps k·B/N entries of each rank's shard) instead of spreading the "
                              "sweep's SAEs over the ranks.")
    max_memory: float | None = option(None, "GB the training data may occupy on the device; a store or .npy "
                                            "larger than this streams from disk (block-shuffled). Unset: half the "
                                            "device's free memory.", within="(0, inf)")
    checkpoint_every: int = option(1000, "Steps between resume checkpoints.", within="[1, inf)")
    keep_steps: tuple[int, ...] = option((), "Comma list of steps at which to also save every SAE "
                                             "(saes/<name>/step-<n>/).", within="[1, inf)")
    eval_step: int | None = option(None, "The snapshot that evaluate, report, browse, steer and steer-score use "
                                         "unless told otherwise: one of --keep-steps; unset: the final SAEs.",
                                   within="[1, inf)")
    log_every: int = option(100, "Steps between log lines.", within="[1, inf)")
    log_to: str | None = option(None, "Also log to wandb or tensorboard.")
    resume: bool = option(False, "Continue the run in OUT from its last checkpoint.")
    quiet: bool = option(False, "No progress bar.")

    def __post_init__(self):
        for a in self.archs:
            check_arch(a)
        if self.log_to not in (None, "wandb", "tensorboard"):
            raise ValueError(f"log_to={self.log_to!r}; expected wandb or tensorboard")
        total = sum(self.group_fractions)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"group fractions {self.group_fractions} must sum to 1 (they sum to {total:.6g})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {','.join(map(str, self.seeds))}: expected distinct non-negative integers")
        # Steps the run never reaches would save or change nothing, silently. Step indices run 0..steps-1.
        late = [("--keep-steps", s) for s in self.keep_steps if s > self.steps]
        late += [("--decay-start", self.decay_start)] if (self.decay_start or 0) >= self.steps else []
        if late:
            flag, step = late[0]
            raise ValueError(f"{flag} {step}: not before the end of the run (--steps {self.steps}), so it would never "
                             "take effect")
        if self.eval_step is not None and self.eval_step not in self.keep_steps:
            raise ValueError(f"eval_step={self.eval_step} is not among the kept snapshots {self.keep_steps}; "
                             "add it to --keep-steps")

    @property
    def theta_start(self) -> int:
        """The step after which θ is tracked: the flag, else the paper's 1000, moved to steps/4 for short runs."""
        return self.threshold_start_step if self.threshold_start_step is not None else min(1000, self.steps // 4)

    def specs(self) -> list[SAESpec]:
        grid = itertools.product(self.archs, self.expansions, self.ks, self.seeds or (None,))
        return [SAESpec(a, e, k, self.group_fractions, s) for a, e, k, s in grid]


# --- evaluate --------------------------------------------------------------------------------------------------

FEW_HELDOUT_ROWS = 200  # evaluate warns when --heldout-frac leaves fewer rows than this


@dataclass(frozen=True, kw_only=True)
@checked
class EvaluateConfig:
    """`sae-vlm evaluate`: monosemanticity, reconstruction, top images and hierarchy of every SAE in a run."""

    run_dir: str = run_dir_option()
    data: str = option(help="Held-out activation store directory or a .npy of shape (rows, d_in).")
    step: str | None = step_option()
    embeddings: str | None = option(None, "Image embeddings .npy [rows, D] for the MS similarity.")
    embedder: str | None = option(None, "Model id or directory to embed the store's images (cached in "
                                         "OUT/embeddings).")
    taxonomy: str | None = option(None, "CSV (label,path) or JSON mapping labels to taxa paths, all of one "
                                        "depth (7 levels in the paper); when given, the only taxonomy source.")
    out: str | None = option(None, "Output directory; default RUN/eval.")
    device: str = device_option()
    heldout_frac: float = option(1.0, "Fraction of --data rows used for the reconstruction metrics; 1: all "
                                      f"(a warning below {FEW_HELDOUT_ROWS} rows).", within="(0, 1]")
    dense_cutoff: float = option(0.1, "A latent firing on more than this fraction of rows is dense.", within="[0, 1]")
    batch_rows: int = option(4096, "Rows per validation batch of the per-batch FVE and L0 that the paper's "
                                   "Tables A6/A7 average (beside the pooled values).", within="[1, inf)")
    rotation_seed: int = option(0, "Seed of the random-rotation baseline; -1 to skip it.", within=ROTATION_SEED_RANGE)
    top: int = option(16, "Top-activating images kept per latent.", within="[1, inf)")
    grids: int = option(0, "Render 4x4 image grids for this many highest-MS latents per SAE.", within="[0, inf)")
    heatmaps: bool = option(False, "Maps for SAEs on one vector per image (CLS, `last`): |gradient x input| of each "
                                   "mapped latent's code over the patches of its top images, through the vision "
                                   "model, into maps/<name>.npz; costs about 2-3 forward passes per (latent, top "
                                   "image). Token stores get their maps without it.")
    heatmap_latents: int = option(64, "With --heatmaps: latents mapped per SAE, highest MS first (else most often "
                                      "firing); 0: every latent that fired.", within="[0, inf)")
    heatmap_batch: int = option(32, "With --heatmaps: (image, latent) pairs per forward and backward pass.",
                                within="[1, inf)")
    model: str | None = option(None, "With --heatmaps: hub id or directory of the vision model; default: the one "
                                     "the SAE records.")
    names: bool = option(False, "Also name every live latent in this pass, as `sae-vlm name` does: its top-3 "
                                "--vocab names by --embedder's text tower, each scored; needs --embedder.")
    vocab: str | None = option(None, "With --names: one name per line, UTF-8; default: the store's own class and "
                                     "taxonomy names plus the packaged English nouns and adjectives.")
    labels: str | None = option(None, "Concept alignment against baselines: a CSV image,label[,label...] naming "
                                      "images of --data and the training store, or `store` for the stores' own "
                                      "labels and taxonomy nodes.")
    train_data: str | None = option(None, "Store the alignment baselines and probes are fit on; default: the "
                                          "run's training data (train_config.json).")
    chunk_rows: int = option(2048, "Rows per evaluation chunk.", cli=False, within="[1, inf)")
    quiet: bool = quiet_option()

    @property
    def out_dir(self) -> str:
        return self.out if self.out is not None else f"{self.run_dir}/eval"


# --- name ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
@checked
class NameConfig:
    """`sae-vlm name`: name every live latent of an evaluated run with the vocabulary entries whose text embeddings
    are nearest the mean image embedding of its top images, and score each name by the AUROC with which its
    image-text similarity separates the images where the latent fires from the rest. The names go into the
    evaluation's latents/<name>.npz, which the browser and the report show."""

    run_dir: str = option(help="Training run directory (RUN/saes/<name>/): every SAE its evaluation scored; or one "
                               "SAE directory.", positional=True)
    embedder: str = option(help="CLIP-style model id or directory with an image and a text tower (the image "
                                "embeddings are cached in the evaluation's embeddings/, shared with evaluate).")
    vocab: str | None = option(None, "Names, one per line, UTF-8, each once; default: the store's own class and "
                                     "taxonomy names plus the packaged English nouns and adjectives.")
    template: str = option("{}", "How a name is written for the text tower, {} standing for it, e.g. "
                                 "'a photo of a {}.'.")
    names: int = option(3, "Names kept per latent, best first (at most the vocabulary's size).", within="[1, inf)")
    eval_dir: str | None = option(None, "Output of `sae-vlm evaluate` to read and add the names to; default "
                                        "RUN/eval (for an SAE directory: SAE/eval, where evaluate writes).",
                                  flag="--eval")
    data: str | None = view_data_option()
    device: str = device_option()
    chunk_rows: int = option(2048, "Rows per chunk of codes.", cli=False, within="[1, inf)")
    quiet: bool = quiet_option()

    def __post_init__(self):
        if self.template.count("{}") != 1:
            raise ValueError(f"--template {self.template!r}: expected one {{}} where the name goes")


# --- convert ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
@checked
class ConvertConfig:
    """`sae-vlm convert`: import an SAE another library wrote (dictionary_learning, SAELens, saev, sparsify,
    overcomplete), or export one to SAELens's format."""

    src: str = option(help="The SAE: a folder or checkpoint file in any supported format, or a hub repo id.",
                      positional=True)
    dst: str = option(help="Output folder (new or empty).", positional=True)
    subfolder: str | None = option(None, "Folder (or checkpoint file) inside SRC, e.g. one hook point's SAE.")
    revision: str | None = option(None, "Hub revision of SRC.")
    source_format: str = option("auto", f"Format of SRC: auto (detected from its files) or one of "
                                        f"{', '.join(FORMAT_NAMES)}.", flag="--from")
    target_format: str = option("sae-vlm", "Format written: sae-vlm or sae-lens.", flag="--to")
    hook_point: str | None = option(None, "Hook point the SAE reads, e.g. layer.22 (overrides the source's).")
    model_id: str | None = option(None, "Backbone model id, e.g. openai/clip-vit-large-patch14-336.")
    arch: str | None = option(None, "Where SRC does not record it (overcomplete; dictionary_learning without its "
                                    "config.json): relu, topk or batchtopk.")
    k: int | None = option(None, "overcomplete TopKSAE/BatchTopKSAE: the top_k per input row.", within="[1, inf)")
    threshold: float | None = option(None, "overcomplete BatchTopKSAE: its running_threshold.", within="[0, inf)")
    input_mean: str | None = option(None, ".npy/.pt of the mean the source's data loader subtracted from inputs "
                                          "(saev scale_mean); folded into the SAE.")
    input_scale: float | None = option(None, "Factor the source's loader multiplied inputs by after that (saev "
                                             "scale_norm); folded into the SAE.", within="(0, inf)")

    def __post_init__(self):
        _choice(self.source_format, ("auto", *FORMAT_NAMES), "--from")
        _choice(self.target_format, ("sae-vlm", "sae-lens"), "--to")
        if self.arch is not None:
            _choice(self.arch, ("relu", "topk", "batchtopk"), "--arch")


@dataclass(frozen=True, kw_only=True)
@checked
class CompareConfig:
    """`sae-vlm compare`: match two SAEs' latents one to one by decoder cosine (two seeds, two widths, two
    libraries) and show how alike the matched pairs are: in direction and, with --data, in activation."""

    sae_a: str = option(help="SAE directory (RUN/saes/<name>, or one `convert` wrote).", positional=True)
    sae_b: str = option(help="The SAE to match it with (same d_in; any width).", positional=True)
    data: str | None = option(None, "Activation store directory or .npy: also the Pearson correlation of each "
                                    "matched pair's codes over its rows.")
    layer: str | None = option(None, "Hook point subfolder of a store with several, e.g. layer.22; default: the one "
                                     "the SAEs read.")
    rows: int | None = option(None, "Correlate over at most this many rows, evenly spaced; unset: all.",
                              within="[1, inf)")
    out: str | None = option(None, "JSON file for the summary and per-latent arrays (match, cosine, correlation).")
    step: str | None = step_option()
    device: str = device_option()


@dataclass(frozen=True, kw_only=True)
@checked
class PushConfig:
    """`sae-vlm push`: upload an SAE folder to the hub with a model card (architecture, sizes, hook point, data,
    training summary, and MS/FVE/L0 when the run was evaluated)."""

    sae_dir: str = option(help="SAE folder (RUN/saes/NAME, or one `convert` wrote).", positional=True)
    repo_id: str = option(help="Hub repo, e.g. you/clip-l22-matryoshka.", positional=True)
    private: bool = option(False, "Create the repo private.")
    revision: str | None = option(None, "Branch to push to (default: main).")
    metrics: str | None = option(None, "metrics.json from `sae-vlm evaluate` for the card (default: SAE_DIR/eval "
                                       "or its run's eval/ when there).")
    dry_run: str | None = option(None, "Write the folder that would be uploaded here and upload nothing.")


# --- steer -----------------------------------------------------------------------------------------------------

EDIT_OPS = ("clamp", "add", "scale", "zero")
LATENTS_GRAMMAR = "paper, first:N, a list like 39,120 or 0-999, random:N, level:L[:N] or all"


def _natural(text: str) -> int:
    """A non-negative integer written in ASCII digits only (no sign, no underscores)."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(text)
    return int(text)


def _positive(text: str) -> int:
    n = _natural(text)
    if n < 1:
        raise ValueError(text)
    return n


def _spans(text: str) -> tuple[tuple[int, int], ...]:
    """'39,120,0-999' -> ((39, 39), (120, 120), (0, 999)); kept as ranges, so '0-10**12' costs nothing here."""
    spans = []
    for item in (t for t in text.split(",") if t.strip()):
        first, dash, last = item.partition("-")
        lo = _natural(first)
        hi = _natural(last) if dash else lo
        if hi < lo:
            raise ValueError(item)
        spans.append((lo, hi))
    if not spans:
        raise ValueError(text)
    return tuple(spans)


@dataclass(frozen=True)
class LatentSpec:
    """steer-score's `--latents`, parsed when the config is built: a typo fails before any model loads. Which ids
    it selects also needs the SAE (steer/score.py `select_latents`)."""

    text: str  # as typed; runs record it
    kind: str  # paper | first | all | random | level | ids
    count: int | None = None  # N of first:N, random:N, level:L:N
    level: int | None = None  # L of level:L[:N]
    spans: tuple[tuple[int, int], ...] = ()  # ids: inclusive (first, last) ranges

    @classmethod
    def parse(cls, text: str) -> LatentSpec:
        kind, colon, rest = text.strip().partition(":")
        expected = {"first": "first:N with N >= 1", "random": "random:N with N >= 1",
                    "level": "level:L or level:L:N with L >= 0 and N >= 1"}.get(kind, LATENTS_GRAMMAR)
        try:
            if kind in ("paper", "all") and not colon:
                return cls(text, kind)
            if kind in ("first", "random"):
                return cls(text, kind, count=_positive(rest))
            if kind == "level":
                level, has_count, count = rest.partition(":")
                return cls(text, kind, level=_natural(level), count=_positive(count) if has_count else None)
            return cls(text, "ids", spans=_spans(text))
        except ValueError:
            raise ValueError(f"--latents {text!r}: expected {expected}") from None


@dataclass(frozen=True, kw_only=True)
@checked
class SteerConfig:
    """`sae-vlm steer`: generate with SAE latents edited in LLaVA's vision tower, every latent × α × image × prompt."""

    llava: str = option(help="LLaVA hub id or directory (LlavaForConditionalGeneration + processor).")
    sae: str = option(help="SAE directory trained at the layer the projector reads.")
    step: str | None = step_option()
    latents: tuple[int, ...] = option(help="Comma list of latent ids, e.g. 39,120.", within="[0, inf)")
    alpha: tuple[float, ...] = option((0.0, 30.0, 50.0), "Comma list of values for the op (paper: clamp to "
                                                         "0,30,40,50).", within="(-inf, inf)")
    image: tuple[str, ...] = option(("white",), "'white' or an image path; repeat for several.", repeat=True)
    prompt: tuple[str, ...] = option(("Write me a short love poem",), "Prompt text; repeat for several.", repeat=True)
    op: str = option("clamp", f"Edit: {' | '.join(EDIT_OPS)}.")
    max_new_tokens: int = option(60, "New tokens per answer (greedy).", within="[1, inf)")
    replace: bool = replace_option(False)
    hook_point: str | None = llava_hook_option()
    unsteered: bool = option(True, "Also generate once per image and prompt with the model unpatched.")
    batch_size: int = option(16, "Cases per generate call.", within="[1, inf)")
    device: str = device_option()
    dtype: str = model_dtype_option()
    out: str = option("steer.json", "JSON file with every output.")
    quiet: bool = quiet_option()

    def __post_init__(self):
        _choice(self.op, EDIT_OPS, "--op")


@dataclass(frozen=True, kw_only=True)
@checked
class SteerScoreConfig:
    """`sae-vlm steer-score`: the paper's steering score, cos(concept of latent j, the first word LLaVA says with
    j clamped to α), beside the unsteered run and the upper and lower bounds."""

    llava: str = option(help="LLaVA hub id or directory.")
    sae: str = option(help="SAE directory (paper: ×64 Matryoshka, layer 22, random tokens).")
    step: str | None = step_option()
    clip: str = option(help="CLIPModel id or directory: image embedder (concepts) and text tower (words).")
    images: str = option("white", "'white' or an image folder or path list to steer on (labels = folders).")
    latents: str = option("paper", "paper: latents 0..999 on the white image, 0..9 on --images, dead ones included, "
                                   "as the paper; first:N: 0..N-1; or live latents only: 39,120 | 0-999 | random:N "
                                   "| level:L[:N] | all.")
    word: str = option("paper", "The answer's first word: paper (up to the first space, punctuation kept) or "
                                "stripped (without punctuation).")
    class_names: str | None = option(None, "Names of class folders, '<label> <name>[, synonyms]' per line; default: "
                                           "LOC_synset_mapping.txt in or beside the image folder, else folder names.")
    alpha: float = option(100.0, "Value for the op (paper: clamp to 100).", within="(-inf, inf)")
    op: str = option("clamp", f"Edit: {' | '.join(EDIT_OPS)}.")
    pool: str | None = option(None, "Folder or path list to take top images from; default: --images.")
    top: str | None = option(None, "Precomputed top-image indices [d_sae, 16] (.npy), indexing --top-images.")
    top_images: str | None = option(None, "Folder or path list the --top indices refer to.")
    per_class: int | None = option(None, "Steer on the first N images of each class folder.", within="[1, inf)")
    max_images: int | None = option(None, "Steer on at most this many images.", within="[1, inf)")
    replace: bool = replace_option(True)
    hook_point: str | None = llava_hook_option()
    max_new_tokens: int = option(5, "New tokens per answer (paper: 5).", within="[1, inf)")
    batch_size: int = option(16, "Cases per generate call (and images per encode batch).", within="[1, inf)")
    seed: int = option(0, "Seed for random latents and the shuffled class names.", within=SEED_RANGE)
    device: str = device_option()
    dtype: str = model_dtype_option()
    out: str = option("steer_score.json", "JSON file with the scores and every answer.")
    quiet: bool = quiet_option()

    def __post_init__(self):
        _choice(self.op, EDIT_OPS, "--op")
        _choice(self.word, ("paper", "stripped"), "--word")
        self.latent_spec  # parsed (and cached) here, so a typo fails before any model loads

    @cached_property
    def latent_spec(self) -> LatentSpec:
        return LatentSpec.parse(self.latents)


# --- browse and report -----------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
@checked
class BrowseConfig:
    """`sae-vlm browse`: serve a read-only browser of a run's latents: tables, top images, histograms, neighbours."""

    run_dir: str = run_dir_option()
    eval_dir: str | None = eval_dir_option()
    data: str | None = view_data_option()
    host: str = option("127.0.0.1", "Interface to listen on; keep loopback unless you mean to share.")
    port: int = option(8765, "Port to listen on.", within="[1, 65535]")
    clip: str | None = option(None, "CLIPModel id or directory: enables text search over latents.")
    llava: str | None = option(None, "LLaVA id or directory: enables the steering panel.")
    model: str | None = option(None, "Vision model id or directory that /inspect runs the SAEs on; unset: the model "
                                     "each SAE (or its store) records.")
    device: str = option("cpu", "Device for the --clip, --llava and /inspect models.")


@dataclass(frozen=True, kw_only=True)
@checked
class ReportConfig:
    """`sae-vlm report`: the browser's views as static HTML that opens from file:// with no server."""

    run_dir: str = run_dir_option()
    out: str = option(help="Directory for the static report (OUT/index.html).")
    eval_dir: str | None = eval_dir_option()
    data: str | None = view_data_option()
    top: int = option(200, "Pages for this many highest-MS alive latents per SAE.", within="[1, inf)")
    all_latents: bool = option(False, "A page for every latent.", flag="--all")
    quiet: bool = quiet_option()


@dataclass(frozen=True, kw_only=True)
@checked
class InspectConfig:
    """`sae-vlm inspect`: which latents fire on each image, and where: its top latents by code, each with a map over
    the patch grid (a token SAE's code on every patch; for an SAE on CLS, `last` or the patch mean, |gradient ×
    input| through the vision tower), with MS and name where the run was evaluated, in OUT/inspect.json and
    OUT/index.html."""

    images: tuple[str, ...] = option(help="Image files, decoded as extract decodes them.", positional=True,
                                     repeat=True)
    sae: str = option(help="SAE directory (RUN/saes/<name>, or one `convert` wrote).")
    out: str = option(help="Output folder for inspect.json and index.html (new, empty, or an earlier inspect's).")
    model: str | None = option(None, "Hub id or directory of the vision model; default: the one the SAE records.")
    step: str | None = step_option()
    hook_point: str | None = option(None, "Hook point the SAE reads, e.g. layer.22; default: the one it records.")
    tokens: str | None = option(None, "How the SAE read the hook point where its config does not say: all (a code "
                                      "per patch) or cls, first, mean (one vector per image: attribution maps).")
    top: int = option(10, "Latents listed per image (those with a positive code).", within="[1, inf)")
    eval_dir: str | None = option(None, "Output of `sae-vlm evaluate` for MS and names; default: the SAE's "
                                        "RUN/eval.", flag="--eval")
    report: str | None = option(None, "Static report of the run (`sae-vlm report`): each latent links to its page.")
    batch_size: int = option(32, "Images per forward pass, and (image, latent) pairs per attribution pass.",
                             within="[1, inf)")
    device: str = device_option()
    quiet: bool = quiet_option()

    def __post_init__(self):
        if self.tokens is not None and len(parse_tokens(self.tokens)) != 1:
            raise ValueError(f"--tokens {self.tokens!r}: expected one token selection, such as all or cls")


# --- demo ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
@checked
class DemoConfig:
    """`sae-vlm demo`: the whole pipeline on the toy world: extract, train, evaluate, steer, report."""

    out: str = option("runs/demo", "Output directory.")
    quick: bool = option(False, "A smaller run (about two minutes) for tests and a first look.")
    seeds: tuple[int, ...] = option((0, 1, 2), "Comma list of SAE seeds: every SAE is trained once per seed, and "
                                               "each finding is a median over them with the per-seed values beside it.",
                                    within=SEED_RANGE)
    quiet: bool = option(False, "No progress output.")

    def __post_init__(self):
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {','.join(map(str, self.seeds))}: expected at least two distinct non-negative "
                             "integers (the findings are medians over seeds)")


MAX_FEATURES = 100_000  # a tree much larger would not fit an SAE of its width in memory anyway


def check_world(branching, d: int, root_prob: float, child_prob: float, noise: float, seed: int) -> None:
    """Refuse settings that describe no tree or no probability, naming the flag of `sae-vlm planted`."""
    text = ",".join(map(str, branching))
    if len(branching) < 2 or min(branching) < 1:
        raise ValueError(f"--branching {text}: expected at least 2 positive integers (the roots, then the children "
                         "of every feature at each level below)")
    n_features = int(np.cumprod(np.asarray(branching, dtype=np.float64)).sum())
    if n_features > MAX_FEATURES:
        raise ValueError(f"--branching {text}: gives {n_features} features; expected at most {MAX_FEATURES}")
    if d < 2:
        raise ValueError(f"--d {d}: expected at least 2 dimensions")
    for flag, p in (("--root-prob", root_prob), ("--child-prob", child_prob)):
        if not 0 < p <= 1:
            raise ValueError(f"{flag} {p}: expected a probability in (0, 1]")
    if noise < 0:
        raise ValueError(f"--noise {noise}: expected a standard deviation >= 0")
    if seed < 0:
        raise ValueError(f"--world-seed {seed}: expected a non-negative integer")


@dataclass(frozen=True, kw_only=True)
@checked
class PlantedConfig:
    """`sae-vlm planted`: features planted in a known tree (synthetic activations, no images); trains SAEs on them
    under several seeds and scores each against the truth: recovery by tree depth, the Matryoshka group of each
    feature's best latent against its depth, and absorption of parents by their children."""

    out: str = option("runs/planted", "Output directory (planted.json, planted.png, run/ with the SAEs).")
    branching: tuple[int, ...] = option((4, 3, 3, 3), "Comma list: the number of roots, then the children of every "
                                                      "feature at each level below.", within="[1, inf)")
    d: int = option(40, "Dimension of the activations.", within="[2, inf)")
    n_train: int = option(50_000, "Training rows.", within="[1, inf)")
    n_eval: int = option(10_000, "Held-out rows the SAEs are scored on.", within="[1, inf)")
    root_prob: float = option(0.25, "Probability that a root fires in a row (each independently).", within="(0, 1]")
    child_prob: float = option(0.5, "Probability that a firing feature also fires one of its children, picked "
                                     "uniformly (else none).", within="(0, 1]")
    noise: float = option(0.02, "Standard deviation of the Gaussian noise on every dimension.", within="[0, inf)")
    world_seed: int = option(0, "Seed of the directions and of the training and held-out samples.", within=SEED_RANGE)
    archs: tuple[str, ...] = option(("batchtopk", "matryoshka"),
                                    f"Comma list of architectures: {', '.join(ARCH_NAMES)}.", flag="--arch")
    k: int | None = option(None, "Active latents per row; unset: the world's mean number of firing features, "
                                 "rounded.", within="[1, inf)")
    steps: int = option(700, "Optimizer steps.", within="[1, inf)")
    batch_size: int = option(256, "Activations per step.", within="[1, inf)")
    lr: float = option(4e-3, "Learning rate.", within="(0, inf)")
    aux_alpha: float = option(0.3, "AuxK loss weight (idle: not fired for 10 batches).", within="[0, inf)")
    seeds: tuple[int, ...] = option((0, 1, 2), "Comma list of SAE seeds; every SAE trains once per seed.",
                                    within=SEED_RANGE)
    device: str = device_option()
    quiet: bool = quiet_option()

    def __post_init__(self):
        check_world(self.branching, self.d, self.root_prob, self.child_prob, self.noise, self.world_seed)
        if not self.archs:
            raise ValueError("--arch is empty; expected at least one architecture")
        for a in self.archs:
            check_arch(a)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds {','.join(map(str, self.seeds))}: expected distinct non-negative integers")
        if self.n_train < self.batch_size:
            raise ValueError(f"--n-train {self.n_train}: expected at least --batch-size ({self.batch_size}) rows")


# --- the paper's recipes ---------------------------------------------------------------------------------------

_PAPER_PRECISION = dict(dtype="fp32", model_dtype="fp32")  # the paper computed and saved float32 activations
# The paper trains 110k steps and scores the step-100000 snapshot (ae_100000.pt).
_PAPER_TRAIN = dict(ks=(20,), batch_size=4096, steps=110_000, decay_start=109_999, keep_steps=(100_000,),
                    eval_step=100_000)
PRESETS: dict[str, dict[type, dict]] = {
    # scripts/monosemanticity_score.sh: CLS at four layers and the projection; both architectures, six widths.
    "paper-ms": {
        ExtractConfig: dict(model="openai/clip-vit-large-patch14-336", layers=("11", "17", "22", "23", "last"),
                            tokens=("cls",), **_PAPER_PRECISION),
        TrainConfig: dict(archs=("batchtopk", "matryoshka"), expansions=(1, 2, 4, 8, 16, 64), **_PAPER_TRAIN),
    },
    # scripts/matryoshka_hierarchy.sh: Matryoshka x2, levels sized like the iNat taxonomy.
    "paper-hierarchy": {
        TrainConfig: dict(archs=("matryoshka",), expansions=(2,), group_fractions=INAT_GROUPS, **_PAPER_TRAIN),
    },
    # scripts/mllm_steering.sh: Matryoshka x64 on two random tokens per image at layer 22.
    "paper-steer": {
        ExtractConfig: dict(model="openai/clip-vit-large-patch14-336", layers=("22",), tokens=("random-2",),
                            **_PAPER_PRECISION),
        TrainConfig: dict(archs=("matryoshka",), expansions=(64,), **_PAPER_TRAIN),
    },
}


def presets_for(config_cls: type) -> dict[str, dict]:
    """{preset name: the fields it sets} for one config class."""
    return {name: by_cls[config_cls] for name, by_cls in PRESETS.items() if config_cls in by_cls}


def preset_fields(config_cls: type, preset: str | None) -> dict:
    """The fields a preset sets for one config class ({} for none); an unknown name is a ValueError."""
    if preset is None:
        return {}
    known = presets_for(config_cls)
    if preset not in known:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(known)}")
    return dict(known[preset])


# --- the toy world's models: retrain and assess the shipped tiny CLIP and toy LLaVA -----------------------------

def _heads_divide(heads: int, **widths: int) -> None:
    """Attention splits a width evenly over its heads; refused here rather than after the images are drawn."""
    for flag, width in widths.items():
        if width % heads:
            raise ValueError(f"{flag} {width}: expected a multiple of --heads ({heads})")


def _batch_fits(n_train: int, batch_size: int) -> None:
    if n_train < batch_size:  # a batch is drawn without replacement
        raise ValueError(f"--n-train {n_train}: expected at least --batch-size ({batch_size}) images")


@dataclass(frozen=True, kw_only=True)
@checked
class ClipTrainConfig:
    """`sae-vlm toy-train-clip`: train the toy world's tiny CLIP contrastively on generated image-text pairs
    (maintainers: this is how the shipped weights were made)."""

    seed: int = option(0, "Seed of the model, the batches and the generated images.", within=SEED_RANGE)
    n_train: int = option(20000, "Generated training images.", within="[1, inf)")
    steps: int = option(2000, "Optimizer steps.", within="[1, inf)")
    batch_size: int = option(128, "Images per step.", within="[1, inf)")
    lr: float = option(2e-3, "Peak learning rate (cosine decay after the warmup).", within="(0, inf)")
    warmup: int = option(100, "Linear warmup steps.", within="[0, inf)")
    weight_decay: float = option(0.05, "AdamW weight decay on the weight matrices.", within="[0, inf)")
    p_full_caption: float = option(0.5, "Share of texts that are the full caption (else a partial description).",
                                   within="[0, 1]")
    p_hard_negative: float = option(0.5, "Share of images that also bring a near-miss text (one attribute changed).",
                                    within="[0, 1]")
    threads: int = option(1, "CPU threads; more spin-wait on a shared 2-core machine.", within="[1, inf)")
    vision_hidden: int = option(64, "Width of the vision tower (its CLS and every hook point).", within="[1, inf)")
    vision_layers: int = option(4, "Vision tower layers.", within="[1, inf)")
    text_hidden: int = option(64, "Width of the text tower.", within="[1, inf)")
    text_layers: int = option(3, "Text tower layers.", within="[1, inf)")
    heads: int = option(4, "Attention heads (vision and text).", within="[1, inf)")
    mlp_ratio: int = option(4, "MLP width over the hidden width.", within="[1, inf)")
    patch: int = option(12, "Patch size in pixels: 12 gives 4x4 patches, 2x2 per quadrant.", within="[1, 48]")
    projection_dim: int = option(64, "Width of `last` (the shared image-text embedding).", within="[1, inf)")
    out: str | None = option(None, "Directory for the model; default: the shipped weights (toyworld/weights/clip).")
    quiet: bool = quiet_option()

    def __post_init__(self):
        _heads_divide(self.heads, **{"--vision-hidden": self.vision_hidden, "--text-hidden": self.text_hidden})
        _batch_fits(self.n_train, self.batch_size)


@dataclass(frozen=True, kw_only=True)
@checked
class LlavaTrainConfig:
    """`sae-vlm toy-train-llava`: train the toy LLaVA (the tiny CLIP's frozen vision tower, a projector and a small
    Llama) to caption and to answer one-word questions (maintainers: how the shipped weights were made)."""

    seed: int = option(0, "Seed of the model, the batches and the generated images.", within=SEED_RANGE)
    n_train: int = option(20000, "Generated training images.", within="[1, inf)")
    steps: int = option(1500, "Optimizer steps.", within="[1, inf)")
    batch_size: int = option(64, "Questions per step.", within="[1, inf)")
    lr: float = option(2e-3, "Peak learning rate (cosine decay after the warmup).", within="(0, inf)")
    warmup: int = option(100, "Linear warmup steps.", within="[0, inf)")
    weight_decay: float = option(0.0, "AdamW weight decay.", within="[0, inf)")
    threads: int = option(1, "CPU threads; more spin-wait on a shared 2-core machine.", within="[1, inf)")
    text_hidden: int = option(96, "Width of the Llama.", within="[1, inf)")
    text_layers: int = option(3, "Llama layers.", within="[1, inf)")
    heads: int = option(4, "Llama attention heads.", within="[1, inf)")
    text_mlp: int = option(256, "Llama MLP width.", within="[1, inf)")
    question_mix: tuple = option((("caption", 0.35), ("one_word", 0.15), ("colour", 0.15), ("shade", 0.1),
                                  ("shape", 0.1), ("pattern", 0.1), ("size", 0.05)),
                                 "How often each question kind (world.QUESTIONS) is asked.", cli=False)
    clip: str | None = option(None, "The tiny CLIP whose vision tower it reads; default: the shipped one.")
    out: str | None = option(None, "Directory for the model; default: the shipped weights (toyworld/weights/llava).")
    quiet: bool = quiet_option()

    def __post_init__(self):
        _heads_divide(self.heads, **{"--text-hidden": self.text_hidden})
        _batch_fits(self.n_train, self.batch_size)


@dataclass(frozen=True, kw_only=True)
@checked
class ToyQualityConfig:
    """`sae-vlm toy-quality`: how good the toy models are: zero-shot attribute accuracy of the tiny CLIP and answer
    accuracy of the toy LLaVA on fresh images (world seed 1), as a Markdown report."""

    out: str = option("toyworld_quality.md", "Markdown report.")
    clip: str | None = option(None, "CLIP directory; default: the shipped one.")
    llava: str | None = option(None, "LLaVA directory; default: the shipped one.")
    n_clip: int = option(500, "Images the CLIP is scored on.", within="[1, inf)")
    n_llava: int = option(200, "Images the LLaVA answers about.", within="[1, inf)")
    skip_llava: bool = option(False, "Score the CLIP only and print it; no report.")
    quiet: bool = quiet_option()
