"""The `sae-vlm` command. Each subcommand lives beside the code it drives; this file only wires them up."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Sparse autoencoders for vision-language models.")

# --- subcommands (one line each) ---
from sae_vlm.sae.cli_train import convert, train  # noqa: E402

app.command("train")(train)
app.command("convert")(convert)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
