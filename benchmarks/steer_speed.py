"""Steered generation: one batched grid vs one generate call per case (64 latents × 1 image, tiny LLaVA).

    python benchmarks/steer_speed.py                      # CPU, tiny random LLaVA built offline
    python benchmarks/steer_speed.py --device cuda --dtype fp16

Both runs produce the same texts (checked). The batched run uses left padding and per-item edits
(`intervene` with a list of edit dicts); the baseline calls `generate` once per (latent, α) case.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _steer_helpers import save_tiny_llava, tiny_sae  # noqa: E402

from sae_vlm.data.images import white_image  # noqa: E402
from sae_vlm.steer.generate import Case, generate_cases, load_llava  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        save_tiny_llava(Path(d))
        model, proc = load_llava(d, device=a.device, dtype=a.dtype)
    sae = tiny_sae(d_sae=max(64, a.latents))
    img = white_image()
    cases = [Case(img, "Write me a short love poem", {j: ("clamp", 50.0)}) for j in range(a.latents)]

    def run(bs):
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate_cases(model, proc, sae, cases, max_new_tokens=a.max_new_tokens, batch_size=bs)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    run(a.batch_size)  # warm-up
    batched = min(run(a.batch_size)[0] for _ in range(a.repeats))
    t_single, single_out = run(1)
    _, batched_out = run(a.batch_size)
    same = sum(x == y for x, y in zip(batched_out, single_out))
    print(f"device={a.device} dtype={next(model.parameters()).dtype} cases={len(cases)} "
          f"max_new_tokens={a.max_new_tokens} torch_threads={torch.get_num_threads()}")
    print(f"one-by-one : {t_single:8.3f} s  ({len(cases) / t_single:7.1f} cases/s)")
    print(f"batched({a.batch_size:>3}): {batched:8.3f} s  ({len(cases) / batched:7.1f} cases/s)  best of {a.repeats}")
    print(f"speed-up   : {t_single / batched:6.1f}x   identical texts: {same}/{len(cases)}")


if __name__ == "__main__":
    main()
