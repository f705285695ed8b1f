"""The feature browser: server-side table queries, the HTTP routes and their safety, and the web app and the
static report driven in a real headless Chromium (skipped only when /usr/bin/chromium is missing)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sae_vlm.browse.data import Dictionary, RunView, TableQuery
from sae_vlm.cli import app

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SAE_NAME = "matryoshka_x2_k4"


@pytest.fixture(scope="module")
def built_run(tmp_path_factory):
    """200 generated images → tiny CLIP store → a few-step Matryoshka SAE → `sae-vlm evaluate` (enough images that
    some latents fire on all 16 top-image slots once θ gates them)."""
    from _extract_helpers import make_images, save_tiny_clip

    root = tmp_path_factory.mktemp("browse")
    make_images(root / "imgs", 100, classes=("cats", "dogs"), size=(32, 32))
    clip = save_tiny_clip(root / "clip")
    run = CliRunner()
    steps = [
        ["extract", "--model", str(clip), "--data", str(root / "imgs"), "--layers", "1", "--tokens", "cls",
         "--out", str(root / "store"), "--quiet", "--workers", "1"],
        ["train", "--data", str(root / "store"), "--arch", "matryoshka", "--width", "2", "--k", "4",
         "--batch-size", "200", "--steps", "20", "--out", str(root / "run"), "--quiet", "--device", "cpu"],
        ["evaluate", str(root / "run"), "--data", str(root / "store"), "--embedder", str(clip), "--quiet",
         "--device", "cpu"],
    ]
    for args in steps:
        r = run.invoke(app, args)
        assert r.exit_code == 0, (args[0], r.output)
    return root


def _dictionary(n: int, seed: int = 0) -> Dictionary:
    rng = np.random.default_rng(seed)
    ms = rng.random(n)
    ms[rng.random(n) < 0.1] = np.nan
    support = rng.integers(0, 50, n).astype(np.float64)
    arrays = {"ms": ms, "support": support, "freq": support / 100, "max_act": rng.random(n) * 10}
    level = np.searchsorted(np.cumsum([n // 8, n // 8, 3 * n // 4]), np.arange(n), side="right")
    # top-16 values: positive on min(support, 16) slots, so support 1..15 is rare and support 0 is dead
    top_val = np.where(np.arange(16) < np.minimum(support, 16)[:, None], 1.0, 0.0)
    return Dictionary("big", "sae", "layer.1", n, arrays, level, None, top_val)


def test_table_query_65536_latents():
    d = _dictionary(65536)
    q = TableQuery.parse({"sort": "ms", "order": "desc", "show": "common", "level": "1", "ms_min": "0.2",
                          "freq_max": "0.4", "per": "100", "page": "3"})
    ids = d.select(q)
    a = d.arrays
    ref = [j for j in range(d.n)
           if a["support"][j] >= 16 and d.level[j] == 1 and a["ms"][j] >= 0.2 and a["freq"][j] <= 0.4]
    assert sorted(ids.tolist()) == ref
    assert np.all(np.diff(a["ms"][ids]) <= 0)
    # NaN latents go last in either order
    all_asc = d.select(TableQuery.parse({"sort": "ms", "order": "asc"}))
    nan = np.isnan(a["ms"][all_asc])
    assert nan.any() and not nan[: (~nan).sum()].any() and np.all(np.diff(a["ms"][all_asc][~nan]) >= 0)
    # one meaning of dead (never positive, as evaluate counts it); rare (< 16 images) includes it
    by = {show: d.select(TableQuery.parse({"show": show, "sort": "id", "order": "asc"})).tolist()
          for show in ("dead", "rare", "common", "all")}
    assert by["dead"] == np.flatnonzero(a["support"] == 0).tolist()
    assert by["rare"] == np.flatnonzero(a["support"] < 16).tolist() and set(by["dead"]) < set(by["rare"])
    assert sorted(by["rare"] + by["common"]) == by["all"] == list(range(d.n))
    for bad, msg in [({"sort": "nope"}, "sort='nope'"), ({"ms_min": "x"}, "ms_min='x' is not a number"),
                     ({"show": "maybe"}, "show='maybe'")]:
        with pytest.raises(ValueError, match=msg):
            TableQuery.parse(bad)


def test_routes_and_safety(built_run):
    from fastapi.testclient import TestClient

    from sae_vlm.browse.app import create_app

    view = RunView(built_run / "run")
    assert set(view.dicts) == {SAE_NAME, "neurons__layer.1"}
    c = TestClient(create_app(view))
    assert c.get("/").status_code == 200
    # one count of dead latents: evaluate's (never positive on the evaluation rows) is the browser's and the page's
    m = json.loads((built_run / "run" / "eval" / "metrics.json").read_text())
    rec = next(r for r in m["saes"] if r["name"] == SAE_NAME)["recon"]
    sae_view = view.get(SAE_NAME)
    assert rec["dead"] == int(sae_view.dead.sum()) == round(rec["dead_frac"] * sae_view.n)
    assert rec["dead"] < int(sae_view.rare.sum())  # rare: the paper's < 16 images, dead included
    assert f"{rec['dead']} dead, {int(sae_view.rare.sum())} rare" in c.get(f"/sae/{SAE_NAME}").text
    page = c.get(f"/sae/{SAE_NAME}", params={"sort": "ms", "order": "desc", "level": "1", "show": "common", "per": "5"})
    assert page.status_code == 200 and "latents match" in page.text
    lat = c.get(f"/sae/{SAE_NAME}/latent/9")
    assert (lat.status_code == 200 and 'id="nearest"' in lat.text and "Matryoshka level" in lat.text
            and "<svg" in lat.text)
    fired = int((view.dicts[SAE_NAME].top_val[9] > 0).sum())
    assert 0 < fired < 16 and lat.text.count('class="top"') == fired  # only images on which the latent fired
    assert c.get("/sae/neurons__layer.1/latent/0").text.count('class="top"') == 16  # raw-neuron baseline
    for url in (f"/sae/{SAE_NAME}/latent/64", f"/sae/{SAE_NAME}/latent/-1", f"/sae/{SAE_NAME}/latent/x", "/sae/nope",
                f"/img/{SAE_NAME}/200", f"/sae/{SAE_NAME}/latent/%C2%B2", f"/img/{SAE_NAME}/%C2%B2"):  # '²'.isdigit()
        assert c.get(url).status_code == 404, url
    assert c.get(f"/sae/{SAE_NAME}", params={"sort": "bogus"}).status_code == 400
    assert c.get("/files/eval/plots/fve_vs_width.png").content[:4] == b"\x89PNG"
    for url in ("/files/eval/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/files/run/..%2f..%2f..%2fetc%2fpasswd",
                "/files/eval/plots/%2e%2e/%2e%2e/saes/x", "/files/run/%2fetc%2fpasswd", "/static/..%2fapp.py"):
        r = c.get(url)
        assert r.status_code in (403, 404) and b"root:" not in r.content, url
    # a bad eval dir is a one-line CLI error
    r = CliRunner().invoke(app, ["report", str(built_run / "run"), "--eval", str(built_run / "none"), "--out",
                                 str(built_run / "x")])
    assert r.exit_code == 2 and "metrics.json is missing" in r.output
    r = CliRunner().invoke(app, ["browse", str(built_run / "run"), "--data", str(built_run / "gone")])
    assert r.exit_code == 2 and "activation store" in r.output and "gone does not exist" in r.output
    # a store that moved away: the pages still render, without images
    bare = RunView(built_run / "run")
    bare.data, bare.notes = None, ["gone"]
    for dd in bare.dicts.values():
        dd.source = None
    c2 = TestClient(create_app(bare))
    assert "gone" in c2.get("/").text and 'class="missing"' in c2.get(f"/sae/{SAE_NAME}/latent/1").text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app):
    """`app` served by uvicorn on a free loopback port from a thread, for the block; yields the port."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:  # no wall-clock bound: the thread fails loudly if it cannot bind
        assert t.is_alive(), "the browse server thread died"
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        t.join()


@pytest.fixture
def server(built_run):
    from sae_vlm.browse.app import create_app

    with serving(create_app(RunView(built_run / "run"))) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture
def chrome(tmp_path):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip("browser test needs Debian chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1200,1000",
                 f"--user-data-dir={tmp_path / 'chrome-profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    yield driver
    driver.quit()


LOADED_IMAGES = """return Array.from(document.querySelectorAll('img.top'))
    .filter(i => i.complete && i.naturalWidth > 0).length;"""


def _first_latent_by_ms(driver) -> int:
    """Click the first visible latent of the table (rare ones are hidden by default)."""
    link = next(a for a in driver.find_elements("css selector", "#latents tbody tr td:first-child a")
                if a.is_displayed())
    j = int(link.text)
    link.click()
    return j


def _all_top_images_loaded(driver) -> bool:
    n = len(driver.find_elements("css selector", "img.top"))
    return 0 < n <= 16 and driver.execute_script(LOADED_IMAGES) == n


def test_browser_server_and_static_report(built_run, server, chrome, tmp_path):
    from selenium.webdriver.common.by import By

    d = chrome
    d.get(f"{server}/sae/{SAE_NAME}?sort=id&order=asc&show=all")
    d.find_element(By.ID, "sort-ms").click()  # a different column starts descending
    assert "sort=ms" in d.current_url and "order=desc" in d.current_url and "show=all" in d.current_url
    ms = json.loads(d.execute_script(
        "return JSON.stringify(Array.from(document.querySelectorAll('#latents tbody tr'))"
        ".map(r => parseFloat(r.cells[2].dataset.v)).filter(v => !isNaN(v)))"))
    assert len(ms) > 1 and ms == sorted(ms, reverse=True)
    d.get(f"{server}/sae/{SAE_NAME}?sort=ms&order=desc")  # by default only latents positive on 16+ images
    assert len(d.find_elements(By.CSS_SELECTOR, "#latents tbody tr")) < len(ms)
    j = _first_latent_by_ms(d)
    assert d.current_url.endswith(f"/sae/{SAE_NAME}/latent/{j}")
    assert _all_top_images_loaded(d)
    assert d.find_element(By.CSS_SELECTOR, "svg.hist") and d.find_elements(By.CSS_SELECTOR, "#nearest a")
    shot = tmp_path / "latent.png"
    d.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000
    nav = "next" if d.find_elements(By.ID, "next") else "prev"  # neighbours by id
    d.find_element(By.ID, nav).click()
    assert d.current_url.endswith(f"/latent/{j + 1 if nav == 'next' else j - 1}")

    # path traversal: a refusal status over plain HTTP, and no file content in the browser
    for path in ("/files/../../../etc/passwd", "/files/eval/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                 "/files/run/..%2F..%2F..%2F..%2Fetc%2Fpasswd"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server + path)
        assert err.value.code in (403, 404), path
        d.get(server + path)
        assert "root:" not in d.page_source

    # the static report, opened from file:// with no server
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", str(built_run / "run"), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    d.get((out / "index.html").as_uri())
    d.find_element(By.LINK_TEXT, SAE_NAME).click()
    assert d.current_url.endswith(f"s/{SAE_NAME}.html")
    rows = d.find_elements(By.CSS_SELECTOR, "#latents tbody tr")
    shown = sum(r.is_displayed() for r in rows)
    d.find_element(By.ID, "show-rare").click()  # the toggle shows the hidden rare latents
    assert shown < sum(r.is_displayed() for r in rows) == len(rows)
    d.find_element(By.ID, "show-rare").click()
    k = _first_latent_by_ms(d)
    assert k == j and d.current_url.startswith("file://")
    assert _all_top_images_loaded(d)
    d.save_screenshot(str(tmp_path / "static.png"))
    assert (tmp_path / "static.png").stat().st_size > 1000


def test_text_search_and_steering(built_run):
    """--clip ranks latents by text↔top-image-mean cosine; --llava shows unsteered and clamped text."""
    from _steer_helpers import save_tiny_clip_model, save_tiny_llava
    from fastapi.testclient import TestClient
    from PIL import Image

    from sae_vlm.browse.app import create_app
    from sae_vlm.browse.tools import Steerer, TextSearch
    from sae_vlm.steer.generate import Case, generate_cases, load_llava, open_image
    from sae_vlm.steer.score import ClipEmbedder

    clip, llava = save_tiny_clip_model(built_run / "fullclip"), save_tiny_llava(built_run / "llava")
    view = RunView(built_run / "run")
    search, steerer = TextSearch(view, str(clip)), Steerer(view, str(llava), max_new_tokens=8)
    c = TestClient(create_app(view, search, steerer))
    page = c.get("/search", params={"q": "red car", "sae": SAE_NAME})
    assert page.status_code == 200 and 'id="hits"' in page.text
    hits = search.search(view.get(SAE_NAME), "red car")
    assert hits and [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    j, score = hits[0]
    d = view.get(SAE_NAME)
    emb = ClipEmbedder.load(str(clip))
    imgs = [Image.open(view.image_path(d, int(r))).convert("RGB") for r in d.top_idx[j]]
    concept, text = emb.images(imgs).mean(0), emb.texts(["red car"])[0]
    ref = concept @ text / np.linalg.norm(concept) / np.linalg.norm(text)
    assert score == pytest.approx(float(ref), abs=1e-4)
    assert c.get("/search", params={"q": "x", "sae": "nope"}).status_code == 404
    # an SAE on the pooled, projected embedding ("last"): ranked by decoder direction, no images needed
    from sae_vlm import SAE, SAEConfig

    last = SAE(SAEConfig(arch="topk", d_in=16, d_sae=24, k=2, hook_point="last"))
    last.save_pretrained(built_run / "last_sae")
    dl = Dictionary("last", "sae", "last", 24, {"ms": np.zeros(24)}, np.zeros(24, np.int64), None, None,
                    built_run / "last_sae")
    assert search.method(dl) == "decoder"
    hits = search.search(dl, "red car", count=24)
    w = last.W_dec.detach().numpy()
    ref = w @ text / np.linalg.norm(w, axis=1) / np.linalg.norm(text)
    assert [j for j, _ in hits] == np.argsort(-ref, kind="stable").tolist()

    prompt = "what is shown in this image ?"
    r = c.get(f"/sae/{SAE_NAME}/steer", params={"j": j, "alpha": 50, "prompt": prompt, "image": "white", "go": 1})
    assert r.status_code == 200 and 'id="steered"' in r.text
    plain, steered = steerer.run(d, j, 50.0, prompt, "white")
    model, proc = load_llava(str(llava))
    assert plain == generate_cases(model, proc, d.sae(), [Case(open_image("white"), prompt, None)], max_new_tokens=8)[0]
    assert steered != plain
    assert c.get(f"/sae/{SAE_NAME}/steer", params={"j": j, "image": "../etc/passwd", "go": 1}).status_code == 400
    assert c.get("/sae/neurons__layer.1/steer", params={"j": 0}).status_code == 404
    assert 'id="steer"' in c.get(f"/sae/{SAE_NAME}/latent/{j}").text
