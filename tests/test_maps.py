"""Where a latent fires: token maps and attribution maps against independent computations, the known answer of the
toy world (the creature's box), `sae-vlm inspect` end to end, and its bad input."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from _adversarial import refused, tree
from typer.testing import CliRunner

import sae_vlm
from sae_vlm import SAE, SAEConfig, toyworld
from sae_vlm.backbones import load_backbone
from sae_vlm.cli import app
from sae_vlm.eval import maps
from sae_vlm.toyworld import world as W

N_IMAGES = 800
SEEDS = (0, 1, 2)
PATCH = 12  # the tiny CLIP's patch side: 48 px images, a 4x4 grid


@pytest.fixture(scope="module")
def toy(one_thread):
    """The tiny CLIP, N toy images with each creature's box (top, left, side), pixel values and activations."""
    samples = toyworld.generate(N_IMAGES, seed=0)
    bb = load_backbone(str(toyworld.clip_path()))
    pv = bb.preprocess([s.image for s in samples])
    caps = bb.capture(pv, ["layer.2", "layer.3", "last"])
    colours = np.array([W.COLOURS.index(s.main.colour) for s in samples])
    return {"bb": bb, "samples": samples, "pv": pv, "caps": caps, "colours": colours,
            "boxes": [s.boxes[0] for s in samples]}


def test_creature_boxes_hold_every_creature_pixel(toy):
    for s, (top, left, side) in zip(toy["samples"], toy["boxes"]):
        off = np.abs(np.asarray(s.image, np.float32) - W.BACKGROUND_RGB[s.background]).max(-1) > 40
        inside = np.zeros_like(off)
        inside[top : top + side, left : left + side] = True
        assert off[inside].any() and not off[~inside].any(), s.index


def train_sae(x_ND: torch.Tensor, d_sae: int, k: int, seed: int, steps: int = 600) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig("topk", x_ND.shape[1], d_sae, k))
    with torch.no_grad():
        sae.b_dec.copy_(x_ND.mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = x_ND[torch.randint(len(x_ND), (256,), generator=g)]
        loss = ((sae(b) - b) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return sae.eval()


def auroc(scores_NF: torch.Tensor, y_N: np.ndarray) -> torch.Tensor:
    """AUROC of every column for the labels, ties counted half."""
    pos, neg = scores_NF[torch.as_tensor(y_N)], scores_NF[torch.as_tensor(~y_N)]
    gt = (pos[:, None] > neg[None]).float().mean((0, 1))
    eq = (pos[:, None] == neg[None]).float().mean((0, 1))
    return gt + eq / 2


def peak_in_box(map_RC: torch.Tensor, box) -> bool:
    """Whether the centre of the map's highest patch lies inside the box (an all-zero map has no peak)."""
    if float(map_RC.max()) <= 0:
        return False
    r, c = divmod(int(map_RC.flatten().argmax()), map_RC.shape[1])
    top, left, side = box
    return top <= r * PATCH + PATCH / 2 < top + side and left <= c * PATCH + PATCH / 2 < left + side


def localisation(toy, codes_NF: torch.Tensor, map_of) -> tuple[float, int]:
    """(share of (latent, top image) pairs whose peak lies in the creature's box, latents scored) over the best
    detector of each colour with AUROC >= 0.9; `map_of(latent, image ids)` gives their maps."""
    hits = []
    for c in range(len(W.COLOURS)):
        a = auroc(codes_NF, toy["colours"] == c)
        j = int(a.argmax())
        if a[j] < 0.9:
            continue
        top = torch.topk(codes_NF[:, j], 16).indices
        hits += [peak_in_box(m, toy["boxes"][i]) for m, i in zip(map_of(j, top), top.tolist())]
    return float(np.mean(hits)) if hits else float("nan"), len(hits) // 16


def chance(toy) -> float:
    return float(np.mean([side**2 / W.IMAGE_SIZE**2 for _, _, side in toy["boxes"]]))


def test_token_maps_find_the_creature(toy):
    """Token SAEs on every token of layer 2: the colour detectors' maps peak inside the creature's box."""
    t = toy["caps"]["layer.2"]
    shares = []
    for seed in SEEDS:
        sae = train_sae(t.reshape(-1, t.shape[-1]).float(), 128, 4, seed, steps=300)
        codes_NF, maps_NRCF = maps.token_codes(toy["bb"], sae, toy["pv"], "layer.2")
        share, scored = localisation(toy, codes_NF, lambda j, top: maps_NRCF[top, :, :, j])
        assert scored >= 2, f"seed {seed}: only {scored} colours detected with AUROC >= 0.9"
        shares.append(share)
    print(f"token maps at layer.2: peak in box {shares} over seeds {SEEDS}; chance {chance(toy):.3f}")
    assert min(shares) >= 0.9 and chance(toy) < 0.15


@pytest.mark.parametrize("point,d_sae,k,floor", [("layer.3", 128, 8, 0.75), ("last", 64, 4, 0.85)])
def test_attribution_maps_find_the_creature(toy, point, d_sae, k, floor):
    """SAEs on the CLS token of the last layer, and on the projected `last` vector: |gradient × input| peaks inside
    the creature's box. Measured per seed 0/1/2: CLS 0.94/0.87/0.89, last 0.95/1.00/0.94; chance 0.12."""
    x = toy["caps"][point]
    x = (x if x.ndim == 2 else x[:, 0]).float()
    how = "pooled" if point == "last" else "cls"
    shares = []
    for seed in SEEDS:
        sae = train_sae(x, d_sae, k, seed)
        codes = sae.encode(x).detach()
        share, scored = localisation(toy, codes, lambda j, top: maps.attribution_maps(
            toy["bb"], sae, toy["pv"][top], [j], point, how=how)[:, 0])
        assert scored >= 1, f"seed {seed}: no colour detected with AUROC >= 0.9"
        shares.append(share)
    print(f"attribution maps at {point}: peak in box {shares} over seeds {SEEDS}; chance {chance(toy):.3f}")
    assert min(shares) >= floor and min(shares) > 5 * chance(toy)


# --- the maps against independent computations ------------------------------------------------------------------

def test_token_maps_equal_the_encoded_patch_tokens(toy):
    torch.manual_seed(1)
    sae = SAE(SAEConfig("topk", 64, 32, 4))
    pv = toy["pv"][:3]
    tokens_BTD = toy["bb"].model(pixel_values=pv, output_hidden_states=True).hidden_states[3]  # after layer 2
    want = sae.encode(tokens_BTD[:, 1:].reshape(-1, 64)).reshape(3, 4, 4, 32)
    got = maps.token_maps(toy["bb"], sae, pv, "layer.2")
    assert got.shape == (3, 4, 4, 32) and (want > 0).any()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    some = torch.tensor([5, 0, 17])
    torch.testing.assert_close(maps.token_maps(toy["bb"], sae, pv, "layer.2", some), got[..., some])
    codes, _ = maps.token_codes(toy["bb"], sae, pv, "layer.2")
    torch.testing.assert_close(codes, want.detach().amax((1, 2)))


def test_attribution_equals_autograd_through_the_layers(toy):
    """|gradient × input| against a hand-written forward: embeddings, pre-layer norm, layers 0..3, CLS code."""
    torch.manual_seed(2)
    sae = SAE(SAEConfig("relu", 64, 16))
    vision = toy["bb"].model.vision_model
    pv, latents = toy["pv"][:2], torch.tensor([[3, 7, 11], [7, 1, 0]])
    want = torch.zeros(2, 3, 4, 4)
    for b in range(2):
        for col, j in enumerate(latents[b].tolist()):
            x0 = vision.pre_layrnorm(vision.embeddings(pv[b : b + 1])).detach().requires_grad_(True)
            h = x0
            for layer in vision.encoder.layers:
                h = layer(h, None)
                h = h[0] if isinstance(h, tuple) else h
            code = sae.encode(h[:, 0])[0, j]
            if code > 0:
                (g,) = torch.autograd.grad(code, x0)
                want[b, col] = (g * x0).sum(-1)[0, 1:].abs().reshape(4, 4).detach()
    assert (want > 0).sum() >= 16
    got = maps.attribution_maps(toy["bb"], sae, pv, latents, "layer.3", how="cls", batch_size=4)  # 6 pairs: 2 passes
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    signed = maps.attribution_maps(toy["bb"], sae, pv, latents, "layer.3", how="cls", signed=True)
    torch.testing.assert_close(signed.abs(), want, rtol=1e-4, atol=1e-6)
    assert (signed < 0).any()


def test_attribution_refuses_latents_out_of_range(toy):
    sae = SAE(SAEConfig("relu", 64, 16))
    with pytest.raises(ValueError, match="0..15"):
        maps.attribution_maps(toy["bb"], sae, toy["pv"][:1], [16], "layer.3")
    with pytest.raises(ValueError, match=r"\[2, L\]"):
        maps.attribution_maps(toy["bb"], sae, toy["pv"][:2], [[1], [2], [3]], "layer.3")


def test_patch_grid_follows_the_pixel_values(toy):
    assert toy["bb"].patch_grid() == (4, 4)
    assert toy["bb"].patch_grid(torch.zeros(1, 3, 48, 72)) == (4, 6)


# --- inspect: the library function and the command ---------------------------------------------------------------

def save_sae(path: Path, arch: str, d_in: int, d_sae: int, k: int | None, seed: int = 0, **cfg) -> Path:
    torch.manual_seed(seed)
    SAE(SAEConfig(arch, d_in, d_sae, k, **cfg)).save_pretrained(path)
    return path


@pytest.fixture
def work(tmp_path, monkeypatch, one_thread):
    """Two toy images, a token SAE and a CLS SAE of the tiny CLIP (which they record), as the working directory."""
    monkeypatch.chdir(tmp_path)
    for s in toyworld.generate(2, seed=3):
        s.image.save(tmp_path / f"toy{s.index}.png")
    clip = str(toyworld.clip_path())
    save_sae(tmp_path / "tok", "topk", 64, 32, 4, hook_point="layer.2", model_id=clip, token_selection="all")
    save_sae(tmp_path / "cls", "topk", 64, 32, 4, hook_point="layer.3", model_id=clip, token_selection="cls")
    return tmp_path


def test_inspect_token_sae_lists_latents_by_code_with_their_maps(work, toy):
    found = sae_vlm.inspect(["toy0.png", "toy1.png"], "tok", toy["bb"], top=5)
    assert [e["image"] for e in found] == ["toy0.png", "toy1.png"]
    sae = SAE.from_pretrained("tok")
    for e in found:
        pv = toy["bb"].preprocess([toyworld.sample(int(e["image"][3]), seed=3).image])
        full = maps.token_maps(toy["bb"], sae, pv, "layer.2")[0]  # [4, 4, F]
        peaks = full.amax((0, 1))
        want = sorted(range(32), key=lambda j: (-float(peaks[j]), j))[:5]
        assert [x["latent"] for x in e["latents"]] == [j for j in want if peaks[j] > 0]
        codes = [x["code"] for x in e["latents"]]
        assert codes == sorted(codes, reverse=True) and len(codes) == 5
        for x in e["latents"]:
            np.testing.assert_allclose(x["map"], full[..., x["latent"]].numpy(), rtol=1e-6)
            assert x["code"] == pytest.approx(max(max(r) for r in x["map"]))


def test_inspect_cls_sae_codes_and_attribution(work, toy):
    [e] = sae_vlm.inspect(["toy0.png"], "cls", toy["bb"], top=3)
    sae = SAE.from_pretrained("cls")
    pv = toy["bb"].preprocess([toyworld.sample(0, seed=3).image])
    codes = sae.encode(toy["bb"].capture(pv, ["layer.3"])["layer.3"][:, 0])[0]
    assert [x["latent"] for x in e["latents"]] == codes.topk(3).indices.tolist()
    assert [x["code"] for x in e["latents"]] == pytest.approx(codes.topk(3).values.tolist(), rel=1e-6)
    want = maps.attribution_maps(toy["bb"], sae, pv, [x["latent"] for x in e["latents"]], "layer.3")[0]
    np.testing.assert_allclose([x["map"] for x in e["latents"]], want.numpy(), rtol=1e-6)
    assert np.array(e["latents"][0]["map"]).shape == (4, 4)


def test_inspect_command_writes_json_and_a_page(work):
    r = CliRunner().invoke(app, ["inspect", "toy0.png", "toy1.png", "--sae", "cls", "--top", "4", "--out", "o",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    found = json.loads((work / "o" / "inspect.json").read_text())
    assert [e["image"] for e in found] == ["toy0.png", "toy1.png"]
    assert all(set(x) == {"latent", "code", "map"} and len(x["map"]) == 4 for e in found for x in e["latents"])
    assert all(len(e["latents"]) == 4 for e in found)
    page = (work / "o" / "index.html").read_text()
    assert page.count("<section>") == 2 and page.count("data:image/png;base64,") == 2 + 2 * 2 * 4
    assert "src=\"http" not in page and "toy1.png" in page
    again = CliRunner().invoke(app, ["inspect", "toy1.png", "--sae", "tok", "--out", "o", "--quiet"])
    assert again.exit_code == 0, again.output  # its own earlier output is replaced
    assert [e["image"] for e in json.loads((work / "o" / "inspect.json").read_text())] == ["toy1.png"]


def test_inspect_page_shows_ms_names_and_links_from_the_run(work):
    run = work / "run"
    (run / "saes").mkdir(parents=True)
    (work / "tok").rename(run / "saes" / "tok")
    ev = run / "eval"
    (ev / "latents").mkdir(parents=True)
    (ev / "metrics.json").write_text("{}")
    np.savez(ev / "latents" / "tok.npz", ms=np.linspace(0, 1, 32))
    (ev / "nodes").mkdir()
    found = sae_vlm.inspect(["toy0.png"], str(run / "saes" / "tok"), str(toyworld.clip_path()))[0]["latents"]
    j = found[0]["latent"]
    (ev / "nodes" / "tok.json").write_text(json.dumps([{"node": "taxon:round", "latent": j, "auroc": 0.97}]))
    (work / "rep" / "s" / "tok").mkdir(parents=True)
    (work / "rep" / "s" / "tok" / f"{j}.html").write_text("page")
    r = CliRunner().invoke(app, ["inspect", "toy0.png", "--sae", "run/saes/tok", "--report", "rep", "--out", "o/i"])
    assert r.exit_code == 0, r.output
    page = (work / "o" / "i" / "index.html").read_text()
    assert f'<a href="../../rep/s/tok/{j}.html">{j}</a>' in page
    assert "taxon:round (AUROC 0.97)" in page and f"<td>{np.linspace(0, 1, 32)[j]:.3f}</td>" in page


# --- bad input: one line naming the culprit, nothing written ------------------------------------------------------

def huge_png(path: Path, side: int = 20_000) -> Path:
    """A PNG whose header claims side x side pixels (above the decompression-bomb limit), with no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_inspect_refuses_bad_input(work):
    clip = str(toyworld.clip_path())
    (work / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (work / "notes.txt").write_text("hello")
    (work / "empty.png").write_bytes(b"")
    huge_png(work / "huge.png")
    (work / "folder.png").mkdir()
    save_sae(work / "narrow", "topk", 16, 32, 4, hook_point="layer.2", model_id=clip, token_selection="all")
    save_sae(work / "orphan", "topk", 64, 32, 4, hook_point="layer.3", token_selection="cls")
    save_sae(work / "unsure", "topk", 64, 32, 4, hook_point="layer.2", model_id=clip)
    save_sae(work / "nowhere", "topk", 64, 32, 4, model_id=clip, token_selection="cls")
    (work / "foreign").mkdir()
    (work / "foreign" / "mine.txt").write_text("keep")
    run = ["--sae", "tok", "--out", "o"]
    for image in ("broken.png", "notes.txt", "empty.png", "huge.png", "folder.png", "missing.png"):
        refused(work, ["inspect", "toy0.png", image, *run], image)
    refused(work, ["inspect", "toy0.png", "--sae", "orphan", "--out", "o"], "--model")
    line = refused(work, ["inspect", "toy0.png", "--sae", "narrow", "--out", "o"], "d_in=16")
    assert "width 64" in line and "layer.2" in line
    line = refused(work, ["inspect", "toy0.png", "--sae", "cls", "--model", toyworld.WEIGHTS / "clip_narrow", "--out",
                          "o"], "d_in=64")
    assert "clip_narrow" in line and "width 12" in line
    refused(work, ["inspect", "toy0.png", "--sae", "unsure", "--out", "o"], "--tokens")
    refused(work, ["inspect", "toy0.png", "--sae", "nowhere", "--out", "o"], "--hook-point")
    refused(work, ["inspect", "toy0.png", *run, "--hook-point", "9"], "'9'")
    refused(work, ["inspect", "toy0.png", *run, "--tokens", "bogus"], "'bogus'")
    refused(work, ["inspect", "toy0.png", *run, "--tokens", "all,cls"], "--tokens")
    refused(work, ["inspect", "toy0.png", *run, "--top", "0"], "--top 0")
    refused(work, ["inspect", "toy0.png", *run, "--batch-size", "-1"], "--batch-size -1")
    refused(work, ["inspect", "toy0.png", "--sae", "nosae", "--out", "o"], "nosae")
    refused(work, ["inspect", "toy0.png", *run, "--model", "./nomodel"], "nomodel")
    refused(work, ["inspect", "toy0.png", *run, "--eval", "foreign"], "foreign")
    refused(work, ["inspect", "toy0.png", "--sae", "tok", "--out", "foreign"], "foreign")
    refused(work, ["inspect", "toy0.png", "--sae", "tok", "--out", "toy1.png"], "toy1.png")
    refused(work, ["inspect", "--sae", "tok", "--out", "o"], "'images'")


def test_inspect_accepts_other_sizes_and_modes(work):
    """Images are decoded as extract decodes them: grey, palette, RGBA and any size are inspected."""
    from PIL import Image

    Image.new("L", (90, 30), 200).save(work / "grey.png")
    Image.new("RGBA", (17, 70), (250, 0, 0, 128)).save(work / "rgba.png")
    toyworld.sample(5, seed=3).image.convert("P").save(work / "palette.png")
    before = tree(work)
    r = CliRunner().invoke(app, ["inspect", "grey.png", "rgba.png", "palette.png", "--sae", "tok", "--out", "o"])
    assert r.exit_code == 0, r.output
    found = json.loads((work / "o" / "inspect.json").read_text())
    assert [e["image"] for e in found] == ["grey.png", "rgba.png", "palette.png"]
    assert all(np.array(x["map"]).shape == (4, 4) for e in found for x in e["latents"])
    new = {k for k in tree(work) if k not in before}
    assert new <= {"o", "o/inspect.json", "o/index.html", "o/.sae-vlm-owner.json", "o/.sae-vlm.lock"}
