"""`sae-vlm train` and `sae-vlm convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sae_vlm.cli_lists import comma_list
from sae_vlm.config import PRESETS, TrainConfig
from sae_vlm.sae.model import ARCHS


def train(
    data: str = typer.Option(..., help="Activation store directory or a .npy file of shape (rows, d_in)."),
    out: Path = typer.Option(..., help="Run directory (SAEs go to OUT/saes/<name>/)."),
    layer: Optional[str] = typer.Option(None, help="Hook point subfolder of a store with several (e.g. layer.22)."),
    arch: Optional[str] = typer.Option(None, help=f"Comma list of architectures: {', '.join(ARCHS)}."),
    width: Optional[str] = typer.Option(None, help="Comma list of expansion factors, e.g. 8,16,64."),
    k: Optional[str] = typer.Option(None, help="Comma list of k (mean active latents; JumpReLU's target L0)."),
    group_fractions: Optional[str] = typer.Option(None, help="Matryoshka group fractions, summing to 1."),
    batch_size: Optional[int] = typer.Option(None, help="Activations per step (paper: 4096)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps."),
    lr: Optional[float] = typer.Option(None, help="Learning rate; default 2e-4/sqrt(F/2^14) per SAE."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear LR warmup steps (default 1000)."),
    aux_alpha: Optional[float] = typer.Option(None, help="AuxK loss weight (default 0.03)."),
    threshold_start_step: Optional[int] = typer.Option(None, help="Step after which θ tracks the batch (default 1000)."),
    dead_window: Optional[int] = typer.Option(None, help="Samples without firing before a latent is dead (default 1e7)."),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between resume checkpoints."),
    log_every: Optional[int] = typer.Option(None, help="Steps between log lines."),
    log_to: Optional[str] = typer.Option(None, help="Also log to wandb or tensorboard."),
    seed: int = typer.Option(0, help="Seed for init and data order."),
    bf16: bool = typer.Option(False, help="bf16 autocast for the forward pass."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:1 or auto (under torchrun: cuda:LOCAL_RANK)."),
    ddp: bool = typer.Option(False, help="Under torchrun: train each SAE data-parallel (rows rank::N of every batch "
                                         "per rank; batch top-k then keeps k·B/N entries of each rank's shard) "
                                         "instead of spreading the sweep's SAEs over the ranks."),
    preset: Optional[str] = typer.Option(None, help=f"Paper recipe: {', '.join(PRESETS)}."),
    resume: bool = typer.Option(False, help="Continue the run in OUT from its last checkpoint."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a sweep of SAEs (every arch × width × k) on one pass over the data.

    Several GPUs: `torchrun --nproc_per_node N --no-python sae-vlm train ...` spreads the sweep's SAEs over the
    ranks (same results as one process); add --ddp to split every batch over the ranks instead.
    """
    from sae_vlm.sae.trainer import train as run_training

    fields: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise typer.BadParameter(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        fields.update(PRESETS[preset])
    given = dict(
        archs=comma_list(arch, "--arch", str, "architectures") if arch else None,
        expansions=comma_list(width, "--width", float, "numbers") if width else None,
        ks=comma_list(k, "--k", int, "integers") if k else None,
        group_fractions=comma_list(group_fractions, "--group-fractions", float, "numbers") if group_fractions else None,
        batch_size=batch_size, steps=steps, lr=lr, warmup_steps=warmup_steps, aux_alpha=aux_alpha,
        threshold_start_step=threshold_start_step, dead_window=dead_window,
        checkpoint_every=checkpoint_every, log_every=log_every, log_to=log_to,
    )
    fields.update({key: v for key, v in given.items() if v is not None})
    cfg = TrainConfig(data=data, out=str(out), layer=layer, seed=seed, bf16=bf16, device=device, ddp=ddp, quiet=quiet,
                      **fields)
    saes = run_training(cfg, resume=resume)
    for name in saes:
        typer.echo(f"saved {out / 'saes' / name}")


def convert(
    src: Path = typer.Argument(..., help="dictionary_learning checkpoint (ae.pt)."),
    dst: Path = typer.Argument(..., help="Output SAE directory."),
    from_: str = typer.Option("dictionary-learning", "--from", help="Source format."),
    hook_point: Optional[str] = typer.Option(None, help="Hook point the SAE reads, e.g. layer.22."),
    model_id: Optional[str] = typer.Option(None, help="Backbone model id, e.g. openai/clip-vit-large-patch14-336."),
) -> None:
    """Import a checkpoint released with the paper into the sae-vlm format."""
    from sae_vlm.sae.convert import from_dictionary_learning

    if from_ != "dictionary-learning":
        raise typer.BadParameter(f"--from {from_!r}: only dictionary-learning is supported")
    sae = from_dictionary_learning(src, hook_point=hook_point, model_id=model_id)
    sae.save_pretrained(dst)
    typer.echo(f"saved {sae.cfg.arch} SAE (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}, k={sae.cfg.k}) to {dst}")
