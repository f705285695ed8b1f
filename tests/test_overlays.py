"""Patch heatmaps of token SAEs: `evaluate` keeps each latent's code on every patch of its top images (checked
against an independent encoding of the store's rows), sparse and bounded; the browser and the static report overlay
them with a colour scale and a toggle (in a real headless Chromium), and leave CLS SAEs' pages as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _adversarial import refused
from test_browse import chrome as chromium
from test_browse import serving
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.browse.data import RunView
from sae_vlm.cli import app
from sae_vlm.data.store import open_store
from sae_vlm.eval.top import MAP_PATCHES, ImageTopMaps, PatchGrid

chrome = chromium  # the browser tests' headless Chromium fixture (skips where Chromium is missing)

TOKENS = 17  # the tiny CLIP: CLS + a 4 x 4 patch grid
SAES = {"all": "topk_all", "random-3": "topk_random", "cls": "topk_cls"}


@pytest.fixture(scope="module")
def token_run(tmp_path_factory, one_thread):
    """24 images → one tiny-CLIP store with cls, all and random-3 rows at layer 1 → a run of three TopK SAEs, one per
    token selection → one `sae-vlm evaluate`."""
    from _extract_helpers import make_images, save_tiny_clip

    root = tmp_path_factory.mktemp("overlays")
    make_images(root / "imgs", 12, classes=("a", "b"), size=(32, 32))
    r = CliRunner().invoke(app, ["extract", "--model", str(save_tiny_clip(root / "clip")), "--data", str(root / "imgs"),
                                 "--layers", "1", "--tokens", "cls,all,random-3", "--out", str(root / "store"),
                                 "--quiet", "--workers", "1"])
    assert r.exit_code == 0, r.output
    for tok, name in SAES.items():
        torch.manual_seed(0)
        SAE(SAEConfig("topk", 32, 64, 4, hook_point="layer.1", token_selection=tok)).save_pretrained(
            root / "run" / "saes" / name)
    r = CliRunner().invoke(app, ["evaluate", str(root / "run"), "--data", str(root / "store"), "--quiet",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return root


def _codes(root: Path, tok: str, rows: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The SAE's codes on store rows `rows`, encoded here, and those rows' token positions."""
    src = open_store(root / "store", f"layer.1__{tok}")
    sae = SAE.from_pretrained(root / "run" / "saes" / SAES[tok]).eval()
    with torch.no_grad():
        return sae.encode(src.get(torch.as_tensor(rows))).float(), src.token_index()[rows]


def _dense(z, m: int, fill: float) -> np.ndarray:
    """Map m of a maps file as a 4 x 4 grid, read straight from its CSR arrays."""
    out = np.full(16, fill)
    a, b = z["indptr"][m], z["indptr"][m + 1]
    out[z["patch"][a:b]] = z["code"][a:b]
    return out.reshape(4, 4)


@pytest.mark.parametrize("tok,per", [("all", TOKENS), ("random-3", 3)])
def test_maps_equal_an_independent_encoding(token_run, tok, per):
    ev = token_run / "run" / "eval"
    z = dict(np.load(ev / "maps" / f"{SAES[tok]}.npz"))
    top = ev / "top" / SAES[tok]
    top_i, top_v = np.load(top / "top_indices.npy"), np.load(top / "top_values.npy")
    assert z["grid"].tolist() == [4, 4] and bool(z["complete"]) == (tok == "all") and top_i.shape == (64, 16)
    n_images = 24
    all_codes, all_pos = _codes(token_run, tok, np.arange(n_images * per))
    best_IF = all_codes.reshape(n_images, per, -1).max(1).values  # each image's value: its largest token code
    checked = 0
    for j in range(64):
        # the top images are distinct images, the 16 with the largest token code, and each index is that token's row
        images = top_i[j] // per
        assert len(set(images.tolist())) == 16
        np.testing.assert_allclose(top_v[j], best_IF[:, j].sort(descending=True).values[:16].numpy(), rtol=1e-5)
        for rank, (row, value) in enumerate(zip(top_i[j], top_v[j])):
            i = row // per
            codes, pos = all_codes[i * per : (i + 1) * per], all_pos[i * per : (i + 1) * per]
            assert codes[row - i * per, j] == pytest.approx(value, rel=1e-5)
            want = np.full(16, 0.0 if tok == "all" else np.nan)
            for p, c in zip(pos, codes[:, j].numpy()):
                if p >= 1:  # token 0 is CLS, not a patch
                    want[p - 1] = c
            got = _dense(z, j * 16 + rank, 0.0 if tok == "all" else np.nan)
            np.testing.assert_allclose(got, want.reshape(4, 4), rtol=2e-3, atol=1e-3)  # float16 storage
            checked += int(np.nansum(want > 0) > 0)
    assert checked > 100  # most maps hold a firing patch: the comparison is not of empty maps


def test_sparse_and_bounded(token_run):
    """An `all` store keeps only firing patches; every map holds at most MAP_PATCHES; and the bound holds on a grid
    larger than it (the largest kept, in order)."""
    z = np.load(token_run / "run" / "eval" / "maps" / f"{SAES['all']}.npz")
    counts = np.diff(z["indptr"])
    assert counts.max() <= min(MAP_PATCHES, 16) and (z["code"] > 0).all() and z["code"].dtype == np.float16
    assert z["patch"].dtype == np.int16 and 0 < counts.mean() < 16  # sparse: not every patch

    grid = PatchGrid(1, 10, 10, 101, True, np.tile(np.arange(101), 3), Path("token_index.npy"))
    g = torch.Generator().manual_seed(0)
    c_RF = torch.relu(torch.randn(303, 5, generator=g))
    acc = ImageTopMaps(2, grid, 5, max_patches=7)
    for r0 in range(0, 303, 101):  # one image per chunk
        acc.add(c_RF[r0 : r0 + 101], r0)
    out = acc.npz()
    vals, rows = acc.result()
    assert np.diff(out["indptr"]).tolist() == [7] * 10
    for j in range(5):
        for rank in range(2):
            img = int(rows[j, rank]) // 101
            want = c_RF[img * 101 + 1 : (img + 1) * 101, j].topk(7)
            m = slice(out["indptr"][j * 2 + rank], out["indptr"][j * 2 + rank + 1])
            assert out["patch"][m].tolist() == want.indices.tolist()
            np.testing.assert_allclose(out["code"][m], want.values.numpy(), rtol=1e-3)
            assert vals[j, rank] == c_RF[img * 101 : (img + 1) * 101, j].max()


def test_cls_sae_has_no_maps_and_its_page_is_as_before(token_run):
    from fastapi.testclient import TestClient

    from sae_vlm.browse.app import create_app

    ev = token_run / "run" / "eval"
    assert not (ev / "maps" / f"{SAES['cls']}.npz").exists()
    view = RunView(token_run / "run")
    assert view.get(SAES["cls"]).maps is None and view.get(SAES["all"]).maps is not None
    client = TestClient(create_app(view))
    cls_page = client.get(f"/sae/{SAES['cls']}/latent/{_alive(view, SAES['cls'])}").text
    assert 'class="top"' in cls_page
    assert not any(s in cls_page for s in ("<canvas", 'id="show-maps"', "data-map=", 'id="map-legend"'))
    page = client.get(f"/sae/{SAES['all']}/latent/{_alive(view, SAES['all'])}").text
    assert page.count("<canvas class=\"map\">") == page.count('class="top"') > 0 and 'id="show-maps"' in page


def _alive(view: RunView, name: str) -> int:
    """A latent positive on all 16 top images (it has a page in the report too), with a firing patch in its maps."""
    d = view.get(name)
    return next(j for j in range(d.n) if d.top_val is not None and d.top_val[j, -1] > 0
                and (d.maps is None or np.nansum(_or_nan(d.maps.grid(j, 0))) > 0))


def _or_nan(grid):
    return np.nan if grid is None else grid


def _maps_copy(token_run: Path, tmp: Path) -> tuple[Path, Path]:
    ev = tmp / "eval"
    shutil.copytree(token_run / "run" / "eval", ev)
    return ev, ev / "maps" / f"{SAES['all']}.npz"


def _save(path: Path, **arrays) -> None:
    good = dict(np.load(path))
    np.savez(path.with_suffix(""), **(good | arrays))  # np.savez adds the .npz


@pytest.mark.parametrize("damage", ["truncated", "pickle", "no_indptr", "short_indptr", "indptr_past_end",
                                    "patch_off_grid", "inf_code", "bad_grid", "orphan"])
def test_malformed_maps_file_is_one_line(token_run, tmp_path, damage):
    ev, maps = _maps_copy(token_run, tmp_path)
    z = dict(np.load(maps))
    if damage == "truncated":
        maps.write_bytes(maps.read_bytes()[:100])
    elif damage == "pickle":
        np.save(maps.with_suffix(".npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
        maps.with_suffix(".npy").rename(maps)
    elif damage == "no_indptr":
        z.pop("indptr")
        maps.unlink()
        np.savez(maps.with_suffix(""), **z)
    elif damage == "short_indptr":
        _save(maps, indptr=z["indptr"][:-5])
    elif damage == "indptr_past_end":
        _save(maps, indptr=z["indptr"] + 1)
    elif damage == "patch_off_grid":
        _save(maps, patch=z["patch"] + 16)
    elif damage == "inf_code":
        _save(maps, code=np.full_like(z["code"], np.inf))
    elif damage == "bad_grid":
        _save(maps, grid=np.array([0, 4]))
    else:  # maps with no top images to go with
        shutil.rmtree(ev / "top" / SAES["all"])
        z = dict(np.load(ev / "latents" / f"{SAES['all']}.npz"))
        np.savez(ev / "latents" / SAES["all"], **{k: v for k, v in z.items() if not k.startswith("top_")})
    line = refused(tmp_path, ["report", token_run / "run", "--eval", ev, "--out", tmp_path / "rep", "--quiet"],
                   str(maps))
    assert "Traceback" not in line


def test_random_store_without_token_count_gets_no_maps(token_run, tmp_path):
    """A random-k store from before the token count was recorded: evaluate warns and writes no maps, and its `all`
    twin still gets them (the rows per image are the tokens there)."""
    store = tmp_path / "store"
    shutil.copytree(token_run / "store", store)
    for sub in ("layer.1__random-3", "layer.1__all"):
        m = json.loads((store / sub / "manifest.json").read_text())
        (store / sub / "manifest.json").write_text(json.dumps({k: v for k, v in m.items()
                                                               if k not in ("tokens_per_image", "prefix_tokens")}))
    r = CliRunner().invoke(app, ["evaluate", str(token_run / "run"), "--data", str(store), "--out",
                                 str(tmp_path / "ev"), "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "random-3" in r.output and "no heatmaps" in r.output
    assert sorted(p.name for p in (tmp_path / "ev" / "maps").iterdir()) == [f"{SAES['all']}.npz"]
    old = np.load(tmp_path / "ev" / "maps" / f"{SAES['all']}.npz")
    new = np.load(token_run / "run" / "eval" / "maps" / f"{SAES['all']}.npz")
    assert all(np.array_equal(old[k], new[k]) for k in new.files)


@pytest.fixture
def live(token_run):
    """The browse app of the token run, served on a free local port from a thread."""
    from sae_vlm.browse.app import create_app

    with serving(create_app(RunView(token_run / "run"))) as port:
        yield f"http://127.0.0.1:{port}"


def test_overlay_toggle_in_chromium(token_run, live, chrome, tmp_path):
    """The live browser and the static report (file://): one overlay per top image, drawn, a colour scale, and a
    toggle that hides and shows them; a CLS SAE's page has neither."""
    view = RunView(token_run / "run")
    j, k = _alive(view, SAES["all"]), _alive(view, SAES["cls"])
    out = tmp_path / "report"
    r = CliRunner().invoke(app, ["report", str(token_run / "run"), "--out", str(out), "--quiet", "--all"])
    assert r.exit_code == 0, r.output
    for page, cls_page in ((f"{live}/sae/{SAES['all']}/latent/{j}", f"{live}/sae/{SAES['cls']}/latent/{k}"),
                           ((out / "s" / SAES["all"] / f"{j}.html").as_uri(),
                            (out / "s" / SAES["cls"] / f"{k}.html").as_uri())):
        _check_overlays(chrome, page)
        chrome.get(cls_page)
        assert chrome.find_elements("css selector", "img.top") and not chrome.find_elements("css selector", "canvas")
        assert not chrome.find_elements("id", "show-maps")


DRAWN = """return Array.from(document.querySelectorAll('canvas.map')).map(c => {
    const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    let n = 0; for (let i = 3; i < a.length; i += 4) n += a[i] > 0; return [c.width, c.height, n]; });"""


def _check_overlays(d, url: str) -> None:
    d.get(url)
    figures, maps = d.find_elements("css selector", "#top-images figure"), d.find_elements("css selector", "canvas.map")
    assert len(figures) == len(maps) > 0 and all(m.is_displayed() for m in maps)
    drawn = d.execute_script(DRAWN)
    assert all(w == 4 and h == 4 for w, h, _ in drawn) and drawn[0][2] > 0  # the best image's map shows patches
    assert d.find_element("id", "map-scale").is_displayed()
    assert d.execute_script("return document.getElementById('map-scale').getContext('2d')"
                            ".getImageData(127, 5, 1, 1).data[0]") > 200  # the scale's top end is bright
    toggle = d.find_element("id", "show-maps")
    assert toggle.is_selected()
    toggle.click()
    assert not any(m.is_displayed() for m in maps) and all(i.is_displayed() for i in d.find_elements(
        "css selector", "img.top"))
    toggle.click()
    assert all(m.is_displayed() for m in maps)


@pytest.mark.parametrize("damage,culprit", [
    ("tokens_text", "layer.1__all/manifest.json"), ("prefix_too_big", "layer.1__all/manifest.json"),
    ("index_truncated", "layer.1__all/token_index.npy"), ("position_off_grid", "layer.1__all/token_index.npy")])
def test_damaged_token_layout_is_one_line(token_run, tmp_path, damage, culprit):
    """What says where a store's patches are, damaged: evaluate names the file and writes nothing."""
    store, sub = tmp_path / "store", tmp_path / "store" / "layer.1__all"
    shutil.copytree(token_run / "store", store)
    shutil.copytree(token_run / "run" / "saes" / SAES["all"], tmp_path / "run" / "saes" / SAES["all"])
    m = json.loads((sub / "manifest.json").read_text())
    if damage in ("tokens_text", "prefix_too_big"):
        m |= {"tokens_per_image": "17"} if damage == "tokens_text" else {"prefix_tokens": 17}
        (sub / "manifest.json").write_text(json.dumps(m))
    elif damage == "index_truncated":
        (sub / "token_index.npy").write_bytes((sub / "token_index.npy").read_bytes()[:90])
    else:
        tok = np.load(sub / "token_index.npy")
        tok[5 * TOKENS + 3] = 40
        np.save(sub / "token_index.npy", tok)
    refused(tmp_path, ["evaluate", tmp_path / "run", "--data", store, "--out", tmp_path / "ev", "--quiet",
                       "--device", "cpu"], culprit)


# --- evaluate --heatmaps: attribution maps of a CLS SAE's top images ---------------------------------------------

MAPPED = 3  # --heatmap-latents


@pytest.fixture(scope="module")
def heat_run(token_run, tmp_path_factory):
    """The token run evaluated again with --heatmaps (the CLS SAE records no model: --model names it)."""
    out = tmp_path_factory.mktemp("heat") / "ev"
    r = CliRunner().invoke(app, ["evaluate", str(token_run / "run"), "--data", str(token_run / "store"), "--out",
                                 str(out), "--heatmaps", "--heatmap-latents", str(MAPPED), "--heatmap-batch", "8",
                                 "--model", str(token_run / "clip"), "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return out


def test_heatmaps_are_attribution_maps_of_the_most_frequent_latents(token_run, heat_run):
    """The CLS SAE's 3 most often firing latents get |gradient x input| maps of their top images, equal to
    `attribution_maps` on those images; the others have none; the cost is in metrics.json."""
    from sae_vlm.backbones import load_backbone
    from sae_vlm.data.images import open_image
    from sae_vlm.eval.maps import attribution_maps

    name = SAES["cls"]
    z = dict(np.load(heat_run / "maps" / f"{name}.npz"))
    arrays = np.load(heat_run / "latents" / f"{name}.npz")
    top_i, top_v = arrays["top_indices"], arrays["top_values"]
    fired = np.flatnonzero(top_v[:, 0] > 0)
    want = fired[np.argsort(-arrays["fire_freq"][fired], kind="stable")][:MAPPED]
    assert str(z["kind"]) == "attribution" and bool(z["complete"]) and z["grid"].tolist() == [4, 4]
    assert np.flatnonzero(z["mapped"]).tolist() == sorted(want.tolist())
    bb = load_backbone(str(token_run / "clip"))
    sae = SAE.from_pretrained(token_run / "run" / "saes" / name).eval()
    paths = open_store(token_run / "store", "layer.1__cls").paths()
    pairs = 0
    for j in range(64):
        for rank in range(16):
            m = j * 16 + rank
            if j not in want or top_v[j, rank] <= 0:
                assert z["indptr"][m + 1] == z["indptr"][m], (j, rank)
                continue
            pv = bb.preprocess([open_image(paths[top_i[j, rank]])])
            ref = attribution_maps(bb, sae, pv, [j], "layer.1", how="cls")[0, 0].numpy()
            assert ref.max() > 0
            np.testing.assert_allclose(_dense(z, m, 0.0), ref, rtol=2e-3, atol=1e-5 * ref.max())
            pairs += 1
    entry = next(e for e in json.loads((heat_run / "metrics.json").read_text())["saes"] if e["name"] == name)
    h = entry["heatmaps"]
    assert (h["kind"], h["latents"], h["pairs"], h["batch"]) == ("attribution", MAPPED, pairs, 8)
    assert h["seconds"] > 0 and h["seconds_per_latent"] == pytest.approx(h["seconds"] / MAPPED, abs=1e-3)
    # the token SAEs keep the token maps evaluate gives them without --heatmaps, and get no `heatmaps` entry
    for tok in ("all", "random-3"):
        old = np.load(token_run / "run" / "eval" / "maps" / f"{SAES[tok]}.npz")
        new = np.load(heat_run / "maps" / f"{SAES[tok]}.npz")
        assert str(new["kind"]) == "tokens" and all(np.array_equal(old[k], new[k]) for k in old.files)


def test_heatmap_pages_name_what_the_map_shows(token_run, heat_run):
    from fastapi.testclient import TestClient

    from sae_vlm.browse.app import create_app

    view = RunView(token_run / "run", heat_run, token_run / "store")
    d = view.get(SAES["cls"])
    assert d.maps is not None and d.maps.mapped is not None
    client = TestClient(create_app(view))
    mapped = [j for j in np.flatnonzero(d.maps.mapped) if d.top_val is not None and d.top_val[j, 0] > 0]
    page = client.get(f"/sae/{SAES['cls']}/latent/{mapped[0]}").text
    assert "gradient × input" in page and page.count('<canvas class="map">') == page.count('class="top"') > 0
    other = next(j for j in range(d.n) if not d.maps.mapped[j] and d.top_val is not None and d.top_val[j, 0] > 0)
    page = client.get(f"/sae/{SAES['cls']}/latent/{other}").text
    assert 'class="top"' in page and not any(s in page for s in ("<canvas", 'id="map-legend"'))
    page = client.get(f"/sae/{SAES['all']}/latent/{_alive(view, SAES['all'])}").text
    assert "code on each patch" in page and "gradient" not in page


def test_heatmaps_bad_input_is_one_line_before_anything(token_run, tmp_path):
    from sae_vlm import toyworld

    base = ["evaluate", token_run / "run", "--data", token_run / "store", "--out", tmp_path / "ev", "--heatmaps",
            "--quiet", "--device", "cpu"]
    refused(tmp_path, base, "--model")  # the CLS SAE records no model
    refused(tmp_path, [*base, "--model", toyworld.clip_path()], "d_in=32")  # a 64-wide model
    np.save(tmp_path / "acts.npy", np.zeros((4, 32), np.float32))
    refused(tmp_path, [*base[:3], tmp_path / "acts.npy", *base[4:], "--model", token_run / "clip"], "--heatmaps")
    refused(tmp_path, [*base, "--model", tmp_path / "no-such-model"], "no-such-model")


def test_inspect_route_with_a_token_sae(token_run):
    """The browser's /inspect with a token SAE: its latents ranked by their largest code on a patch, each map the
    latent's code on every patch (`token_maps` of the same image), no attribution."""
    from test_browse_inspect import client, latents

    from sae_vlm.backbones import load_backbone
    from sae_vlm.data.images import open_image
    from sae_vlm.eval.maps import token_maps

    view = RunView(token_run / "run")
    d = view.get(SAES["all"])
    row = 5 * TOKENS  # the sixth image's first row
    page = client(view).get("/inspect", params={"sae": SAES["all"], "row": row, "top": 5})
    assert page.status_code == 200, page.text
    got = latents(page.text)
    path = view.image_path(d, row)
    assert path is not None and len(got) == 5
    bb = load_backbone(str(token_run / "clip"))
    maps_RCF = token_maps(bb, d.sae(), bb.preprocess([open_image(path)]), "layer.1")[0].numpy()
    peaks_F = maps_RCF.max((0, 1))
    want = [int(j) for j in np.argsort(-peaks_F, kind="stable")[:5]]
    assert [j for j, _, _ in got] == want
    for j, code, m in got:
        assert code == pytest.approx(float(peaks_F[j]), rel=1e-4) and m.shape == (4, 4)
        np.testing.assert_allclose(m, maps_RCF[:, :, j], rtol=1e-4, atol=1e-6)


def test_overlays_and_inspect_share_one_colour_scale():
    """The browser's overlays (browse.js) and inspect's pictures (eval/inspect_page.py) draw maps on one table."""
    import re

    import sae_vlm.browse
    from sae_vlm.eval.inspect_page import INFERNO

    js = (Path(sae_vlm.browse.__file__).parent / "static" / "browse.js").read_text()
    table = re.search(r"var INFERNO = (\[\[.*?\]\]);", js, re.S)
    assert table is not None and json.loads(table.group(1)) == INFERNO.astype(int).tolist()
