"""Broken SAEs never pass for good ones: training stops on non-finite values and keeps a finite checkpoint, data with
nothing to learn is refused, convert refuses NaN and keeps zero decoder rows zero, evaluate lists non-finite SAEs
under `broken`, and steering refuses empty inputs and an SAE from another layer.

Each probe asserts the exit code, one line naming the culprit, the tree outside the command's own output unchanged,
and where a command succeeds, that its result is right.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _adversarial import refused, tree
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sae_vlm import SAE, SAEConfig
from sae_vlm.cli import app
from sae_vlm.sae import activations, mechanics, trainer

D = 16
NAME = "batchtopk_x2_k4"


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.normal(size=(256, D)) + 0.3).astype(np.float32))
    return tmp_path


TRAIN = ["train", "--data", "acts.npy", "--width", "2", "--k", "4", "--batch-size", "32", "--quiet"]


def invoke(args: list) -> tuple[int, list[str]]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, [line for line in r.output.splitlines() if line.strip()]


def finite_file(path: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values() if t.is_floating_point())


# --- data with nothing to learn --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, culprit", [
    ("zero", "all 256 rows sampled are zero"),
    ("constant", "all 256 rows sampled are the same vector"),
    ("nan", "nan at row 17"),
    ("inf", "inf at row 200"),
])
def test_data_without_anything_to_learn_is_refused_naming_the_file(work, kind, culprit):
    x = np.load(work / "acts.npy")
    x = {"zero": np.zeros_like(x), "constant": np.tile(x[:1], (256, 1)), "nan": x, "inf": x}[kind]
    x[17, 3] = np.nan if kind == "nan" else x[17, 3]
    x[200, 0] = np.inf if kind == "inf" else x[200, 0]
    np.save(work / f"{kind}.npy", x)
    line = refused(work, ["train", *TRAIN[3:], "--data", f"{kind}.npy", "--out", "run", "--steps", "4"], culprit)
    assert f"{kind}.npy" in line


# --- training that goes non-finite ------------------------------------------------------------------------------

def poison_batch(monkeypatch, at_step: int) -> None:
    """The batch step index `at_step` trains on holds NaN, as a corrupted read would: that step's loss is NaN."""
    real = trainer.train_step

    def step(m, x_ND, step, *args, **kwargs):
        return real(m, x_ND * float("nan") if step == at_step else x_ND, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)


def test_a_nan_step_stops_the_run_naming_step_and_sae_and_the_checkpoint_resumes(work, monkeypatch):
    sound = trainer.train_step
    poison_batch(monkeypatch, 6)  # step index 6: the 7th step
    args = TRAIN + ["--out", "run", "--steps", "10", "--checkpoint-every", "3", "--keep-steps", "3,9"]
    code, lines = invoke(args)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: SAE {NAME} went non-finite at step 7 (loss nan)"), lines[0]
    assert "checkpoint at step 6 is kept" in lines[0]
    sae_dir = work / "run" / "saes" / NAME
    assert [p.name for p in sae_dir.iterdir()] == ["step-3"]  # the snapshot before, never one after or a final
    assert finite_file(sae_dir / "step-3" / "model.safetensors")
    ckpt = work / "run" / "ckpt" / "state.safetensors"
    assert finite_file(ckpt) and json.loads((work / "run" / "events.jsonl").read_text())["step"] == 7
    monkeypatch.setattr(trainer, "train_step", sound)
    code, lines = invoke(args + ["--resume"])
    assert code == 0 and "resumed from step 6" in lines, lines
    assert SAE.from_pretrained(sae_dir).nonfinite() == ""
    assert SAE.from_pretrained(sae_dir / "step-9").meta["training"]["step"] == 9
    events = [json.loads(line) for line in (work / "run" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("non-finite", 7), ("resumed", 6)]
    rows = [json.loads(line) for line in (work / "run" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows) and len({r["step"] for r in rows}) == len(rows)


def test_a_huge_learning_rate_diverges_and_no_sae_is_saved(work):
    code, lines = invoke(TRAIN + ["--out", "run", "--steps", "30", "--lr", "1e30", "--checkpoint-every", "2"])
    assert code == 2 and len(lines) == 1 and f"SAE {NAME} went non-finite at step" in lines[0], lines
    step = int(lines[0].split("at step ")[1].split(" ")[0])
    assert 1 <= step < 30 and not (work / "run" / "saes").exists()
    ckpt = work / "run" / "ckpt" / "state.safetensors"
    if step > 2:  # the checkpoint left behind is the last finite one
        assert f"checkpoint at step {2 * ((step - 1) // 2)} is kept" in lines[0] and finite_file(ckpt)
    else:
        assert "no checkpoint was written before it" in lines[0] and not ckpt.exists()


def test_weights_that_go_non_finite_on_the_last_step_are_never_saved(work, monkeypatch):
    """The loss of the last step is finite, its update is not: the weight check before the save catches it."""
    calls = {"n": 0}
    real = mechanics.normalize_decoder_

    def normalize(W_dec_FD, eps=1e-8):
        real(W_dec_FD, eps)
        calls["n"] += 1
        if calls["n"] == 4:
            W_dec_FD.data[0, :3] = float("inf")

    monkeypatch.setattr(mechanics, "normalize_decoder_", normalize)
    code, lines = invoke(TRAIN + ["--out", "run", "--steps", "4", "--checkpoint-every", "2"])
    assert code == 2 and len(lines) == 1, lines
    assert f"SAE {NAME} went non-finite at step 4 (W_dec has 3 non-finite values)" in lines[0]
    assert "checkpoint at step 2 is kept" in lines[0] and not (work / "run" / "saes").exists()
    assert finite_file(work / "run" / "ckpt" / "state.safetensors")


def test_a_resumed_run_says_from_which_step_and_records_it(work):
    assert invoke(TRAIN + ["--out", "run", "--steps", "4", "--checkpoint-every", "2"])[0] == 0
    code, lines = invoke(TRAIN + ["--out", "run", "--steps", "6", "--checkpoint-every", "2", "--resume"])
    assert code == 0 and "resumed from step 4" in lines, lines
    events = [json.loads(line) for line in (work / "run" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"]) for e in events] == [("resumed", 4)]
    assert SAE.from_pretrained(work / "run" / "saes" / NAME).meta["training"]["step"] == 6
    code, lines = invoke(TRAIN + ["--out", "fresh", "--steps", "4"])
    assert code == 0 and not any("resumed" in line for line in lines)
    assert not (work / "fresh" / "events.jsonl").exists()


def test_library_guards_refuse_settings_that_break_the_maths():
    h = torch.rand(8, 4, requires_grad=True)
    for bandwidth in (0.0, -1e-3, float("inf")):
        with pytest.raises(ValueError, match=f"jumprelu_bandwidth={bandwidth}"):
            activations.jumprelu(h, torch.zeros(4), bandwidth)
        with pytest.raises(ValueError, match="jumprelu_bandwidth"):
            SAE(SAEConfig("jumprelu", 4, 8)).train_encode(torch.rand(3, 4), bandwidth)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 5.0)
    with pytest.raises(ValueError, match="grad_clip=-1"):
        mechanics.clip_grad_norm_([p], -1)
    mechanics.clip_grad_norm_([p], 0)  # 0: no clipping
    assert torch.equal(p.grad, torch.full((3,), 5.0))
    mechanics.clip_grad_norm_([p], 1.0)
    assert abs(float(p.grad.norm()) - 1.0) < 1e-5
    theta = torch.tensor(0.5)
    for beta in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"threshold_beta={beta}"):
            mechanics.update_threshold_(theta, torch.rand(4, 4), beta)
    assert float(theta) == 0.5


# --- convert: no NaN in, no NaN out ---------------------------------------------------------------------------

def sae_lens_dir(path: Path, arch: str = "topk", rescale: bool = False, poison: str | None = None,
                 value: float = float("nan"), zero_rows: tuple[int, ...] = ()) -> dict:
    """A SAELens cfg.json + sae_weights.safetensors as SAELens 6 writes them; returns the tensors."""
    g = torch.Generator().manual_seed(3)
    f = 32
    st = {"W_enc": torch.randn(D, f, generator=g) * 0.3, "b_enc": torch.randn(f, generator=g) * 0.1,
          "W_dec": torch.randn(f, D, generator=g) * 0.7, "b_dec": torch.randn(D, generator=g) * 0.1}
    if arch == "jumprelu":
        st["threshold"] = torch.rand(f, generator=g) * 0.1
    st["W_dec"][list(zero_rows)] = 0.0
    if poison is not None:
        st[poison].view(-1)[[0, 5, 7][: st[poison].numel()]] = value
    path.mkdir(parents=True)
    save_file(st, str(path / "sae_weights.safetensors"))
    cfg = {"architecture": arch, "d_in": D, "d_sae": f, "apply_b_dec_to_input": True, "normalize_activations": "none"}
    if arch == "topk":
        cfg |= {"k": 4, "rescale_acts_by_decoder_norm": rescale}
    (path / "cfg.json").write_text(json.dumps(cfg))
    return st


@pytest.mark.parametrize("arch, tensor", [("topk", "W_enc"), ("topk", "b_enc"), ("topk", "W_dec"), ("topk", "b_dec"),
                                          ("jumprelu", "threshold")])
@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_convert_refuses_non_finite_weights_naming_the_tensor(work, arch, tensor, value):
    sae_lens_dir(work / "src", arch, poison=tensor, value=value)
    n = min(3, {"b_dec": D, "threshold": 32, "b_enc": 32}.get(tensor, 3))
    line = refused(work, ["convert", "src", "dst"], f"{tensor} has {n} non-finite values")
    assert str(work / "src" / "sae_weights.safetensors") in line or "src/sae_weights.safetensors" in line


def test_convert_of_our_own_format_and_of_dictionary_learning_refuses_nan(work):
    sae = SAE(SAEConfig("batchtopk", D, 32, 4))
    with torch.no_grad():
        sae.W_dec[2, :2] = float("nan")
    sae.save_pretrained(work / "ours")
    refused(work, ["convert", "ours", "dst"], "ours/model.safetensors: W_dec has 2 non-finite values")
    refused(work, ["evaluate", "ours", "--data", "acts.npy", "--out", "ev"], "W_dec has 2 non-finite values")
    g = torch.Generator().manual_seed(0)
    state = {"encoder.weight": torch.randn(32, D, generator=g), "encoder.bias": torch.zeros(32),
             "decoder.weight": torch.randn(D, 32, generator=g), "b_dec": torch.zeros(D), "k": torch.tensor(4),
             "threshold": torch.tensor(float("inf"))}
    (work / "dl").mkdir()
    torch.save(state, work / "dl" / "ae.pt")
    refused(work, ["convert", "dl", "dst"], "threshold has 1 non-finite values")


def sae_lens_topk(st: dict, x: torch.Tensor, k: int = 4) -> torch.Tensor:
    """SAELens's TopK SAE with rescale_acts_by_decoder_norm, written out: codes h·‖W_dec‖ (top k, ReLU), decoded by
    codes/‖W_dec‖ @ W_dec; a zero row's latent has code 0 and adds nothing."""
    norms = st["W_dec"].norm(dim=-1)
    h = ((x - st["b_dec"]) @ st["W_enc"] + st["b_enc"]) * norms
    vals, idx = h.topk(k, dim=-1)
    codes = torch.zeros_like(h).scatter_(-1, idx, vals.relu())
    scaled = torch.where(norms > 0, codes / norms.clamp_min(1e-30), torch.zeros_like(codes))
    return scaled @ st["W_dec"] + st["b_dec"]


@pytest.mark.parametrize("to", ["sae-vlm", "sae-lens"])
def test_zero_decoder_rows_convert_to_zero_and_are_counted_dead(work, to):
    st = sae_lens_dir(work / "src", rescale=True, zero_rows=(4, 19))
    before = tree(work)
    code, lines = invoke(["convert", "src", "dst", "--to", to])
    assert code == 0, lines
    assert any("2 of 32 latents have an all-zero decoder row" in line for line in lines), lines
    assert {k: v for k, v in tree(work).items() if not k.startswith("dst")} == before
    sae = SAE.from_pretrained(work / "dst")
    assert sae.nonfinite() == "" and int((sae.W_dec == 0).all(1).sum()) == 2
    x = torch.from_numpy(np.load(work / "acts.npy"))
    ref = sae_lens_topk(st, x)
    with torch.no_grad():
        assert float((sae(x) - ref).norm() / ref.norm()) < 1e-5
    if to == "sae-vlm":
        meta = json.loads((work / "dst" / "config.json").read_text())
        assert meta["source"]["zero_decoder_rows"] == 2 and any("all-zero decoder row" in n for n in meta["notes"])


# --- evaluate: broken SAEs are listed, never scored --------------------------------------------------------------

def save_sae(path: Path, seed: int, edit=None) -> None:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig("topk", D, 32, 4))
    if edit is not None:
        with torch.no_grad():
            edit(sae)
    sae.save_pretrained(path)


def nan_row(sae):
    sae.W_dec[3] = float("nan")


def overflow(sae):  # finite weights whose reconstructions overflow float32
    sae.W_enc_FD.mul_(1e18)
    sae.W_dec.mul_(1e25)


def test_evaluate_lists_non_finite_saes_under_broken_and_scores_the_rest(work):
    run = work / "run" / "saes"
    save_sae(run / "good", 0)
    save_sae(run / "nan", 1, nan_row)
    save_sae(run / "overflow", 2, overflow)
    code, lines = invoke(["evaluate", "run", "--data", "acts.npy", "--quiet"])
    assert code == 0, lines
    m = json.loads((work / "run" / "eval" / "metrics.json").read_text())
    assert [s["name"] for s in m["saes"]] == ["good"] and np.isfinite(m["saes"][0]["recon"]["fve"])
    broken = {b["name"]: b["error"] for b in m["broken"]}
    assert "W_dec has 16 non-finite values" in broken["nan"]
    assert "non-finite metrics" in broken["overflow"] and "mse inf" in broken["overflow"]
    assert any("skipped SAE nan" in line for line in lines) and any("skipped SAE overflow" in line for line in lines)
    written = {p.name for p in (work / "run" / "eval" / "latents").iterdir()}
    assert written == {"good.npz"} and not (work / "run" / "eval" / "top" / "overflow").exists()


@pytest.mark.parametrize("edit, culprit", [(nan_row, "W_dec has 16 non-finite values"),
                                           (overflow, "non-finite metrics (fve nan, mse inf")])
def test_evaluate_with_every_sae_broken_is_an_error(work, edit, culprit):
    save_sae(work / "run" / "saes" / "only", 0, edit)
    line = refused(work, ["evaluate", "run", "--data", "acts.npy", "--quiet"], culprit)
    assert "no SAE of run could be scored; only:" in line


# --- steering: empty inputs and an SAE from another layer -------------------------------------------------------

@pytest.fixture
def folders(work):
    (work / "empty").mkdir()
    for c in ("red", "blue"):
        (work / "imgs" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), c).save(work / "imgs" / c / "a.png")
    save_sae(work / "sae", 0)
    return work


STEER_SCORE = ["steer-score", "--llava", "no/llava", "--sae", "sae", "--clip", "no/clip", "--out", "s.json"]


@pytest.mark.parametrize("extra, culprit", [
    (["--images", "empty"], "--images empty holds no images"),
    (["--images", "imgs", "--per-class", "0"], "--per-class 0"),
    (["--images", "imgs", "--max-images", "0"], "--max-images 0"),
    (["--images", "imgs", "--max-images", "-2"], "--max-images -2"),
])
def test_steer_score_without_images_is_one_line_before_any_model_loads(folders, extra, culprit):
    refused(folders, STEER_SCORE + extra, culprit)


def test_steer_with_a_missing_image_is_one_line_before_the_model_loads(folders):
    refused(folders, ["steer", "--llava", "no/llava", "--sae", "sae", "--latents", "1", "--image", "gone.png",
                      "--out", "o.json"], "gone.png")


def test_an_sae_from_another_layer_is_refused_unless_the_layer_is_named(work, capsys):
    from _steer_helpers import save_tiny_llava
    from transformers import LlavaForConditionalGeneration

    from sae_vlm.steer import intervene

    model = LlavaForConditionalGeneration.from_pretrained(save_tiny_llava(work / "llava")).eval()
    capsys.readouterr()  # the save's progress lines
    torch.manual_seed(0)
    sae = SAE(SAEConfig("topk", 32, 64, 4, hook_point="layer.0"))
    with pytest.raises(ValueError, match="was trained at layer.0 but the model's projector reads layer.1.*"
                                         "--hook-point layer.1"):
        with intervene(model, None, sae, {3: ("clamp", 5.0)}):
            pass
    for _ in range(2):  # the named layer is the override: one warning line, once
        with intervene(model, "layer.1", sae, {3: ("clamp", 5.0)}) as bb:
            assert bb is not None
    err = [line for line in capsys.readouterr().err.splitlines() if "layer" in line]
    assert err == ["warning: SAE (d_sae=64) was trained at layer.0 but is applied at layer.1; its latents may mean "
                   "nothing there"]
    with intervene(model, None, SAE(SAEConfig("topk", 32, 64, 4, hook_point="layer.1")), {3: ("clamp", 5.0)}):
        pass
    assert "layer" not in capsys.readouterr().err
    # the same layer by its index from the end (the tiny LLaVA reads its tower's layer -2): no refusal, no warning
    with intervene(model, None, SAE(SAEConfig("topk", 32, 64, 4, hook_point="-2")), {3: ("clamp", 5.0)}):
        pass
    with intervene(model, "-2", SAE(SAEConfig("topk", 32, 64, 4, hook_point="layer.1")), {3: ("clamp", 5.0)}):
        pass
    assert "layer" not in capsys.readouterr().err
