"""Resume state: every SAE's weights, Adam moments and idle-latent counters, in one safetensors file per rank."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from sae_vlm.io import atomic_save_safetensors, atomic_write_text
from sae_vlm.sae.distributed import CKPT, Dist, check_in_sync

__all__ = ["CKPT", "checkpoint", "load_checkpoint", "resume_step", "save_checkpoint", "truncate_log"]


def checkpoint(out: Path, members: list, step: int, norm: float, place: Dist, device) -> None:
    if place.ddp:
        check_in_sync([m.sae for m in members], device)
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
    every: list[list[int]] = [[] for _ in range(place.world)]
    dist.all_gather_object(every, sorted(steps))
    common = set.intersection(*(set(s) for s in every))
    return steps[max(common)] if common else None


def save_checkpoint(path: Path, members: list, step: int, norm: float, place: Dist = Dist()) -> None:
    tensors = {"norm_factor": torch.tensor(norm, dtype=torch.float64)}
    for m in members:
        name = m.spec.name
        for k, t in m.sae.state_dict().items():
            tensors[f"{name}/sae/{k}"] = t
        for idx, st in m.opt.state_dict()["state"].items():
            for k, t in st.items():
                tensors[f"{name}/opt/{idx}/{k}"] = t
        tensors[f"{name}/since_fired"] = m.idle.since_fired_F
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"step": str(step), "members": json.dumps([m.spec.name for m in members]), "world": str(place.world),
            "ddp": str(int(place.ddp))}
    atomic_save_safetensors(path, tensors, metadata=meta)


def load_checkpoint(path: Path, members: list, place: Dist = Dist()) -> tuple[int, float]:
    meta = checkpoint_meta(path)
    saved = json.loads(meta["members"])
    if saved != [m.spec.name for m in members]:
        wanted = [m.spec.name for m in members]
        raise ValueError(f"checkpoint {path} holds SAEs {saved}, but the config asks for {wanted}")
    tensors = load_file(str(path))
    for m in members:
        name = m.spec.name
        m.sae.load_state_dict({k.split("/", 2)[2]: t for k, t in tensors.items() if k.startswith(f"{name}/sae/")})
        state: dict = {}
        for k, t in tensors.items():
            if k.startswith(f"{name}/opt/"):
                _, _, idx, key = k.split("/")
                param = m.opt.param_groups[0]["params"][int(idx)]
                if t.ndim == 2 and t.shape != param.shape and t.T.shape == param.shape:
                    t = t.T  # a checkpoint from before the encoder was held latent-major ([d, F] moments)
                state.setdefault(int(idx), {})[key] = torch.empty_like(param).copy_(t) if key != "step" else t
        m.opt.load_state_dict({"state": state, "param_groups": m.opt.state_dict()["param_groups"]})
        m.idle.since_fired_F.copy_(tensors[f"{name}/since_fired"])
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
