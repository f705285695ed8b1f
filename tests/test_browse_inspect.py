"""The browser's /inspect: a store image or an upload, its top latents checked against the SAE's own codes of the
stored activations, the maps as `inspect_images` gives them and drawn the right way round; bad uploads refused
with HTTP 400 and one line, nothing written anywhere; and the page driven in a real headless Chromium."""

from __future__ import annotations

import base64
import dataclasses
import html
import http.client
import io
import json
import re
import tempfile

import numpy as np
import pytest
import torch
from _adversarial import tree
from PIL import Image
from test_browse import chrome, serving  # noqa: F401  (chrome: the headless Chromium fixture)
from typer.testing import CliRunner

from sae_vlm.browse.data import RunView
from sae_vlm.browse.inspector import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, Inspector, is_loopback
from sae_vlm.cli import app

SAE_NAME = "topk_x2_k4"
ROW = 3
LOCAL = ("127.0.0.1", 50000)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """40 generated 32×32 images → a tiny CLIP's CLS store (fp32, so codes compare exactly) → a top-k SAE →
    `sae-vlm evaluate`."""
    from _extract_helpers import make_images, save_tiny_clip

    root = tmp_path_factory.mktemp("inspect")
    make_images(root / "imgs", 20, classes=("cats", "dogs"), size=(32, 32))
    clip = save_tiny_clip(root / "clip")
    steps = [
        ["extract", "--model", str(clip), "--data", str(root / "imgs"), "--layers", "1", "--tokens", "cls",
         "--dtype", "fp32", "--out", str(root / "store"), "--quiet", "--workers", "1"],
        ["train", "--data", str(root / "store"), "--arch", "topk", "--width", "2", "--k", "4", "--batch-size", "40",
         "--steps", "20", "--out", str(root / "run"), "--quiet", "--device", "cpu"],
        ["evaluate", str(root / "run"), "--data", str(root / "store"), "--embedder", str(clip), "--quiet",
         "--device", "cpu"],
    ]
    for args in steps:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0, (args[0], r.output)
    return root


@pytest.fixture
def no_temp(tmp_path, monkeypatch):
    """Python's temporary folder, moved to an empty one that each test checks is still empty."""
    where = tmp_path / "tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def client(view: RunView, peer=LOCAL, **kw):
    from fastapi.testclient import TestClient

    from sae_vlm.browse.app import create_app

    return TestClient(create_app(view, inspector=Inspector(view, **({"uploads": True} | kw))), client=peer)


def latents(page: str) -> list[tuple[int, float, np.ndarray]]:
    """(latent, code, map) of each listed latent, in page order."""
    rows = re.findall(r'data-latent="(\d+)" data-code="([^"]+)">.*?data-map="([^"]*)"', page, re.S)
    return [(int(j), float(c), np.array(json.loads(html.unescape(m)))) for j, c, m in rows]


def data_images(page: str, cls: str) -> list[np.ndarray]:
    """The data: URL PNGs of one class of element (map <img> tags or the .seen background), as arrays."""
    pat = r"\.seen \{ background-image: url\(([^)]+)\)" if cls == "seen" else r'class="map" src="([^"]+)"'
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1])))) for u in re.findall(pat, page)]


def expected_top(view: RunView, row: int, top: int) -> list[tuple[int, float]]:
    """The SAE's own code of the activation extract stored for that row: positive codes, descending."""
    d = view.get(SAE_NAME)
    assert d.source is not None
    with torch.no_grad():
        codes = d.sae().encode(d.source.get(torch.tensor([row])))[0].numpy()
    order = [int(j) for j in np.argsort(-codes, kind="stable") if codes[j] > 0][:top]
    return [(j, float(codes[j])) for j in order]


def one_line(r, status: int, culprit: str) -> str:
    lines = r.text.splitlines()
    assert r.status_code == status, (r.status_code, r.text)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.text
    assert culprit in lines[0], lines[0]
    return lines[0]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_store_row_and_upload_agree_with_the_sae(built, no_temp):
    from sae_vlm.backbones import load_backbone
    from sae_vlm.eval.maps import inspect_images

    view = RunView(built / "run")
    before = tree(built)
    c = client(view)
    page = c.get("/inspect", params={"sae": SAE_NAME, "row": ROW, "top": 5})
    assert page.status_code == 200, page.text
    got = latents(page.text)
    want = expected_top(view, ROW, 5)
    assert len(got) == len(want) > 0
    assert [j for j, _, _ in got] == [j for j, _ in want]
    assert np.allclose([c_ for _, c_, _ in got], [c_ for _, c_ in want], rtol=1e-4, atol=1e-6)
    path = view.image_path(view.get(SAE_NAME), ROW)
    assert path is not None
    direct = inspect_images([path], view.get(SAE_NAME).sae(), load_backbone(str(built / "clip")), top=5)[0]
    for (j, _, m), ref in zip(got, direct["latents"]):
        assert j == ref["latent"] and m.shape == (4, 4) and np.allclose(m, ref["map"], rtol=1e-4, atol=1e-7)
    for a in page.text.split('class="latent" href="')[1:]:  # each latent links to its own page
        assert c.get(a.split('"', 1)[0]).status_code == 200
    # each drawn map has one pixel per patch, its brightest (inferno: pale yellow) at the map's peak
    drawn = data_images(page.text, "map")
    assert len(drawn) == len(got)
    for (_, _, m), rgb in zip(got, drawn):
        assert rgb.shape == (4, 4, 3) and (m >= 0).all() and m.max() > 0
        brightness = rgb.astype(int).sum(-1)
        assert m.flat[brightness.argmax()] >= 0.99 * m.max()  # at the peak, up to the colours' rounding
    # the image beside it is what the tower saw: the 32×32 store image itself (normalisation undone)
    seen = data_images(page.text, "seen")[0]
    assert np.abs(seen.astype(int) - np.asarray(Image.open(path).convert("RGB"), int)).max() <= 1
    # the same file uploaded gives the same latents, codes and maps
    up = c.post("/inspect", files={"image": (path.name, path.read_bytes(), "image/png")},
                data={"sae": SAE_NAME, "top": "5"})
    assert up.status_code == 200 and f"upload: {path.name}" in up.text
    assert [(j, c_) for j, c_, _ in latents(up.text)] == [(j, c_) for j, c_, _ in got]
    # other sizes and modes are converted as extract converts them; a wide image is seen centre-cropped
    wide = np.random.default_rng(1).integers(0, 255, (32, 64, 3), dtype=np.uint8)
    for name, img in [("wide.png", Image.fromarray(wide)), ("grey16.png", Image.fromarray(
            np.arange(40 * 24, dtype=np.uint16).reshape(40, 24) * 60)),
            ("rgba.png", Image.new("RGBA", (20, 50), (10, 200, 30, 100))), ("palette.gif", Image.new("P", (33, 33)))]:
        r = c.post("/inspect", files={"image": (name, png(img), "image/png")})
        assert r.status_code == 200 and f"upload: {name}" in r.text, (name, r.text[-300:])
        if name == "wide.png":
            assert np.abs(data_images(r.text, "seen")[0].astype(int) - wide[:, 16:48].astype(int)).max() <= 1
    assert tree(built) == before and not any(no_temp.iterdir())


def test_upload_refusals_are_one_line_and_write_nothing(built, no_temp):
    view = RunView(built / "run")
    c = client(view)
    good = (built / "imgs" / "cats" / "img_0000.png").read_bytes()
    before = tree(built)

    def upload(name, data, peer=c, **fields):
        return peer.post("/inspect", files={"image": (name, data, "image/png")}, data=fields)

    one_line(upload("junk.png", b"not an image at all"), 400, "upload 'junk.png': not an image")
    one_line(upload("cut.png", good[: len(good) // 2]), 400, "upload 'cut.png'")
    one_line(upload("empty.png", b""), 400, "empty file")
    one_line(upload("huge.bin", b"\0" * (MAX_UPLOAD_BYTES + 1)), 400, f"over the limit of {MAX_UPLOAD_BYTES} bytes")
    bomb = png(Image.new("1", (8000, 6000)))  # 48 MP in the header, a few kB on disk: refused before decoding
    assert len(bomb) < 100_000
    one_line(upload("bomb.png", bomb), 400, f"8000x6000 pixels exceeds the limit of {MAX_UPLOAD_PIXELS}")
    strip = png(Image.new("L", (MAX_UPLOAD_PIXELS // 4, 1)))  # under the decode limit, not once resized to 32 high
    one_line(upload("strip.png", strip), 400, f"a {MAX_UPLOAD_PIXELS // 4}x1 image becomes")
    one_line(upload("ok.png", good, top="0"), 400, "top='0'")
    one_line(upload("ok.png", good, top="many"), 400, "top='many'")
    one_line(upload("ok.png", good, sae="nope"), 404, "'nope'")
    one_line(upload("ok.png", good, sae="neurons__layer.1"), 404, "holds raw neurons")
    one_line(c.post("/inspect", content=good, headers={"content-type": "image/png"}), 400, "'image/png'")
    one_line(c.post("/inspect", content=b"top=3", headers={"content-type": "application/x-www-form-urlencoded"}),
             400, "expected multipart/form-data")
    one_line(c.post("/inspect", files={"picture": ("ok.png", good, "image/png")}), 400, "no file field 'image'")
    one_line(c.post("/inspect", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}), 400,
             "no parts (a missing or wrong multipart boundary?)")
    # the limits are the inspector's: a smaller one refuses a file the default takes
    small = client(view, max_bytes=len(good) - 1, max_pixels=32 * 32 - 1)
    one_line(upload("ok.png", good, peer=small), 400, f"has {len(good)} bytes, over the limit of {len(good) - 1}")
    one_line(upload("ok.png", png(Image.new("RGB", (32, 32))), peer=small), 400, "32x32 pixels exceeds")
    # uploads only on a loopback server, from a loopback client
    one_line(upload("ok.png", good, peer=client(view, uploads=False)), 403, "127.0.0.1")
    one_line(upload("ok.png", good, peer=client(view, peer=("192.168.1.9", 4000))), 403, "not from 192.168.1.9")
    assert "Uploads are off" in client(view, uploads=False).get("/inspect").text
    assert [is_loopback(h) for h in ("127.0.0.1", "127.3.0.1", "::1", "localhost", "::ffff:127.0.0.1")] == [True] * 5
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.9", "example.org", None, ""))
    # store rows: an unknown row is 404, a bad count 400
    for row in ("40", "-1", "x", "%C2%B2", "²", "1e3"):
        one_line(c.get("/inspect", params={"row": row}), 404, "no image file for that store row")
    one_line(c.get("/inspect", params={"row": "1", "top": "101"}), 400, "top='101'")
    one_line(c.get("/inspect", params={"sae": "nope"}), 404, "'nope'")
    assert tree(built) == before and not any(no_temp.iterdir())


def test_model_refusals_name_the_flag_and_both_widths(built, no_temp, tmp_path):
    from _extract_helpers import tiny_clip_config, tiny_clip_processor
    from transformers import CLIPVisionModelWithProjection

    view = RunView(built / "run")
    good = (built / "imgs" / "cats" / "img_0000.png").read_bytes()
    files = {"image": ("ok.png", good, "image/png")}
    wide = tmp_path / "wide_clip"
    CLIPVisionModelWithProjection(tiny_clip_config(hidden_size=48)).save_pretrained(wide)
    tiny_clip_processor().save_pretrained(wide)
    before = tree(built)
    one_line(client(view, model=str(wide)).post("/inspect", files=files), 400, "d_in=32")
    assert "48" in client(view, model=str(wide)).post("/inspect", files=files).text
    one_line(client(view, model=str(tmp_path / "gone")).post("/inspect", files=files), 400, str(tmp_path / "gone"))
    # an SAE that records no model, its store gone: the browser's --model flag is named
    d = view.get(SAE_NAME)
    sae = d.sae()
    sae.cfg = dataclasses.replace(sae.cfg, model_id=None)
    d.source = None
    one_line(client(view).post("/inspect", files=files), 400, "sae-vlm browse --model")
    # --model is a browse flag
    r = CliRunner().invoke(app, ["browse", "--help"])
    assert r.exit_code == 0 and "--model" in r.output
    assert tree(built) == before and not any(no_temp.iterdir())


# --- the page in a real headless Chromium -------------------------------------------------------------------------


@pytest.fixture
def server(built):
    from sae_vlm.browse.app import create_app

    view = RunView(built / "run")
    with serving(create_app(view, inspector=Inspector(view, uploads=True))) as port:
        yield port, view


MAPS_LOADED = """return Array.from(document.querySelectorAll('img.map'))
    .filter(i => i.complete && i.naturalWidth === 4 && i.naturalHeight === 4).length;"""


def shown(driver) -> list[tuple[int, float]]:
    rows = driver.find_elements("css selector", ".inspect-row")
    assert rows and driver.execute_script(MAPS_LOADED) == len(rows)
    return [(int(r.get_attribute("data-latent")), float(r.get_attribute("data-code"))) for r in rows]


def test_inspect_page_in_chromium(built, server, chrome, tmp_path):  # noqa: F811  (test_browse's fixture)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def arrives(test):  # a form's answer loads after click() returns; no bound on how long it takes
        return WebDriverWait(d, timeout=3600, poll_frequency=0.05).until(lambda _: test())

    port, view = server
    base = f"http://127.0.0.1:{port}"
    want = expected_top(view, ROW, 10)
    before = tree(built)
    d = chrome
    d.get(base + "/")
    d.find_element(By.ID, "inspect-link").click()
    arrives(lambda: d.find_elements(By.ID, "row"))
    d.find_element(By.ID, "row").send_keys(str(ROW))
    d.find_element(By.ID, "inspect-row").click()
    arrives(lambda: d.find_elements(By.ID, "inspected"))
    got = shown(d)
    assert [j for j, _ in got] == [j for j, _ in want] and np.allclose([c for _, c in got], [c for _, c in want],
                                                                       rtol=1e-4, atol=1e-6)
    d.save_screenshot(str(tmp_path / "inspect.png"))
    assert (tmp_path / "inspect.png").stat().st_size > 1000
    first = d.find_element(By.CSS_SELECTOR, "a.latent")
    first.click()
    assert arrives(lambda: d.current_url == f"{base}/sae/{SAE_NAME}/latent/{got[0][0]}")
    # an upload through the file input: the store row's own file gives the store row's latents
    d.get(base + "/inspect")
    path = view.image_path(view.get(SAE_NAME), ROW)
    d.find_element(By.ID, "image").send_keys(str(path))
    d.find_element(By.ID, "upload").click()
    assert f"upload: {path.name}" in arrives(lambda: d.find_elements(By.ID, "inspected"))[0].text
    assert shown(d) == got
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    d.get(base + "/inspect")
    d.find_element(By.ID, "image").send_keys(str(bad))
    d.find_element(By.ID, "upload").click()
    arrives(lambda: not d.find_elements(By.ID, "upload-form"))
    text = d.find_element(By.TAG_NAME, "body").text.strip()
    assert text.count("\n") == 0 and text.startswith("error: upload 'bad.png'"), text
    # a body over the limit, through the real server: a 400 with one line, not a dropped connection
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("POST", "/inspect", body=b"\0" * (MAX_UPLOAD_BYTES + 2**17),
                 headers={"Content-Type": "multipart/form-data; boundary=x"})
    r = conn.getresponse()
    assert r.status == 400 and r.read().decode().count("\n") == 0
    assert tree(built) == before
