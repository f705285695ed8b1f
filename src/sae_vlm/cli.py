"""The `sae-vlm` command. Each subcommand lives beside the code it drives; this file only wires them up."""

from __future__ import annotations

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Sparse autoencoders for vision-language models.")

# --- subcommands (one line each) ---
from sae_vlm.data.cli_extract import extract  # noqa: E402
app.command("extract")(extract)
from sae_vlm.sae.cli_train import convert, train  # noqa: E402

app.command("train")(train)
app.command("convert")(convert)
from sae_vlm.demo import demo  # noqa: E402

app.command("demo")(demo)
from sae_vlm.eval.cli_evaluate import evaluate  # noqa: E402

app.command("evaluate")(evaluate)
from sae_vlm.steer.cli_steer import steer, steer_score  # noqa: E402

app.command("steer")(steer)
app.command("steer-score")(steer_score)
from sae_vlm.browse.cli_browse import browse, report  # noqa: E402

app.command("browse")(browse)
app.command("report")(report)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
