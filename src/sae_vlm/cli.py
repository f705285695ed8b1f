"""The `sae-vlm` command. Every option is generated from a config dataclass field (config.py), which holds its
default and help; each command builds its config, calls one library function and prints a summary."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import select
import sys
import types
import typing
from typing import Any, Callable, Optional

import typer
from typer.core import TyperGroup

try:  # typer 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:
    from click.exceptions import ClickException, NoArgsIsHelpError

from sae_vlm import config as C


def _integer(text: str) -> int:
    """An integer, also written as an integral float (`1e5`, `2.0`)."""
    try:
        return int(text)
    except ValueError:
        value = float(text)
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def number(text: str, flag: str, cast: type) -> int | float:
    """A number typed for `flag`; anything else is a one-line error naming the flag and the text."""
    try:
        return _integer(text.strip()) if cast is int else cast(text.strip())
    except (ValueError, OverflowError):
        raise ValueError(f"{flag} {text!r}: expected {'an integer' if cast is int else 'a number'}") from None


def comma_list(text: str, flag: str, cast: Callable = str) -> tuple:
    """`"8, 16,64"` -> (8.0, 16.0, 64.0) with cast=float; a bad or empty list is a one-line error."""
    what = {int: "integers", float: "numbers"}.get(cast, "values")
    try:
        values = tuple(_integer(v.strip()) if cast is int else cast(v.strip()) for v in text.split(",") if v.strip())
    except (ValueError, OverflowError):
        raise ValueError(f"{flag} {text!r}: expected comma-separated {what}") from None
    if not values:
        raise ValueError(f"{flag} {text!r}: expected at least one of the {what}")
    return values


# --- config fields -> typer parameters ---------------------------------------------------------------------------

def _help_text(text: str) -> str:
    """Help as typer's rich formatter shows it: square brackets are markup there, so they are escaped."""
    return text.replace("[", "\\[")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _shown(value) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(_shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _base_type(tp):
    """The type without its `| None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _parameter(f: dataclasses.Field, tp, preset_fields: set[str]) -> inspect.Parameter:
    """The typer parameter for one field, with the field's default and help."""
    base, meta = _base_type(tp), f.metadata
    has_default = f.default is not dataclasses.MISSING
    value: Any = f.default if has_default else None
    if meta.get("positional"):
        info = typer.Argument(..., help=_help_text(meta["help"]), show_default=False)
        many = typing.get_origin(base) is tuple  # IMAGE...: one or more
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=list[str] if many else str,
                                 default=info)
    if base is bool:
        info = typer.Option(value, *([meta["flag"]] if meta["flag"] else []), help=_help_text(meta["help"]))
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=info)
    if typing.get_origin(base) is tuple:
        annotation = Optional[list[str]] if meta.get("repeat") else Optional[str]
        default = None if value is None else list(value) if meta.get("repeat") else _shown(value) or None
    elif base in (int, float):  # parsed by _value, so that a typo is one line naming the flag
        annotation, default = Optional[str], None if value is None else _shown(value)
    else:
        annotation, default = Optional[base], value
    help_text = _help_text(meta["help"])
    if not has_default and f.name in preset_fields:
        help_text += " Required unless a --preset sets it."
    elif not has_default:
        default = ...
    info = typer.Option(default, _flag(f), help=help_text)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=info)


def _value(f: dataclasses.Field, tp, raw):
    """A given command-line value in the field's type (comma lists split and cast)."""
    base = _base_type(tp)
    if base in (int, float):
        return number(raw, _flag(f), base)
    if typing.get_origin(base) is not tuple:
        return raw
    if f.metadata.get("repeat"):
        return tuple(raw)
    return comma_list(raw, _flag(f), typing.get_args(base)[0])


def command(config_cls: type, run: Callable[[Any], None]) -> Callable[..., None]:
    """A typer command whose options are `config_cls`'s fields (and --preset where the class has presets); it
    builds the config and calls `run(config)`."""
    hints = typing.get_type_hints(config_cls)
    fields = [f for f in dataclasses.fields(config_cls) if f.metadata.get("cli", True)]
    presets = C.presets_for(config_cls)
    preset_fields = {k for fields_ in presets.values() for k in fields_}
    params = [_parameter(f, hints[f.name], preset_fields) for f in fields]
    if presets:
        params.append(inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                        default=typer.Option(None, help=f"Paper recipe: {', '.join(presets)}; "
                                                                        "the flags given override it.")))

    def build(ctx: typer.Context, **kwargs) -> None:
        # Only flags typed on the command line override a preset; the rest fall back to it, then to the field.
        given = {f.name: _value(f, hints[f.name], kwargs[f.name]) for f in fields
                 if getattr(ctx.get_parameter_source(f.name), "name", None) == "COMMANDLINE"}
        values = {**C.preset_fields(config_cls, kwargs.get("preset")), **given}
        missing = [_flag(f) for f in fields if f.default is dataclasses.MISSING and f.name not in values]
        if missing:
            raise ValueError(f"{', '.join(missing)} is required (or a --preset that sets it)")
        cfg = config_cls(**values)
        with _library_bars_off(getattr(cfg, "quiet", False)):
            run(cfg)

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    build.__signature__ = inspect.Signature([ctx_param, *params])  # type: ignore[attr-defined]
    build.__doc__ = _help_text(_help(config_cls))
    return build


def _help(config_cls: type) -> str:
    """The command's help from the config's docstring, without its "`sae-vlm x`: " prefix."""
    text = inspect.cleandoc(config_cls.__doc__ or "").split(": ", 1)[-1]
    text = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))
    return text[:1].upper() + text[1:]


@contextlib.contextmanager
def _library_bars_off(quiet: bool):
    """--quiet also silences the bars of transformers and huggingface_hub (weight loading, downloads); they are
    process-wide switches, so they are set back after the command."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars
    from transformers.utils import logging as hf_logging

    transformers_on, hub_on = hf_logging.is_progress_bar_enabled(), not are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' and the hub's
    try:
        yield
    finally:
        if transformers_on:
            hf_logging.enable_progress_bar()
        if not hub_on:
            disable_progress_bars()


EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def _stdout_is_closed() -> bool:
    """Whether stdout's reader went away (`sae-vlm ... | head`); if so, stdout now writes to /dev/null, so that what
    is left in its buffer flushes quietly, now and at exit."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poll.poll(0)):  # POLLERR: a pipe without a reader
            return False
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return True
    except (OSError, ValueError, AttributeError):  # a captured stdout with no file; no poll on this OS
        return False


def one_line_errors(fn: Callable[..., None]) -> Callable[..., None]:
    """Bad input (ValueError, or an OSError such as a missing path or an unknown model id) ends a command with one
    `error:` line and exit code 2, instead of a traceback. A closed stdout ends it quietly."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError) as e:
            if isinstance(e, BrokenPipeError) and _stdout_is_closed():
                raise typer.Exit(EXIT_BROKEN_PIPE) from None
            text = str(e).strip()
            typer.echo(f"error: {text.splitlines()[0] if text else type(e).__name__}", err=True)
            raise typer.Exit(2) from None

    return run


# --- the commands: run one library function, print what it did ----------------------------------------------------

def extract(cfg: C.ExtractConfig) -> None:
    from sae_vlm.data.extract import run_extract

    s = run_extract(cfg)
    store = s.store
    if store is None:  # not rank 0
        return
    typer.echo(f"wrote {cfg.out}: {store.rows} images kept, {len(store.skipped)} skipped, {s.images_processed} "
               f"processed in {s.seconds:.1f}s ({s.img_per_s:.1f} img/s), subdirs {', '.join(store.subdirs)}")
    if store.ignored:
        kinds = ", ".join(f"{ext} {n}" for ext, n in list(store.ignored.items())[:8])
        typer.echo(f"  {sum(store.ignored.values())} files in the folder are not images and were not read ({kinds}); "
                   "counted in manifest.json as ignored_files")
    for note in store.notes:  # what the data source was read as, and what in it was passed over
        typer.echo(f"  {note}")
    for sk in store.skipped[:20]:
        typer.echo(f"  skipped {sk['path']}: {sk['reason']}")
    if len(store.skipped) > 20:
        typer.echo(f"  ... {len(store.skipped) - 20} more in {cfg.out}/manifest.json")


def verify(cfg: C.VerifyConfig) -> None:
    from sae_vlm.data.store import verify_store

    for name, shards, rows, nbytes in verify_store(cfg):
        typer.echo(f"{name}: {shards} shards, {rows} rows, {nbytes / 1e9:.3g} GB: every byte matches the manifest")


def train(cfg: C.TrainConfig) -> None:
    from sae_vlm.sae import trainer

    for name in trainer.train(cfg):
        typer.echo(f"saved {cfg.out}/saes/{name}")


def evaluate(cfg: C.EvaluateConfig) -> None:
    from sae_vlm.eval.report import hierarchy_table
    from sae_vlm.eval.run import evaluate_run
    from sae_vlm.eval.seeds import seed_line

    metrics = evaluate_run(cfg)
    typer.echo(f"scored the SAEs at step {metrics.step}")
    for r in metrics.saes:
        ms = r.ms
        ms_txt = (f"MS {ms['mean']:.3f}±{ms['std']:.3f} ({ms['unscored']} unscored)" if ms and "mean" in ms
                  else "MS – (no image embeddings: pass --embeddings or --embedder)" if not ms else "MS –")
        rec = r.recon
        fve = f"{100 * rec['fve']:.1f}%" if math.isfinite(rec["fve"]) else "– (the data has no variance)"
        typer.echo(f"{r.name}: {ms_txt}, FVE {fve}, L0 {rec['l0']:.1f}, "
                   f"{rec['dead']} of {r.d_sae} dead (never positive)")
    for base, entry in metrics.seeds.items():
        typer.echo(seed_line(base, entry))
    for r in metrics.saes:
        if r.hierarchy is not None:
            typer.echo("\n" + hierarchy_table(r.to_json()))
    typer.echo(f"wrote {cfg.out_dir}/metrics.json")


def name_latents(cfg: C.NameConfig) -> None:
    from sae_vlm.eval.naming import name_run

    res = name_run(cfg)
    typer.echo(f"vocabulary: {res.vocab['names']} names ({res.vocab['source']}); text and image embeddings "
               f"{res.seconds.get('text', 0) + res.seconds.get('images', 0):.1f}s")
    for sae, s in res.saes.items():
        score = "–" if s["median_score"] is None else f"{s['median_score']:.3f}"
        wrong = "–" if s["median_score_shuffled"] is None else f"{s['median_score_shuffled']:.3f}"
        typer.echo(f"{sae}: named {s['named']} of {s['latents']} latents; median name score {score} (AUROC; another "
                   f"latent's name: {wrong}) in {sum(s['seconds'].values()):.1f}s")
    typer.echo(f"wrote the names into {res.eval_dir}/latents/ and {res.eval_dir}/naming.json")


def convert(cfg: C.ConvertConfig) -> None:
    from sae_vlm.sae.formats import convert, describe

    sae, notes = convert(cfg)
    source = sae.meta.get("source", {}).get("format", "sae-vlm")
    typer.echo(f"saved {describe(sae)} from {source} to {cfg.dst} ({cfg.target_format} format)")
    for note in notes:
        typer.echo(f"  note: {note}")


def compare(cfg: C.CompareConfig) -> None:
    from sae_vlm.eval.compare import compare_saes, summary_lines

    for line in summary_lines(compare_saes(cfg)):
        typer.echo(line)
    if cfg.out is not None:
        typer.echo(f"wrote {cfg.out}")


def push(cfg: C.PushConfig) -> None:
    from sae_vlm.sae.push import push_sae

    where = push_sae(cfg)
    typer.echo(f"wrote the upload folder to {where} (dry run: nothing uploaded)" if cfg.dry_run else f"pushed {where}")


def _table(rows: list[dict], cols: list[str], width: int = 70) -> str:
    def cell(v) -> str:
        s = ("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)).replace("\n", " ⏎ ")
        return s if len(s) <= width else s[: width - 1] + "…"

    cells = [[cell(r[c]) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(cols)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def steer(cfg: C.SteerConfig) -> None:
    from sae_vlm.steer.generate import run_steer

    rows = run_steer(cfg)
    cols = ["latent", "alpha"] + (["image"] if len(cfg.image) > 1 else []) + (["prompt"] if len(cfg.prompt) > 1 else [])
    typer.echo(_table(rows, cols + ["output"]))
    typer.echo(f"wrote {cfg.out}")


def steer_score(cfg: C.SteerScoreConfig) -> None:
    from sae_vlm.steer.protocol import run_steer_score

    res = run_steer_score(cfg)

    def fmt(d: dict) -> str:
        return f"{d['mean']:.3f} ± {d['std']:.3f} (n={d['n']})"

    lines = [("steered", fmt(res["steered"])), ("unsteered", fmt(res["unsteered"]))]
    if res["bounds"]:
        lines += [("upper bound", fmt(res["bounds"]["upper"])), ("lower bound", fmt(res["bounds"]["lower"]))]
    else:
        lines += [("bounds", "n/a (no class names)")]
    typer.echo("\n".join(f"{k:<12} {v}" for k, v in lines))
    typer.echo(f"wrote {cfg.out}")


def browse(cfg: C.BrowseConfig) -> None:
    from sae_vlm.browse.app import serve

    serve(cfg, announce=typer.echo)


def report(cfg: C.ReportConfig) -> None:
    from sae_vlm.browse.report import report_run

    typer.echo(f"wrote {report_run(cfg)}")


def inspect_images(cfg: C.InspectConfig) -> None:
    from sae_vlm.eval.inspect_page import run_inspect

    found = run_inspect(cfg)
    for entry in found:
        top = ", ".join(f"{x['latent']} ({x['code']:.3g})" for x in entry["latents"][:5]) or "no latent fires"
        typer.echo(f"{entry['image']}: {top}")
    typer.echo(f"wrote {cfg.out}/inspect.json and {cfg.out}/index.html")


def demo(cfg: C.DemoConfig) -> None:
    from sae_vlm.toyworld.demo import run_demo, summary_lines

    for line in summary_lines(run_demo(cfg), cfg):
        typer.echo(line)


def planted(cfg: C.PlantedConfig) -> None:
    from sae_vlm.eval.planted import run_planted

    res = run_planted(cfg)
    w = res["world"]
    typer.echo(f"world: {w['features']} features in d={w['d']} (levels {'/'.join(map(str, w['level_sizes']))}), "
               f"k={res['train']['k']}; median [min..max] over seeds {','.join(map(str, cfg.seeds))}")

    def cell(s: dict, i: int | None = None) -> str:
        m, lo, hi = (s[k] if i is None or s[k] is None else s[k][i] for k in ("median", "min", "max"))
        return "-" if m is None else f"{m:.2f} [{lo:.2f}..{hi:.2f}]"

    for arch, s in res["by_arch"].items():
        rows = [{"depth": d, "recovered (cos>=0.9)": cell(s["recovery_by_depth"], d),
                 "mean best cos": cell(s["mean_cos_by_depth"], d)} for d in range(len(w["level_sizes"]))]
        typer.echo(f"\n{arch}: depth/group Spearman {cell(s['depth_level_spearman'])}, absorption "
                   f"{cell(s['absorption'])} (parent silent without a child {cell(s['parent_silent_alone'])})")
        typer.echo(_table(rows, list(rows[0])))
    typer.echo(f"\nwrote {res['json']} and {res['plot']}")


def toy_train(cfg: C.ClipTrainConfig | C.LlavaTrainConfig) -> None:
    from sae_vlm.toyworld import train_clip, train_llava

    done = train_clip.train(cfg) if isinstance(cfg, C.ClipTrainConfig) else train_llava.train(cfg)
    typer.echo(f"saved {done.out}: final loss {done.final_loss:.3f} after {done.cpu_seconds / 60:.1f} CPU minutes")


def toy_quality(cfg: C.ToyQualityConfig) -> None:
    from sae_vlm.toyworld.quality import assess

    q = assess(cfg)
    for name, scores in (("tiny CLIP", q.clip), ("toy LLaVA", q.llava)):
        if scores is not None:
            typer.echo(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()
                                               if isinstance(v, float) and not k.endswith("_chance")))
    if q.report is not None:
        typer.echo(f"wrote {q.report}")


COMMANDS = [("extract", C.ExtractConfig, extract), ("verify", C.VerifyConfig, verify), ("train", C.TrainConfig, train),
            ("evaluate", C.EvaluateConfig, evaluate), ("name", C.NameConfig, name_latents),
            ("convert", C.ConvertConfig, convert),
            ("compare", C.CompareConfig, compare),
            ("push", C.PushConfig, push),
            ("steer", C.SteerConfig, steer), ("steer-score", C.SteerScoreConfig, steer_score),
            ("browse", C.BrowseConfig, browse), ("report", C.ReportConfig, report),
            ("inspect", C.InspectConfig, inspect_images), ("demo", C.DemoConfig, demo),
            ("planted", C.PlantedConfig, planted),
            ("toy-train-clip", C.ClipTrainConfig, toy_train), ("toy-train-llava", C.LlavaTrainConfig, toy_train),
            ("toy-quality", C.ToyQualityConfig, toy_quality)]

class OneLineUsageErrors(TyperGroup):
    """Typer's command group, except that a usage error (an unknown flag, a missing option, an unknown command) is
    one `error:` line and exit code 2, like every other bad input."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except NoArgsIsHelpError:  # a bare `sae-vlm`: the help, as typer shows it
            return super().main(*args, **kwargs)
        except ClickException as e:
            typer.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(cls=OneLineUsageErrors, no_args_is_help=True, add_completion=False,
                  help="Sparse autoencoders for vision-language models.")
for _name, _cls, _run in COMMANDS:
    app.command(_name)(one_line_errors(command(_cls, _run)))


def main() -> None:
    try:
        try:
            app()
        finally:
            sys.stdout.flush()  # here, not at exit, where a closed pipe could only be reported as ignored
    except BrokenPipeError:
        if not _stdout_is_closed():
            raise
        sys.exit(EXIT_BROKEN_PIPE)


if __name__ == "__main__":
    main()
