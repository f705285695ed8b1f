"""Output folders a command owns, and one writer at a time in each.

A command writes only into a folder that is new, empty, or marked as holding its own kind of output
(`.sae-vlm-owner.json`); anything else is refused with one line naming the folder, and nothing in it is touched.
While it writes, it holds an exclusive flock on `.sae-vlm.lock` in that folder, which the kernel releases when the
process ends however it ends; a second run on the same folder is refused with the PID of the first.

Without fcntl (Windows) the lock is the file itself, created exclusively with the PID in it and removed at the end.
A process killed there leaves it behind, and we do not probe whether that PID still lives (on Windows `os.kill`
would end it): the next run is refused with the PID and the file to remove once that process is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from sae_vlm.io import TEMP_NAME, atomic_write_json, remove_stale_temps

OWNER, LOCK = ".sae-vlm-owner.json", ".sae-vlm.lock"
# Folders written before markers existed, recognised by paths only that kind writes (all of them present).
LEGACY = {"extract": ("extract_config.json",), "train": ("train_config.json",), "evaluate": ("metrics.json", "latents"),
          "report": ("index.html", "s"), "demo": ("images/eval/toyworld.jsonl",)}
KINDS = ("extract", "train", "evaluate", "report", "convert", "demo", "planted", "inspect")


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
    with _locked(out):
        try:
            check_owned(out, kind)  # another run may have claimed it between the first check and the lock
            if owner(out) != kind:
                atomic_write_json(out / OWNER, {"kind": kind, "tool": "sae-vlm"})
            _remove_killed_runs_temps(out)
            yield out
        except BaseException:
            if created and {p.name for p in out.iterdir()} <= {OWNER, LOCK}:  # failed before writing: leave no trace
                (out / OWNER).unlink(missing_ok=True)
                _release_lock_file(out)
                out.rmdir()
            raise


def _in_use(out: Path, pid: str) -> ValueError:
    return ValueError(f"output folder {out} is in use by another sae-vlm run (PID {pid or 'unknown'}); wait for it "
                      "to finish or choose another folder")


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold `out`'s lock for the block: a flock where fcntl exists, else the lock file itself."""
    if fcntl is None:
        with _lock_file(out):
            yield
        return
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(out, os.pread(fd, 32, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock (a cleanup may have unlinked the file already: that is fine on POSIX)


@contextlib.contextmanager
def _lock_file(out: Path) -> Iterator[None]:
    """The lock where there is no flock: `.sae-vlm.lock` created exclusively, holding our PID, removed after."""
    try:
        fd = os.open(out / LOCK, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    except FileExistsError:
        pid = _lock_pid(out) or "unknown"
        raise ValueError(f"output folder {out} is in use by another sae-vlm run (PID {pid}) or was left locked by "
                         f"one that was killed: if process {pid} is gone, remove {out / LOCK}; else wait for it "
                         "or choose another folder") from None
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)  # the file's existence is the lock: closed, it can be removed on Windows too
    try:
        yield
    finally:
        _release_lock_file(out)


def _lock_pid(out: Path) -> str:
    try:
        return (out / LOCK).read_text(errors="replace").strip()[:32]
    except OSError:
        return ""


def _release_lock_file(out: Path) -> None:
    """Remove the lock file when it is ours; with a flock held, the file is left (its fd still holds the lock)."""
    if fcntl is None and _lock_pid(out) != str(os.getpid()):
        return
    (out / LOCK).unlink(missing_ok=True)


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
