"""`sae-vlm browse RUN` (local web app) and `sae-vlm report RUN --out DIR` (static HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _view(run_dir: Path, eval_dir: Optional[Path], data: Optional[str]):
    from sae_vlm.browse.data import RunView

    return RunView(run_dir, eval_dir, data)


def browse(
    run_dir: Path = typer.Argument(..., help="Training run directory (RUN/saes/<name>/)."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Output of `sae-vlm evaluate` (default RUN/eval)."),
    data: Optional[str] = typer.Option(None, help="Activation store the evaluation read (default: from metrics.json)."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on; keep loopback unless you mean to share."),
    port: int = typer.Option(8765, help="Port to listen on."),
    clip: Optional[str] = typer.Option(None, help="CLIPModel id or dir: enables text search over latents."),
    llava: Optional[str] = typer.Option(None, help="LLaVA id or dir: enables the steering panel."),
    device: str = typer.Option("cpu", help="Device for the --clip / --llava models."),
) -> None:
    """Serve a read-only browser of a run's latents: tables, top images, histograms, neighbours."""
    import uvicorn

    from sae_vlm.browse.app import create_app
    from sae_vlm.browse.tools import Steerer, TextSearch

    view = _view(run_dir, eval_dir, data)
    search = TextSearch(view, clip, device) if clip else None
    steerer = Steerer(view, llava, device) if llava else None
    typer.echo(f"serving {view.run_dir} at http://{host}:{port}/")
    uvicorn.run(create_app(view, search, steerer), host=host, port=port, log_level="warning")


def report(
    run_dir: Path = typer.Argument(..., help="Training run directory (RUN/saes/<name>/)."),
    out: Path = typer.Option(..., help="Directory for the static report (OUT/index.html)."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="Output of `sae-vlm evaluate` (default RUN/eval)."),
    data: Optional[str] = typer.Option(None, help="Activation store the evaluation read (default: from metrics.json)."),
    top: int = typer.Option(200, help="Pages for this many highest-MS alive latents per SAE."),
    all_: bool = typer.Option(False, "--all", help="A page for every latent."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Write the browser's views as static HTML that opens from file:// with no server."""
    from sae_vlm.browse.report import write_report

    view = _view(run_dir, eval_dir, data)
    index = write_report(view, out, top=top, all_latents=all_, quiet=quiet)
    typer.echo(f"wrote {index}")
