"""Layers that point down: every import in src/ (module level and inside functions) goes into the importer's own
layer or one below it, as CONVENTIONS.md lists them; no two modules import each other, even through others."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
from _adversarial import refused

import sae_vlm
from sae_vlm.config import PlantedConfig, TrainConfig
from sae_vlm.names import ARCH_NAMES, FORMAT_NAMES
from sae_vlm.sae import arch, formats, model

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = Path(__file__).resolve().parents[1]

# Bottom to top, as in CONVENTIONS.md; a module belongs to the layer of its longest matching prefix.
LAYERS = [
    ("base", ("sae_vlm.io", "sae_vlm.outdir", "sae_vlm.device", "sae_vlm.config", "sae_vlm.names", "sae_vlm.topk",
              "sae_vlm.token_selection")),
    ("images", ("sae_vlm.data.images",)),
    ("backbones", ("sae_vlm.backbones",)),
    ("store", ("sae_vlm.data",)),
    ("sae", ("sae_vlm.sae",)),
    ("eval", ("sae_vlm.eval",)),
    ("steer", ("sae_vlm.steer",)),
    ("browse", ("sae_vlm.browse",)),
    ("toyworld", ("sae_vlm.toyworld",)),
    ("top", ("sae_vlm.cli", "sae_vlm")),
]


def module_files(src: Path = SRC) -> dict[str, Path]:
    """{dotted module name: file} for every module under src/sae_vlm (a package by its own name)."""
    out = {}
    for f in sorted((src / "sae_vlm").rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def type_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes under `if TYPE_CHECKING:`: imports for annotations, never run."""
    return {n for block in ast.walk(tree) if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
            for stmt in block.body for n in ast.walk(stmt)}


@functools.cache
def parse(file: Path) -> ast.Module:
    return ast.parse(file.read_text())


def imports_of(name: str, file: Path, known: set[str], runtime: bool = False) -> set[str]:
    """The sae_vlm modules `name` imports anywhere in its file (`runtime`: not those only for annotations);
    `from p import m` counts as p.m when m is a module."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    tree = parse(file)
    skip = type_only(tree) if runtime else set()
    found = set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m == "sae_vlm" or m.startswith("sae_vlm.")} - {name}


@functools.cache
def import_graph(src: Path = SRC, runtime: bool = False) -> dict[str, set[str]]:
    files = module_files(src)
    return {name: imports_of(name, f, set(files), runtime) for name, f in files.items()}


def layer_of(module: str) -> int:
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and CONVENTIONS.md"
    return best[1]


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs whose target sits in a higher layer."""
    return sorted((a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_imports_point_down():
    ups = upward(import_graph())
    names = [layer for layer, _ in LAYERS]
    assert not ups, "imports into a higher layer: " + "; ".join(
        f"{a} ({names[layer_of(a)]}) -> {b} ({names[layer_of(b)]})" for a, b in ups)


def test_no_import_circles():
    assert circles(import_graph(runtime=True)) == []


def test_the_analysis_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "sae_vlm"
    (pkg / "data").mkdir(parents=True)
    (pkg / "eval").mkdir()
    for f in ("__init__.py", "config.py", "data/__init__.py", "data/store.py", "eval/__init__.py", "eval/top.py"):
        (pkg / f).write_text("")
    (pkg / "config.py").write_text("def f():\n    from sae_vlm.eval.top import x\n")
    (pkg / "data" / "store.py").write_text("from . import images\nfrom ..eval import top\n")
    (pkg / "eval" / "top.py").write_text("import sae_vlm.config\n")
    graph = import_graph(tmp_path)
    assert graph["sae_vlm.config"] == {"sae_vlm.eval.top"}
    assert graph["sae_vlm.data.store"] == {"sae_vlm.data", "sae_vlm.eval.top"}  # `images` is no module here
    assert upward(graph) == [("sae_vlm.config", "sae_vlm.eval.top"), ("sae_vlm.data.store", "sae_vlm.eval.top")]
    assert circles(graph) == [["sae_vlm.config", "sae_vlm.eval.top"]]


def test_config_loads_without_torch_or_the_sae_package():
    code = ("import sys, sae_vlm, sae_vlm.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('sae_vlm.sae', 'sae_vlm.data'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- registries instead of upward imports ------------------------------------------------------------------------


def test_the_light_name_lists_are_what_sae_registers_and_reads():
    shipped = [ast.literal_eval(call.args[0].args[0]) for call in ast.walk(ast.parse(inspect.getsource(arch)))
               if isinstance(call, ast.Call) and ast.unparse(call.func) == "register" and call.args]
    assert shipped == ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"]
    assert ARCH_NAMES[: len(shipped)] == shipped and list(arch.ARCHS)[: len(shipped)] == shipped
    assert tuple(formats.READERS) == FORMAT_NAMES == formats.FORMATS


@pytest.fixture
def spare_relu():
    """ARCHS as it was, whatever a test registers or replaces."""
    before, names = dict(arch.ARCHS), list(ARCH_NAMES)
    yield arch.ArchSpec("relu", "topk", "topk", {"recon": arch.RECON})
    arch.ARCHS.clear()
    arch.ARCHS.update(before)
    ARCH_NAMES[:] = names


def test_register_refuses_to_replace_an_architecture_silently(spare_relu):
    shipped = arch.ARCHS["relu"]
    for spec in (spare_relu, shipped):  # another record, or the same one again
        with pytest.raises(ValueError, match=r"architecture 'relu' is already registered; pass replace=True"):
            arch.register(spec)
        assert arch.ARCHS["relu"] is shipped
    assert arch.register(spare_relu, replace=True) is spare_relu
    assert arch.ARCHS["relu"] is spare_relu and ARCH_NAMES.count("relu") == 1
    assert model.SAE(model.SAEConfig("relu", 8, 16, 4)).arch is spare_relu  # the model asks the replaced record


def test_a_new_architecture_is_known_to_the_config_and_only_once(spare_relu):
    with pytest.raises(ValueError, match="unknown architecture 'relu_plus'; expected one of relu, topk"):
        TrainConfig(data="x", out="y", archs=("relu_plus",))
    arch.register(arch.ArchSpec("relu_plus", "relu", "relu", {"recon": arch.RECON}, needs_k=False))
    assert TrainConfig(data="x", out="y", archs=("relu_plus",)).archs == ("relu_plus",)
    assert PlantedConfig(archs=("relu_plus",)).archs == ("relu_plus",)
    with pytest.raises(ValueError, match="'relu_plus' is already registered"):
        arch.register(arch.ArchSpec("relu_plus", "topk", "topk", {"recon": arch.RECON}))
    assert ARCH_NAMES.count("relu_plus") == 1 and arch.ARCHS["relu_plus"].train_select == "relu"


@pytest.mark.parametrize("args, culprit", [
    (["train", "--data", "acts.npy", "--out", "run", "--arch", "batchtopk,gated"], "'gated'"),
    (["planted", "--out", "p", "--arch", "Matryoshka"], "'Matryoshka'"),
    (["convert", "sae", "out", "--from", "saelens"], "saelens"),
    (["extract", "--model", "m", "--data", "imgs", "--out", "s", "--tokens", "cls,random-0"], "'random-0'"),
])
def test_names_checked_by_the_config_are_refused_before_any_work(tmp_path, monkeypatch, args, culprit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "acts.npy").write_bytes(b"")
    (tmp_path / "sae").mkdir()
    refused(tmp_path, args, culprit)


def test_from_pretrained_delegates_to_the_registered_loader(tmp_path):
    source = inspect.getsource(model).lower()
    assert not [lib for lib in ("dictionary", "sae_lens", "saelens", "saev", "sparsify", "overcomplete")
                if lib in source], "sae/model.py names a library: the dispatch belongs to sae/formats"
    assert model.FOREIGN_LOADERS == [formats.load_foreign]
    seen = []

    def loader(path, **hints):
        seen.append((path, hints))
        return model.SAE(model.SAEConfig("topk", 4, 8, 2))

    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "notes.txt").write_text("not an SAE")
    model.FOREIGN_LOADERS.append(loader)
    try:
        sae = model.SAE.from_pretrained(tmp_path / "ckpt", k=2)
    finally:
        model.FOREIGN_LOADERS.remove(loader)
    assert seen == [(tmp_path / "ckpt", {"k": 2})] and sae.cfg.d_sae == 8
    with pytest.raises(ValueError, match="ckpt is not an SAE any supported library wrote"):
        model.SAE.from_pretrained(tmp_path / "ckpt")  # the formats' own dispatch again


# --- the names the README teaches --------------------------------------------------------------------------------

PACKAGES = ["sae_vlm", "sae_vlm.backbones", "sae_vlm.data", "sae_vlm.eval", "sae_vlm.sae", "sae_vlm.sae.formats",
            "sae_vlm.steer", "sae_vlm.toyworld"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves(package):
    mod = importlib.import_module(package)
    assert mod.__all__ and len(set(mod.__all__)) == len(mod.__all__)
    missing = [n for n in mod.__all__ if getattr(mod, n, None) is None]
    assert not missing, f"{package} exports names it does not have: {missing}"


def test_the_package_loads_its_names_on_first_use():
    from sae_vlm.data.store import open_store
    from sae_vlm.eval.ms import monosemanticity_score
    from sae_vlm.steer.intervene import intervene

    assert (sae_vlm.SAE, sae_vlm.intervene, sae_vlm.monosemanticity_score, sae_vlm.open_store) == (
        model.SAE, intervene, monosemanticity_score, open_store)
    assert set(dir(sae_vlm)) >= set(sae_vlm.__all__)
    with pytest.raises(AttributeError, match="no attribute 'SAEs'"):
        sae_vlm.SAEs  # noqa: B018
    from sae_vlm import toyworld  # a subpackage still imports as one

    assert toyworld.clip_path().exists()


def taught_imports(text: str) -> list[tuple[str, str]]:
    """(module, name) for every `from sae_vlm... import a, b` in the Python blocks of a Markdown text."""
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    lines = [hit for b in blocks for hit in re.findall(r"^from (sae_vlm[\w.]*) import ([^\n(]+)", b, re.M)]
    return [(m, n.strip()) for m, names in lines for n in names.split("#")[0].split(",") if n.strip()]


def test_every_name_the_readme_and_docs_teach_imports():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    taught = [t for p in pages if p.exists() for t in taught_imports(p.read_text())]
    assert ("sae_vlm", "SAE") in taught
    missing = [f"{m}.{n}" for m, n in taught if not hasattr(importlib.import_module(m), n)]
    assert not missing, f"taught but not importable: {missing}"


def test_the_package_and_its_subpackages_export_what_the_readme_teaches():
    taught = taught_imports((ROOT / "README.md").read_text())
    assert len(taught) >= 3
    for module, name in taught:  # `from sae_vlm.data.store import open_store` -> sae_vlm.data exports open_store
        package = ".".join(module.split(".")[:2])
        assert name in importlib.import_module(package).__all__, f"{package} does not export {name}"
        assert getattr(importlib.import_module(package), name) is getattr(importlib.import_module(module), name)
