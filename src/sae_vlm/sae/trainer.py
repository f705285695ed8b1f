"""Train a sweep of SAEs on one pass over the data, with exact resume after a kill.

Read top to bottom: `train` sets up data and SAEs (or restores them), then loops over steps; each step
feeds one batch to every SAE of the sweep. Everything random derives from `cfg.seed`, so a resumed run
replays the same batches and reaches bit-identical weights. Several processes: see distributed.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae_vlm.config import SAESpec, TrainConfig
from sae_vlm.data.source import ActivationSource, as_source
from sae_vlm.sae import distributed as D
from sae_vlm.sae import losses, mechanics
from sae_vlm.sae.checkpoint import checkpoint, load_checkpoint, resume_step, truncate_log
from sae_vlm.io import atomic_write_text
from sae_vlm.sae.model import SAE, EncoderOutput, SAEConfig, group_sizes_from_fractions
from sae_vlm.sae.runlog import Logger, check_log_sink
from sae_vlm.sae.sparse import SparseCodes


class Batches:
    """Batch `step` of the run: a fresh seeded permutation per epoch, drawn on the device holding the data."""

    def __init__(self, source: ActivationSource, cfg: TrainConfig, device: torch.device):
        self.source, self.cfg, self.device = source, cfg, device
        if source.rows == 0:
            raise ValueError(f"activation source {cfg.data!r} is empty (0 rows)")
        if source.rows < cfg.batch_size:
            raise ValueError(f"activation source has {source.rows} rows, fewer than batch_size={cfg.batch_size}")
        self.per_epoch = source.rows // cfg.batch_size  # the ragged tail of each epoch is dropped
        fits = hasattr(source, "all") and source.rows * source.d_in * 4 <= cfg.max_device_bytes
        self.data_ND = source.all().to(device, torch.float32) if fits else None
        if self.data_ND is not None:
            for start in range(0, source.rows, 65536):
                check_finite(self.data_ND[start : start + 65536], torch.arange(start, min(start + 65536, source.rows)))
        self.perm_device = device if self.data_ND is not None else torch.device("cpu")
        self._epoch, self._perm = -1, None

    def __call__(self, step: int, shard: tuple[int, int] | None = None) -> torch.Tensor:
        """The batch of `step`; `shard=(rank, world)` keeps only rows rank::world of it (data-parallel)."""
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator(self.perm_device).manual_seed(self.cfg.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.source.rows, generator=g, device=self.perm_device)
            self._epoch = epoch
        idx = self._perm[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size]
        if shard is not None:
            idx = idx[shard[0] :: shard[1]]
        if self.data_ND is not None:
            return self.data_ND[idx]
        x = self.source.get(idx)
        check_finite(x, idx)
        return x.to(self.device, non_blocking=True)


def check_finite(x_ND: torch.Tensor, rows_N: torch.Tensor) -> None:
    """Raise naming the first source row (rows_N maps batch rows to source rows) that holds NaN or inf."""
    bad = ~torch.isfinite(x_ND)
    if bad.any():
        row = int(rows_N[int(bad.any(dim=1).nonzero()[0])])
        value = x_ND[bad][0].item()
        raise ValueError(f"activations contain {value} at row {row}; expected finite values (NaN/inf in the source)")


@dataclasses.dataclass
class Member:
    """One SAE of the sweep with its optimizer and dead-latent counter."""

    spec: SAESpec
    sae: SAE
    opt: torch.optim.Adam
    dead: mechanics.DeadLatents
    base_lr: float
    terms: dict


def build_member(spec: SAESpec, d_in: int, cfg: TrainConfig, device, meta: dict) -> Member:
    d_sae = int(round(spec.expansion * d_in))
    groups = group_sizes_from_fractions(spec.group_fractions, d_sae) if spec.arch == "matryoshka" else None
    k = spec.k if spec.arch != "relu" else min(spec.k, d_sae)
    # Seeded per member, so an SAE's init doesn't depend on its place in the sweep.
    torch.manual_seed(cfg.seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    sae = SAE(SAEConfig(spec.arch, d_in, d_sae, k, groups, meta.get("hook_point"), meta.get("model_id"),
                        meta.get("token_selection"))).to(device)
    base_lr = cfg.lr if cfg.lr is not None else mechanics.default_lr(d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=(0.9, 0.999), fused=True)
    terms = losses.objective(spec.arch)
    if "l0_penalty" in terms:
        terms["l0_penalty"] = functools.partial(losses.l0_deviation, bandwidth=cfg.jumprelu_bandwidth)
    return Member(spec, sae, opt, mechanics.DeadLatents(d_sae, cfg.dead_window, device), base_lr, terms)


def term_weights(cfg: TrainConfig) -> dict:
    return {"recon": 1.0, "aux": cfg.aux_alpha, "l1": cfg.l1_coeff, "l0_penalty": cfg.l0_coeff}


def train_step(m: Member, x_ND: torch.Tensor, step: int, cfg: TrainConfig, metrics: bool = True,
               ddp: bool = False) -> dict:
    """One optimizer step of one SAE on a normalised batch; returns what the log records (if `metrics`).

    `ddp`: x_ND is this rank's shard of the global batch; every rank calls this at the same steps.
    """
    sae, weights = m.sae, term_weights(cfg)
    with torch.autocast(x_ND.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        enc = sae.train_encode(x_ND, cfg.jumprelu_bandwidth, fast=cfg.fast)
        x_hat = sae.decode(enc.codes).float()
    enc = as_float(enc)
    m.dead.update(enc.codes, sync=D.any_rank_fired if ddp else None)
    dead_F = m.dead.mask()
    if sae.cfg.arch in ("topk", "batchtopk", "matryoshka") and step > cfg.threshold_start_step:
        mechanics.update_threshold_(sae.threshold, enc.codes, cfg.threshold_beta, sync=D.global_min if ddp else None)
    values = {name: fn(x_ND, x_hat, enc, sae, dead_F) for name, fn in m.terms.items()}
    loss = sum(weights[name] * v for name, v in values.items())

    lr = m.base_lr * mechanics.lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.decay_start)
    for group in m.opt.param_groups:
        group["lr"] = lr
    m.opt.zero_grad(set_to_none=True)
    loss.backward()
    if ddp:  # before the projection and clipping, so every rank takes the same step
        D.average_grads_(list(sae.parameters()))
    mechanics.remove_parallel_grads_(sae.W_dec)
    torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    m.opt.step()
    mechanics.normalize_decoder_(sae.W_dec)
    if sae.cfg.arch == "jumprelu":
        with torch.no_grad():
            sae.threshold.clamp_(min=0.0)
    if not metrics:
        return {}
    values = {k: v.detach() for k, v in values.items()}
    out = {"loss": loss.detach(), **values, "fve": fve(x_ND, x_hat.detach()), "l0": l0(enc.codes),
           "dead_frac": dead_F.float().mean()}
    if ddp:  # the log shows the mean over ranks' shards
        out = D.mean_over_ranks(out)
    return {**out, "lr": lr}


def as_float(enc: EncoderOutput) -> EncoderOutput:
    """Losses run on fp32 codes whatever precision the autocast forward produced. h stays as it is: the aux
    loss only ranks it and gathers a few entries, and casting all N×F of it would cost a full pass."""
    codes = enc.codes
    codes = codes._replace(values_M=codes.values_M.float()) if isinstance(codes, SparseCodes) else codes.float()
    return EncoderOutput(enc.h_NF, codes)


def l0(codes) -> torch.Tensor:
    """Mean number of active latents per row."""
    if isinstance(codes, SparseCodes):
        return (codes.values_M > 0).sum().float() / codes.n_rows
    return (codes > 0).sum(-1).float().mean()


def fve(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> torch.Tensor:
    """1 − Σ_d Var(x − x̂) / Σ_d Var(x), variances per dimension over the batch (paper §2.7)."""
    return 1 - (x_ND - x_hat_ND).var(0).sum() / x_ND.var(0).sum()


def estimate_norm_factor(batches: Batches, n: int) -> float:
    """s = sqrt(E‖x‖²) over the first n batches; training sees x/s (paper §2.2)."""
    total, count = 0.0, 0
    for step in range(min(n, batches.per_epoch)):
        x = batches(step).double()
        total += x.pow(2).sum().item()
        count += x.shape[0]
    return math.sqrt(total / count)


def source_meta(source, cfg: TrainConfig) -> dict:
    """Where the activations came from, copied into every SAE's config.json."""
    manifest = getattr(source, "manifest", None) or {}
    keys = ("hook_point", "model_id", "token_selection")
    return {k: getattr(source, k, None) or manifest.get(k) for k in keys}


def train(cfg: TrainConfig, source: ActivationSource | None = None, resume: bool = False) -> dict[str, SAE]:
    """Train the sweep; under torchrun each rank returns the SAEs it saved (see distributed.py)."""
    place, device, created = D.setup_distributed(cfg)
    try:
        saes = _train(cfg, source, resume, place, device)
        if place.world > 1:
            dist.barrier()
        return saes
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, source, resume: bool, place: D.Dist, device: torch.device) -> dict[str, SAE]:
    out = Path(cfg.out)
    # train_config.json is written before the first step, so this also catches a run killed before its first checkpoint.
    if (any((out / "ckpt").glob("state*.safetensors")) or (out / "train_config.json").exists()) and not resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    check_log_sink(cfg.log_to)
    source = as_source(source if source is not None else cfg.data, layer=cfg.layer)  # a tensor or array works too
    batches = Batches(source, cfg, device)
    meta = source_meta(source, cfg)
    specs = cfg.specs()
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep has duplicate SAEs: {names}")
    members = [build_member(spec, source.d_in, cfg, device, meta) for i, spec in enumerate(specs) if place.owns(i)]
    if place.world > 1:
        dist.barrier()  # every rank has checked `out` before rank 0 writes into it

    found = resume_step(out, place) if resume else None
    if found is not None:
        check_same_run(out / "train_config.json", cfg)
        start, norm = load_checkpoint(found, members, place)
        if place.lead:
            truncate_log(out / "log.jsonl", start)
    else:
        if place.lead:
            truncate_log(out / "log.jsonl", 0)  # --resume without a checkpoint restarts from step 0
        start, norm = 0, estimate_norm_factor(batches, cfg.norm_batches)
        first = batches(0) / norm
        for m in members:
            with torch.no_grad():
                m.sae.b_dec.copy_(mechanics.geometric_median(first))
        out.mkdir(parents=True, exist_ok=True)
        if place.lead:
            atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))

    logger = Logger(out, cfg) if place.lead else None
    saves = place.lead or not place.ddp  # data-parallel copies are identical: rank 0 saves them
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=cfg.quiet or not place.lead)
    shard = (place.rank, place.world) if place.ddp else None
    stats: list[dict] = [{} for _ in members]
    try:
        for step in bar:
            x_ND = batches(step, shard) / norm if members else None  # a rank with no SAE only joins log gathers
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps or done in cfg.keep_steps
            stats = [train_step(m, x_ND, step, cfg, metrics=log_now, ddp=place.ddp) for m in members]
            if done % cfg.log_every == 0 or done == cfg.steps:
                rows = [{"step": done, "sae": m.spec.name, **{k: float(v) for k, v in s.items()}}
                        for m, s in zip(members, stats)]
                rows = D.gather_rows(rows, names, place)
                if logger is not None:
                    logger.write(rows)
                    if rows:
                        bar.set_postfix(fve=f"{rows[0]['fve']:.3f}", l0=f"{rows[0]['l0']:.1f}")
            if done in cfg.keep_steps and saves:
                for m, s in zip(members, stats):
                    export(m, norm, out / "saes" / m.spec.name / f"step-{done}", cfg, done, s)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint(out, members, done, norm, place, device)
    finally:
        if logger is not None:
            logger.close()
    if start >= cfg.steps:  # resuming a finished run: its SAEs are already saved
        return {m.spec.name: SAE.from_pretrained(out / "saes" / m.spec.name) for m in members if saves}
    final = {m.spec.name: export(m, norm, out / "saes" / m.spec.name, cfg, cfg.steps, s)
             for m, s in zip(members, stats) if saves}
    checkpoint(out, members, cfg.steps, norm, place, device)
    return final


# Settings a resumed run may change: they don't alter what is computed.
RESUME_MAY_CHANGE = {"data", "out", "steps", "device", "quiet", "log_to", "log_every", "checkpoint_every", "keep_steps",
                     "max_device_bytes"}


def check_same_run(saved_config: Path, cfg: TrainConfig) -> None:
    """Refuse a --resume whose settings differ from the run's: it would not continue the same computation."""
    if not saved_config.is_file():
        return
    saved = json.loads(saved_config.read_text())
    now = json.loads(json.dumps(dataclasses.asdict(cfg)))  # tuples as lists, like the saved file
    diff = [f"{k}={saved[k]!r} (now {now[k]!r})" for k in now if k not in RESUME_MAY_CHANGE and k in saved
            and saved[k] != now[k]]
    if diff:
        raise ValueError(f"--resume with different settings than {saved_config}: {', '.join(diff)}; "
                         "rerun with the run's settings or start a new --out")


def export(m: Member, norm: float, directory: Path, cfg: TrainConfig, step: int, stats: dict) -> SAE:
    """Save a copy with the input scale folded in, so the saved SAE takes raw activations."""
    sae = SAE(m.sae.cfg)
    sae.load_state_dict(m.sae.state_dict())
    sae.fold_input_scale(norm)
    summary = {k: float(v) for k, v in stats.items()}
    sae.meta = {"data": str(cfg.data), "layer": cfg.layer,
                "training": {"step": step, "norm_factor": norm, "lr": m.base_lr, "batch_size": cfg.batch_size,
                             "seed": cfg.seed, "last_batch": summary}}
    sae.save_pretrained(directory)
    return sae


