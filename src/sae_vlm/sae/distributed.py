"""Several processes under torchrun: where this process sits, and the collectives training needs.

Two layouts (chosen by `TrainConfig.ddp`):
- a sweep spread over ranks: SAE i of the sweep trains on rank i % world; every rank reads the same batches,
  so each SAE gets exactly the updates it would get alone, and log.jsonl matches a one-process run.
- data parallel: every rank holds every SAE and takes rows rank::world of each global batch; gradients are
  averaged, firing masks OR-ed and θ's batch minimum taken globally, so parameters stay identical.
  Batch top-k then selects k·B/world entries within each rank's shard, not k·B over the global batch.

Gradients are averaged by hand (`average_grads_`, one flat all_reduce per SAE), not by DistributedDataParallel:
DDP syncs only a backward begun in its wrapper's forward(), while a training step calls the SAE's encode, decode
and loss terms directly; it would also need a wrapper per SAE of the sweep, find_unused_parameters and no buffer
broadcast, and its divide-then-sum would change --ddp results in the last bits. CONVENTIONS.md has the details.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from sae_vlm.device import join_process_group, resolve_device

CKPT = "ckpt/state.safetensors"


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun launch; rank 0 of 1 without one."""

    rank: int = 0
    world: int = 1
    ddp: bool = False  # data-parallel (every rank holds every SAE) rather than the sweep spread over ranks

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def saves(self) -> bool:
        """Whether this rank writes its SAEs: data-parallel copies are identical, so only rank 0 does."""
        return self.lead or not self.ddp

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


def setup_distributed(cfg) -> tuple[Dist, torch.device, bool]:
    """(place, device, whether we created the process group). WORLD_SIZE > 1 means torchrun launched us."""
    rank, world, device, created = join_process_group(resolve_device(cfg.device))
    place = Dist(rank, world, cfg.ddp and world > 1)
    if place.ddp and cfg.batch_size % place.world:
        raise ValueError(f"--ddp needs batch_size divisible by the {place.world} ranks, got {cfg.batch_size}")
    return place, device, created


def gather_rows(rows: list[dict], names: list[str], place: Dist) -> list[dict]:
    """Sweep spread over ranks: rank 0 gets every rank's rows, in sweep order (as one process writes them)."""
    if place.world == 1 or place.ddp:
        return rows if place.lead else []
    parts: list[list[dict]] | None = [[] for _ in range(place.world)] if place.lead else None
    dist.gather_object(rows, parts, dst=0)
    if parts is None:
        return []
    return sorted((r for part in parts for r in part), key=lambda r: names.index(r["sae"]))


@torch.no_grad()
def any_rank_fired(fired_F: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """A latent fired in the global batch if it fired on any rank's shard; the batch is world× the shard."""
    fired = fired_F.to(torch.int32)
    dist.all_reduce(fired, op=dist.ReduceOp.MAX)
    return fired.bool(), n_rows * dist.get_world_size()


@torch.no_grad()
def global_min(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


@torch.no_grad()
def mean_over_ranks(stats: dict) -> dict:
    keys = list(stats)
    mean = torch.stack([stats[k].float().reshape(()) for k in keys])
    dist.all_reduce(mean)
    return dict(zip(keys, (mean / dist.get_world_size()).unbind(0)))


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
def check_in_sync(modules, device: torch.device) -> None:
    """Data-parallel guard: every rank's parameters must equal rank 0's bit for bit."""
    differs = False
    for module in modules:
        for t in module.state_dict().values():
            ref = t.detach().clone()
            dist.broadcast(ref, src=0)
            differs |= not torch.equal(ref, t)
    flag = torch.tensor(int(differs), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        raise RuntimeError("data-parallel ranks hold different SAE parameters; expected identical copies")
