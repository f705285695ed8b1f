"""Every numeric setting declares its valid range in config.py, and the range holds at its edges: the value just
inside each finite edge is accepted, the value just outside (and nan, ±inf for floats, 2^63 for ints) is refused
with a ValueError naming the flag, the value and the range."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
from _adversarial import refused

from sae_vlm import config as C

CLASSES = [c for c in vars(C).values()
           if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == C.__name__
           and c not in (C.Interval, C.LatentSpec)]  # parsed values, not settings


def _numeric(tp) -> type | None:
    """int or float for a number field (also `| None` and tuples of them), else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple:
        return _numeric(args[0])
    if args and type(None) in args:
        return _numeric(next(a for a in args if a is not type(None)))
    return tp if tp in (int, float) else None


NUMERIC = [(cls, f, _numeric(typing.get_type_hints(cls)[f.name])) for cls in CLASSES
           for f in dataclasses.fields(cls) if _numeric(typing.get_type_hints(cls)[f.name])]
IDS = [f"{cls.__name__}.{f.name}" for cls, f, _ in NUMERIC]


def _required(cls) -> dict:
    """The fields without a default, filled with values that pass."""
    hints = typing.get_type_hints(cls)
    filler = {str: "x", float: 8.0, int: 4}
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING:
            tp = hints[f.name]
            out[f.name] = "batchtopk" if f.name == "arch" else (1,) if typing.get_origin(tp) is tuple else filler[tp]
    return out


def _build(cls, name: str, v):
    """`cls` with field `name` set to v (a one-element tuple for a tuple field) and the companions some other
    check needs to accept an inside value: fractions summing to 1, two distinct demo seeds, two tree levels, a
    kept snapshot for eval_step, a batch no larger than the training set, one head (it divides any width)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    value: typing.Any = v
    if typing.get_origin(typing.get_type_hints(cls)[name]) is tuple:
        value = (v,)
        if name == "group_fractions" and v < 1:
            value = (v, 1 - v)
        elif name == "branching":
            value = (v, 1)
        elif cls is C.DemoConfig:
            value = (v, v - 1 if v > 0 else v + 1)
    extra = {"keep_steps": (v,) if 1 <= v <= C.INT_MAX else ()} if name == "eval_step" else {}
    if cls is C.PlantedConfig and name == "n_train":
        extra = {"batch_size": 1}
    if cls in (C.ClipTrainConfig, C.LlavaTrainConfig):
        extra = {"batch_size": 1, "heads": 1}
    assert name in fields
    return cls(**{**_required(cls), **extra, name: value})


def _edges(within: C.Interval, kind: type) -> tuple[list, list]:
    """(values just inside, values just outside) each finite edge."""
    inside, outside = [], []
    for edge, is_open, out in ((within.lo, within.lo_open, -1), (within.hi, within.hi_open, 1)):
        if not math.isfinite(edge):
            continue
        if kind is int:
            inside.append(int(edge) - out if is_open else int(edge))
            outside.append(int(edge) if is_open else int(edge) + out)
        else:
            inside.append(math.nextafter(edge, -out * math.inf) if is_open else edge)
            outside.append(edge if is_open else math.nextafter(edge, out * math.inf))
    if kind is float:
        outside += [math.nan, math.inf, -math.inf]
    elif not math.isfinite(within.hi):
        outside.append(C.INT_MAX + 1)
    return inside, outside


def test_every_number_field_declares_a_range():
    assert len(NUMERIC) > 60
    missing = [i for i, (_, f, _) in zip(IDS, NUMERIC) if not isinstance(f.metadata.get("within"), C.Interval)]
    assert not missing, f"declare within= on these fields: {missing}"


@pytest.mark.parametrize("cls, f, kind", NUMERIC, ids=IDS)
def test_each_edge_holds(cls, f, kind):
    within = f.metadata["within"]
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    inside, outside = _edges(within, kind)
    assert inside or outside
    for v in inside:
        got = getattr(_build(cls, f.name, kind(v)), f.name)
        assert v in (got if isinstance(got, tuple) else (got,))
    for v in outside:
        with pytest.raises(ValueError) as e:
            _build(cls, f.name, kind(v) if math.isfinite(v) else v)
        assert str(e.value).startswith(f"{flag} ") and within.text in str(e.value), str(e.value)


MEANINGS = [  # the ranges the issue names, as declared
    (C.TrainConfig, "grad_clip", "[0, inf)"), (C.TrainConfig, "threshold_beta", "(0, 1)"),
    (C.TrainConfig, "warmup_steps", "[0, inf)"), (C.TrainConfig, "decay_start", "[0, inf)"),
    (C.TrainConfig, "threshold_start_step", "[0, inf)"), (C.TrainConfig, "keep_steps", "[1, inf)"),
    (C.TrainConfig, "jumprelu_bandwidth", "(0, inf)"), (C.BrowseConfig, "port", "[1, 65535]"),
    (C.EvaluateConfig, "heldout_frac", "(0, 1]"), (C.ExtractConfig, "max_pixels", "[1, inf)"),
    (C.EvaluateConfig, "grids", "[0, inf)"), (C.EvaluateConfig, "rotation_seed", f"[-1, {2**32 - 1}]"),
]


@pytest.mark.parametrize("cls, name, text", MEANINGS, ids=[m[1] for m in MEANINGS])
def test_ranges_follow_meaning(cls, name, text):
    assert {f.name: f for f in dataclasses.fields(cls)}[name].metadata["within"].text == text


def test_steps_the_run_never_reaches_are_refused():
    base = dict(data="x", out="y", steps=100)
    C.TrainConfig(**base, keep_steps=(100,), eval_step=100, decay_start=99)
    for kw, culprit in ((dict(keep_steps=(50, 101)), "--keep-steps 101"), (dict(decay_start=100), "--decay-start 100")):
        with pytest.raises(ValueError, match=culprit):
            C.TrainConfig(**base, **kw)


def test_a_range_that_is_not_an_interval_is_refused():
    with pytest.raises(ValueError, match="range"):
        C.Interval.parse("[1, 0]")


# One command per family: the CLI turns the ValueError into one line naming the flag and the value.
CLI_PROBES = [
    (["extract", "--model", "m", "--data", "d", "--out", "s", "--max-pixels", "0"], "--max-pixels 0"),
    (["train", "--data", "d.npy", "--out", "r", "--threshold-beta", "1.5"], "--threshold-beta 1.5"),
    (["evaluate", "run", "--data", "d.npy", "--heldout-frac", "0"], "--heldout-frac 0"),
    (["convert", "a", "b", "--threshold", "-1"], "--threshold -1"),
    (["compare", "a", "b", "--rows", "0"], "--rows 0"),
    (["push", "sae", "me/x y", "--dry-run", "stage"], "'me/x y'"),
    (["steer", "--llava", "l", "--sae", "s", "--latents", "-1"], "--latents -1: expected an integer in [0, inf)"),
    (["steer-score", "--llava", "l", "--sae", "s", "--clip", "c", "--per-class", "0"], "--per-class 0"),
    (["browse", "run", "--port", "70000"], "--port 70000"),
    (["report", "run", "--out", "rep", "--top", "0"], "--top 0"),
    (["demo", "--seeds", "0,-1"], "--seeds 0,-1"),
    (["planted", "--noise", "-0.5"], "--noise -0.5"),
]


@pytest.mark.parametrize("args, culprit", CLI_PROBES, ids=[a[0] for a, _ in CLI_PROBES])
def test_each_command_refuses_an_edge_in_one_line(tmp_path, monkeypatch, args, culprit):
    monkeypatch.chdir(tmp_path)
    line = refused(tmp_path, args, culprit)
    assert "expected" in line
