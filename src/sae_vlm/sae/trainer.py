"""Train a sweep of SAEs on one pass over the data, with exact resume after a kill.

Read top to bottom: `train` sets up data and SAEs (or restores them), then loops over steps; each step
feeds one batch to every SAE of the sweep. Everything random derives from `cfg.seed`, so a resumed run
replays the same batches and reaches bit-identical weights.

Under torchrun (WORLD_SIZE > 1) there are two ways to use several processes (see `Dist`):
- default, a sweep spread over ranks: SAE i of the sweep trains on rank i % world; every rank reads the same
  batches, so each SAE gets exactly the updates it would get alone, and log.jsonl matches a one-process run.
- `ddp=True`, data parallel: every rank holds every SAE and takes rows rank::world of each global batch;
  gradients are averaged, firing masks OR-ed and θ's batch minimum taken globally, so params stay identical.
  Batch top-k then selects k·B/world entries within each rank's shard, not k·B over the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
import os
import zlib
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from sae_vlm.config import SAESpec, TrainConfig
from sae_vlm.data.source import ActivationSource, as_source
from sae_vlm.sae import losses, mechanics
from sae_vlm.sae.sparse import SparseCodes
from sae_vlm.sae.model import SAE, EncoderOutput, SAEConfig, atomic_save_file, atomic_write_text, group_sizes_from_fractions

CKPT = "ckpt/state.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    if ddp:
        update_dead_global_(m.dead, enc.codes, sae.cfg.d_sae)
    else:
        m.dead.update(enc.codes)
    dead_F = m.dead.mask()
    if sae.cfg.arch in ("topk", "batchtopk", "matryoshka") and step > cfg.threshold_start_step:
        if ddp:
            update_threshold_global_(sae.threshold, enc.codes, cfg.threshold_beta)
        else:
            mechanics.update_threshold_(sae.threshold, enc.codes, cfg.threshold_beta)
    values = {name: fn(x_ND, x_hat, enc, sae, dead_F) for name, fn in m.terms.items()}
    loss = sum(weights[name] * v for name, v in values.items())

    lr = m.base_lr * mechanics.lr_factor(step, cfg.warmup_steps, cfg.steps, cfg.decay_start)
    for group in m.opt.param_groups:
        group["lr"] = lr
    m.opt.zero_grad(set_to_none=True)
    loss.backward()
    if ddp:  # before the projection and clipping, so every rank takes the same step
        average_grads_(list(sae.parameters()))
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
        keys = list(out)
        mean = torch.stack([out[k].float().reshape(()) for k in keys])
        dist.all_reduce(mean)
        out = dict(zip(keys, (mean / dist.get_world_size()).unbind(0)))
    return {**out, "lr": lr}


# --- data-parallel pieces: collectives over the default process group ------------------------------------------

@torch.no_grad()
def update_dead_global_(dead: mechanics.DeadLatents, codes, d_sae: int) -> None:
    """DeadLatents.update for the global batch: a latent fired if it fired on any rank's shard."""
    fired_F = torch.zeros(d_sae, dtype=torch.int32, device=dead.since_fired_F.device)
    if isinstance(codes, SparseCodes):
        fired_F[codes.cols_M[codes.values_M > 0]] = 1
        n = codes.n_rows
    else:
        fired_F[(codes > 0).any(dim=0)] = 1
        n = codes.shape[0]
    dist.all_reduce(fired_F, op=dist.ReduceOp.MAX)
    dead.since_fired_F += n * dist.get_world_size()
    dead.since_fired_F[fired_F.bool()] = 0


@torch.no_grad()
def update_threshold_global_(theta: torch.Tensor, codes, beta: float) -> None:
    """mechanics.update_threshold_ with the smallest kept activation over all ranks' shards."""
    values = codes.values_M if isinstance(codes, SparseCodes) else codes
    kept = values[values > 0].to(theta.dtype)
    smallest = kept.min() if kept.numel() else torch.full((), torch.inf, dtype=theta.dtype, device=theta.device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN)
    smallest = torch.where(torch.isinf(smallest), torch.zeros_like(smallest), smallest)  # nothing kept anywhere
    theta.copy_(torch.where(theta < 0, smallest, beta * theta + (1 - beta) * smallest))


@torch.no_grad()
def average_grads_(params: list[torch.nn.Parameter]) -> None:
    """Mean of every rank's gradients, in one flat all_reduce (a missing grad counts as zero)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p)


@torch.no_grad()
def check_in_sync(members: list[Member], device: torch.device) -> None:
    """Data-parallel guard: every rank's parameters must equal rank 0's bit for bit."""
    differs = False
    for m in members:
        for t in m.sae.state_dict().values():
            ref = t.detach().clone()
            dist.broadcast(ref, src=0)
            differs |= not torch.equal(ref, t)
    flag = torch.tensor(int(differs), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise RuntimeError("data-parallel ranks hold different SAE parameters; expected identical copies")


def as_float(enc: EncoderOutput) -> EncoderOutput:
    """Losses run in fp32 whatever precision the autocast forward produced."""
    codes = enc.codes
    codes = codes._replace(values_M=codes.values_M.float()) if isinstance(codes, SparseCodes) else codes.float()
    return EncoderOutput(enc.h_NF.float() if enc.h_NF.dtype != torch.float32 else enc.h_NF, codes)


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


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch; rank 0 of 1 without one."""

    rank: int = 0
    world: int = 1
    ddp: bool = False  # data-parallel (every rank holds every SAE) rather than the sweep spread over ranks

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether SAE `index` of the sweep trains (and is saved) here."""
        return self.ddp or index % self.world == self.rank

    @property
    def ckpt(self) -> str:
        """This rank's resume file: one shared file when params are replicated, one per rank for a spread sweep."""
        return CKPT if self.world == 1 or self.ddp else f"ckpt/state.rank{self.rank}-of-{self.world}.safetensors"

    @property
    def describe(self) -> str:
        if self.world == 1:
            return "a single-process run"
        return f"a {self.world}-process {'--ddp' if self.ddp else 'sweep'} run"


def setup_distributed(cfg: TrainConfig) -> tuple[Dist, torch.device, bool]:
    """(place, device, whether we created the process group). WORLD_SIZE > 1 means torchrun launched us."""
    device = resolve_device(cfg.device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        return Dist(), device, False
    if device.type == "cuda":  # one GPU per local rank, whatever index was asked for
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    place = Dist(dist.get_rank(), dist.get_world_size(), cfg.ddp and dist.get_world_size() > 1)
    if place.ddp and cfg.batch_size % place.world:
        raise ValueError(f"--ddp needs batch_size divisible by the {place.world} ranks, got {cfg.batch_size}")
    return place, device, created


def train(cfg: TrainConfig, source: ActivationSource | None = None, resume: bool = False) -> dict[str, SAE]:
    """Train the sweep; under torchrun each rank returns the SAEs it saved (see `Dist`)."""
    place, device, created = setup_distributed(cfg)
    try:
        saes = _train(cfg, source, resume, place, device)
        if place.world > 1:
            dist.barrier()
        return saes
    finally:
        if created:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, source, resume: bool, place: Dist, device: torch.device) -> dict[str, SAE]:
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
        start, norm = load_checkpoint(found, members, cfg, place)
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
    shard = (place.rank, place.world) if place.ddp else None
    saves = place.lead or not place.ddp  # data-parallel copies are identical: rank 0 saves them
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train",
               disable=cfg.quiet or not place.lead)
    stats: list[dict] = [{} for _ in members]
    for step in bar:
        x_ND = batches(step, shard) / norm if members else None  # a rank with no SAE only joins the log gathers
        done = step + 1
        log_now = done % cfg.log_every == 0 or done == cfg.steps or done in cfg.keep_steps
        stats = [train_step(m, x_ND, step, cfg, metrics=log_now, ddp=place.ddp) for m in members]
        if done % cfg.log_every == 0 or done == cfg.steps:
            rows = [{"step": done, "sae": m.spec.name, **{k: float(v) for k, v in s.items()}} for m, s in zip(members, stats)]
            rows = gather_rows(rows, names, place)
            if logger is not None:
                logger.write(rows)
                if rows:
                    bar.set_postfix(fve=f"{rows[0]['fve']:.3f}", l0=f"{rows[0]['l0']:.1f}")
        if done in cfg.keep_steps and saves:
            for m, s in zip(members, stats):
                export(m, norm, out / "saes" / m.spec.name / f"step-{done}", cfg, done, s)
        if done % cfg.checkpoint_every == 0 and done < cfg.steps:
            checkpoint(out, members, done, norm, place, device)
    if logger is not None:
        logger.close()
    if start >= cfg.steps:  # resuming a finished run: its SAEs are already saved
        return {m.spec.name: SAE.from_pretrained(out / "saes" / m.spec.name) for m in members if saves}
    final = {m.spec.name: export(m, norm, out / "saes" / m.spec.name, cfg, cfg.steps, s)
             for m, s in zip(members, stats) if saves}
    checkpoint(out, members, cfg.steps, norm, place, device)
    return final


def gather_rows(rows: list[dict], names: list[str], place: Dist) -> list[dict]:
    """Sweep spread over ranks: rank 0 gets every rank's rows, in sweep order (as one process writes them)."""
    if place.world == 1 or place.ddp:
        return rows if place.lead else []
    parts = [None] * place.world if place.lead else None
    dist.gather_object(rows, parts, dst=0)
    if not place.lead:
        return []
    return sorted((r for part in parts for r in part), key=lambda r: names.index(r["sae"]))


def checkpoint(out: Path, members: list[Member], step: int, norm: float, place: Dist, device) -> None:
    if place.ddp:
        check_in_sync(members, device)
        if place.lead:
            save_checkpoint(out / place.ckpt, members, step, norm, place)
        return
    path = out / place.ckpt
    if place.world > 1 and path.exists():
        # Keep the previous step: a kill mid-save can leave ranks one checkpoint apart, and resume needs a common step.
        os.replace(path, previous(path))
    save_checkpoint(path, members, step, norm, place)


def previous(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def checkpoint_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def resume_step(out: Path, place: Dist) -> Path | None:
    """This rank's checkpoint at the latest step every rank holds, or None to start over.

    Refuses (ValueError) when the checkpoints were written by a launch of another shape.
    """
    ckpt_dir = out / "ckpt"
    expected = {Path(dataclasses.replace(place, rank=r).ckpt).name for r in range(place.world)}
    others = sorted(p.name for p in ckpt_dir.glob("state*.safetensors") if p.name not in expected)
    if others:
        raise ValueError(f"{ckpt_dir} holds {', '.join(others)}, written by a launch of another world size; resume it "
                         f"with the same number of processes (this is {place.describe})")
    mine = [p for p in (out / place.ckpt, previous(out / place.ckpt)) if p.exists()]
    for p in mine:
        meta = checkpoint_meta(p)
        was = Dist(0, int(meta.get("world", "1")), meta.get("ddp", "0") == "1")
        if (was.world, was.ddp) != (place.world, place.ddp):
            raise ValueError(f"checkpoint {p} was written by {was.describe}; resume it the same way "
                             f"(this is {place.describe})")
    steps = {int(checkpoint_meta(p)["step"]): p for p in mine}
    if place.world == 1 or place.ddp:
        return max(steps.items())[1] if steps else None
    every = [None] * place.world
    dist.all_gather_object(every, sorted(steps))
    common = set.intersection(*(set(s) for s in every))
    return steps[max(common)] if common else None


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


def save_checkpoint(path: Path, members: list[Member], step: int, norm: float, place: Dist = Dist()) -> None:
    tensors = {"norm_factor": torch.tensor(norm, dtype=torch.float64)}
    for m in members:
        name = m.spec.name
        for k, t in m.sae.state_dict().items():
            tensors[f"{name}/sae/{k}"] = t
        for idx, st in m.opt.state_dict()["state"].items():
            for k, t in st.items():
                tensors[f"{name}/opt/{idx}/{k}"] = t
        tensors[f"{name}/since_fired"] = m.dead.since_fired_F
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_save_file(tensors, path, metadata={"step": str(step), "members": json.dumps([m.spec.name for m in members]),
                                              "world": str(place.world), "ddp": str(int(place.ddp))})


def load_checkpoint(path: Path, members: list[Member], cfg: TrainConfig, place: Dist = Dist()) -> tuple[int, float]:
    meta = checkpoint_meta(path)
    saved = json.loads(meta["members"])
    if saved != [m.spec.name for m in members]:
        raise ValueError(f"checkpoint {path} holds SAEs {saved}, but the config asks for {[m.spec.name for m in members]}")
    tensors = load_file(str(path))
    for m in members:
        name = m.spec.name
        device = m.sae.W_dec.device
        m.sae.load_state_dict({k.split("/", 2)[2]: t for k, t in tensors.items() if k.startswith(f"{name}/sae/")})
        state: dict = {}
        for k, t in tensors.items():
            if k.startswith(f"{name}/opt/"):
                _, _, idx, key = k.split("/")
                state.setdefault(int(idx), {})[key] = t.to(device) if key != "step" else t
        m.opt.load_state_dict({"state": state, "param_groups": m.opt.state_dict()["param_groups"]})
        m.dead.since_fired_F.copy_(tensors[f"{name}/since_fired"])
    return int(meta["step"]), float(tensors["norm_factor"])


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint (and a half-written last line) so a resumed log has no duplicates."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row["step"] <= step:
            keep.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def check_log_sink(log_to: str | None) -> None:
    """Fail before anything is written when the requested logging package is missing."""
    if log_to is not None and importlib.util.find_spec(log_to) is None:
        raise ValueError(f"--log-to {log_to} needs the {log_to} package; pip install {log_to}")


class Logger:
    """JSONL log (one line per SAE per log step, appended whole), plus optional W&B or TensorBoard."""

    def __init__(self, out: Path, cfg: TrainConfig):
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "log.jsonl", "a")
        self.sink = None
        if cfg.log_to == "wandb":
            import wandb

            self.sink = wandb.init(project="sae-vlm", name=out.name, config=dataclasses.asdict(cfg), resume="allow")
        elif cfg.log_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.sink = SummaryWriter(str(out / "tensorboard"))

    def write(self, rows: list[dict]) -> None:
        self.file.write("".join(json.dumps(r) + "\n" for r in rows))
        self.file.flush()
        os.fsync(self.file.fileno())
        for r in rows:
            scalars = {f"{r['sae']}/{k}": v for k, v in r.items() if k not in ("step", "sae")}
            if self.sink is None:
                continue
            if hasattr(self.sink, "add_scalar"):
                for k, v in scalars.items():
                    self.sink.add_scalar(k, v, r["step"])
            else:
                self.sink.log(scalars, step=r["step"])

    def close(self) -> None:
        self.file.close()
        if self.sink is not None:
            getattr(self.sink, "close", getattr(self.sink, "finish", lambda: None))()
