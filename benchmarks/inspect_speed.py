"""`inspect` cost per image against one plain forward pass, side by side in one process, and attribution's cost
per latent at several batch sizes.

    python benchmarks/inspect_speed.py                         # CPU: a ViT-B/16-shaped CLIP tower, random weights
    python benchmarks/inspect_speed.py --shape L --d-sae 65536     # the paper's ViT-L/14-336 shape
    python benchmarks/inspect_speed.py --device cuda --shape L --d-sae 65536 --images 64 --batch-sizes 1,16,64

The tower is built from a config (no download), random weights: `B` is ViT-B/16 at 224 px (196 patches + CLS,
width 768, 12 layers, SAEs at layer.10), `L` the paper's ViT-L/14 at 336 px (576 patches + CLS, width 1024, 24
layers, SAEs at layer.22). There is a token SAE on every token and one on CLS. Ratios are against the same tower's
plain forward pass (`Backbone.run`) over the same images at the same batch size; times are medians of `--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae_vlm import SAE, SAEConfig
from sae_vlm.backbones import Backbone
from sae_vlm.eval.maps import attribution_maps, inspect_batch

SHAPES = {"B": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   image_size=224, patch_size=16, projection_dim=512),
          "L": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768)}


def tower(shape: str, device: str) -> Backbone:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**SHAPES[shape])).to(device)
    return Backbone(model, model_id=f"vit-{shape.lower()}-random")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="B")
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch-sizes", default="1,4,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU; 0: torch's default")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    bb, shape = tower(a.shape, a.device), SHAPES[a.shape]
    side, d = shape["image_size"], shape["hidden_size"]
    pv = torch.randn(a.images, 3, side, side, device=a.device)
    point = f"layer.{shape['num_hidden_layers'] - 2}"
    token = SAE(SAEConfig("topk", d, a.d_sae, 32, hook_point=point, token_selection="all")).to(a.device)
    cls = SAE(SAEConfig("topk", d, a.d_sae, 32, hook_point=point, token_selection="cls")).to(a.device)
    print(f"device {a.device}, threads {torch.get_num_threads()}, ViT-{a.shape} shape at {side} px, hook {point}, "
          f"d_sae {a.d_sae}, {a.images} images")

    with torch.no_grad():
        forward = median_time(lambda: bb.run(pv), a.device, a.repeats) / a.images
    inspect_token = median_time(lambda: inspect_batch(bb, token, pv, point, "tokens", top=10), a.device,
                                a.repeats) / a.images
    print(f"plain forward: {forward * 1e3:.1f} ms/image")
    print(f"inspect, token SAE (top 10 latents per image, one encode of every patch): "
          f"{inspect_token * 1e3:.1f} ms/image = {inspect_token / forward:.2f}x a forward pass")
    latents = torch.arange(8)
    for bs in (int(b) for b in a.batch_sizes.split(",")):
        pairs = a.images * len(latents)
        t = median_time(lambda: attribution_maps(bb, cls, pv, latents, point, how="cls", batch_size=bs), a.device,
                        max(1, a.repeats - 2)) / pairs
        print(f"attribution, batch {bs} (image, latent) pairs: {t * 1e3:.1f} ms per latent per image = "
              f"{t / forward:.2f}x a forward pass")


if __name__ == "__main__":
    main()
