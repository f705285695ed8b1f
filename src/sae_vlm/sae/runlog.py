"""The training log: JSONL lines appended whole, plus optional W&B or TensorBoard."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path


def check_log_sink(log_to: str | None) -> None:
    """Fail before anything is written when the requested logging package is missing."""
    if log_to is not None and importlib.util.find_spec(log_to) is None:
        raise ValueError(f"--log-to {log_to} needs the {log_to} package; pip install {log_to}")


def record_event(out: Path, event: dict) -> None:
    """One line in OUT/events.jsonl for what happened to the run besides its metrics (a resume, a stop); log.jsonl
    keeps only metric rows, so that a resumed run's log equals an unbroken one's."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "events.jsonl", "a") as f:
        f.write(json.dumps({**event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


class Logger:
    """JSONL log (one line per SAE per log step, appended whole), plus optional W&B or TensorBoard."""

    def __init__(self, out: Path, cfg):
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "log.jsonl", "a")
        self.wandb = self.tensorboard = None
        if cfg.log_to == "wandb":
            import wandb  # pyright: ignore[reportMissingImports]  (optional: `pip install wandb`)

            self.wandb = wandb.init(project="sae-vlm", name=out.name, config=dataclasses.asdict(cfg), resume="allow")
        elif cfg.log_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def write(self, rows: list[dict]) -> None:
        self.file.write("".join(json.dumps(r) + "\n" for r in rows))
        self.file.flush()
        os.fsync(self.file.fileno())
        for r in rows:
            scalars = {f"{r['sae']}/{k}": v for k, v in r.items() if k not in ("step", "sae")}
            if self.tensorboard is not None:
                for k, v in scalars.items():
                    self.tensorboard.add_scalar(k, v, r["step"])
            if self.wandb is not None:
                self.wandb.log(scalars, step=r["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
