"""Extraction throughput vs the bare forward pass of the same model on the same images.

  bare:    pixel_values prepared in memory beforehand, timed `model(pixel_values)` over batches (full forward)
  extract: `run_extract` from a folder of PNG files: decode + preprocess (worker threads) + capture + token
           selection + fp16 shards + manifest, at the last layer and "last" (so also a full forward)
ratio = extract img/s / bare img/s (goal >= 0.9: decoding and writing hidden behind compute).

  python benchmarks/extract_throughput.py --hidden 384 --layers 6 --image-size 224 --n-images 256
  python benchmarks/extract_throughput.py --model openai/clip-vit-large-patch14-336 --device cuda --n-images 4096
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sae_vlm.backbones import Backbone, load_backbone
from sae_vlm.config import ExtractConfig
from sae_vlm.data.extract import run_extract


def tiny_model(args, tmp: Path) -> str:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                           num_attention_heads=max(1, args.hidden // 64), image_size=args.image_size, patch_size=16,
                           projection_dim=args.hidden)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp / "model")
    s = args.image_size
    CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}).save_pretrained(tmp / "model")
    return str(tmp / "model")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="hub id or dir; default: a random CLIP built from --hidden/--layers")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--n-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model-dtype", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = args.model or tiny_model(args, tmp)
        mdt = args.model_dtype or ("fp16" if args.device.startswith("cuda") else "fp32")
        bb: Backbone = load_backbone(model, device=args.device, dtype=mdt)
        rng = np.random.default_rng(0)
        (tmp / "imgs").mkdir()
        for i in range(args.n_images):  # photo-like sizes so decode + resize cost is realistic
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(tmp / "imgs" / f"{i:06d}.png")
        n_layers = bb.n_layers
        # bare forward: same batches, inputs already in memory
        px = bb.preprocess([Image.open(tmp / "imgs" / f"{i:06d}.png").convert("RGB") for i in range(args.batch_size)])
        px = px.to(bb.device(), bb.dtype())
        n_batches = (args.n_images + args.batch_size - 1) // args.batch_size
        with torch.inference_mode():
            bb.run(px)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n_batches):
                bb.run(px)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            bare = n_batches * args.batch_size / (time.perf_counter() - t)
        cfg = ExtractConfig(model=model, data=str(tmp / "imgs"), out=str(tmp / "store"),
                            layers=(f"layer.{n_layers - 1}", "last"), tokens=("cls",), batch_size=args.batch_size,
                            shard_rows=max(args.batch_size, args.n_images // 4), workers=args.workers,
                            device=args.device, quiet=True)
        t = time.perf_counter()
        s = run_extract(cfg, backbone=bb)
        ext = args.n_images / (time.perf_counter() - t)
        res = {"model": args.model or f"random CLIP hidden={args.hidden} layers={args.layers} image={args.image_size}",
               "device": args.device, "n_images": args.n_images, "batch_size": args.batch_size,
               "workers": args.workers, "threads": torch.get_num_threads(), "bare_img_per_s": round(bare, 2),
               "extract_img_per_s": round(ext, 2), "ratio": round(ext / bare, 3),
               "rows": s.store.rows if s.store else None}
        print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
