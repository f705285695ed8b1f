"""`sae-vlm extract`: images -> activation store."""

from __future__ import annotations

from typing import Optional

import typer

from sae_vlm.cli_lists import comma_list
from sae_vlm.data.extract import PRESETS, ExtractConfig, run_extract


def extract(
    model: Optional[str] = typer.Option(None, "--model", help="hub id or local dir (from_pretrained)"),
    data: str = typer.Option(..., "--data", help="image folder, HF dataset dir/id, .tar shards, or a .txt path list"),
    out: str = typer.Option(..., "--out", help="store directory (rerun the same command to resume)"),
    layers: Optional[str] = typer.Option(None, "--layers", help="comma list: 11,22,last (ints mean layer.<i>)"),
    tokens: Optional[str] = typer.Option(None, "--tokens", help="comma list of cls, mean, all, random-<k>"),
    dtype: str = typer.Option("fp16", "--dtype", help="storage dtype: fp16, bf16 or fp32"),
    model_dtype: Optional[str] = typer.Option(None, "--model-dtype", help="compute dtype (default fp32 on cpu, fp16 on cuda)"),
    batch_size: int = typer.Option(64, "--batch-size"),
    shard_rows: int = typer.Option(4096, "--shard-rows", help="rows per shard (for the token selection with most rows per image)"),
    workers: int = typer.Option(4, "--workers", help="image decoding threads"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    seed: int = typer.Option(0, "--seed", help="seed of the random-k token draws"),
    preset: Optional[str] = typer.Option(None, "--preset", help="paper-ms or paper-steer (fills unset flags)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Extract activations at several hook points and token selections in one pass over the images."""
    p = {}
    if preset is not None:
        if preset not in PRESETS:
            raise typer.BadParameter(f"preset {preset!r} is unknown; expected one of {sorted(PRESETS)}")
        p = PRESETS[preset]
    model = model or p.get("model")
    if model is None:
        raise typer.BadParameter("--model is required (or a --preset that names one)")
    layers = layers or p.get("layers") or ""
    tokens = tokens or p.get("tokens") or "cls"
    if dtype not in ("fp16", "bf16", "fp32"):
        raise typer.BadParameter(f"--dtype {dtype!r} is not one of fp16, bf16, fp32")
    cfg = ExtractConfig(model=model, data=data, out=out,
                        layers=comma_list(layers, "--layers", str, "hook points") if layers else (),
                        tokens=comma_list(tokens, "--tokens", str, "token selections"),
                        dtype=dtype, model_dtype=model_dtype, batch_size=batch_size, shard_rows=shard_rows,
                        workers=workers, device=device, seed=seed)
    if quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    s = run_extract(cfg, quiet=quiet)
    if s["rank"] == 0:
        typer.echo(f"wrote {out}: {s['rows']} images kept, {len(s['skipped'])} skipped, "
                   f"{s['images_processed']} processed in {s['seconds']:.1f}s ({s['img_per_s']:.1f} img/s), "
                   f"subdirs {', '.join(s['subdirs'])}")
        for sk in s["skipped"][:20]:
            typer.echo(f"  skipped {sk['path']}: {sk['reason']}")
        if len(s["skipped"]) > 20:
            typer.echo(f"  ... {len(s['skipped']) - 20} more in {out}/manifest.json")
