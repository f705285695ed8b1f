"""Images -> backbone hook points -> activation store, with decoding and writing overlapped with compute.

Distributed (torchrun): shard s is processed by rank s % world_size; every rank writes its own shard files
and part markers, and rank 0 writes the manifests after a barrier. Shard contents depend only on the input
order, so the store equals a single-process run byte for byte.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta

import numpy as np
import torch
from tqdm.auto import tqdm

from sae_vlm.backbones.hf import Backbone, load_backbone, parse_hook_point
from sae_vlm.data.images import DEFAULT_MAX_PIXELS, BadImage, ImageSource, load_image, open_images, prefetch_map
from sae_vlm.data.store import STORAGE, StoreWriter, to_storage
from sae_vlm.data.tokens import POOLED, TokenSelection, parse_tokens, rows_per_image, select_tokens

PRESETS = {
    "paper-ms": {"model": "openai/clip-vit-large-patch14-336", "layers": "11,17,22,23,last", "tokens": "cls"},
    "paper-steer": {"model": "openai/clip-vit-large-patch14-336", "layers": "22", "tokens": "random-2"},
}


@dataclass(frozen=True)
class ExtractConfig:
    model: str
    data: str
    out: str
    layers: tuple[str, ...] = ()  # empty: the layer LLaVA's projector reads, else "last"
    tokens: tuple[str, ...] = ("cls",)
    dtype: str = "fp16"  # storage dtype: fp16 | bf16 | fp32
    model_dtype: str | None = None  # compute dtype; default fp32 on CPU, fp16 on CUDA
    batch_size: int = 64
    shard_rows: int = 4096  # rows per shard (of the selection with most rows per image); skipped images make it less
    workers: int = 4
    device: str = "cpu"
    seed: int = 0  # for random-k token draws
    max_pixels: int = DEFAULT_MAX_PIXELS

    def store_config(self, n_images: int) -> dict:
        """The settings a resume must match (not batch size, workers, device or ranks: they do not change rows)."""
        d = asdict(self)
        for k in ("out", "batch_size", "workers", "device"):
            d.pop(k)
        return {**d, "layers": list(self.layers), "tokens": list(self.tokens), "n_images": n_images}


def _dist(device: str) -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    if ws <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend, timeout=timedelta(hours=12))
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _plan(backbone: Backbone, layers, tokens) -> list[tuple[str, str, TokenSelection]]:
    """(subdir name, hook point, selection) for every requested combination; 'last' gets one 'pooled' subdir."""
    plan = []
    for hp in dict.fromkeys(parse_hook_point(x) for x in layers):
        backbone._module(hp)  # validates the name early
        sels = [POOLED] if hp == "last" else parse_tokens(list(tokens))
        for sel in sels:
            if sel.kind == "cls" and not backbone.has_cls:
                raise ValueError(f"token selection 'cls' at {hp}: {backbone.model_id} has no CLS token (SigLIP); "
                                 "use --layers last for its pooled vector, or --tokens mean / random-k")
            plan.append((f"{hp}__{sel.name}", hp, sel))
    return plan


def run_extract(cfg: ExtractConfig, backbone: Backbone | None = None, quiet: bool = False) -> dict:
    """Run one extraction (or resume it); returns a summary dict (rows, skipped, seconds, img_per_s)."""
    rank, world = _dist(cfg.device)
    device = cfg.device
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if backbone is None:
        mdt = cfg.model_dtype or ("fp16" if device.startswith("cuda") else "fp32")
        backbone = load_backbone(cfg.model, device=device, dtype=mdt)
    src: ImageSource = open_images(cfg.data)
    n = len(src)
    if n == 0:
        raise ValueError(f"data source {cfg.data} holds no images")
    layers = list(cfg.layers) or ([backbone.default_layer] if backbone.default_layer else ["last"])
    plan = _plan(backbone, layers, cfg.tokens)
    n_tokens = _n_tokens(backbone)
    subdirs = {name: {"hook_point": hp, "tokens": sel.name, "rows_per_image": rows_per_image(sel, n_tokens)}
               for name, hp, sel in plan}
    writer = StoreWriter(cfg.out, cfg.store_config(n), subdirs)
    writer.prepare(is_main=rank == 0)
    _barrier(world)
    # a shard covers a fixed range of input images, so its content depends on nothing but the input order
    shard_images = max(1, cfg.shard_rows // max(sd["rows_per_image"] for sd in subdirs.values()))
    n_shards = math.ceil(n / shard_images)
    done = writer.done_shards()
    mine = [s for s in range(n_shards) if s % world == rank and s not in done]
    todo = [i for s in mine for i in range(s * shard_images, min(n, (s + 1) * shard_images))]
    if done and rank == 0 and not quiet:
        print(f"resuming: {len(done)} of {n_shards} shards already done")

    def load(i: int):
        try:
            return i, backbone.preprocess([load_image(src, i, cfg.max_pixels)])[0], None
        except BadImage as e:
            return i, None, str(e)
        except Exception as e:  # a decodable image the processor cannot handle: skip it, never end the run
            return i, None, f"cannot preprocess: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    hook_points = list(dict.fromkeys(hp for _, hp, _ in plan))
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), disable=quiet or rank != 0, unit="img", desc="extract")
    write_pool = ThreadPoolExecutor(1)
    pending = None
    bufs: dict[int, dict] = {}  # shard -> rows computed so far; batches may span shards
    items: list[tuple[int, int]] = []  # (shard, image index) of the batch being filled
    px: list[torch.Tensor] = []
    n_seen = 0

    def new_buf():
        return {"acts": {name: [] for name in subdirs}, "tok": {name: [] for name in subdirs}, "images": [], "skipped": []}

    def flush_batch():
        if not px:
            return
        acts = backbone.capture(torch.stack(px), hook_points)
        ids = [src.records[i].id for _, i in items]
        shard_of = np.array([s for s, _ in items])
        for name, hp, sel in plan:
            rows, tok = select_tokens(acts[hp], sel, ids, backbone.has_cls, backbone.n_registers, cfg.seed, hp)
            arr, tok = to_storage(rows, cfg.dtype, hp), tok.numpy()
            r = len(arr) // len(items)
            for s in np.unique(shard_of):
                lo, hi = np.flatnonzero(shard_of == s)[[0, -1]]  # a shard's images are contiguous in the batch
                bufs[int(s)]["acts"][name].append(arr[lo * r : (hi + 1) * r])
                bufs[int(s)]["tok"][name].append(tok[lo * r : (hi + 1) * r])
        items.clear()
        px.clear()

    def submit_done(before: int | None):
        """Write every buffered shard < `before` (all of them if None); call only with an empty batch."""
        nonlocal pending
        for s in sorted(bufs):
            if before is not None and s >= before:
                break
            b = bufs.pop(s)
            arrays = {k: (np.concatenate(v) if v else np.zeros((0, backbone.d_model), STORAGE[cfg.dtype]))
                      for k, v in b["acts"].items()}
            toks = {k: (np.concatenate(v) if v else np.zeros(0, np.int32)) for k, v in b["tok"].items()}
            if pending is not None:
                pending.result()  # one write in flight at a time bounds memory
            pending = write_pool.submit(writer.write_shard, s, arrays, toks, b["images"], b["skipped"])

    try:
        for i, pv, reason in prefetch_map(load, todo, cfg.workers, ahead=max(2 * cfg.batch_size, 8)):
            s = i // shard_images
            buf = bufs.setdefault(s, new_buf())
            rec = src.records[i]
            if pv is None:
                buf["skipped"].append({"path": rec.path, "reason": reason})
            else:
                buf["images"].append({"id": rec.id, "path": rec.path, "label": rec.label})
                items.append((s, i))
                px.append(pv)
                if len(px) >= cfg.batch_size:
                    flush_batch()
                    submit_done(before=s)
            n_seen += 1
            bar.update(1)
        flush_batch()
        submit_done(before=None)
        if pending is not None:
            pending.result()
    finally:
        write_pool.shutdown(wait=True)
        bar.close()
    _barrier(world)
    elapsed = time.perf_counter() - t0
    if world > 1:  # images processed by all ranks, for the summary's throughput
        import torch.distributed as dist

        t = torch.tensor([n_seen], device=device if device.startswith("cuda") else "cpu")
        dist.all_reduce(t)
        n_seen = int(t.item())
    summary = {"rows": None, "skipped": None, "seconds": elapsed, "images_processed": n_seen,
               "img_per_s": n_seen / elapsed if elapsed > 0 else float("nan"), "rank": rank, "world_size": world}
    if rank == 0:
        meta = {"model_id": backbone.model_id, "revision": backbone.revision, "d_model": backbone.d_model,
                "data": cfg.data, "shard_images": shard_images}
        root = writer.finalize(n_shards, meta)
        summary.update(rows=root["rows"], skipped=root["skipped"], subdirs=root["subdirs"])
    _barrier(world)
    return summary


def _n_tokens(backbone: Backbone) -> int:
    """Sequence length of a layer output (rows per image of 'all'), measured on a blank image because the
    processor's crop, not the config's image_size, decides it (DINOv2 interpolates positions)."""
    from PIL import Image

    px = backbone.preprocess([Image.new("RGB", (64, 64))])
    return int(backbone.capture(px, ["layer.0"])["layer.0"].shape[1])
