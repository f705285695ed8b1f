"""The `sae-vlm` command. Each subcommand lives beside the code it drives; this file only wires them up."""

from __future__ import annotations

import functools

import typer

from sae_vlm.browse.cli_browse import browse, report
from sae_vlm.data.cli_extract import extract
from sae_vlm.eval.cli_evaluate import evaluate
from sae_vlm.sae.cli_train import convert, train
from sae_vlm.steer.cli_steer import steer, steer_score
from sae_vlm.toyworld.demo import demo

def one_line_errors(command):
    """Bad input (ValueError, or an OSError such as a missing path or an unknown model id) ends a command with one
    `error:` line and exit code 2, instead of a traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ValueError, OSError) as e:
            typer.echo(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", err=True)
            raise typer.Exit(2) from None

    return run


app = typer.Typer(no_args_is_help=True, add_completion=False, help="Sparse autoencoders for vision-language models.")
for name, fn in [("extract", extract), ("train", train), ("evaluate", evaluate), ("convert", convert),
                 ("steer", steer), ("steer-score", steer_score), ("browse", browse), ("report", report),
                 ("demo", demo)]:
    app.command(name)(one_line_errors(fn))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
