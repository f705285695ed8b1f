"""The written conventions (CONVENTIONS.md) that a test can check: short functions, one place per setting, one
record per architecture, the backbone interface kept public."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae_vlm import cli
from sae_vlm import config as C

SRC = Path(__file__).resolve().parents[1] / "src" / "sae_vlm"
ROUTE_TABLES = {("browse/app.py", "create_app")}  # FastAPI route tables: one nested function per route


def sources() -> dict[str, str]:
    return {str(p.relative_to(SRC)): p.read_text() for p in sorted(SRC.rglob("*.py"))}


def test_no_function_is_over_60_lines():
    long = []
    for rel, text in sources().items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (rel, node.name) not in ROUTE_TABLES:
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 60:
                    long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_architecture_names_are_compared_only_in_their_records():
    pattern = re.compile(r"""arch\w*\s*(==|!=|\bin\b|\bnot in\b)\s*[("']""")
    # sae/formats/ is where other libraries' architecture names are mapped onto ours, by name
    found = [f"{rel}: {line.strip()}" for rel, text in sources().items()
             if rel != "sae/arch.py" and not rel.startswith("sae/formats/")
             for line in text.splitlines() if pattern.search(line)]
    assert not found, found


def test_backbone_internals_stay_inside_backbones():
    pattern = re.compile(r"\b(bb|backbone|self\.backbone)\._[a-z]")
    found = [f"{rel}: {line.strip()}" for rel, text in sources().items() if not rel.startswith("backbones/")
             for line in text.splitlines() if pattern.search(line)]
    assert not found, found


@pytest.mark.parametrize("name, config_cls", [(name, cls) for name, cls, _ in cli.COMMANDS])
def test_every_setting_is_an_option_with_its_default_shown_once(name, config_cls):
    """Each config field is on the command line; a default the CLI shows is not repeated in the help text."""
    text = CliRunner().invoke(cli.app, [name, "--help"], env={"COLUMNS": "400"}).output
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True):
            continue
        flag = cli._flag(f)
        names = flag.split("/") if not f.metadata.get("positional") else [f.name]
        assert any(n in text for n in names), (name, f.name)
        shown = f.default not in (dataclasses.MISSING, None, ())
        if shown:
            assert "default" not in f.metadata["help"].lower(), (name, f.name, f.metadata["help"])
    if name == "train":
        assert text.count("[default: 4096]") == 1 and "[default: batchtopk]" in text


def test_one_preset_registry_serves_extract_and_train():
    assert set(C.presets_for(C.ExtractConfig)) == {"paper-ms", "paper-steer"}
    assert set(C.presets_for(C.TrainConfig)) == {"paper-ms", "paper-hierarchy", "paper-steer"}
    with pytest.raises(ValueError, match="unknown preset 'paper-x'; expected one of paper-ms, paper-steer"):
        C.preset_fields(C.ExtractConfig, "paper-x")
