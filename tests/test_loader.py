"""The streaming loader (data/loader.py): what it reads, in which order, and what a broken file does to it.

- every epoch is a set of distinct rows, epochs differ, and any step read cold equals the same step read in order;
- under --ddp the ranks' batches are disjoint and each rank reads only its own chunks;
- on a class-sorted store the mixing is close to a full permutation, and training reaches the same FVE;
- a streamed run resumed from a checkpoint ends bit-identical to an unbroken one;
- a truncated or corrupt shard stops with a line naming the file and rows.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae_vlm.cli import app
from sae_vlm.config import TrainConfig
from sae_vlm.data import loader
from sae_vlm.data import store as S
from sae_vlm.data.loader import ALIGN, FileRows, Layout, RowFile, Schedule, StreamingBatches
from sae_vlm.data.store import as_source
from sae_vlm.io import npy_bytes
from sae_vlm.sae import trainer

D = 16


def write_store(root, arr: np.ndarray, shard_rows: int, dtype: str = "fp16"):
    """A one-subdir store written by the real StoreWriter, one image per row."""
    n = len(arr)
    sub = {"acts": {"hook_point": "layer.0", "tokens": "cls", "rows_per_image": 1, "width": arr.shape[1], "note": ""}}
    w = S.StoreWriter(root, {"dtype": dtype}, sub)
    w.prepare()
    shards = range(0, n, shard_rows)
    for s, r0 in enumerate(shards):
        r1 = min(n, r0 + shard_rows)
        ims = [{"id": str(i), "path": f"{i}.png", "label": None} for i in range(r0, r1)]
        w.write_shard(s, {"acts": S.to_storage(torch.from_numpy(arr[r0:r1]), dtype, "layer.0")},
                      {"acts": np.full(r1 - r0, -1, np.int32)}, ims, [])
    w.finalize(len(shards), {"model_id": "test"})
    return S.open_store(root)


def ids_store(tmp_path, rows=1000, shard_rows=96):
    """Row i holds the value i in every column (exact in fp32 storage), so a batch names its rows."""
    arr = np.repeat(np.arange(rows, dtype=np.float32)[:, None], D, 1)
    return write_store(tmp_path / "ids", arr, shard_rows, dtype="fp32")


def streamer(src, layout: Layout, batch: int, seed=0, rank=0, world=1) -> StreamingBatches:
    return StreamingBatches(src.files, Schedule(src.rows, layout, seed, batch, rank, world),
                            torch.device("cpu"))


def rows_of(x_ND: torch.Tensor) -> list[int]:
    return x_ND[:, 0].long().tolist()


def test_epochs_are_distinct_rows_and_any_step_reads_the_same(tmp_path):
    src = ids_store(tmp_path)
    layout = Layout(chunk_rows=7, window_chunks=5)  # chunks and windows cross shard boundaries
    a = streamer(src, layout, batch=50)
    assert a.per_epoch == 1000 // 50
    epochs = [[r for i in range(a.per_epoch) for r in rows_of(a(e * a.per_epoch + i))] for e in range(2)]
    for e in epochs:
        assert len(e) == len(set(e)) == a.per_epoch * 50 and set(e) <= set(range(1000))
    assert epochs[0] != epochs[1]
    b = streamer(src, layout, batch=50)  # a resumed run asks for a step out of the blue
    for step in (33, 2, 20, 19):
        assert torch.equal(b(step), a(step))
    assert streamer(src, layout, batch=50, seed=1)(0).tolist() != a(0).tolist()
    a.close(), b.close()


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])  # gathered straight into the batch, or converted into it
def test_held_batches_stay_intact_while_released_memory_is_reused(tmp_path, monkeypatch, dtype):
    """Host batches and windows are refilled buffers: a batch (or a view of one) still held is never written over,
    one let go is refilled, and no more than two window buffers are ever made, even when batches span windows."""
    arr = np.repeat(np.arange(1000, dtype=np.float32)[:, None], D, 1)  # row ids, exact in fp16 too
    src = write_store(tmp_path / dtype, arr, 96, dtype=dtype)
    made = []
    real = loader.aligned_bytes
    monkeypatch.setattr(loader, "aligned_bytes", lambda n: made.append(n) or real(n))
    s = streamer(src, Layout(chunk_rows=7, window_chunks=5), batch=30)  # windows of 35 rows: most batches span two
    held, view = s(0), s(1)[3:9]
    want = held.clone(), view.clone(), rows_of(s.rows_of(s.schedule.pieces(0)).float()[:, None])
    buffers = set()
    for step in range(2, 3 * s.per_epoch):
        x = s(step)
        assert len({*rows_of(x)}) == 30
        buffers.add(x.data_ptr())
    assert torch.equal(held, want[0]) and torch.equal(view, want[1]) and rows_of(held) == want[2]
    assert len(buffers) == 2  # the batch the caller holds while asking for the next, and the one refilled
    assert len(made) == 2
    s.close()


def test_ddp_ranks_read_disjoint_rows_of_their_own_chunks(tmp_path):
    src = ids_store(tmp_path)
    layout = Layout(chunk_rows=10, window_chunks=4)
    ranks = [streamer(S.open_store(src.path), layout, batch=60, rank=r, world=3) for r in range(3)]  # own readers
    assert len({s.per_epoch for s in ranks}) == 1
    for step in range(ranks[0].per_epoch):
        parts = [rows_of(s(step)) for s in ranks]
        assert all(len(p) == 20 for p in parts)
        assert len(set().union(*parts)) == 60
        chunks = [{r // 10 for r in p} for p in parts]
        assert not (chunks[0] & chunks[1]) and not (chunks[1] & chunks[2]) and not (chunks[0] & chunks[2])
    read = [s.files.bytes_read for s in ranks]
    assert max(read) < 0.5 * src.rows * src.files.row_bytes, read  # a rank reads about a third, not everything


def label_entropy(labels_N: np.ndarray) -> float:
    p = np.bincount(labels_N) / len(labels_N)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_default_layout_mixes_a_class_sorted_store_like_a_full_permutation():
    """Per-batch label entropy of the default layout within 5% of a full permutation (ImageNet-like: 1000 classes
    sorted, 1.28M rows of 1024 fp16; batch 4096). Uses the schedule only: no data is read."""
    rows, classes, batch = 1_281_024, 1000, 4096
    labels = np.arange(rows) * classes // rows
    layout = Layout.for_budget(rows, 1024 * 2, 8 << 30)
    sched = Schedule(rows, layout, seed=0, batch_size=batch)
    full, ours = [], []
    perm = np.random.default_rng(0).permutation(rows)
    for step in range(0, sched.per_epoch, 31):
        full.append(label_entropy(labels[perm[step * batch : (step + 1) * batch]]))
        idx = np.concatenate([window_positions(sched, *p) for p in sched.pieces(step)])
        ours.append(label_entropy(labels[idx]))
    assert np.mean(ours) >= 0.95 * np.mean(full), (np.mean(ours), np.mean(full), layout)


def window_positions(sched: Schedule, epoch: int, w: int, a: int, b: int) -> np.ndarray:
    spans = sched.window_rows(sched.windows(epoch)[w])
    n = sum(y - x for x, y in spans)
    return sched.source_rows(epoch, w, sched.permutation(epoch, w, n)[a:b])


def clustered(rows: int, classes: int, seed=0) -> np.ndarray:
    """Sorted by class: each class a cluster around its own mean, so a badly mixed batch is visibly biased."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((classes, D)) * 3
    labels = np.arange(rows) * classes // rows
    return (means[labels] + rng.standard_normal((rows, D))).astype(np.float32)


def test_streamed_training_on_a_sorted_store_matches_the_full_permutation(tmp_path, capsys):
    arr = clustered(6000, 24)
    src = write_store(tmp_path / "sorted", arr, shard_rows=1000)
    common = dict(data=str(src.path), archs=("batchtopk",), expansions=(2,), ks=(4,), batch_size=128, steps=400,
                  warmup_steps=20, threshold_start_step=20, device="cpu", quiet=True, checkpoint_every=1000)
    mem = trainer.train(TrainConfig(out=str(tmp_path / "mem"), **common))
    low = 6000 * D * 4 / 8 / 1e9  # an eighth of the data fits: windows of ~1/32 of it
    cfg = TrainConfig(out=str(tmp_path / "stream"), max_memory=low, **{**common, "quiet": False})
    streamed = trainer.train(cfg)
    assert f"data: streamed {400 * 128:,} rows in" in capsys.readouterr().err  # the steps' rows, not the norm's
    assert json.loads((tmp_path / "stream" / "data_plan.json").read_text())["path"] == "stream"
    assert json.loads((tmp_path / "mem" / "data_plan.json").read_text())["path"] == "memory"
    x = torch.from_numpy(arr)
    with torch.no_grad():
        f_mem, f_stream = (float(trainer.fve(x, s["batchtopk_x2_k4"](x))) for s in (mem, streamed))
    assert f_stream > f_mem - 0.01, (f_mem, f_stream)


def test_streamed_run_resumes_bit_exact(tmp_path):
    arr = clustered(3000, 8)
    np.save(tmp_path / "x.npy", arr)
    args = ["train", "--data", str(tmp_path / "x.npy"), "--arch", "batchtopk", "--width", "2", "--k", "4",
            "--batch-size", "64", "--warmup-steps", "5", "--checkpoint-every", "15", "--max-memory", "0.00005",
            "--threshold-start-step", "8", "--device", "cpu", "--quiet"]  # unset, it would follow the first --steps
    run = CliRunner()
    assert run.invoke(app, [*args, "--steps", "40", "--out", str(tmp_path / "ref")]).exit_code == 0
    assert run.invoke(app, [*args, "--steps", "25", "--out", str(tmp_path / "run")]).exit_code == 0
    r = run.invoke(app, [*args, "--steps", "40", "--out", str(tmp_path / "run"), "--resume", "--max-memory", "5"])
    assert r.exit_code == 0, r.output
    a, b = ((tmp_path / d / "saes/batchtopk_x2_k4/model.safetensors").read_bytes() for d in ("ref", "run"))
    assert a == b, "the resumed run must read the batches it started with, whatever --max-memory says now"


def test_a_streamed_run_that_ends_before_theta_is_learned_settles_it_from_the_stream(tmp_path):
    """θ is set from the last batches after the loop; the stream must still be open then (it was closed, and a
    1-step run on a large store ended in a traceback)."""
    np.save(tmp_path / "x.npy", clustered(3000, 8))
    r = CliRunner().invoke(app, ["train", "--data", str(tmp_path / "x.npy"), "--arch", "topk", "--width", "2", "--k",
                                 "4", "--batch-size", "64", "--steps", "1", "--max-memory", "0.00005", "--device",
                                 "cpu", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    assert "streaming from disk" in r.output and "θ was never learned" in r.output
    assert (tmp_path / "run" / "saes" / "topk_x2_k4" / "model.safetensors").is_file()


def test_truncated_shard_is_named_with_its_rows(tmp_path):
    src = ids_store(tmp_path, rows=300, shard_rows=100)
    shard = src.path / "shard_000001.npy"
    data = shard.read_bytes()
    shard.write_bytes(data[:-D * 4 * 10])
    with pytest.raises(ValueError, match="shard_000001.npy is truncated"):
        S.open_store(src.path)
    # truncated after the store was opened: the read names the file and the missing rows
    files = FileRows([RowFile(shard, ALIGN, 100, 0)], D, np.dtype(np.float32))  # header padded to ALIGN
    with pytest.raises(ValueError, match=r"shard_000001.npy ends early: rows 90..100"):
        files.read(0, 100)


def as_old_store(src) -> S.StoreReader:
    """The store as written before block checksums: shards with numpy's own header, sha256 only."""
    mp = src.path / "manifest.json"
    m = json.loads(mp.read_text())
    m.pop("checksums")
    for sh in m["shards"]:
        data = npy_bytes(np.load(src.path / sh["file"]))
        (src.path / sh["file"]).write_bytes(data)
        sh["sha256"] = hashlib.sha256(data).hexdigest()
        del sh["crc32"], sh["header_crc32"]
    mp.write_text(json.dumps(m))
    return S.open_store(src.path)


def test_corrupt_shard_is_found_once_and_named(tmp_path, monkeypatch):
    """A store from before block checksums: whole-file sha256, remembered across runs."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src = as_old_store(ids_store(tmp_path, rows=300, shard_rows=100))
    shard = src.path / "shard_000002.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard .*shard_000002.npy \(rows 200..300\) is corrupt"):
        as_source(src.path).read_rows(0, 300)
    src2 = as_old_store(ids_store(tmp_path / "ok", rows=300, shard_rows=100))
    calls, sha256 = [], S.hashlib.sha256
    monkeypatch.setattr(S.hashlib, "sha256", lambda *a: calls.append(1) or sha256(*a))
    src2.read_rows(0, 300)
    first = len(calls)
    as_source(src2.path).read_rows(0, 300)  # a new reader in a new run: the cache says verified
    assert first >= 3 and len(calls) == first, "verified shards are not hashed again"
