"""Block checksums and `sae-vlm verify`: a flipped byte anywhere in a shard stops every reader (streamed training,
training in memory, row reads, `verify`) with one line naming the shard and the rows of the damaged block, before
those rows are used; stores from before block checksums keep the whole-file sha256; the loader's batches are the
same as before the copies were removed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from _adversarial import refused, tree
from test_loader import as_old_store, write_store
from typer.testing import CliRunner

from sae_vlm.cli import app
from sae_vlm.data import store as S
from sae_vlm.data.loader import Layout, Schedule, StreamingBatches
from sae_vlm.io import npy_bytes

D = 256  # fp16 rows of 512 bytes: blocks of 128 rows, so a 300-row shard has blocks 0..128, 128..256, 256..300


def store(tmp_path, rows=900, shard_rows=300, dtype="fp16", seed=0):
    arr = np.random.default_rng(seed).standard_normal((rows, D)).astype(np.float32)
    return write_store(tmp_path / "store", arr, shard_rows, dtype=dtype), arr


def flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


# (byte to flip in shard_000001.npy, the rows the error names): header text, header padding, rows' blocks
ROW = D * 2
FLIPS = [(12, "300..600"), (2000, "300..600"), (4096, "300..428"), (4096 + 200 * ROW + 7, "428..556"),
         (4096 + 300 * ROW - 1, "556..600")]
TRAIN = ["train", "--width", "1", "--k", "4", "--batch-size", "64", "--steps", "15", "--warmup-steps", "2",
         "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("at,rows", FLIPS)
@pytest.mark.parametrize("how", ["streamed", "in-memory", "verify"])
def test_a_flipped_byte_anywhere_stops_every_reader_naming_shard_and_rows(tmp_path, at, rows, how):
    src, _ = store(tmp_path)
    flip(src.path / "shard_000001.npy", at)
    args = {"streamed": [*TRAIN, "--data", src.path, "--out", tmp_path / "run", "--max-memory", "0.0002"],
            "in-memory": [*TRAIN, "--data", src.path, "--out", tmp_path / "run"],
            "verify": ["verify", src.path]}[how]
    line = refused(src.path, args, f"shard_000001.npy (rows {rows}) is corrupt")
    assert str(src.path) in line


def test_row_reads_and_random_gets_check_blocks_before_returning_rows(tmp_path):
    src, arr = store(tmp_path)
    flip(src.path / "shard_000002.npy", 4096 + 130 * ROW)  # local row 130: block 128..256, rows 728..856
    reader = S.open_store(src.path)
    assert np.array_equal(reader.read_rows(0, 600).numpy(), arr[:600].astype(np.float16).astype(np.float32))
    assert np.array_equal(reader.read_rows(600, 728).numpy(), arr[600:728].astype(np.float16).astype(np.float32))
    with pytest.raises(ValueError, match=r"shard_000002.npy \(rows 728..856\) is corrupt"):
        reader.read_rows(700, 730)  # ends two rows into the damaged block
    with pytest.raises(ValueError, match=r"shard_000002.npy \(rows 728..856\) is corrupt"):
        S.open_store(src.path).get(torch.tensor([5, 800]))


def test_verify_passes_a_clean_store_and_leaves_it_untouched(tmp_path):
    src, _ = store(tmp_path, dtype="bf16")
    root = src.path.parent
    before = tree(root)
    r = CliRunner().invoke(app, ["verify", str(root)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"{src.path}: 3 shards, 900 rows, {(3 * (4096 + 300 * ROW)) / 1e9:.3g} GB: every byte " \
                               "matches the manifest"
    assert CliRunner().invoke(app, ["verify", str(root), "--layer", "acts"]).exit_code == 0
    assert tree(root) == before


@pytest.mark.parametrize("edit,culprit", [
    (lambda m: m["checksums"].update(block_rows=0), "checksums.'block_rows' is 0"),
    (lambda m: m["checksums"].update(kind="md5"), "checksums.'kind' is \"md5\""),
    (lambda m: m.update(checksums=[1]), "'checksums' is [1]"),
    (lambda m: m["shards"][1].update(crc32=m["shards"][1]["crc32"][:-8]), "shards[1].'crc32' holds 2 checksums"),
    (lambda m: m["shards"][0].update(crc32="xyz"), "shards[0].'crc32' is \"xyz\""),
    (lambda m: m["shards"][2].pop("header_crc32"), "shards[2].'header_crc32' is missing"),
])
def test_a_hand_edited_checksum_field_is_named(tmp_path, edit, culprit):
    src, _ = store(tmp_path)
    mp = src.path / "manifest.json"
    m = json.loads(mp.read_text())
    edit(m)
    mp.write_text(json.dumps(m))
    refused(tmp_path, ["verify", src.path], culprit)


@pytest.mark.parametrize("args,culprit", [(["verify", "nowhere"], "nowhere does not exist"),
                                          (["verify", "empty"], "empty is not an activation store"),
                                          (["verify", "store", "--layer", "layer.9"], "'layer.9'"),
                                          (["verify", "store", "--layer", ""], "''")])
def test_verify_refuses_what_is_not_a_store(tmp_path, monkeypatch, args, culprit):
    store(tmp_path)
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path)
    refused(tmp_path, args, culprit)


def test_old_store_streams_checked_in_the_background_and_stops_before_a_corrupt_shard(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, arr = store(tmp_path)
    old = as_old_store(src)
    assert old.checksums is None and old.files.files[0].offset == 128
    flip(old.path / "shard_000002.npy", 128 + 5)
    stream = StreamingBatches(S.open_store(old.path).files, Schedule(900, Layout(10, 20), 0, 50), torch.device("cpu"))
    seen = []
    with pytest.raises(ValueError, match=r"shard_000002.npy \(rows 600..900\) is corrupt: its sha256"):
        for step in range(stream.per_epoch):
            seen.append(stream(step))
    stream.close()
    ok = {tuple(r) for r in arr[:600].astype(np.float16).astype(np.float32)[:, :4].tolist()}
    assert all(tuple(r[:4]) in ok for x in seen for r in x.tolist()), "rows of the corrupt shard reached a batch"


def test_verify_rehashes_an_old_store_whatever_the_cache_says(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    src, _ = store(tmp_path)
    old = as_old_store(src)
    old.verify()  # remembered in the cache
    shard = old.path / "shard_000000.npy"
    st = os.stat(shard)
    flip(shard, 128 + 77)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime: the cache still says verified
    S.open_store(old.path).read_rows(0, 10)
    refused(old.path, ["verify", old.path], "shard_000000.npy (rows 0..300) is corrupt")


def reference_batch(stream: StreamingBatches, stored_ND: torch.Tensor, step: int) -> torch.Tensor:
    """The batch as the loader before this change built it: each piece's sorted permuted positions, mapped to
    source rows, concatenated, then converted to fp32 (computed from the schedule and the array, no file read)."""
    sched, parts = stream.schedule, []
    for e, w, a, b in sched.pieces(step):
        n = sum(y - x for x, y in sched.window_rows(sched.windows(e)[w]))
        pos = np.sort(sched.permutation(e, w, n)[a:b])
        parts.append(stored_ND[torch.from_numpy(sched.source_rows(e, w, pos))])
    return torch.cat(parts).float()


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_batches_equal_the_previous_loader_bit_for_bit_old_and_new_layouts(tmp_path, dtype):
    src, arr = store(tmp_path, rows=1500, shard_rows=290, dtype=dtype)  # shards cut blocks and chunks alike
    x = torch.from_numpy(arr)
    arr_t = {"fp16": x.half(), "bf16": x.bfloat16(), "fp32": x}[dtype]
    layout = Layout(chunk_rows=96, window_chunks=5)  # chunks of 48 KB: O_DIRECT slots in the window buffer
    new = StreamingBatches(src.files, Schedule(1500, layout, 3, 100), torch.device("cpu"))
    spans = [new.schedule.window_rows(c) for c in new.schedule.windows(0)]
    assert any(new.files.slots(sp)[1] > sum(b - a for a, b in sp) for sp in spans), "no chunk was placed for O_DIRECT"
    got = [new(step) for step in range(new.per_epoch + 3)]
    new.close()
    old = as_old_store(S.open_store(src.path))
    old_stream = StreamingBatches(old.files, Schedule(1500, layout, 3, 100), torch.device("cpu"))
    for step, g in enumerate(got):
        ref = reference_batch(old_stream, arr_t, step)
        assert torch.equal(g, ref) and torch.equal(old_stream(step), ref), step
    old_stream.close()


def test_streamed_training_on_a_checksummed_store_resumes_bit_exact(tmp_path):
    src, _ = store(tmp_path, rows=600, shard_rows=200)
    args = [*TRAIN[:7], "--warmup-steps", "2", "--device", "cpu", "--quiet", "--data", str(src.path),
            "--checkpoint-every", "5", "--max-memory", "0.0002", "--threshold-start-step", "3"]
    run = CliRunner()
    r = run.invoke(app, [*args, "--steps", "14", "--out", str(tmp_path / "ref")])
    assert r.exit_code == 0, r.output
    assert run.invoke(app, [*args, "--steps", "7", "--out", str(tmp_path / "run")]).exit_code == 0
    r = run.invoke(app, [*args, "--steps", "14", "--out", str(tmp_path / "run"), "--resume"])
    assert r.exit_code == 0, r.output
    a, b = ((tmp_path / d / "saes/batchtopk_x1_k4/model.safetensors").read_bytes() for d in ("ref", "run"))
    assert a == b


def test_default_chunks_are_whole_blocks_and_still_mix():
    """With 64 KB blocks of 32 rows (1024 fp16), a chunk is whole blocks, and the ImageNet-like class-sorted order
    still mixes within 5% of a full permutation."""
    from test_loader import label_entropy, window_positions

    rows, batch = 1_281_024, 4096
    labels = np.arange(rows) * 1000 // rows
    layout = Layout.for_budget(rows, 2048, 1 << 30, block_rows=32)
    assert layout.chunk_rows % 32 == 0 and layout.chunk_rows * layout.window_chunks * 2048 <= 1 << 29
    sched, perm = Schedule(rows, layout, 0, batch), np.random.default_rng(0).permutation(rows)
    steps = range(0, sched.per_epoch, 31)
    full = np.mean([label_entropy(labels[perm[s * batch : (s + 1) * batch]]) for s in steps])
    ours = np.mean([label_entropy(labels[np.concatenate([window_positions(sched, *p) for p in sched.pieces(s)])])
                    for s in steps])
    assert ours >= 0.95 * full, (ours, full, layout)


def test_a_resume_over_parts_from_before_block_checksums_ends_in_a_whole_file_store(tmp_path):
    """New shards carry no sha256 (their blocks cover every byte); a store finished over parts written before block
    checksums falls back to the whole-file path, hashing the newer shards, and reads and verifies as such."""
    src, arr = store(tmp_path)
    assert not any("sha256" in sh for sh in json.loads((src.path / "manifest.json").read_text())["shards"])
    root = src.path.parent
    part_file = root / "parts" / "shard_000000.json"
    part = json.loads(part_file.read_text())
    shard = src.path / "shard_000000.npy"
    shard.write_bytes(npy_bytes(np.load(shard)))  # numpy's own header, as then
    si = part["subdirs"]["acts"]
    del si["crc32"], si["header_crc32"]
    si["sha256"] = S.sha256_of(shard)
    part_file.write_text(json.dumps(part))
    sub = {"acts": {"hook_point": "layer.0", "tokens": "cls", "rows_per_image": 1, "width": D, "note": ""}}
    S.StoreWriter(root, {"dtype": "fp16"}, sub).finalize(3, {"model_id": "test"})
    m = json.loads((src.path / "manifest.json").read_text())
    assert "checksums" not in m
    assert [sh["sha256"] for sh in m["shards"]] == [S.sha256_of(src.path / sh["file"]) for sh in m["shards"]]
    again = S.open_store(root)
    assert torch.equal(again.read_rows(0, 900), torch.from_numpy(arr).half().float())
    assert CliRunner().invoke(app, ["verify", str(root)]).exit_code == 0
