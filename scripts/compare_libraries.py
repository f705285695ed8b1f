"""SAEs from six libraries trained on the same activations, converted, and scored side by side by `sae-vlm evaluate`.

    python scripts/compare_libraries.py --train runs/demo/stores/train --eval runs/demo/stores/eval --layer last \
        --embeddings runs/demo/embeddings/clip.npy --out runs/compare

Every library trains with its own model code on the same batches (same rows, same order, same steps, width and
learning rate); each SAE is then read back through `sae_vlm.sae.formats` exactly as `sae-vlm convert` would, into
OUT/saes/<library>/, and `evaluate` scores them all in one pass: MS against the image embeddings, FVE, L0 and the
fraction of dead latents. Inputs are divided by s = sqrt(E‖x‖²) for every library (dictionary_learning and sae-vlm
do so themselves and fold it back); saev also gets its loader's mean-centring and rescaling to norm sqrt(d). Those
are folded into the converted SAEs with --input-mean/--input-scale, so all six take raw activations.
The peer libraries come from benchmarks/.peers (pinned; see benchmarks/peers.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import peers  # noqa: E402

from sae_vlm.config import ConvertConfig, EvaluateConfig, TrainConfig  # noqa: E402
from sae_vlm.data.store import open_store  # noqa: E402
from sae_vlm.eval.run import evaluate_run  # noqa: E402
from sae_vlm.sae.formats import convert  # noqa: E402
from sae_vlm.sae.trainer import train  # noqa: E402


def batches(x_ND: torch.Tensor, batch_size: int, steps: int, seed: int):
    """The same batches for every library: epochs of a seeded permutation."""
    g, order = torch.Generator().manual_seed(seed), torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(x_ND), generator=g)])
        yield x_ND[order[:batch_size]]
        order = order[batch_size:]


def adam_loop(model, params, loss_fn, data, lr: float, after_step=lambda: None) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for x in data:
        loss = loss_fn(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after_step()


def train_dictionary_learning(x, a, out: Path) -> dict:
    from dictionary_learning.trainers.batch_top_k import BatchTopKTrainer
    from dictionary_learning.training import trainSAE

    d = x.shape[1]
    cfg = dict(trainer=BatchTopKTrainer, steps=a.steps, activation_dim=d, dict_size=a.width * d, k=a.k, layer=0,
               lm_name="compare", lr=a.lr, warmup_steps=a.steps // 10, threshold_start_step=a.steps // 4, seed=0,
               device="cpu")
    trainSAE(batches(x, a.batch_size, a.steps + 100, a.seed), [cfg], steps=a.steps, save_dir=str(out),
             normalize_activations=True)
    return {"src": out / "trainer_0", "trained": "BatchTopK"}


def train_sparsify(x, a, out: Path) -> dict:
    from sparsify import SparseCoder, SparseCoderConfig

    s = norm_factor(x)
    coder = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=a.width * x.shape[1], k=a.k))

    def loss(xb):
        o = coder(xb / s)
        return o.fvu + o.auxk_loss / 32

    def after():
        coder.set_decoder_norm_to_unit_norm()

    adam_loop(coder, coder.parameters(), loss, batches(x, a.batch_size, a.steps, a.seed), a.lr, after)
    coder.save_to_disk(out / "sae")
    return {"src": out / "sae", "trained": "TopK", "input_scale": 1 / s}


def train_sae_lens(x, a, out: Path) -> dict:
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    s = norm_factor(x)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=x.shape[1], d_sae=a.width * x.shape[1], k=a.k))
    step = iter(range(a.steps))

    def loss(xb):
        return sae.training_forward_pass(TrainStepInput(xb / s, {}, None, next(step), False)).loss

    adam_loop(sae, sae.parameters(), loss, batches(x, a.batch_size, a.steps, a.seed), a.lr)
    sae.save_inference_model(out / "sae")
    return {"src": out / "sae", "trained": "BatchTopK (saved as JumpReLU)", "input_scale": 1 / s}


def train_saev(x, a, out: Path) -> dict:
    import saev.config
    import saev.nn

    mean = x.mean(0)
    scale = math.sqrt(x.shape[1]) / float((x - mean).norm(dim=1).mean())  # saev's scale_mean + scale_norm
    sae = saev.nn.SparseAutoencoder(saev.config.SparseAutoencoder(d_vit=x.shape[1], exp_factor=a.width,
                                                                  sparsity_coeff=a.saev_l1))

    def loss(xb):
        return sae(scale * (xb - mean))[2].loss

    def after():
        sae.normalize_w_dec()

    adam_loop(sae, sae.parameters(), loss, batches(x, a.batch_size, a.steps, a.seed), a.lr, after)
    torch.save(mean, out / "mean.pt")
    saev.nn.dump(str(out / "sae.pt"), sae)
    return {"src": out / "sae.pt", "trained": f"ReLU + L1 {a.saev_l1:g}", "input_mean": str(out / "mean.pt"),
            "input_scale": scale}


def train_overcomplete(x, a, out: Path) -> dict:
    from overcomplete.sae import TopKSAE

    s = norm_factor(x)
    sae = TopKSAE(x.shape[1], a.width * x.shape[1], top_k=a.k)

    def loss(xb):
        _, codes, x_hat = sae(xb / s)
        return (x_hat - xb / s).square().sum(-1).mean()

    adam_loop(sae, sae.parameters(), loss, batches(x, a.batch_size, a.steps, a.seed), a.lr)
    with torch.no_grad():
        sae(x[:1] / s)  # a training-mode pass normalises the dictionary, as overcomplete's own loop leaves it
    torch.save(sae.state_dict(), out / "sae.pt")
    return {"src": out / "sae.pt", "trained": "TopK", "arch": "topk", "k": a.k, "input_scale": 1 / s}


def train_sae_vlm(x, a, out: Path) -> dict:
    train(TrainConfig(data=a.train, layer=a.layer, out=str(out / "run"), archs=("batchtopk",), expansions=(a.width,),
                      ks=(a.k,), batch_size=a.batch_size, steps=a.steps, lr=a.lr, warmup_steps=a.steps // 10,
                      threshold_start_step=a.steps // 4, checkpoint_every=a.steps, log_every=a.steps, seed=a.seed,
                      device="cpu", quiet=True))
    return {"src": out / "run" / "saes" / f"batchtopk_x{a.width:g}_k{a.k}", "trained": "BatchTopK"}


LIBRARIES = {"sae-vlm": train_sae_vlm, "dictionary_learning": train_dictionary_learning, "sparsify": train_sparsify,
             "SAELens": train_sae_lens, "saev": train_saev, "overcomplete": train_overcomplete}


def norm_factor(x: torch.Tensor) -> float:
    return float(x.square().sum(1).mean().sqrt())


def table(rows: list[dict]) -> str:
    lines = ["| library | trained as | read as | MS (mean ± std) | FVE | L0 | dead |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, ms, rec = r["metrics"], r["metrics"].get("ms") or {}, r["metrics"]["recon"]
        ms_txt = f"{ms['mean']:.3f} ± {ms['std']:.3f}" if "mean" in ms else "–"
        lines.append(f"| {r['library']} | {r['trained']} | {m['arch']} | {ms_txt} | {100 * rec['fve']:.1f}% | "
                     f"{rec['l0']:.1f} | {rec['dead_frac']:.3f} |")
    return "\n".join(lines)


def compare(a: argparse.Namespace) -> list[dict]:
    peers.ensure_installed()
    torch.manual_seed(a.seed)
    x = open_store(a.train, layer=a.layer).all() if Path(a.train).is_dir() else torch.from_numpy(np.load(a.train))
    out = Path(a.out)
    rows = []
    for library in a.libraries.split(","):
        work = out / "work" / library
        work.mkdir(parents=True, exist_ok=True)
        got = LIBRARIES[library](x.float(), a, work)
        hints = {k: got[k] for k in ("arch", "k", "input_mean", "input_scale") if k in got}
        convert(ConvertConfig(src=str(got["src"]), dst=str(out / "saes" / library), hook_point=a.layer, **hints))
        rows.append({"library": library, "trained": got["trained"]})
    metrics = evaluate_run(EvaluateConfig(run_dir=str(out), data=a.eval, embeddings=a.embeddings,
                                          out=str(out / "eval"), device="cpu", quiet=True)).to_json()
    by_name = {m["name"]: m for m in metrics["saes"]}
    for r in rows:
        r["metrics"] = by_name[r["library"]]
    (out / "comparison.md").write_text(table(rows) + "\n")
    (out / "comparison.json").write_text(json.dumps([{**r, "metrics": r["metrics"]} for r in rows], indent=1,
                                                    default=str))
    return rows


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training store (or .npy)")
    p.add_argument("--eval", required=True, help="held-out store (or .npy) for evaluate")
    p.add_argument("--embeddings", default=None, help="image embeddings .npy for MS (rows of --eval)")
    p.add_argument("--layer", default=None, help="hook point subfolder of the stores")
    p.add_argument("--out", required=True)
    p.add_argument("--libraries", default=",".join(LIBRARIES))
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--saev-l1", type=float, default=4e-4, help="saev's sparsity_coeff (its default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    print(table(compare(parse())))
