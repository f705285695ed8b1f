"""The browser's `/inspect` view: an image's top latents and where in the image each fires (`eval.maps`), for a
store image or an uploaded one.

Uploads are a POST of multipart form data, taken only while the server listens on a loopback address and from a
loopback client. The body is read into memory, at most MAX_UPLOAD_BYTES of it kept, and the image is decoded as
extract decodes (`decode_image`) up to MAX_UPLOAD_PIXELS: nothing is written to disk, so nothing is left behind.
"""

from __future__ import annotations

import copy
import email.parser
import email.policy
import ipaddress
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from sae_vlm.browse.data import Dictionary, RunView
from sae_vlm.data.images import BadImage, decode_image
from sae_vlm.eval.inspect_page import colour, data_uri, scale_css, seen_image

if TYPE_CHECKING:
    from sae_vlm.backbones import Backbone
    from sae_vlm.sae.model import SAE

MAX_UPLOAD_BYTES = 20 * 2**20  # 20 MiB: a large photo; the processor resizes it to the model's size anyway
MAX_UPLOAD_PIXELS = 40_000_000  # 40 MP, below PIL's decompression-bomb warning (89 MP)
FORM_OVERHEAD = 64 * 2**10  # the multipart headers and small fields around the file
TOP_DEFAULT, TOP_MAX = 10, 100
PICKS = 12  # store images offered as thumbnails on the form


def is_loopback(host: str | None) -> bool:
    """127.0.0.0/8, ::1 (an IPv4-mapped one too) or the name localhost."""
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def parse_top(text: str | None) -> int:
    """The `top` field: how many latents to list, 1..TOP_MAX."""
    text = (text or "").strip() or str(TOP_DEFAULT)
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= TOP_MAX):
        raise ValueError(f"top={text[:20]!r}; expected a number of latents from 1 to {TOP_MAX}")
    return int(text)


def parse_form(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """multipart/form-data -> (text fields, files as (file name, bytes)); anything else is one ValueError."""
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise ValueError(f"Content-Type {content_type[:60]!r}; expected multipart/form-data with an image file")
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise ValueError("the form data has no parts (a missing or wrong multipart boundary?)")
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in msg.iter_parts():
        name = str(part.get_param("name", "", header="content-disposition"))
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (one_line(filename)[:120] or "the upload", data)
        else:
            fields[name] = data.decode("utf-8", "replace")
    return fields, files


def decode_upload(filename: str, data: bytes, max_bytes: int, max_pixels: int) -> Image.Image:
    """The uploaded file as an RGB image, decoded as extract decodes; a ValueError naming the file otherwise."""
    if len(data) > max_bytes:
        raise ValueError(f"upload {filename!r} has {len(data)} bytes, over the limit of {max_bytes} bytes "
                         f"({max_bytes / 2**20:g} MiB)")
    try:
        return decode_image(data, max_pixels)
    except BadImage as e:
        raise ValueError(f"upload {filename!r}: {e}") from None


async def read_upload(request, max_bytes: int, max_pixels: int) -> tuple[dict[str, str], str, Image.Image]:
    """(form fields, file name, decoded image) of an upload POST. The whole body is read so that the browser gets
    the answer, but no more than the limit (and the form's overhead) is kept in memory."""
    cap, seen, chunks = max_bytes + FORM_OVERHEAD, 0, []
    async for chunk in request.stream():
        seen += len(chunk)
        if seen <= cap:
            chunks.append(chunk)
    if seen > cap:
        raise ValueError(f"upload of {seen} bytes, over the limit of {max_bytes} bytes ({max_bytes / 2**20:g} MiB)")
    fields, files = parse_form(request.headers.get("content-type", ""), b"".join(chunks))
    if "image" not in files:
        raise ValueError("the form has no file field 'image'; expected an image file to inspect")
    filename, data = files["image"]
    return fields, filename, decode_upload(filename, data, max_bytes, max_pixels)


def heatmap(map_RC) -> dict:
    """A map as a PNG with one pixel per patch (the page scales it up without smoothing) and its colour scale,
    inferno over 0..max: both kinds of map (codes, |gradient × input|) are non-negative."""
    m = np.nan_to_num(np.asarray(map_RC, np.float64))
    hi = float(m.max()) if m.size else 0.0
    return {"map": data_uri(Image.fromarray(colour(m), "RGB")), "lo": 0.0, "hi": hi, "scale": scale_css(),
            "grid": f"{m.shape[0]}×{m.shape[1]}"}


def check_resized(bb: Backbone, image: Image.Image, max_pixels: int) -> None:
    """Refuse an image that the processor's resize (shorter side to the model's input size) would blow up past
    the pixel limit: a 1×40,000,000 strip passes the decode limit but not this one."""
    vcfg = getattr(bb.model.config, "vision_config", bb.model.config)
    size = getattr(vcfg, "image_size", 224)
    side = min(size) if isinstance(size, (tuple, list)) else int(size)
    w, h = image.size
    resized = w * h * (side / min(w, h)) ** 2
    if resized > max_pixels:
        raise ValueError(f"a {w}x{h} image becomes {resized:.0f} pixels once its shorter side is resized to {side}, "
                         f"over the limit of {max_pixels}; crop it to a less extreme aspect ratio")


class Inspector:
    """Runs `inspect_images` for the browser. The backbone is `--model`, else the model the SAE (or its store)
    records; it loads on first use, one per model, and one lock serialises requests (a model with hooks in it
    serves one at a time). `uploads`: the server listens on a loopback address."""

    def __init__(self, view: RunView, model: str | None = None, device: str = "cpu", uploads: bool = False,
                 max_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_UPLOAD_PIXELS):
        self.view, self.model, self.device, self.uploads = view, model, device, uploads
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self._backbones: dict[str, Backbone] = {}
        self._saes: dict[str, SAE] = {}  # a copy per dictionary on the backbone's device, when not the CPU
        self._lock = threading.Lock()

    def saes(self) -> list[str]:
        return [name for name, d in self.view.dicts.items() if d.kind == "sae"]

    def model_for(self, d: Dictionary) -> str:
        if self.model:
            return self.model
        meta = d.source.meta if d.source is not None else None
        recorded = d.sae().cfg.model_id or (meta.manifest.get("model_id") if meta is not None else None)
        if not recorded:
            raise ValueError(f"SAE {d.name} records no backbone model, nor does its store; "
                             "start the browser with `sae-vlm browse --model ID|DIR`")
        return str(recorded)

    def backbone(self, d: Dictionary) -> Backbone:
        from sae_vlm.backbones import load_backbone
        from sae_vlm.device import resolve_device

        model = self.model_for(d)
        if model not in self._backbones:
            self._backbones[model] = load_backbone(model, device=resolve_device(self.device), dtype="fp32")
        return self._backbones[model]

    def sae_for(self, d: Dictionary, device: torch.device) -> SAE:
        if device.type == "cpu":
            return d.sae()
        if d.name not in self._saes:
            self._saes[d.name] = copy.deepcopy(d.sae()).to(device)
        return self._saes[d.name]

    def run(self, d: Dictionary, image: Image.Image, top: int) -> dict:
        """{"seen": the image as the model saw it (data URL), "latents": [{j, code, cells: the map, and
        the map drawn (`heatmap`)}], by code, descending}."""
        from sae_vlm.eval.maps import inspect_images

        if d.kind != "sae":
            raise ValueError(f"{d.name} holds raw neurons; inspect needs an SAE")
        with self._lock:
            bb = self.backbone(d)
            check_resized(bb, image, self.max_pixels)
            sae = self.sae_for(d, next(bb.model.parameters()).device)
            found = inspect_images([image], sae, bb, top=top)[0]["latents"]
            seen = data_uri(seen_image(bb, bb.preprocess([image])[0]))
        return {"seen": seen, "latents": [{"j": int(x["latent"]), "code": float(x["code"]), "cells": x["map"],
                                           **heatmap(x["map"])} for x in found]}

    def picks(self, d: Dictionary) -> list[int]:
        """Store rows of the first few images with a file, one row per image, for the form's thumbnails."""
        if d.source is None or d.source.meta is None:
            return []
        per = d.source.meta.rows_per_image
        rows = range(0, min(d.source.rows, PICKS * per), per)
        return [r for r in rows if self.view.image_path(d, r) is not None]


def inspect_context(inspector: Inspector, d: Dictionary, links, top: int, result: dict | None = None,
                    row: int | None = None, label: str | None = None) -> dict:
    """The /inspect page: the two forms, and for an inspected image its top latents, each with its MS, the
    taxonomy nodes it detects best, its map and a link to its page."""
    ms = d.arrays.get("ms")
    latents = [x | {"link": links.latent(d.name, x["j"]), "ms": ms[x["j"]] if ms is not None else None,
                    "detects": d.detects.get(x["j"], [])[:2]} for x in (result or {}).get("latents", [])]
    picks = [(r, links.img(d.name, r, inspector.view.image_path(d, r))) for r in inspector.picks(d)]
    return {"links": links, "title": f"inspect · {label}" if label else "inspect an image", "names": inspector.saes(),
            "sae": d.name, "top": top, "top_max": TOP_MAX, "row": row, "label": label, "result": result,
            "latents": latents, "picks": picks, "rows": d.source.rows if d.source is not None else None,
            "uploads": inspector.uploads, "max_mib": inspector.max_bytes / 2**20,
            "max_mp": inspector.max_pixels / 1e6}
