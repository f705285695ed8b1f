"""The README and docs/ are executed: docs/cli.md is what scripts/cli_reference.py writes now, and every fenced
command block runs, in the order of its page, on the toy world's tiny CLIP and toy LLaVA.

How a block runs:
- `bash`: bash itself parses the block (variables, loops, continuation lines), with PATH empty and every command a
  shell function that only records its argv; the recorded commands then run here, in process:
  - `sae-vlm ...` through the CLI, with hub ids, layers, sizes and presets mapped to the toy world (HUB,
    PLACEHOLDERS, TOY_LAYERS, SMALLER, toy_presets);
  - a launcher (`torchrun`, `python -m torch.distributed.run`) around `sae-vlm`: the wrapped command in one process
    (tests/test_train_dist.py and tests/test_extract_resume_dist.py run the launcher itself);
  - set-up and long jobs are checked, not run: `make X` (the target exists: `make demo` takes minutes, `make test`
    is this suite), `source .venv/bin/activate` (the venv that `make` creates), `python -m MODULE` (the module has
    a `main`; the toy models' trainers and quality check take minutes);
- `python`: run in one namespace per page, with the few names a block says it assumes (`supplied`);
- `text`: an illustration (a folder layout, a printed line), not a command.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import socket
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae_vlm import config as C
from sae_vlm.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.M | re.S)
TOY = ROOT / "src" / "sae_vlm" / "toyworld" / "weights"
# Hub models -> the shipped toy models; the paper's hub repo -> a local copy written by `fake_hub`.
HUB = {"openai/clip-vit-large-patch14-336": str(TOY / "clip"), "openai/clip-vit-base-patch32": str(TOY / "clip"),
       "llava-hf/llava-1.5-7b-hf": str(TOY / "llava"), "mateuszpach/sae-for-vlm": "hub/sae-for-vlm"}
PLACEHOLDERS = {"<run>": "imagenet_l22_batchtopk_20_x8"}
# ViT-L/14's 24 layers -> the tiny CLIP's 4; layer 22 is where llava-1.5's projector reads, layer 2 the toy LLaVA's.
TOY_LAYERS = {"11": "0", "17": "1", "22": "2", "23": "3"}
# Flags set on every command of that name: hours of training and 1000-latent sweeps become a second's.
SMALLER = {"extract": {"--batch-size": "32", "--workers": "1"}, "train": {"--steps": "20", "--batch-size": "32"},
           "planted": {"--n-train": "512", "--n-eval": "256", "--steps": "20", "--seeds": "0,1"},
           "steer": {"--max-new-tokens": "3"}, "steer-score": {"--latents": "first:3", "--max-images": "2"},
           "report": {"--top": "3"}, "evaluate": {"--heatmap-latents": "4"}}
LAUNCHERS = {"torchrun", "torch.distributed.run"}


def blocks(page: str) -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in FENCE.findall((ROOT / page).read_text())]


# --- (a) the command reference is current ------------------------------------------------------------------------

def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_current_and_lists_every_option():
    ref = load_script("cli_reference")
    text = ref.render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is stale: python scripts/cli_reference.py"
    from sae_vlm.cli import COMMANDS

    for name, config_cls, _ in COMMANDS:  # every command and every option the CLI has, with its range
        section = text.split(f"## `sae-vlm {name}`\n", 1)[1].split("\n## ", 1)[0]
        for f in dataclasses.fields(config_cls):
            if f.metadata.get("cli", True):
                assert f"| `{ref.flag(f, config_cls.__annotations__[f.name])}" in section, (name, f.name)
            if f.metadata.get("within"):
                assert f"`{f.metadata['within'].text}`" in section, (name, f.name)
    assert "`--preset paper-ms`: `--model openai/clip-vit-large-patch14-336`" in text


def test_every_block_is_a_command_or_marked_as_an_illustration():
    langs = {page: [lang for lang, _ in blocks(page)] for page in PAGES}
    unmarked = {page: ls for page, ls in langs.items() if set(ls) - {"bash", "python", "text"}}
    assert not unmarked, f"fence each block as bash, python or text: {unmarked}"
    assert all(not re.search(r"^ {4}(sae-vlm|python) ", (ROOT / p).read_text(), re.M) for p in PAGES)
    assert "docs/platforms.md" in (ROOT / "README.md").read_text()
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / page).read_text()):
            if target != "docs/platforms.md" and target != "platforms.md":  # written on another branch
                assert (ROOT / page).parent.joinpath(target).exists(), f"{page} links to a missing {target}"


# --- (b) every command block runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_home(tmp_path_factory):
    """The image folders the docs name (~/imagenet/train, $INAT/train, ...), as toy-world class folders."""
    from sae_vlm.toyworld import world

    home = tmp_path_factory.mktemp("home")
    for i, (rel, n) in enumerate({"imagenet/train": 100, "imagenet/val": 48, "inat/train": 100,
                                  "my-images": 32}.items()):
        world.write_folder(world.generate(n, seed=0, start=1000 * i), home / rel)
    (home / "photos").mkdir()
    world.sample(5000).image.save(home / "photos" / "cat.jpg")  # the one photo the README inspects
    return home


def record(code: str, home: Path, log: Path) -> list[list[str]]:
    """The commands of a bash block, as bash expands them; none of them runs."""
    for old, new in {**HUB, **PLACEHOLDERS}.items():
        code = code.replace(old, new)
    shims = "".join(f"{name}() {{ printf '%s\\0' {name} \"$@\" $'\\x01' >> \"$LOG\"; }}\n"
                    for name in ("sae-vlm", "make", "python", "torchrun", "source", "pip"))
    env = {"PATH": "", "HOME": str(home), "IMAGENET": str(home / "imagenet"), "INAT": str(home / "inat"),
           "LOG": str(log)}
    done = subprocess.run(["/bin/bash", "-c", "set -eu\n" + shims + code], env=env, capture_output=True, text=True,
                          cwd=log.parent)
    assert done.returncode == 0, done.stderr
    words = log.read_text().split("\0") if log.exists() else []
    log.unlink(missing_ok=True)
    commands, current = [], []
    for w in words:
        if w == "\x01":
            commands, current = commands + [current], []
        elif w:
            current.append(w)
    return commands


def toy_layer(value: str) -> str:
    """`22`, `layer.22`, `layer.22__all`, `11,17,22,23,last` -> the tiny CLIP's layers."""
    value = re.sub(r"layer\.(\d+)", lambda m: "layer." + TOY_LAYERS.get(m.group(1), m.group(1)), value)
    return ",".join(TOY_LAYERS.get(v, v) for v in value.split(","))


def toy_args(args: list[str]) -> list[str]:
    out = []
    for i, a in enumerate(args):
        flag = args[i - 1] if i else ""
        out.append(toy_layer(a) if flag in ("--layers", "--layer", "--hook-point") or "layer." in a
                   else "cpu" if flag == "--device" else a)
    for flag, value in {**SMALLER.get(args[0], {}), **browse_port(args[0])}.items():
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


def browse_port(command: str) -> dict:
    if command != "browse":
        return {}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return {"--port": str(s.getsockname()[1])}


def toy_presets() -> dict:
    """The paper's presets on the toy world: the toy models and layers, two widths, snapshots within 20 steps."""
    out = {}
    for name, by_cls in C.PRESETS.items():
        out[name] = {}
        for cls, fields in by_cls.items():
            fields = dict(fields)
            if "model" in fields:
                fields["model"], fields["layers"] = HUB[fields["model"]], tuple(map(toy_layer, fields["layers"]))
            if cls is C.TrainConfig:
                fields |= dict(expansions=fields["expansions"][:2], decay_start=19, keep_steps=(10,), eval_step=10)
            if fields.get("group_fractions") == C.INAT_GROUPS:  # its smallest group needs 500 latents: 8 x 64
                fields["expansions"] = (8,)
            out[name][cls] = fields
    return out


def run_command(argv: list[str]) -> None:
    name, args = argv[0], argv[1:]
    if name == "sae-vlm":
        result = CliRunner().invoke(app, toy_args(args))
        assert result.exit_code == 0, f"sae-vlm {' '.join(args)}\n{result.output}"
    elif name in LAUNCHERS or args[:2] == ["-m", "torch.distributed.run"]:
        wrapped = args[args.index("sae-vlm") + 1:] if "sae-vlm" in args else args[args.index("sae_vlm.cli") + 1:]
        run_command(["sae-vlm", *wrapped])
    elif name == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M)
        assert set(args) <= set(targets), f"make {' '.join(args)}: no such target"
    elif name == "source":
        assert args == [".venv/bin/activate"], args
    elif name == "python" and args[0] == "-m":
        assert hasattr(importlib.import_module(args[1]), "main"), args
    else:
        raise AssertionError(f"no rule to check {argv}")


def supplied(code: str) -> dict:
    """The names a python block assumes, as its text says: activations, embeddings, a LLaVA and its inputs, SAEs."""
    from sae_vlm import SAE, SAEConfig

    torch.manual_seed(0)
    names: dict = {"acts": torch.randn(48, 64), "image_embeddings": torch.randn(48, 16)}
    for name in ("sae_l11", "sae_l22"):
        names[name] = SAE(SAEConfig(arch="batchtopk", d_in=64, d_sae=128, k=8))
    if "llava" in code:
        from sae_vlm.steer.generate import build_prompt, load_llava
        from sae_vlm.toyworld import world

        names["llava"], processor = load_llava(HUB["llava-hf/llava-1.5-7b-hf"], dtype="fp32")
        names["inputs"] = dict(processor(images=[world.sample(0).image], return_tensors="pt",
                                         text=[build_prompt(processor, "What colour is the object?")]))
    return {k: v for k, v in names.items() if re.search(rf"\b{k}\b", code)}


def fake_hub(work: Path) -> None:
    """The paper's hub repo, one dictionary_learning BatchTopK checkpoint in its layout (tiny CLIP width)."""
    import json

    folder = work / "hub" / "sae-for-vlm" / PLACEHOLDERS["<run>"] / "trainer_0"
    (folder / "checkpoints").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    state = {"encoder.weight": torch.randn(128, 64, generator=g) * 0.1, "encoder.bias": torch.zeros(128),
             "decoder.weight": torch.randn(64, 128, generator=g) * 0.1, "b_dec": torch.zeros(64),
             "k": torch.tensor(8), "threshold": torch.tensor(0.05)}
    torch.save(state, folder / "checkpoints" / "ae_100000.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": "BatchTopKSAE", "k": 8, "layer": 22,
                                                                "activation_dim": 64, "dict_size": 128}}))


@pytest.mark.parametrize("page", [p for p in PAGES if any(lang != "text" for lang, _ in blocks(p))])
def test_command_blocks_run_on_the_toy_world(page, toy_home, tmp_path, monkeypatch, one_thread):
    import uvicorn

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(C, "PRESETS", toy_presets())
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # browse: bind, load, announce
    fake_hub(tmp_path)
    namespace: dict = {}
    ran = 0
    for lang, code in blocks(page):
        if lang == "bash":
            for argv in record(code, toy_home, tmp_path / ".commands"):
                run_command(argv)
                ran += 1
        elif lang == "python":
            for old, new in HUB.items():
                code = code.replace(old, new)
            code = re.sub(r"layer\.(\d+)", lambda m: "layer." + TOY_LAYERS.get(m.group(1), m.group(1)), code)
            namespace = {**supplied(code), **namespace}
            exec(compile(code, f"{page} python block", "exec"), namespace)
            ran += 1
    assert ran >= sum(lang != "text" for lang, _ in blocks(page))
