"""Images -> backbone hook points -> activation store, with decoding and writing overlapped with compute.

Distributed (torchrun): shard s is processed by rank s % world_size; every rank writes its own shard files
and part markers, and rank 0 writes the manifests after a barrier. Shard contents depend only on the input
order, so the store equals a single-process run byte for byte.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sae_vlm.backbones import Backbone, load_backbone
from sae_vlm.config import ExtractConfig
from sae_vlm.data.images import BadImage, ImageSource, load_image, open_images, prefetch_map
from sae_vlm.data.store import STORAGE, StoreWriter, to_storage
from sae_vlm.data.tokens import rows_per_image, select_tokens
from sae_vlm.device import join_process_group, resolve_device, resolve_dtype
from sae_vlm.outdir import claim
from sae_vlm.token_selection import POOLED, TokenSelection, parse_tokens

Plan = list[tuple[str, str, TokenSelection]]  # (store subdir, hook point, token selection)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def make_plan(backbone: Backbone, layers, tokens) -> Plan:
    """(subdir name, hook point, selection) for every requested combination; 'last' gets one 'pooled' subdir."""
    plan = []
    for hp in dict.fromkeys(_layer(backbone, x) for x in layers):
        sels = [POOLED] if hp == "last" else parse_tokens(list(tokens))
        for sel in sels:
            if sel.kind == "cls" and not backbone.has_cls:
                raise ValueError(f"token selection 'cls' at {hp}: {backbone.model_id} has no CLS token (SigLIP); "
                                 "use --layers last for its pooled vector, or --tokens mean / random-k")
            plan.append((f"{hp}__{sel.name}", hp, sel))
    return plan


def resume_settings(cfg: ExtractConfig, n_images: int) -> dict:
    """The settings a resume must match: all that can change the stored bytes, batch size included (batched
    kernels may round differently); not workers, device, ranks or output folder."""
    d = dataclasses.asdict(cfg)
    for k in ("out", "workers", "device", "quiet"):
        d.pop(k)
    return {**d, "layers": list(cfg.layers), "tokens": list(cfg.tokens), "n_images": n_images}


def _layer(backbone: Backbone, name: str) -> str:
    """The hook point a --layers entry names, under its one name: -1 is stored as layer.<n - 1>."""
    try:
        return backbone.hook_point(name)
    except ValueError as e:
        raise ValueError(f"--layers {name}: {e}") from None


class ShardWriter:
    """Turns decoded images, in input order, into store shards: fills a batch, runs the backbone on it, keeps each
    shard's rows until the stream has passed the shard, then writes it on a background thread (one write in
    flight at a time bounds memory). Batches may span shards; a shard's images are contiguous in a batch."""

    def __init__(self, cfg: ExtractConfig, backbone: Backbone, src: ImageSource, plan: Plan, store: StoreWriter,
                 shard_images: int):
        self.cfg, self.backbone, self.src, self.plan, self.store = cfg, backbone, src, plan, store
        self.shard_images = shard_images
        self.hook_points = list(dict.fromkeys(hp for _, hp, _ in plan))
        self.shards: dict[int, dict] = {}  # shard -> rows computed so far
        self.batch: list[tuple[int, int]] = []  # (shard, image index) of the batch being filled
        self.pixels: list[torch.Tensor] = []
        self.pool = ThreadPoolExecutor(1)
        self.pending: Future | None = None
        self.on_done: Callable[[int], object] = lambda n: None  # images through the model (or skipped) so far

    def add(self, i: int, pixels: torch.Tensor | None, reason: str | None) -> None:
        """Image i of the input, preprocessed, or None with the reason it was skipped."""
        s = i // self.shard_images
        if self.batch and self.batch[-1][0] != s:  # a batch never spans shards: a resumed shard is batched alike
            self._run_batch()
            self._write_shards(before=s)
        shard = self.shards.setdefault(s, {"acts": {name: [] for name, _, _ in self.plan},
                                           "tok": {name: [] for name, _, _ in self.plan}, "images": [], "skipped": []})
        rec = self.src.records[i]
        if pixels is None:
            shard["skipped"].append({"path": rec.path, "reason": reason})
            self.on_done(1)
            return
        shard["images"].append({"id": rec.id, "path": rec.path, "label": rec.label})
        self.batch.append((s, i))
        self.pixels.append(pixels)
        if len(self.pixels) >= self.cfg.batch_size:
            self._run_batch()
            self._write_shards(before=s)

    def finish(self) -> None:
        """Run the last batch, write every remaining shard and wait for the writes."""
        self._run_batch()
        self._write_shards(before=None)
        if self.pending is not None:
            self.pending.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _run_batch(self) -> None:
        if not self.pixels:
            return
        bb, cfg = self.backbone, self.cfg
        acts = bb.capture(torch.stack(self.pixels), self.hook_points)
        ids = [self.src.records[i].id for _, i in self.batch]
        shard_of = np.array([s for s, _ in self.batch])
        for name, hp, sel in self.plan:
            rows, tok = select_tokens(acts[hp], sel, ids, bb.has_cls, bb.n_registers, cfg.seed, hp)
            arr, tok = to_storage(rows, cfg.dtype, hp), tok.numpy()
            r = len(arr) // len(self.batch)
            for s in np.unique(shard_of):
                lo, hi = np.flatnonzero(shard_of == s)[[0, -1]]
                self.shards[int(s)]["acts"][name].append(arr[lo * r : (hi + 1) * r])
                self.shards[int(s)]["tok"][name].append(tok[lo * r : (hi + 1) * r])
        self.on_done(len(self.batch))
        self.batch.clear()
        self.pixels.clear()

    def _write_shards(self, before: int | None) -> None:
        """Write every buffered shard < `before` (all of them if None); only with an empty batch."""
        for s in sorted(self.shards):
            if before is not None and s >= before:
                break
            b = self.shards.pop(s)
            arrays = {name: np.concatenate(b["acts"][name]) if b["acts"][name]
                      else np.zeros((0, self.backbone.width(hp)), STORAGE[self.cfg.dtype]) for name, hp, _ in self.plan}
            toks = {k: (np.concatenate(v) if v else np.zeros(0, np.int32)) for k, v in b["tok"].items()}
            if self.pending is not None:
                self.pending.result()
            lo = s * self.shard_images
            listing = [r.id for r in self.src.records[lo : lo + self.shard_images]]
            self.pending = self.pool.submit(self.store.write_shard, s, arrays, toks, b["images"], b["skipped"],
                                            listing)


@dataclasses.dataclass(frozen=True)
class StoreSummary:
    """What the finished store holds (rank 0 reads it when it merges the shards)."""

    rows: int  # images kept
    skipped: list[dict]  # {path, reason} per image passed over
    subdirs: list[str]
    ignored: dict[str, int]  # files of --data that are not images, by extension
    notes: list[str]  # what --data was read as, and what in it was passed over


@dataclasses.dataclass(frozen=True)
class ExtractSummary:
    """What one rank of `run_extract` did; `store` on rank 0 only."""

    seconds: float
    images_processed: int  # by all ranks
    img_per_s: float
    rank: int
    world_size: int
    store: StoreSummary | None = None


def run_extract(cfg: ExtractConfig, backbone: Backbone | None = None) -> ExtractSummary:
    """Run one extraction (or resume it); returns what it did."""
    rank, world, device, _ = join_process_group(resolve_device(cfg.device))
    resolve_dtype(cfg.model_dtype or "auto", device, "--model-dtype")  # bf16 on a CPU that lacks it: refused first
    if "*" not in cfg.data and Path(cfg.data).exists():  # recorded absolute: the store reads the same from anywhere
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).resolve()))
    with claim(cfg.out, "extract", lead=rank == 0):
        return _extract(cfg, backbone, rank, world, device)


def _extract(cfg: ExtractConfig, backbone: Backbone | None, rank: int, world: int, device) -> ExtractSummary:
    src = open_images(cfg.data)  # before the model: a bad --data fails fast
    if len(src) == 0:
        other = ", ".join(f"{ext} {n}" for ext, n in list(src.ignored.items())[:8])
        raise ValueError("; ".join([f"--data {cfg.data} holds no images"] + ([f"other files: {other}"] if other else [])
                                   + src.notes))
    if backbone is None:
        backbone = load_backbone(cfg.model, device=device, dtype=cfg.model_dtype or "auto")
    layers = list(cfg.layers) or ([backbone.default_layer] if backbone.default_layer else ["last"])
    plan = make_plan(backbone, layers, cfg.tokens)
    n_tokens = _n_tokens(backbone)
    subdirs = {name: {"hook_point": hp, "tokens": sel.name, "rows_per_image": rows_per_image(sel, n_tokens),
                      "width": backbone.width(hp), "note": backbone.describe(hp), "tokens_per_image": n_tokens,
                      "prefix_tokens": backbone.n_prefix} for name, hp, sel in plan}
    store = StoreWriter(cfg.out, resume_settings(cfg, len(src)), subdirs)
    store.prepare(is_main=rank == 0)
    _barrier(world)
    # a shard covers a fixed range of input images, so its content depends on nothing but the input order
    shard_images = max(1, cfg.shard_rows // max(sd["rows_per_image"] for sd in subdirs.values()))
    n_shards = math.ceil(len(src) / shard_images)
    done = store.done_shards()
    store.check_listing(done, [r.id for r in src.records], shard_images, cfg.data)
    if done and rank == 0 and not cfg.quiet:
        print(f"resuming: {len(done)} of {n_shards} shards already done")
    if rank == 0:
        check_disk_space(cfg, subdirs, n_shards - len(done), shard_images)
    mine = [s for s in range(n_shards) if s % world == rank and s not in done]
    todo = [i for s in mine for i in range(s * shard_images, min(len(src), (s + 1) * shard_images))]
    t0 = time.perf_counter()
    n_seen = _process(cfg, backbone, src, ShardWriter(cfg, backbone, src, plan, store, shard_images), todo, rank)
    _barrier(world)
    elapsed = time.perf_counter() - t0
    if world > 1:  # images processed by all ranks, for the summary's throughput
        t = torch.tensor([n_seen], device=device)
        dist.all_reduce(t)
        n_seen = int(t.item())
    done_store = None
    if rank == 0:
        meta = {"model_id": backbone.model_id, "revision": backbone.revision, "d_model": backbone.d_model,
                "data": cfg.data, "shard_images": shard_images, "ignored_files": src.ignored, "source": src.describe()}
        root = store.finalize(n_shards, meta)
        done_store = StoreSummary(root["rows"], root["skipped"], root["subdirs"], src.ignored, src.notes)
    _barrier(world)
    return ExtractSummary(elapsed, n_seen, n_seen / elapsed if elapsed > 0 else float("nan"), rank, world, done_store)


def check_disk_space(cfg: ExtractConfig, subdirs: dict[str, dict], shards_left: int, shard_images: int) -> None:
    """Refuse up front a store the disk cannot hold: a full disk mid-run costs the user the time until then."""
    values = sum(sd["rows_per_image"] * sd["width"] for sd in subdirs.values())
    need = shards_left * shard_images * values * np.dtype(STORAGE[cfg.dtype]).itemsize
    free = shutil.disk_usage(cfg.out).free
    if need > free:
        raise OSError(f"--out {cfg.out}: the store needs about {need / 1e9:.1f} GB more, {free / 1e9:.1f} GB are free "
                      "on that disk; free space or choose another --out, then rerun the same command to resume")


def _process(cfg: ExtractConfig, backbone: Backbone, src: ImageSource, writer: ShardWriter, todo: list[int],
             rank: int) -> int:
    """Decode and preprocess `todo` on worker threads, feed the writer in order; returns the images seen."""

    def load(i: int):
        try:
            return i, backbone.preprocess([load_image(src, i, cfg.max_pixels)])[0], None
        except BadImage as e:
            return i, None, str(e)
        except Exception as e:  # a decodable image the processor cannot handle: skip it, never end the run
            return i, None, f"cannot preprocess: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"

    n_seen = 0
    with tqdm(total=len(todo), disable=cfg.quiet or rank != 0, unit="img", desc="extract") as bar:
        writer.on_done = bar.update  # counts images through the forward pass, not as they are decoded
        try:
            for i, pixels, reason in prefetch_map(load, todo, cfg.workers, ahead=max(2 * cfg.batch_size, 8)):
                writer.add(i, pixels, reason)
                n_seen += 1
            writer.finish()
        finally:
            writer.close()
    return n_seen


def _n_tokens(backbone: Backbone) -> int:
    """Sequence length of a layer output (rows per image of 'all'), measured on a blank image because the
    processor's crop, not the config's image_size, decides it (DINOv2 interpolates positions)."""
    from PIL import Image

    px = backbone.preprocess([Image.new("RGB", (64, 64))])
    return int(backbone.capture(px, ["layer.0"])["layer.0"].shape[1])
