"""Train a sweep of SAEs on one pass over the data, with exact resume after a kill.

Read top to bottom: `train` sets up data and SAEs (or restores them), then loops over steps; each step
feeds one batch to every SAE of the sweep. Everything random derives from `cfg.seed`, so a resumed run
replays the same batches and reaches bit-identical weights. Several processes: see distributed.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import cast

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae_vlm.config import SAESpec, TrainConfig
from sae_vlm.data.loader import Layout, Schedule, StreamingBatches, check_finite
from sae_vlm.data.source import ActivationSource, TensorSource, fingerprint
from sae_vlm.data.store import as_source
from sae_vlm.device import check_bf16, keep_freed_memory, memory_budget
from sae_vlm.io import atomic_write_text, read_json
from sae_vlm.outdir import claim
from sae_vlm.sae import distributed as D
from sae_vlm.sae import mechanics
from sae_vlm.sae.arch import arch_spec
from sae_vlm.sae.checkpoint import checkpoint, load_checkpoint, resume_step, truncate_log
from sae_vlm.sae.groups import group_sizes_from_fractions
from sae_vlm.sae.model import SAE, EncoderOutput, SAEConfig
from sae_vlm.sae.runlog import Logger, check_log_sink, record_event
from sae_vlm.sae.sparse import SparseCodes


class Batches:
    """Batch `step` of the run. Data within --max-memory lives on the device and every epoch draws a fresh seeded
    permutation of it; a larger store or .npy streams from disk, block-shuffled (data/loader.py). `plan` says
    which, and a resumed run passes the plan it started with so that it replays the same batches."""

    def __init__(self, source: ActivationSource, cfg: TrainConfig, device: torch.device, place: D.Dist = D.Dist(),
                 plan: dict | None = None):
        self.source, self.cfg, self.device = source, cfg, device
        self.name = str(source.meta.path if source.meta else cfg.data)  # what a message about the rows names
        if source.rows == 0:
            raise ValueError(f"activation source {cfg.data!r} is empty (0 rows)")
        if source.rows < cfg.batch_size:
            raise ValueError(f"activation source has {source.rows} rows, fewer than batch_size={cfg.batch_size}")
        self.per_epoch = source.rows // cfg.batch_size  # the ragged tail of each epoch is dropped
        budget, files = memory_budget(cfg.max_memory, device), source.files
        self.data_bytes = source.rows * source.d_in * 4
        streams = plan["path"] == "stream" if plan else self.data_bytes > budget
        self.stream, self.data_ND, self.rank_local = None, None, False
        if files is not None and streams:
            layout = Layout(plan["chunk_rows"], plan["window_chunks"]) if plan else \
                Layout.for_budget(source.rows, files.row_bytes, budget, files.block_rows)
            rank, world = (place.rank, place.world) if place.ddp else (0, 1)
            schedule = Schedule(source.rows, layout, cfg.seed, cfg.batch_size, rank, world)
            self.stream = StreamingBatches(files, schedule, device)
            self.per_epoch, self.rank_local = schedule.per_epoch, place.ddp
            self.plan = {"path": "stream", "chunk_rows": layout.chunk_rows, "window_chunks": layout.window_chunks}
        else:
            self.plan = {"path": "memory"}
            if self.data_bytes <= budget or plan is not None:
                self.data_ND = source.all().to(device, torch.float32)
                for start in range(0, source.rows, 65536):
                    stop = min(start + 65536, source.rows)
                    self.check_rows(self.data_ND[start:stop], torch.arange(start, stop))
        self.budget = budget
        self.perm_device = device if self.data_ND is not None else torch.device("cpu")
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def __call__(self, step: int, shard: tuple[int, int] | None = None) -> torch.Tensor:
        """The batch of `step`; `shard=(rank, world)` keeps only rows rank::world of it (data-parallel). A streamed
        --ddp run reads only this rank's rows already, so the shard is its whole batch."""
        if self.stream is not None:
            with naming(self.name):  # the stream checks its rows as it reads them
                return self.stream(step)
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
        self.check_rows(x, idx)
        return x.to(self.device, non_blocking=True)

    def check_rows(self, x_ND: torch.Tensor, rows_N: torch.Tensor) -> None:
        with naming(self.name):
            check_finite(x_ND, rows_N)

    def fingerprint(self) -> str:
        """The data's content fingerprint, from the copy in memory when there is one (no second read)."""
        return fingerprint(TensorSource(self.data_ND) if self.data_ND is not None else self.source)

    def describe(self) -> str:
        gb = f"{self.data_bytes / 1e9:.3g} GB as float32"
        if self.stream is None:
            return f"data: {gb}, held in memory on {self.device} (--max-memory {self.budget / 1e9:.3g} GB)"
        lay = self.stream.schedule.layout
        window_gb = lay.chunk_rows * lay.window_chunks * self.stream.files.row_bytes / 1e9
        return (f"data: {gb} > --max-memory {self.budget / 1e9:.3g} GB: streaming from disk in chunks of "
                f"{lay.chunk_rows} rows, windows of {lay.window_chunks} chunks ({window_gb:.3g} GB)")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()



@contextlib.contextmanager
def naming(what: str):
    """A ValueError inside the block names `what` (the data file) first."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


@dataclasses.dataclass
class Member:
    """One SAE of the sweep with its optimizer and idle-latent counter."""

    spec: SAESpec
    sae: SAE
    opt: torch.optim.Adam
    idle: mechanics.IdleLatents
    base_lr: float
    terms: dict  # log name -> loss function, options bound
    weights: dict  # log name -> weight
    bad_at: torch.Tensor  # the first step whose loss was NaN or inf (-1: none), kept on the device: no sync per step
    bad_loss: torch.Tensor  # that loss


def build_member(spec: SAESpec, d_in: int, cfg: TrainConfig, device, meta: dict) -> Member:
    arch = arch_spec(spec.arch)
    d_sae = int(round(spec.expansion * d_in))
    groups = group_sizes_from_fractions(spec.group_fractions, d_sae) if arch.nested_groups else None
    k = spec.k if arch.needs_k else min(spec.k, d_sae)
    # Seeded per member, so an SAE's init doesn't depend on its place in the sweep; seed s of a --seeds sweep
    # starts where a run with --seed s starts.
    torch.manual_seed(init_seed(spec, cfg) * 1_000_003 + zlib.crc32(spec.base_name.encode()))
    sae = SAE(SAEConfig(spec.arch, d_in, d_sae, k, groups, meta.get("hook_point"), meta.get("model_id"),
                        meta.get("token_selection"))).to(device)
    base_lr = cfg.lr if cfg.lr is not None else mechanics.default_lr(d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=base_lr, betas=(0.9, 0.999), fused=True)
    terms = {name: functools.partial(t.fn, **{kw: getattr(cfg, field) for kw, field in t.options})
             for name, t in arch.terms.items()}
    weights = {name: 1.0 if t.weight is None else getattr(cfg, t.weight) for name, t in arch.terms.items()}
    return Member(spec, sae, opt, mechanics.IdleLatents(d_sae, cfg.dead_window, device), base_lr, terms, weights,
                  torch.tensor(-1, device=device), torch.tensor(0.0, device=device))


def init_seed(spec: SAESpec, cfg: TrainConfig) -> int:
    return cfg.seed if spec.seed is None else spec.seed


def train_step(m: Member, x_ND: torch.Tensor, step: int, cfg: TrainConfig, metrics: bool = True,
               ddp: bool = False) -> dict:
    """One optimizer step of one SAE on a normalised batch; returns what the log records (if `metrics`).

    `ddp`: x_ND is this rank's shard of the global batch; every rank calls this at the same steps.
    """
    sae = m.sae
    with torch.autocast(x_ND.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
        enc = sae.train_encode(x_ND, cfg.jumprelu_bandwidth, fast=cfg.fast)
        x_hat = sae.decode(enc.codes).float()
    enc = as_float(enc)
    m.idle.update(enc.codes, sync=D.any_rank_fired if ddp else None)
    idle_F = m.idle.mask()
    if sae.arch.tracks_threshold and step > cfg.theta_start:
        mechanics.update_threshold_(sae.threshold, enc.codes, cfg.threshold_beta, sync=D.global_min if ddp else None)
    values = {name: fn(x_ND, x_hat, enc, sae, idle_F) for name, fn in m.terms.items()}
    loss = cast(torch.Tensor, sum(m.weights[name] * v for name, v in values.items()))
    mark_nonfinite(m, loss.detach(), step + 1)

    lr = m.base_lr * mechanics.lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.decay_start)
    for group in m.opt.param_groups:
        group["lr"] = lr
    m.opt.zero_grad(set_to_none=True)
    loss.backward()
    if ddp:  # before the projection and clipping, so every rank takes the same step
        D.average_grads_(list(sae.parameters()))
    mechanics.remove_parallel_grads_(sae.W_dec)
    mechanics.clip_grad_norm_(list(sae.parameters()), cfg.grad_clip)  # 0: off
    m.opt.step()
    mechanics.normalize_decoder_(sae.W_dec)
    if sae.arch.learned_threshold:
        with torch.no_grad():
            sae.threshold.clamp_(min=0.0)
    if not metrics:
        return {}
    values = {k: v.detach() for k, v in values.items()}
    out = {"loss": loss.detach(), **values, "fve": fve(x_ND, x_hat.detach()), "l0": l0(enc.codes),
           "idle_frac": idle_F.float().mean()}  # not fired within --dead-window: AuxK's target, not 'dead'
    if ddp:  # the log shows the mean over ranks' shards
        out = D.mean_over_ranks(out)
    return {**out, "lr": lr}


def mark_nonfinite(m: Member, loss: torch.Tensor, done: int) -> None:
    """Remember the first step whose loss is NaN or inf; read only where the loop checks (see stop_if_nonfinite)."""
    first = ~torch.isfinite(loss) & (m.bad_at < 0)
    m.bad_at = torch.where(first, done, m.bad_at)
    m.bad_loss = torch.where(first, loss.float(), m.bad_loss)


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
    """s = sqrt(E‖x‖²) over the first n batches; training sees x/s (paper §2.2). Data that is all zero (s = 0)
    or one vector repeated (no variance: nothing to reconstruct beyond b_dec) is refused."""
    sums = torch.zeros(3, dtype=torch.float64)  # Σ‖x‖², rows, largest distance from the first row
    first = batches(0)[0].double()
    for step in range(min(n, batches.per_epoch)):
        x = batches(step).double()
        sums += torch.tensor([x.pow(2).sum().item(), x.shape[0], (x - first).abs().max().item()],
                             dtype=torch.float64)
    if batches.rank_local:  # each rank read its own rows: the global batches are their union
        sums = sums.to(batches.device)
        dist.all_reduce(sums)
    rows = int(sums[1])
    if sums[0] == 0:
        raise ValueError(f"{batches.name}: all {rows} rows sampled are zero; the input-norm factor would be 0 and "
                         "there is nothing to train on (were the activations extracted?)")
    if sums[2] == 0:
        raise ValueError(f"{batches.name}: all {rows} rows sampled are the same vector (no variance); an SAE has "
                         "nothing to learn from constant activations")
    return math.sqrt(float(sums[0] / sums[1]))


def source_meta(source: ActivationSource) -> dict:
    """Where the activations came from, copied into every SAE's config.json."""
    manifest = source.meta.manifest if source.meta else {}
    return {k: manifest.get(k) for k in ("hook_point", "model_id", "token_selection")}


def train(cfg: TrainConfig, source: ActivationSource | None = None) -> dict[str, SAE]:
    """Train the sweep (or continue it: `cfg.resume`); under torchrun each rank returns the SAEs it saved (see
    distributed.py). `source` overrides `cfg.data` with activations in memory."""
    cfg = fix_theta_start(cfg)
    place, device, created = D.setup_distributed(cfg)
    try:
        if cfg.bf16:
            check_bf16(device, "--bf16")
        if device.type == "cpu":
            keep_freed_memory()
        with claim(cfg.out, "train", lead=place.lead):  # rank 0 holds the folder for the whole job
            saes = _train(cfg, source, place, device)
            if place.world > 1:
                dist.barrier()
        return saes
    finally:
        if created:
            dist.destroy_process_group()


def fix_theta_start(cfg: TrainConfig) -> TrainConfig:
    """The θ start step of this run, fixed when it starts and kept in train_config.json: a resume with more
    --steps must not move it (the unset default depends on --steps)."""
    if cfg.threshold_start_step is not None:
        return cfg
    saved = Path(cfg.out) / "train_config.json"
    start = read_json(saved).get("threshold_start_step") if cfg.resume and saved.is_file() else None
    return dataclasses.replace(cfg, threshold_start_step=start if isinstance(start, int) else cfg.theta_start)


@dataclasses.dataclass
class Run:
    """What every step of one launch needs: the settings, this rank's place, the data and this rank's SAEs."""

    cfg: TrainConfig
    place: D.Dist
    device: torch.device
    batches: Batches
    members: list[Member]
    names: list[str]  # every SAE of the sweep, in order (also those other ranks train)
    data_fingerprint: str  # of the activations' content: a resume must read the same data
    checkpointed: int | None = None  # the step of the last checkpoint on disk

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def check_every_step(self) -> bool:
        """A CPU waits for nothing to read the non-finite flag, so one process there checks every step; a GPU checks
        at log, snapshot and checkpoint steps only (several processes: there, together)."""
        return self.device.type == "cpu" and self.place.world == 1


def _train(cfg: TrainConfig, source, place: D.Dist, device: torch.device) -> dict[str, SAE]:
    run = prepare(cfg, source, place, device)
    try:
        return _run(run, cfg, place, device)
    finally:  # after the last read: settling θ reads the last batches again
        run.batches.close()


def _run(run: Run, cfg: TrainConfig, place: D.Dist, device: torch.device) -> dict[str, SAE]:
    restored = restore(run) if cfg.resume else None
    start, norm = restored if restored is not None else initialise(run)
    if restored is not None:
        run.checkpointed = start
        if place.lead:  # said even with --quiet: the run did not start from scratch
            tqdm.write(f"resumed from step {start}", file=sys.stderr)
            record_event(run.out, {"event": "resumed", "step": start})
    stats = loop(run, start, norm)
    if start < cfg.steps:
        settle_thresholds(run, norm)
    if start >= cfg.steps:  # resuming a finished run: its SAEs are already saved
        return {m.spec.name: SAE.from_pretrained(run.out / "saes" / m.spec.name) for m in run.members if place.saves}
    final = {m.spec.name: export(m, norm, run.out / "saes" / m.spec.name, cfg, cfg.steps, s)
             for m, s in zip(run.members, stats) if place.saves}
    checkpoint(run.out, run.members, cfg.steps, norm, place, device)
    return final


@torch.no_grad()
def settle_thresholds(run: Run, norm: float, n: int = 8) -> None:
    """θ that was never learned (the run ended before --threshold-start-step) would gate nothing at inference:
    set it to the mean smallest kept activation of the last n batches, and say so."""
    cfg, ddp = run.cfg, run.place.ddp
    for m in run.members:
        if not (m.sae.arch.tracks_threshold and float(m.sae.threshold) < 0):
            continue
        steps = range(max(0, cfg.steps - n), cfg.steps)
        for i, step in enumerate(steps):  # β = i/(i+1): a running mean over the batches
            x = run.batches(step, (run.place.rank, run.place.world) if ddp else None) / norm
            codes = m.sae.train_encode(x, cfg.jumprelu_bandwidth, fast=cfg.fast).codes
            mechanics.update_threshold_(m.sae.threshold, codes, i / (i + 1), sync=D.global_min if ddp else None)
        if run.place.lead:
            tqdm.write(f"warning: {m.spec.name}: θ was never learned (it is updated after step "
                       f"{cfg.theta_start}, the threshold start; --steps {cfg.steps}); set from the last {len(steps)} "
                       "batches", file=sys.stderr)


def prepare(cfg: TrainConfig, source, place: D.Dist, device: torch.device) -> Run:
    """Check --out, open the data and build this rank's SAEs."""
    out = Path(cfg.out)
    # train_config.json is written before the first step, so this also catches a run killed before its first checkpoint.
    if (any((out / "ckpt").glob("state*.safetensors")) or (out / "train_config.json").exists()) and not cfg.resume:
        raise FileExistsError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    check_log_sink(cfg.log_to)
    source = as_source(source if source is not None else cfg.data, layer=cfg.layer)  # a tensor or array works too
    plan_file = out / "data_plan.json"
    plan = read_json(plan_file) if cfg.resume and plan_file.is_file() else None
    batches = Batches(source, cfg, device, place, plan)
    if place.lead and not cfg.quiet:
        tqdm.write(batches.describe(), file=sys.stderr)
    meta = source_meta(source)
    specs = cfg.specs()
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"sweep has duplicate SAEs: {names}")
    members = [build_member(spec, source.d_in, cfg, device, meta) for i, spec in enumerate(specs) if place.owns(i)]
    if place.world > 1:
        dist.barrier()  # every rank has checked `out` before rank 0 writes into it
    return Run(cfg, place, device, batches, members, names, batches.fingerprint())


def restore(run: Run) -> tuple[int, float] | None:
    """(step, norm factor) of the latest checkpoint every rank holds, loaded into the SAEs; None if there is none."""
    found = resume_step(run.out, run.place)
    if found is None:
        return None
    check_same_run(run.out / "train_config.json", run.cfg)
    check_same_data(run)
    start, norm = load_checkpoint(found, run.members, run.place)
    if run.place.lead:
        truncate_log(run.out / "log.jsonl", start)
    return start, norm


def initialise(run: Run) -> tuple[int, float]:
    """A fresh start: the input-norm factor, b_dec at the first batch's geometric median, the saved config."""
    if run.place.lead:
        truncate_log(run.out / "log.jsonl", 0)  # --resume without a checkpoint restarts from step 0
    norm = estimate_norm_factor(run.batches, run.cfg.norm_batches)
    first = run.batches(0) / norm
    for m in run.members:
        with torch.no_grad():
            m.sae.b_dec.copy_(mechanics.geometric_median(first))
            if run.batches.rank_local:  # ranks saw different first batches; they must start from one b_dec
                dist.broadcast(m.sae.b_dec, 0)
    run.out.mkdir(parents=True, exist_ok=True)
    if run.place.lead:
        atomic_write_text(run.out / "data_plan.json",
                          json.dumps({**run.batches.plan, "data_fingerprint": run.data_fingerprint}))
        atomic_write_text(run.out / "train_config.json", json.dumps(dataclasses.asdict(run.cfg), indent=2))
    return 0, norm


def loop(run: Run, start: int, norm: float) -> list[dict]:
    """Steps `start`..end: train, log, keep snapshots, checkpoint. Returns the last step's stats per SAE."""
    cfg, place, members = run.cfg, run.place, run.members
    logger = Logger(run.out, cfg) if place.lead else None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=cfg.quiet or not place.lead)
    shard = (place.rank, place.world) if place.ddp else None
    stats: list[dict] = [{} for _ in members]
    stream = run.batches.stream
    before = (stream.rows_served, stream.read_seconds) if stream is not None else (0, 0.0)  # the norm's batches
    t0 = time.perf_counter()
    try:
        for step in bar:
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps or done in cfg.keep_steps
            if members:  # a rank with no SAE only joins the log gathers
                x_ND = run.batches(step, shard) / norm
                stats = [train_step(m, x_ND, step, cfg, metrics=log_now, ddp=place.ddp) for m in members]
            save_now = done in cfg.keep_steps or done == cfg.steps or \
                (done % cfg.checkpoint_every == 0 and done < cfg.steps)
            if save_now or log_now or run.check_every_step:
                stop_if_nonfinite(run, done, weights=save_now)
            if done % cfg.log_every == 0 or done == cfg.steps:
                rows = [{"step": done, "sae": m.spec.name, **{k: float(v) for k, v in s.items()}}
                        for m, s in zip(members, stats)]
                rows = D.gather_rows(rows, run.names, place)
                if logger is not None:
                    logger.write(rows)
                    if rows:
                        bar.set_postfix(fve=f"{rows[0]['fve']:.3f}", l0=f"{rows[0]['l0']:.1f}")
            if done in cfg.keep_steps and place.saves:
                for m, s in zip(members, stats):
                    export(m, norm, run.out / "saes" / m.spec.name / f"step-{done}", cfg, done, s)
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                checkpoint(run.out, members, done, norm, place, run.device)
                run.checkpointed = done
    finally:
        if logger is not None:
            logger.close()
    wall = time.perf_counter() - t0
    if stream is not None and place.lead and not cfg.quiet and stream.rows_served > before[0]:
        rows, waited = stream.rows_served - before[0], stream.read_seconds - before[1]
        tqdm.write(f"data: streamed {rows:,} rows in {wall:.1f} s ({rows / wall:,.0f} rows/s), {waited:.1f} s of it "
                   "waiting for data", file=sys.stderr)
    return stats


def first_nonfinite(members: list[Member], done: int, weights: bool) -> dict | None:
    """This rank's first SAE whose loss went NaN or inf (flagged by train_step), or, with `weights`, whose weights
    are no longer finite; None when all are sound."""
    for m in members:
        at = int(m.bad_at)  # the one device sync of a check
        if at >= 0:
            return {"sae": m.spec.name, "step": at, "what": f"loss {float(m.bad_loss)}"}
    for m in members if weights else []:
        bad = m.sae.nonfinite()
        if bad:
            return {"sae": m.spec.name, "step": done, "what": bad}
    return None


def stop_if_nonfinite(run: Run, done: int, weights: bool) -> None:
    """End the run when an SAE went non-finite, before anything is logged or saved from it: the checkpoint on
    disk stays the last finite one, and no SAE directory gets NaN weights."""
    found = first_nonfinite(run.members, done, weights)
    if run.place.world > 1:  # every rank stops together, naming the same SAE
        every: list = [None] * run.place.world
        dist.all_gather_object(every, found)
        found = next((f for f in every if f is not None), None)
    if found is None:
        return
    if run.place.lead:
        record_event(run.out, {"event": "non-finite", **found})
    kept = (f"the checkpoint at step {run.checkpointed} is kept (finite; --resume continues from it)"
            if run.checkpointed is not None else "no checkpoint was written before it")
    raise ValueError(f"SAE {found['sae']} went non-finite at step {found['step']} ({found['what']}); no SAE was "
                     f"saved from it and {kept}; a lower --lr or --grad-clip in a new --out may train it")


# Settings a resumed run may change: they don't alter what is computed.
RESUME_MAY_CHANGE = {"data", "out", "steps", "device", "quiet", "log_to", "log_every", "checkpoint_every", "keep_steps",
                     "max_memory", "resume", "eval_step"}


def check_same_data(run: Run) -> None:
    """Refuse a --resume on activations other than the run's (the path may change; the content may not)."""
    plan_file = run.out / "data_plan.json"
    saved = read_json(plan_file).get("data_fingerprint") if plan_file.is_file() else None
    if saved is not None and saved != run.data_fingerprint:
        raise ValueError(f"--resume with other data: {run.cfg.data} is not the activations {run.out} was trained on "
                         "(their content differs); resume with the run's data or start a new --out")


def check_same_run(saved_config: Path, cfg: TrainConfig) -> None:
    """Refuse a --resume whose settings differ from the run's: it would not continue the same computation."""
    if not saved_config.is_file():
        return
    saved = read_json(saved_config)
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
                             "seed": init_seed(m.spec, cfg), "data_seed": cfg.seed, "last_batch": summary}}
    sae.save_pretrained(directory)
    return sae


