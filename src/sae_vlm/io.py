"""Atomic file writes: one implementation, thin wrappers per format.

`atomic_write_bytes` writes to a unique hidden temporary file in the target's directory
(`.<name>.tmp<pid>.<random>`), fsyncs it and `os.replace`s it over the target, so readers see either the old
file or the complete new one, never a partial write. A killed writer leaves at most that temporary file behind
(`remove_stale_temps` clears them; `outdir.claim` runs it over the folder a command takes).
Parent directories are created as needed.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any


def atomic_write_bytes(path, data: bytes) -> None:
    """Write `data` to `path` atomically (fsync + unique temporary name in the same directory + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path) -> Any:
    """The JSON in `path`; a file that is not JSON is a ValueError naming it (a missing one stays FileNotFoundError)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_utf8(path, what: str) -> str:
    """A text file's text (a BOM, as Excel writes, dropped); bytes that are not UTF-8 are a ValueError naming `what`,
    the file and the line (a missing file stays FileNotFoundError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path} line {line}: byte {data[e.start]:#x} is not UTF-8 text; save it as "
                         "UTF-8") from None


TEMP_NAME = re.compile(r"\..+\.tmp\d+\.[0-9a-f]{8}")  # exactly the names atomic_write_bytes gives its temp files


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files a killed writer of ours left directly in `folder` (call only while owning it)."""
    if folder.is_dir():
        for p in folder.iterdir():
            if TEMP_NAME.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> None:
    # surrogateescape: a file name that is not valid UTF-8 (os.fsdecode gives surrogates) is written as its bytes
    atomic_write_bytes(path, text.encode(encoding, "surrogateescape"))


def atomic_write_json(path, obj, **json_kwargs) -> None:
    """`json.dumps(obj, **json_kwargs)` and a newline, written atomically."""
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def npy_bytes(array) -> bytes:
    """The .npy file of an array (C order, no pickles), e.g. to checksum before writing it."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def atomic_save_npy(path, array) -> None:
    atomic_write_bytes(path, npy_bytes(array))


def atomic_save_npz(path, **arrays) -> None:
    import numpy as np

    buf = io.BytesIO()
    named: dict[str, Any] = {k: np.asarray(v) for k, v in arrays.items()}
    np.savez(buf, **named)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_safetensors(path, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def atomic_save_image(path, image, format: str = "PNG") -> None:
    """A PIL image saved atomically."""
    buf = io.BytesIO()
    image.save(buf, format=format)
    atomic_write_bytes(path, buf.getvalue())


def atomic_save_figure(path, fig, **savefig_kwargs) -> None:
    """A matplotlib figure saved atomically (`savefig_kwargs` as for `fig.savefig`)."""
    buf = io.BytesIO()
    fig.savefig(buf, **savefig_kwargs)
    atomic_write_bytes(path, buf.getvalue())
