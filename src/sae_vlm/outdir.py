"""Output folders a command owns, and one writer at a time in each.

A command writes only into a folder that is new, empty, or marked as holding its own kind of output
(`.sae-vlm-owner.json`); anything else is refused with one line naming the folder, and nothing in it is touched.
While it writes, it holds an exclusive flock on `.sae-vlm.lock` in that folder, which the kernel releases when the
process ends however it ends; a second run on the same folder is refused with the PID of the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from sae_vlm.io import TEMP_NAME, atomic_write_json, remove_stale_temps

OWNER, LOCK = ".sae-vlm-owner.json", ".sae-vlm.lock"
# Folders written before markers existed, recognised by paths only that kind writes (all of them present).
LEGACY = {"extract": ("extract_config.json",), "train": ("train_config.json",), "evaluate": ("metrics.json", "latents"),
          "report": ("index.html", "s"), "demo": ("images/eval/toyworld.jsonl",)}
KINDS = ("extract", "train", "evaluate", "report", "convert", "demo", "planted")


def owner(out: Path) -> str | None:
    """The kind of output `out` holds by its marker, None when it has none (or an unreadable one)."""
    try:
        kind = json.loads((out / OWNER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def check_owned(out: Path, kind: str) -> None:
    """Refuse `out` unless it is new, empty, or holds this kind of output."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"output folder {out} is a file; choose a folder")
    held = owner(out)
    if held == kind or (held is None and kind in LEGACY and all((out / p).exists() for p in LEGACY[kind])):
        return
    # a run killed before its marker landed leaves only the lock and our temp file: still empty
    entries = [p.name for p in out.iterdir() if p.name != LOCK and not TEMP_NAME.fullmatch(p.name)]
    if not entries:
        return
    what = f"sae-vlm {held} output" if held else f"{len(entries)} files that sae-vlm did not write ({entries[0]}, …)"
    raise ValueError(f"output folder {out} holds {what}; {kind} writes only into a new or empty folder or one "
                     f"holding its own earlier output: choose another folder")


@contextlib.contextmanager
def claim(out: str | Path, kind: str, lead: bool = True) -> Iterator[Path]:
    """Own `out` for this kind and hold its lock for the block; `lead=False` (other ranks of a torchrun job,
    whose rank 0 holds it for them) only yields the path."""
    assert kind in KINDS, kind
    out = Path(out)
    if not lead:
        yield out
        return
    check_owned(out, kind)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(f"output folder {out} is in use by another sae-vlm run (PID {pid}); wait for it to "
                             "finish or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        check_owned(out, kind)  # another run may have claimed it between the first check and the lock
        if owner(out) != kind:
            atomic_write_json(out / OWNER, {"kind": kind, "tool": "sae-vlm"})
        _remove_killed_runs_temps(out)
        yield out
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {OWNER, LOCK}:  # failed before writing: leave no trace
            for name in (OWNER, LOCK):
                (out / name).unlink(missing_ok=True)
            out.rmdir()
        raise
    finally:
        os.close(fd)  # releases the flock


def _remove_killed_runs_temps(out: Path) -> None:
    """Our temp-file names, anywhere in the folder we now own, except in nested folders with a claim of their own
    (another run may hold those)."""
    for folder, subdirs, _ in os.walk(out):
        subdirs[:] = [d for d in subdirs if not os.path.exists(os.path.join(folder, d, OWNER))]
        remove_stale_temps(Path(folder))


def check_result_file(path: str | Path, keys: tuple[str, ...], what: str) -> None:
    """An output *file* (steer's JSON) may replace only an earlier result of the same command: a JSON object
    with `keys`. Anything else at that path is refused, naming it."""
    path = Path(path)
    if not path.exists():
        return
    try:
        ok = path.is_file() and all(k in json.loads(path.read_text()) for k in keys)
    except (OSError, ValueError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"--out {path} exists and is not an earlier {what} result; choose another file")
