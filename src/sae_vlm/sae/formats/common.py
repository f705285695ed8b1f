"""What every format reader shares: the parts it returns, the user's hints, and safe, well-named file reading."""

from __future__ import annotations

import dataclasses
import functools
import io
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_vlm.io import read_json as io_read_json


@dataclasses.dataclass
class Parts:
    """One library's SAE in our layout, and how its encoder uses the parameters."""

    arch: str  # ours: relu | topk | batchtopk | matryoshka | jumprelu
    W_enc_DF: torch.Tensor
    b_enc_F: torch.Tensor
    W_dec_FD: torch.Tensor
    b_dec_D: torch.Tensor
    k: int | None = None
    threshold: torch.Tensor | None = None  # a scalar, or one per latent
    group_sizes: tuple[int, ...] | None = None
    subtracts_b_dec: bool = True  # the library encodes x − b_dec (False: it encodes x)
    hook_point: str | None = None
    model_id: str | None = None
    source: dict = dataclasses.field(default_factory=dict)  # format, path, the library's own config
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should know about the conversion


@dataclasses.dataclass(frozen=True)
class Hints:
    """What some checkpoints do not record, given by the user."""

    arch: str | None = None  # overcomplete: the SAE class (relu, topk, batchtopk); dictionary_learning w/o config.json
    k: int | None = None  # overcomplete TopKSAE
    threshold: float | None = None  # overcomplete BatchTopKSAE: its running_threshold
    input_mean: str | None = None  # .npy/.pt of the mean the library's data loader subtracted (saev)
    input_scale: float | None = None  # the factor it multiplied inputs by after that
    hook_point: str | None = None
    model_id: str | None = None

    def input_mean_D(self, d_in: int) -> torch.Tensor | None:
        if self.input_mean is None:
            return None
        path = Path(self.input_mean)
        try:  # a .npy, or a tensor saved with torch.save (read weights-only)
            mean = (torch.from_numpy(np.load(path)) if path.suffix == ".npy"
                    else torch.load(path, map_location="cpu", weights_only=True))
        except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
            raise ValueError(f"--input-mean {path}: {str(e).splitlines()[0]}") from None
        if isinstance(mean, dict) and len(mean) == 1:
            mean = next(iter(mean.values()))
        if not isinstance(mean, torch.Tensor) or mean.numel() != d_in:
            raise ValueError(f"--input-mean {path}: expected {d_in} values (one per input dimension)")
        return mean.reshape(d_in).to(torch.float64)


def unsupported(what: str) -> ValueError:
    return ValueError(f"{what} has no equivalent in sae-vlm, which holds ReLU, TopK, BatchTopK, Matryoshka "
                      "BatchTopK and JumpReLU SAEs with a linear encoder and decoder; it cannot be converted")


def load_state(path: Path, library: str, resave: str | None = None, data: bytes | None = None) -> dict:
    """A torch checkpoint (the file, or `data` read from it), loaded with weights_only=True: anything needing
    arbitrary unpickling is refused, with how to re-save it in the library that wrote it."""
    if data is None and not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(io.BytesIO(data) if data is not None else path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        how = f" Re-save its tensors in {library}: {resave}" if resave else " Re-save it as a plain state dict."
        raise ValueError(f"{path} holds {what}, which sae-vlm never unpickles (it loads tensors only).{how}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict (names → tensors)")
    return state


def checkpoint_keys(path: Path) -> frozenset[str] | None:
    """The top-level names in a torch checkpoint (None: unreadable, or not weights-only); detection asks each
    format in turn, so one read serves them all."""
    st = path.stat()
    return _checkpoint_keys(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _checkpoint_keys(path: str, size: int, mtime_ns: int) -> frozenset[str] | None:
    try:
        return frozenset(map(str, torch.load(path, map_location="cpu", weights_only=True, mmap=True)))
    except Exception:  # unreadable or unsafe: the reader names the problem
        return None


def starts_with_json(path: Path) -> bool:
    """saev's files begin with a JSON line; torch's zip checkpoints never do."""
    with open(path, "rb") as f:
        return f.read(1) == b"{"


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


def read_json(path: Path) -> dict:
    """A library's JSON config: io.read_json, which must find an object."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing")
    data = io_read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, expected an object")
    return data


def tensor(state: dict, key: str, path: Path, shape: tuple[int | None, ...] | None = None) -> torch.Tensor:
    """state[key] as float, checked against `shape` (None: any size); a missing or misshapen tensor is named."""
    t = state.get(key)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{path} has no tensor {key!r}; it holds {', '.join(sorted(map(str, state))[:12])}")
    if shape is not None and (t.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape))):
        want = "×".join("?" if s is None else str(s) for s in shape) or "a scalar"
        raise ValueError(f"{path}: {key!r} has shape {tuple(t.shape)}, expected {want}")
    bad = int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0
    if bad:  # converted, they would reach every code and reconstruction
        raise ValueError(f"{path}: {key} has {bad} non-finite values (NaN or inf); expected finite weights")
    return t.float()


def field(cfg: dict, key: str, path: Path, kind: type = int):
    """cfg[key] of type `kind` (bools are not ints); a missing or wrong-typed field is named."""
    value = cfg.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{path}: field {key!r} is {value!r}, expected {kind.__name__}")
    return value
