"""SAEs written by other libraries' own save code convert exactly; ours export to what SAELens's own loader opens.

The five libraries are installed pinned, without their dependencies, into benchmarks/.peers (see benchmarks/peers.py);
checkpoints are produced here by each library's classes and save functions, never written by hand. "Exact" means the
converted SAE's codes and reconstructions match the library's own encode/decode within 1e-5 (relative).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sae_vlm import SAE, SAEConfig
from sae_vlm.sae.formats import detect, load_foreign
from sae_vlm.sae.formats import sae_lens as sae_lens_format

ROOT = Path(__file__).resolve().parents[1]
D, F, N = 16, 64, 48


@pytest.fixture(scope="module", autouse=True)
def peers(one_thread):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import peers

    peers.ensure_installed()
    yield peers
    peers.unload()  # later tests must not see the stubbed nnsight, accelerate, wandb, scipy, ...
    sys.path.remove(str(ROOT / "benchmarks"))


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    return float((ours - theirs).norm() / theirs.norm().clamp_min(1e-12))


def inputs(seed=0, n=N, d=D, shift=0.7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def assert_same(sae: SAE, x, codes, recon):
    ours = sae.encode(x)
    assert int((codes > 0).sum()) > 0, f"the comparison needs active latents ({sae.cfg.arch})"
    assert torch.equal(ours > 0, codes > 0)
    assert rel_err(ours, codes) < 1e-5
    assert rel_err(sae.decode(ours), recon) < 1e-5


def perturb(module: torch.nn.Module, names: list[str], seed=1, scale=0.3) -> None:
    """Non-zero biases (and thresholds), so every bias placement shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            p = module.get_parameter(n) if n in dict(module.named_parameters()) else module.get_buffer(n)
            p.add_(torch.randn(p.shape, generator=g).abs() * scale if "threshold" in n
                   else torch.randn(p.shape, generator=g) * scale)


# ---------------------------------------------------------------- dictionary_learning (trainSAE's own saving)

def dl_trainers():
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.trainers.jumprelu import JumpReluTrainer
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.trainers.top_k import TopKTrainer

    common = dict(steps=6, activation_dim=D, dict_size=F, layer=3, lm_name="tiny/clip", device="cpu", seed=0,
                  warmup_steps=1)
    topk = dict(k=4, threshold_start_step=0)
    l1 = dict(sparsity_warmup_steps=None)
    return {"batchtopk": dict(trainer=BatchTopKTrainer, **common, **topk),
            "matryoshka": dict(trainer=MatryoshkaBatchTopKTrainer, **common, **topk,
                               group_fractions=[1 / 8, 1 / 8, 1 / 4, 1 / 2]),
            "topk": dict(trainer=TopKTrainer, **common, **topk),
            "jumprelu": dict(trainer=JumpReluTrainer, **common, **l1, target_l0=6.0, lr=1e-2),
            "relu": dict(trainer=StandardTrainer, **common, **l1)}


def train_dl(kind: str, out: Path):
    from dictionary_learning.training import trainSAE

    def batches():
        g = torch.Generator().manual_seed(5)
        while True:
            yield torch.randn(32, D, generator=g) * 3 + 1

    trainer = dl_trainers()[kind] if kind != "gated" else None
    if kind == "gated":
        from dictionary_learning.trainers.gdm import GatedSAETrainer

        trainer = dict(trainer=GatedSAETrainer, steps=6, activation_dim=D, dict_size=F, layer=3, lm_name="tiny/clip",
                       device="cpu", seed=0, warmup_steps=1, sparsity_warmup_steps=None)
    trainSAE(batches(), [trainer], steps=6, save_dir=str(out), normalize_activations=True)
    return out / "trainer_0"


DL_CLASSES = {"batchtopk": "BatchTopKSAE", "matryoshka": "MatryoshkaBatchTopKSAE", "topk": "AutoEncoderTopK",
              "jumprelu": "JumpReluAutoEncoder", "relu": "AutoEncoder"}


@pytest.mark.parametrize("kind", list(DL_CLASSES))
def test_dictionary_learning_converts_exactly(kind, tmp_path):
    import dictionary_learning.dictionary as dld
    import dictionary_learning.trainers.batch_top_k as btk
    import dictionary_learning.trainers.matryoshka_batch_top_k as mbtk
    import dictionary_learning.trainers.top_k as tk

    folder = train_dl(kind, tmp_path)
    assert detect(folder) == "dictionary-learning"
    cls = {"batchtopk": btk.BatchTopKSAE, "matryoshka": mbtk.MatryoshkaBatchTopKSAE, "topk": tk.AutoEncoderTopK,
           "jumprelu": dld.JumpReluAutoEncoder, "relu": dld.AutoEncoder}[kind]
    kwargs = {"normalize_decoder": False} if kind == "relu" else {}
    theirs = cls.from_pretrained(str(folder / "ae.pt"), **kwargs)
    perturb_names = {"jumprelu": ["threshold"], "batchtopk": [], "matryoshka": [], "topk": [], "relu": []}[kind]
    if perturb_names:  # a few training steps leave θ near its init; spread it so the gate matters
        perturb(theirs, perturb_names)
        torch.save({k: v for k, v in theirs.state_dict().items()}, folder / "ae.pt")
    sae = SAE.from_pretrained(folder)
    assert sae.cfg.arch == kind and sae.cfg.hook_point == "layer.3" and sae.cfg.model_id == "tiny/clip"
    x = inputs() * 3
    with torch.no_grad():
        codes = theirs.encode(x)
        assert_same(sae, x, codes, theirs.decode(codes))


def test_dictionary_learning_gated_is_refused_by_name(tmp_path):
    folder = train_dl("gated", tmp_path)
    with pytest.raises(ValueError, match="GatedAutoEncoder.*no equivalent"):
        SAE.from_pretrained(folder / "ae.pt")


# ---------------------------------------------------------------- SAELens (save_model / save_inference_model)

def test_sae_lens_converts_exactly(tmp_path):
    from sae_lens import SAE as LensSAE
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(model_name="tiny/clip", hook_name="layer.3")
    made = {
        "relu": StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, metadata=meta)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=5, rescale_acts_by_decoder_norm=True)),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False)),
    }
    batchtopk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=F, k=5))
    for name, lens in [*made.items(), ("batchtopk", batchtopk)]:
        perturb(lens, ["b_enc", "b_dec"] + (["W_dec"] if name == "topk" else []))
        if name == "jumprelu":
            with torch.no_grad():
                lens.threshold.copy_(torch.rand(F) * 0.5)
        if name == "batchtopk":
            batchtopk.topk_threshold.fill_(0.02)  # its decoder starts at norm 0.1, so pre-activations are small
            batchtopk.save_inference_model(tmp_path / name)
        else:
            lens.save_model(tmp_path / name)
        assert detect(tmp_path / name) == "sae-lens"
        theirs = LensSAE.load_from_disk(tmp_path / name)
        sae = SAE.from_pretrained(tmp_path / name)
        assert sae.cfg.arch == {"batchtopk": "jumprelu"}.get(name, name)
        x = inputs(seed=2)
        with torch.no_grad():
            codes = theirs.encode(x)
            codes = codes.to_dense() if codes.is_sparse else codes
            assert_same(sae, x, codes, theirs.decode(codes))
    assert SAE.from_pretrained(tmp_path / "relu").cfg.hook_point == "layer.3"


def test_sae_lens_unsupported_architectures_are_named(tmp_path):
    from sae_lens import GatedSAE, GatedSAEConfig, StandardSAE, StandardSAEConfig

    GatedSAE(GatedSAEConfig(d_in=D, d_sae=F)).save_model(tmp_path / "gated")
    with pytest.raises(ValueError, match="SAELens architecture 'gated' has no equivalent"):
        SAE.from_pretrained(tmp_path / "gated")
    StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, normalize_activations="layer_norm")).save_model(tmp_path / "ln")
    with pytest.raises(ValueError, match="layer_norm"):
        SAE.from_pretrained(tmp_path / "ln")


# ---------------------------------------------------------------- saev (saev.nn.dump)

def test_saev_converts_exactly_and_folds_its_input_normalisation(tmp_path):
    import saev.config
    import saev.nn

    theirs = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=D, exp_factor=F // D))
    perturb(theirs, ["b_enc", "b_dec"])
    saev.nn.dump(str(tmp_path / "sae.pt"), theirs)
    theirs = saev.nn.load(str(tmp_path / "sae.pt"))
    assert detect(tmp_path / "sae.pt") == "saev" and detect(tmp_path) == "saev"
    x = inputs(seed=3)
    with torch.no_grad():
        recon, codes, _ = theirs(x)
        sae = SAE.from_pretrained(tmp_path / "sae.pt")
        assert sae.cfg.arch == "relu" and any("normalised" in n for n in sae.meta["notes"])
        assert_same(sae, x, codes, recon)
        # saev's loader feeds s·(x − μ); folded, our SAE takes raw x and gives back raw-space reconstructions
        mu, s = torch.randn(D) * 2, 0.37
        torch.save(mu, tmp_path / "mean.pt")
        folded = SAE.from_pretrained(tmp_path / "sae.pt", input_mean=str(tmp_path / "mean.pt"), input_scale=s)
        recon_z, codes_z, _ = theirs(s * (x - mu))
        assert_same(folded, x, codes_z, recon_z / s + mu)


# ---------------------------------------------------------------- sparsify (SparseCoder.save_to_disk)

def test_sparsify_converts_exactly(tmp_path):
    from sparsify import SparseCoder, SparseCoderConfig

    coder = SparseCoder(D, SparseCoderConfig(num_latents=F, k=6))
    perturb(coder, ["encoder.bias", "b_dec"])
    coder.save_to_disk(tmp_path / "layers.3")
    assert detect(tmp_path / "layers.3") == "sparsify"
    theirs = SparseCoder.load_from_disk(tmp_path / "layers.3")
    x = inputs(seed=4)
    with torch.no_grad():
        top_acts, top_idx, _ = theirs.encode(x)
        codes = torch.zeros(N, F).scatter_(1, top_idx, top_acts)
        sae = SAE.from_pretrained(tmp_path / "layers.3")
        assert (sae.cfg.arch, sae.cfg.k, sae.cfg.hook_point) == ("topk", 6, "layers.3")
        assert_same(sae, x, codes, theirs.decode(top_acts, top_idx))
    with pytest.raises(ValueError, match=r"2 hook points .*convert one of them"):
        coder.save_to_disk(tmp_path / "layers.4")
        SAE.from_pretrained(tmp_path)
    SparseCoder(D, SparseCoderConfig(num_latents=F, k=4, transcode=True)).save_to_disk(tmp_path / "tc")
    with pytest.raises(ValueError, match="transcoder has no equivalent"):
        SAE.from_pretrained(tmp_path / "tc")


# ---------------------------------------------------------------- overcomplete (torch.save of the state dict)

@pytest.mark.parametrize("kind", ["topk", "relu", "jumprelu", "batchtopk"])
def test_overcomplete_converts_exactly(kind, tmp_path):
    from overcomplete.sae import SAE as OvSAE
    from overcomplete.sae import BatchTopKSAE, JumpSAE, TopKSAE

    theirs = {"topk": lambda: TopKSAE(D, F, top_k=5), "relu": lambda: OvSAE(D, F),
              "jumprelu": lambda: JumpSAE(D, F), "batchtopk": lambda: BatchTopKSAE(D, F, top_k=5 * N)}[kind]()
    perturb(theirs, ["encoder.final_block.0.bias"])
    if kind == "jumprelu":
        with torch.no_grad():
            theirs.thresholds.copy_(torch.log(torch.rand(F) * 0.5 + 0.05))
    theirs.train()
    with torch.no_grad():
        theirs(inputs(seed=9))  # a training-mode pass normalises the dictionary (and sets BatchTopK's threshold)
    torch.save(theirs.state_dict(), tmp_path / "sae.pt")
    theirs.eval()
    hints = {"topk": {"arch": "topk", "k": 5}, "relu": {"arch": "relu"}, "jumprelu": {},
             "batchtopk": {"arch": "batchtopk", "k": 5, "threshold": float(getattr(theirs, "running_threshold", 0))}}
    assert detect(tmp_path / "sae.pt") == "overcomplete"
    sae = SAE.from_pretrained(tmp_path / "sae.pt", **hints[kind])
    assert sae.cfg.arch == kind
    x = inputs(seed=6)  # not the batch that set the threshold: it gates with ≥ where we gate with >
    with torch.no_grad():
        _, codes = theirs.encode(x)
        assert_same(sae, x, codes, theirs.decode(codes))


def test_overcomplete_needs_its_class_and_refuses_other_encoders(tmp_path):
    from overcomplete.sae import TopKSAE

    torch.save(TopKSAE(D, F, top_k=5).state_dict(), tmp_path / "sae.pt")
    with pytest.raises(ValueError, match="--arch topk --k K"):
        SAE.from_pretrained(tmp_path / "sae.pt")
    torch.save(TopKSAE(D, F, top_k=5, encoder_module="mlp_bn_1").state_dict(), tmp_path / "bn.pt")
    with pytest.raises(ValueError, match="no equivalent"):
        SAE.from_pretrained(tmp_path / "bn.pt", arch="topk", k=5)


# ---------------------------------------------------------------- safety

_EXECUTED = []


def _mark():
    _EXECUTED.append(True)
    return {}


class _Payload:
    """Unpickling this would call _mark: an arbitrary-code-execution stand-in."""

    def __reduce__(self):
        return (_mark, ())


@pytest.mark.parametrize("library", ["dictionary_learning", "overcomplete", "saev"])
def test_pickled_checkpoints_are_refused_with_how_to_resave(library, tmp_path):
    from overcomplete.sae import TopKSAE

    if library == "overcomplete":  # the whole module pickled, as torch.save(sae) does
        path = tmp_path / "sae.pt"
        torch.save(TopKSAE(D, F, top_k=5), path)
        args = {"source_format": "overcomplete", "arch": "topk", "k": 5}
        resave = "torch.save(sae.state_dict(), 'sae.pt')"
    elif library == "saev":
        import saev.config
        import saev.nn

        path = tmp_path / "sae.pt"
        saev.nn.dump(str(path), saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=D, exp_factor=2)))
        head, _ = path.read_bytes().split(b"\n", 1)
        import io

        buf = io.BytesIO()
        torch.save({"W_enc": torch.zeros(D, 2 * D), "evil": _Payload()}, buf)
        path.write_bytes(head + b"\n" + buf.getvalue())
        args, resave = {}, "saev.nn.dump('sae.pt', sae)"
    else:
        folder = train_dl("batchtopk", tmp_path)
        path = folder / "ae.pt"
        state = torch.load(path, weights_only=True)
        torch.save({**state, "extra": _Payload()}, path)
        args, resave = {}, "torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, 'ae.pt')"
    with pytest.raises(ValueError) as e:
        load_foreign(path, **args)
    msg = str(e.value)
    assert "never unpickles" in msg and resave in msg and "weights_only=False" not in msg
    assert "\n" not in msg and _EXECUTED == []


# ---------------------------------------------------------------- export to SAELens

@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"])
def test_export_opens_in_sae_lens_with_the_same_outputs(arch, tmp_path):
    from sae_lens import SAE as LensSAE

    torch.manual_seed(7)
    sae = SAE(SAEConfig(arch, D, F, None if arch in ("relu", "jumprelu") else 4,
                        (8, 8, 16, 32) if arch == "matryoshka" else None, "layer.3", "tiny/clip"))
    perturb(sae, ["b_enc", "b_dec"])
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(F) * 0.5 if arch == "jumprelu" else torch.tensor(0.3))
    sae_lens_format.write(sae, tmp_path / "lens")
    theirs = LensSAE.load_from_disk(tmp_path / "lens")
    assert theirs.cfg.metadata.hook_name == "layer.3" and theirs.cfg.metadata.model_name == "tiny/clip"
    x = inputs(seed=8)
    with torch.no_grad():
        codes = theirs.encode(x)
        codes = codes.to_dense() if codes.is_sparse else codes
        assert_same(sae, x, codes, theirs.decode(codes))
    back = SAE.from_pretrained(tmp_path / "lens")  # and the export reads back as SAELens
    assert json.loads((tmp_path / "lens" / "cfg.json").read_text())["d_sae"] == F
    assert rel_err(back.encode(x), sae.encode(x)) < 1e-6


# ---------------------------------------------------------------- the pipeline on a converted SAE

def test_convert_evaluate_report_steer_on_a_converted_sae(tmp_path):
    """A sparsify coder at the layer the tiny LLaVA's projector reads: `convert`, then `evaluate` (MS against the
    neurons too), `report` and `steer` take it like an SAE trained here."""
    from _steer_helpers import save_tiny_llava
    from sparsify import SparseCoder, SparseCoderConfig
    from typer.testing import CliRunner

    from sae_vlm.cli import app

    coder = SparseCoder(32, SparseCoderConfig(num_latents=128, k=8))
    perturb(coder, ["encoder.bias", "b_dec"])
    with torch.no_grad():
        coder.W_dec.mul_(4)  # so clamping one latent moves the tiny model's answer
    coder.save_to_disk(tmp_path / "released" / "vision.layer.1")
    cli = CliRunner()

    def run(*args):
        r = cli.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output

    sae_dir = tmp_path / "run" / "saes" / "sparsify_l1"
    out = run("convert", tmp_path / "released" / "vision.layer.1", sae_dir, "--hook-point", "layer.1")
    assert "topk SAE (d_in=32, d_sae=128, k=8) from sparsify" in out
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.normal(size=(80, 32)) + 0.3).astype(np.float32))
    np.save(tmp_path / "emb.npy", (rng.normal(size=(80, 8)) + 0.5).astype(np.float32))
    out = run("evaluate", tmp_path / "run", "--data", tmp_path / "acts.npy", "--embeddings", tmp_path / "emb.npy",
              "--quiet")
    m = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    [r] = m["saes"]
    assert r["name"] == "sparsify_l1" and np.isfinite(r["ms"]["mean"]) and r["recon"]["l0"] == 8
    assert m["baselines"]["layer.1"]["no_sae"]["latents"] == 32  # the neurons, scored the same way
    assert "sparsify_l1: MS" in out and "L0 8.0" in out
    run("report", tmp_path / "run", "--out", tmp_path / "report", "--quiet")
    assert "sparsify_l1" in (tmp_path / "report" / "index.html").read_text()
    llava = save_tiny_llava(tmp_path / "llava")
    active = int(SAE.from_pretrained(sae_dir).encode(torch.from_numpy(np.load(tmp_path / "acts.npy"))).sum(0).argmax())
    run("steer", "--llava", llava, "--sae", sae_dir, "--latents", active, "--alpha", "0,200", "--image", "white",
        "--prompt", "describe the image", "--max-new-tokens", "4", "--out", tmp_path / "steer.json", "--quiet")
    rows = json.loads((tmp_path / "steer.json").read_text())["results"]
    base = next(r["output"] for r in rows if r["latent"] is None)
    assert any(r["output"] != base for r in rows if r["latent"] is not None)


def test_hub_repo_subfolder_fetches_only_that_sae(tmp_path, monkeypatch):
    """A hub id with a subfolder naming one checkpoint downloads that file and its trainer config, nothing else."""
    import fnmatch
    import shutil

    import huggingface_hub

    hub = train_dl("batchtopk", tmp_path / "hub" / "l22_batchtopk_x8")
    ckpts = hub / "checkpoints"
    ckpts.mkdir()
    for step in (0, 100000):
        shutil.copyfile(hub / "ae.pt", ckpts / f"ae_{step}.pt")
    asked = []

    def snapshot_download(repo_id, revision=None, allow_patterns=()):
        asked.extend(allow_patterns)
        local = tmp_path / "cache" / repo_id
        for f in (tmp_path / "hub").rglob("*"):
            rel = f.relative_to(tmp_path / "hub").as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (local / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, local / rel)
        return str(local)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    sae = SAE.from_pretrained("someone/released-saes",
                              subfolder="l22_batchtopk_x8/trainer_0/checkpoints/ae_100000.pt")
    fetched = sorted(p.relative_to(tmp_path / "cache").as_posix() for p in (tmp_path / "cache").rglob("*.*"))
    assert fetched == ["someone/released-saes/l22_batchtopk_x8/trainer_0/checkpoints/ae_100000.pt",
                       "someone/released-saes/l22_batchtopk_x8/trainer_0/config.json"]
    assert sae.cfg.arch == "batchtopk" and sae.cfg.hook_point == "layer.3" and asked


def test_library_comparison_table_on_one_tiny_store(tmp_path):
    """scripts/compare_libraries.py: six libraries train on the same rows, convert, and evaluate scores them all."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import compare_libraries as cl
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(6, D)) * 3
    for name, n in (("train", 1200), ("eval", 300)):
        labels = rng.integers(0, 6, n)
        np.save(tmp_path / f"{name}.npy", (centres[labels] + rng.normal(size=(n, D)) * 0.3).astype(np.float32))
        if name == "eval":
            np.save(tmp_path / "emb.npy", (np.eye(6)[labels] + rng.normal(size=(n, 6)) * 0.1).astype(np.float32))
    args = cl.parse(["--train", str(tmp_path / "train.npy"), "--eval", str(tmp_path / "eval.npy"), "--embeddings",
                     str(tmp_path / "emb.npy"), "--out", str(tmp_path / "cmp"), "--steps", "40", "--batch-size",
                     "64", "--width", "2", "--k", "4", "--saev-l1", "0.02"])
    rows = cl.compare(args)
    assert [r["library"] for r in rows] == list(cl.LIBRARIES)
    for r in rows:
        m = r["metrics"]
        assert np.isfinite(m["ms"]["mean"]) and 0 < m["recon"]["fve"] <= 1 and m["recon"]["l0"] > 0, r["library"]
        assert m["d_sae"] == 2 * D and 0 <= m["recon"]["dead_frac"] < 1
    table = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + len(rows) and all(f"| {lib} |" in "\n".join(table) for lib in cl.LIBRARIES)


def test_push_stages_the_sae_its_model_card_and_a_sae_lens_copy(tmp_path, monkeypatch):
    from sae_lens import SAE as LensSAE
    from typer.testing import CliRunner

    from sae_vlm.cli import app

    torch.manual_seed(3)
    sae = SAE(SAEConfig("matryoshka", D, F, 4, (8, 8, 16, 32), "layer.3", "openai/clip-vit-base-patch32", "cls"))
    perturb(sae, ["b_enc", "b_dec"])
    sae.threshold.fill_(0.2)
    sae.meta = {"data": "/data/stores/train", "training": {"step": 500, "lr": 0.002, "batch_size": 64, "seed": 0}}
    sae_dir = tmp_path / "run" / "saes" / "matryoshka_x4_k4"
    sae.save_pretrained(sae_dir)
    rng = np.random.default_rng(0)
    np.save(tmp_path / "acts.npy", (rng.normal(size=(60, D)) + 0.5).astype(np.float32))
    np.save(tmp_path / "emb.npy", (rng.normal(size=(60, 6)) + 0.5).astype(np.float32))
    cli = CliRunner()
    r = cli.invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / "acts.npy"), "--embeddings",
                         str(tmp_path / "emb.npy"), "--quiet"])
    assert r.exit_code == 0, r.output
    [m] = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())["saes"]
    r = cli.invoke(app, ["push", str(sae_dir), "me/clip-sae", "--dry-run", str(tmp_path / "stage")])
    assert r.exit_code == 0, r.output
    stage = tmp_path / "stage"
    for name in ("config.json", "model.safetensors"):
        assert (stage / name).read_bytes() == (sae_dir / name).read_bytes()
    card = (stage / "README.md").read_text()
    for text in ("library_name: sae-vlm", "base_model: openai/clip-vit-base-patch32", "| architecture | matryoshka |",
                 f"| d_in | {D} |", f"| d_sae | {F} (×4) |", "| k | 4 |", "| hook point | layer.3 |",
                 "| token selection | cls |", "| training data | /data/stores/train |", "step 500",
                 f"{m['ms']['mean']:.3f} ± {m['ms']['std']:.3f}", f"{100 * m['recon']['fve']:.1f}%",
                 f"| {m['recon']['l0']:.1f} |", 'SAE.from_pretrained("me/clip-sae")'):
        assert text in card, text
    x = inputs(seed=4)
    lens = LensSAE.load_from_disk(stage / "sae_lens")
    assert rel_err(lens.decode(lens.encode(x)), sae(x)) < 1e-5
    # without --dry-run the same folder goes to the hub
    import huggingface_hub

    uploaded = {}

    class Api:
        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["repo"] = (repo_id, private)

        def upload_folder(self, folder_path, repo_id, revision=None, commit_message=""):
            uploaded["files"] = sorted(p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*.*"))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    r = cli.invoke(app, ["push", str(sae_dir), "me/clip-sae", "--private"])
    assert r.exit_code == 0, r.output
    assert uploaded == {"repo": ("me/clip-sae", True), "files": ["README.md", "config.json", "model.safetensors",
                                                                 "sae_lens/cfg.json",
                                                                 "sae_lens/sae_weights.safetensors"]}
    assert cli.invoke(app, ["push", str(tmp_path), "me/x", "--dry-run", str(tmp_path / "s2")]).exit_code == 2
