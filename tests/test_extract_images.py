"""Image sources and robust decoding: unusual valid files are kept, broken ones skipped with a reason."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
from _extract_helpers import make_images
from PIL import Image

from sae_vlm.data.images import BadImage, decode_image, load_image, open_images


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb as far as the header goes)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"\0" * 16))


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def unusual_and_bad(root):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))
    root.mkdir(parents=True, exist_ok=True)
    good = {
        "cmyk.jpg": _bytes(rgb.convert("CMYK"), "JPEG"),
        "gray.png": _bytes(rgb.convert("L"), "PNG"),
        "sixteen.png": _bytes(Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)), "PNG"),
        "palette_transparent.png": _bytes(rgb.convert("P"), "PNG", transparency=0),
        "rgba.png": _bytes(rgb.convert("RGBA"), "PNG"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 30x20 stored image displays as 20x30
    good["rotated.jpg"] = _bytes(rgb, "JPEG", exif=exif.tobytes())
    full_jpg, full_png = _bytes(rgb, "JPEG"), _bytes(rgb, "PNG")
    bad = {
        "empty.jpg": b"",
        "truncated.jpg": full_jpg[: len(full_jpg) // 2],
        "truncated.png": full_png[: len(full_png) // 2],
        "text.png": b"this is not an image\n",
        "bomb.png": _png_header_only(40000, 40000),  # past PIL's own hard limit
        "big.png": _png_header_only(10000, 10000),  # past our pixel limit, under PIL's error limit
    }
    for name, data in {**good, **bad}.items():
        (root / name).write_bytes(data)
    return good, bad


def test_unusual_kept_bad_skipped_with_reason(tmp_path):
    good, bad = unusual_and_bad(tmp_path / "imgs")
    src = open_images(tmp_path / "imgs")
    assert [r.id for r in src.records] == sorted(list(good) + list(bad))
    kept, reasons = {}, {}
    for i, r in enumerate(src.records):
        try:
            kept[r.id] = load_image(src, i)
        except BadImage as e:
            reasons[r.id] = str(e)
    assert set(kept) == set(good) and set(reasons) == set(bad)
    assert all(im.mode == "RGB" for im in kept.values())
    assert kept["rotated.jpg"].size == (20, 30)  # EXIF transpose applied
    assert np.asarray(kept["sixteen.png"]).max() > 200  # 16-bit scaled down, not clipped to white
    assert np.asarray(kept["sixteen.png"]).min() < 50
    assert "empty" in reasons["empty.jpg"] and "not an image" in reasons["text.png"]
    assert "bomb" in reasons["bomb.png"] and "too large" in reasons["big.png"]
    assert "decode" in reasons["truncated.jpg"] and "decode" in reasons["truncated.png"]
    with pytest.raises(BadImage, match="too large"):
        decode_image(good["gray.png"], max_pixels=100)


def test_folder_labels_path_list_tar_and_hf_dataset(tmp_path):
    paths = make_images(tmp_path / "tree", 3)
    src = open_images(tmp_path / "tree")
    assert [r.label for r in src.records] == ["00000_Animalia_Chordata"] * 3 + ["00001_Plantae/sub"] * 3
    assert src.records[0].id == "00000_Animalia_Chordata/img_0000.png"

    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{p}\tlab{i}\n" for i, p in enumerate(paths[:4])))
    src = open_images(lst)
    assert len(src) == 4 and src.records[2].label == "lab2"
    assert np.array_equal(np.asarray(load_image(src, 1)), np.asarray(Image.open(paths[1]).convert("RGB")))

    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i, p in enumerate(paths[:3]):
            tf.add(p, arcname=f"sample{i:03d}.png")
            data = f"{i % 2}".encode()
            ti = tarfile.TarInfo(f"sample{i:03d}.cls")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    src = open_images(tar_path)
    assert [r.id for r in src.records] == ["sample000", "sample001", "sample002"]
    assert [r.label for r in src.records] == ["0", "1", "0"]
    assert np.array_equal(np.asarray(load_image(src, 2)), np.asarray(Image.open(paths[2]).convert("RGB")))
    assert len(open_images(str(tmp_path / "shard-*.tar"))) == 3

    import datasets

    ds = datasets.Dataset.from_dict(
        {"picture": [str(p) for p in paths[:3]], "label": [0, 1, 1]},
        features=datasets.Features({"picture": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}))
    ds.save_to_disk(str(tmp_path / "hfds"))
    src = open_images(tmp_path / "hfds")
    assert len(src) == 3 and [r.label for r in src.records] == ["cat", "dog", "dog"]
    assert np.array_equal(np.asarray(load_image(src, 0)), np.asarray(Image.open(paths[0]).convert("RGB")))


def test_missing_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_images(tmp_path / "nope")
