"""Which activations an SAE reads: its (hook point, token selection) from its config, and that source in a store."""

from __future__ import annotations

from pathlib import Path

from sae_vlm.data.store import as_source
from sae_vlm.io import read_json


def open_data(data, hook_point: str | None, token_selection: str | None):
    """The activation source an SAE reads: a store subdir picked by hook point (and tokens), or a .npy/tensor."""
    if not (isinstance(data, (str, Path)) and Path(data).is_dir()):
        return as_source(data)
    tries = [f"{hook_point}__{token_selection}", hook_point] if hook_point else [None]
    err: Exception | None = None
    for layer in tries:
        try:
            return as_source(data, layer=layer)
        except (ValueError, FileNotFoundError) as e:
            err = e
    assert err is not None
    raise err


def sae_config(sdir: Path) -> dict:
    """An SAE's config.json as a dict, read before its weights are loaded."""
    raw = read_json(sdir / "config.json")
    if not isinstance(raw, dict):
        raise ValueError(f"{sdir / 'config.json'} holds a JSON {type(raw).__name__}, not an SAE config")
    return raw


def source_key(sdir: Path, raw: dict | None = None) -> tuple:
    """The (hook point, token selection) an SAE reads, from its config.json (or `raw`, that file already read)."""
    raw = sae_config(sdir) if raw is None else raw
    return raw.get("hook_point"), raw.get("token_selection")
