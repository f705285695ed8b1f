"""A training run directory: its SAEs, their step snapshots, and which of them is scored by default.

RUN/saes/<name>/ holds each SAE at the end of training; RUN/saes/<name>/step-<n>/ the snapshots `--keep-steps`
kept. The paper scores the step-100000 snapshot of a 110k-step run, so a run trained with a paper preset records
`eval_step: 100000` in RUN/train_config.json, and evaluate, report, browse, steer and steer-score use that
snapshot unless `--step final` (or another step) is asked for.
"""

from __future__ import annotations

from pathlib import Path

from sae_vlm.io import read_json

FINAL = "final"


def is_sae_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def default_step(run_dir: Path) -> str:
    """The run's `eval_step` from train_config.json, else "final"."""
    cfg = run_dir / "train_config.json"
    step = read_json(cfg).get("eval_step") if cfg.is_file() else None
    return str(step) if step is not None else FINAL


def parse_step(step: str | int | None) -> str | None:
    """None, "final" or a step number (as text); anything else is a ValueError."""
    if step is None or str(step) == FINAL:
        return None if step is None else FINAL
    if not str(step).isdigit():
        raise ValueError(f"--step {step!r} is not understood; expected a step number or 'final'")
    return str(int(step))


def snapshot(sae_dir: Path, step: str) -> Path:
    """The SAE directory of one snapshot: the directory itself for "final", else its step-<n>/ subdirectory."""
    if step == FINAL:
        return sae_dir
    path = sae_dir / f"step-{step}"
    if not is_sae_dir(path):
        kept = sorted(p.name for p in sae_dir.glob("step-*") if is_sae_dir(p))
        raise FileNotFoundError(f"{sae_dir} has no snapshot at step {step}; it holds {', '.join(kept) or 'none'} "
                                "besides the final SAE (pass --step final or one of those)")
    return path


def find_saes(run_dir: str | Path, step: str | int | None = None) -> tuple[list[tuple[str, Path]], str]:
    """([(SAE name, its directory at `step`)], the step used) for a run directory or a single SAE directory.

    `step` None: the run's default (its `eval_step`, else "final")."""
    run = Path(run_dir)
    asked = parse_step(step)
    if is_sae_dir(run):  # one SAE: its own snapshots live beside it
        owner = run.parent.parent if run.parent.name == "saes" else None
        used = asked or (default_step(owner) if owner is not None else FINAL)
        return [(run.name, snapshot(run, used))], used
    dirs = [p.parent for p in sorted(run.glob("saes/*/config.json"))]
    if not dirs:
        raise FileNotFoundError(f"{run} holds no SAEs; expected {run}/saes/<name>/config.json or an SAE directory")
    used = asked or default_step(run)
    return [(d.name, snapshot(d, used)) for d in dirs], used


def resolve_sae_dir(sae_dir: str | Path, step: str | int | None = None) -> Path:
    """One SAE directory at the asked step, or at its run's default step (see find_saes)."""
    if not is_sae_dir(Path(sae_dir)):
        raise FileNotFoundError(f"{sae_dir} is not an SAE directory (config.json and model.safetensors)")
    [(_, path)] = find_saes(sae_dir, step)[0]
    return path
