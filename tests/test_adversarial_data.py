"""A careless or hostile user's data: folders with stray archives, symlinked and looping folders, a folder changed
between an interrupted extract and its resume, cut tar shards, hand-edited store files, layer indices out of range.

A refused command exits 2 with one `error:` line naming the culprit and leaves the tree as it was; a command that
succeeds keeps exactly the images it should, and says what it read and what it passed over.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from _adversarial import refused, tree
from PIL import Image
from typer.testing import CliRunner

from sae_vlm import toyworld
from sae_vlm.cli import app
from sae_vlm.data.images import open_images
from sae_vlm.data.store import open_store

N_LAYERS = 4  # the shipped tiny CLIP's vision tower
CLIP = str(toyworld.clip_path())


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (i * 7 % 256, 90, 200 - i)).save(buf, format="PNG")
    return buf.getvalue()


def _images(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"{i:02d}.png").write_bytes(_png(i))


def _tar(path: Path, n: int, start: int = 0) -> Path:
    """A webdataset shard of n keys, each an image and a label."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for i in range(start, start + n):
            for name, data in ((f"k{i:03d}.png", _png(i)), (f"k{i:03d}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def ok(*args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r.output


def extract(data, out, *more) -> str:
    return ok("extract", "--model", CLIP, "--data", data, "--out", out, "--layers", "1", "--tokens", "cls",
              "--quiet", *more)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def kept_ids(out: Path) -> list[str]:
    return [im["id"] for im in open_store(out, layer="layer.1__cls").images()]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Two class folders of 6 images each, and a shard of 1 image."""
    root = tmp_path_factory.mktemp("data")
    for c in ("cat", "dog"):
        _images(root / "imgs" / c, 6, start=10 if c == "dog" else 0)
    _tar(root / "backup.tar", 1)
    return root


@pytest.fixture
def work(base, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base, tmp_path, dirs_exist_ok=True, symlinks=True)
    return tmp_path


# --- a folder is a folder ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["backup.tar", "cat/old.tar", "shards.tar.gz", "dog/x.zip"])
def test_an_archive_in_an_image_folder_is_named_and_never_read(work, where):
    shutil.copy(work / "backup.tar", work / "imgs" / where)
    out = extract("imgs", "s")
    assert "12 images kept, 0 skipped" in out
    assert f"not read: {where}" in out and "--data 'DIR/*.tar'" in out
    m = manifest(work / "s")
    assert m["rows"] == 12 and m["source"]["kind"] == "folder" and m["source"]["ignored_archives"] == [where]
    assert len(kept_ids(work / "s")) == 12


def test_a_folder_of_only_shards_is_read_as_shards_and_says_so(work):
    for i in range(2):
        _tar(work / "shards" / f"s-{i:03d}.tar", 3, start=3 * i)
    (work / "shards" / ".DS_Store").write_bytes(b"\0")  # hidden files do not make it a folder of images
    out = extract("shards", "s")
    assert "6 images kept" in out and "read as webdataset shards" in out and "s-000.tar" in out
    m = manifest(work / "s")
    assert m["source"]["kind"] == "webdataset" and len(m["source"]["shards"]) == 2
    assert kept_ids(work / "s") == [f"k{i:03d}" for i in range(6)]


def test_a_brace_pattern_names_shards_and_a_missing_one_is_refused(work):
    for i in range(3):
        _tar(work / "shards" / f"s-{i:03d}.tar", 2, start=2 * i)
    assert "4 images kept" in extract("shards/s-{000..001}.tar", "s")
    assert [im["label"] for im in open_store(work / "s").images()] == ["0", "1", "0", "1"]
    refused(work, ["extract", "--model", CLIP, "--data", "shards/s-{000..003}.tar", "--out", "t"],
            "shard shards/s-003.tar does not exist")


NOT_IMAGES = [
    ("empty", {}, "holds no images"),
    ("texts", {"a.txt": b"x", "b.txt": b"y", "c.json": b"{}"}, ".txt 2"),
    ("tars_and_readme", {"a.tar": None, "README": b"hi"}, "not read: a.tar"),
    ("nested_tars", {"sub/a.tar": None, "sub/b.tar": None}, "a.tar, sub/b.tar"),
]


@pytest.mark.parametrize("name, files, culprit", NOT_IMAGES, ids=[n for n, _, _ in NOT_IMAGES])
def test_a_folder_without_images_is_refused_saying_what_it_holds(work, name, files, culprit):
    folder = work / name
    folder.mkdir()
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            shutil.copy(work / "backup.tar", folder / rel)
        else:
            (folder / rel).write_bytes(data)
    line = refused(work, ["extract", "--model", CLIP, "--data", name, "--out", "s"], culprit)
    assert f"--data {work / name} holds no images" in line


def test_a_glob_that_matches_images_is_refused_naming_the_first(work):
    refused(work, ["extract", "--model", CLIP, "--data", "imgs/cat/*", "--out", "s"], "imgs/cat/00.png")


# --- symbolic links ------------------------------------------------------------------------------------------------

def test_symlinked_class_folders_are_followed_and_counted(work):
    subset = work / "subset"
    _images(subset / "bird", 3, start=30)
    for c in ("cat", "dog"):
        os.symlink(work / "imgs" / c, subset / c, target_is_directory=True)
    os.symlink(work / "imgs" / "cat" / "00.png", subset / "bird" / "linked.png")
    out = extract("subset", "s")
    assert "16 images kept" in out and "13 of 16 images found through symbolic links" in out
    ids = kept_ids(work / "s")
    assert len(ids) == 16 and ids == sorted(ids) and "cat/05.png" in ids and "bird/linked.png" in ids
    assert manifest(work / "s")["source"]["via_symlinks"] == 13
    assert [r.id for r in open_images(subset).records] == ids  # the listing is the same every time


@pytest.mark.parametrize("link, target", [("cat/loop", ".."), ("self", "."), ("dog/up", "../.."),
                                          ("again", "cat")])
def test_a_link_to_a_folder_already_read_is_read_once(work, link, target):
    os.symlink(target, work / "imgs" / link, target_is_directory=True)
    src = open_images(work / "imgs")
    ids = [r.id for r in src.records]
    assert len(ids) == len(set(r.path for r in src.records))
    if target == "../..":  # a link out of the root to an ancestor: the ancestor's other content is read, once
        assert "dog/up/backup.tar" in src.describe()["ignored_archives"]
    else:
        assert len(ids) == 12 and all(not i.startswith(link + "/") for i in ids)
        assert src.describe()["repeated_folders"] == [link]
        assert any(f"read once: {link}" in n for n in src.notes)


def test_a_broken_symlinked_image_is_skipped_with_its_reason(work):
    os.symlink(work / "nowhere.png", work / "imgs" / "cat" / "gone.png")
    out = extract("imgs", "s")
    assert "12 images kept, 1 skipped" in out and "gone.png: cannot read" in out


# --- resume after the folder changed -------------------------------------------------------------------------------

def _interrupted(work: Path) -> list:
    """An extract of imgs into s as if killed after its first shard (of 4 images)."""
    args = ["extract", "--model", CLIP, "--data", "imgs", "--out", "s", "--layers", "1", "--tokens", "cls",
            "--shard-rows", "4", "--quiet"]
    ok(*args)
    for p in sorted((work / "s" / "parts").glob("shard_*.json"))[1:]:
        p.unlink()
    (work / "s" / "manifest.json").unlink()
    return args


def _rename(work: Path) -> None:
    (work / "imgs" / "cat" / "01.png").rename(work / "imgs" / "cat" / "01b.png")


def _swap(work: Path) -> None:
    (work / "imgs" / "cat" / "00.png").unlink()
    _images(work / "imgs" / "ant", 1)


def _rename_late(work: Path) -> None:  # in a shard not done yet: the resumed store is the new listing, whole
    (work / "imgs" / "dog" / "15.png").rename(work / "imgs" / "dog" / "15b.png")


CHANGES = [(_rename, "'cat/01.png' is now 'cat/01b.png'"), (_swap, "'cat/00.png' is now 'ant/00.png'")]


@pytest.mark.parametrize("change, culprit", CHANGES, ids=["rename", "remove_and_add"])
def test_a_resume_over_a_changed_listing_is_refused(work, change, culprit):
    args = _interrupted(work)
    change(work)
    line = refused(work, args, culprit)
    assert "changed since the interrupted extract" in line and "new --out" in line


def test_a_resume_over_an_unchanged_or_late_changed_listing_completes_right(work):
    args = _interrupted(work)
    _rename_late(work)
    assert "12 images kept" in ok(*args)
    assert kept_ids(work / "s") == [r.id for r in open_images(work / "imgs").records]
    assert "dog/15b.png" in kept_ids(work / "s")


def test_a_finished_store_rerun_over_a_changed_folder_is_refused(work):
    extract("imgs", "s")
    _rename(work)
    refused(work, ["extract", "--model", CLIP, "--data", "imgs", "--out", "s", "--layers", "1", "--tokens", "cls"],
            "'cat/01.png' is now 'cat/01b.png'")


@pytest.mark.parametrize("edit", ['{"shard": 0}', '[1, 2]', '{"images": 3, "skipped": [], "subdirs": {}}'])
def test_a_damaged_part_file_is_named(work, edit):
    args = _interrupted(work)
    (work / "s" / "parts" / "shard_000000.json").write_text(edit)
    refused(work, args, "shard_000000.json")


# --- cut and foreign tar shards ------------------------------------------------------------------------------------

def _damaged(whole: bytes, how: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        members = tf.getmembers()
    second, last = members[2], members[-1]
    return {"empty": b"", "mid_first_header": whole[:100], "mid_data": whole[: second.offset_data + 10],
            "at_a_member_boundary": whole[: second.offset], "mid_last_data": whole[: last.offset_data + 1],
            "garbled_header": whole[: second.offset] + b"\x01" * 512 + whole[second.offset + 512 :]}[how]


@pytest.mark.parametrize("how", ["empty", "mid_first_header", "mid_data", "at_a_member_boundary", "mid_last_data",
                                 "garbled_header"])
def test_a_tar_cut_or_garbled_anywhere_is_one_line_naming_it(work, how):
    (work / "cut.tar").write_bytes(_damaged(_tar(work / "shard.tar", 3).read_bytes(), how))
    refused(work, ["extract", "--model", CLIP, "--data", "cut.tar", "--out", "s"], str(work / "cut.tar"))


def test_a_compressed_shard_is_refused_not_read_by_offset(work):
    import gzip

    (work / "z.tar").write_bytes(gzip.compress((work / "backup.tar").read_bytes()))
    refused(work, ["extract", "--model", CLIP, "--data", "z.tar", "--out", "s"], "shards are uncompressed .tar")


# --- store files edited by hand ------------------------------------------------------------------------------------

def _edit(m: dict, path: list, value) -> dict:
    node = m
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return m


MANIFEST_EDITS = [
    (["dtype"], KeyError, "'dtype' is missing"),
    (["shards"], KeyError, "'shards' is missing"),
    (["dtype"], "fp8", "'dtype' is \"fp8\""),
    (["dtype"], ["fp16"], "'dtype' is [\"fp16\"]"),
    (["shape"], [1000], "'shape' is [1000]"),
    (["shape"], [12, 64, 1], "'shape'"),
    (["shape"], "12x64", "'shape'"),
    (["rows_per_image"], "two", "'rows_per_image' is \"two\""),
    (["rows_per_image"], 0, "'rows_per_image' is 0"),
    (["rows_per_image"], 5, "not a multiple of rows_per_image 5"),
    (["shards"], {"file": "x"}, "'shards'"),
    (["shards", 0], "shard_000000.npy", "shards[0]"),
    (["shards", 0, "file"], "../../imgs/cat/00.png", "shards[0].'file'"),
    (["shards", 0, "rows"], -1, "shards[0].'rows' is -1"),
    (["shards", 0, "rows"], 11, "its shards hold 11 rows"),
    (["shards", 0, "crc32"], KeyError, "shards[0].'crc32' is missing"),
    (["checksums"], KeyError, "shards[0].'sha256' is missing"),  # without blocks it reads as an older store
    (["rows_file"], "/etc/passwd", "'rows_file'"),
    (["hook_point"], None, "'hook_point' is null"),
]


@pytest.fixture(scope="module")
def store(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "s"
    extract(base / "imgs", out)
    return out


@pytest.mark.parametrize("path, value, culprit", MANIFEST_EDITS,
                         ids=[f"{'.'.join(map(str, p))}={v if v is not KeyError else 'missing'}"
                              for p, v, _ in MANIFEST_EDITS])
def test_every_malformed_manifest_field_is_one_line_naming_it(store, tmp_path, monkeypatch, path, value, culprit):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(store, tmp_path / "s")
    mp = tmp_path / "s" / "layer.1__cls" / "manifest.json"
    mp.write_text(json.dumps(_edit(json.loads(mp.read_text()), path, value)))
    line = refused(tmp_path, ["train", "--data", "s", "--out", "r", "--width", "2", "--k", "4", "--steps", "2",
                              "--quiet"], culprit)
    assert "s/layer.1__cls/manifest.json: " in line


@pytest.mark.parametrize("content", ["[1, 2]", "3", '"text"', "null"])
def test_a_manifest_that_is_not_an_object_is_named(store, tmp_path, monkeypatch, content):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(store, tmp_path / "s")
    (tmp_path / "s" / "layer.1__cls" / "manifest.json").write_text(content)
    refused(tmp_path, ["train", "--data", "s/layer.1__cls", "--out", "r", "--quiet"], "is not a store manifest")


ROWS_EDITS = [
    (lambda lines: lines[:3] + ["{not json"] + lines[4:], "line 4 is not valid JSON"),
    (lambda lines: lines[:1] + ["[1, 2]"] + lines[2:], "line 2 is not an object with id, path, label"),
    (lambda lines: lines[:-1], "lists 11 images; the manifest beside it says 12"),
    (lambda lines: lines + lines[:1], "lists 13 images"),
]


@pytest.mark.parametrize("edit, culprit", ROWS_EDITS, ids=["bad_json", "not_object", "short", "long"])
def test_a_bad_rows_file_is_named_with_its_line(store, tmp_path, edit, culprit):
    shutil.copytree(store, tmp_path / "s")
    rows = tmp_path / "s" / "layer.1__cls" / "rows.jsonl"
    rows.write_text("\n".join(edit(rows.read_text().splitlines())) + "\n")
    with pytest.raises(ValueError, match=culprit) as e:
        open_store(tmp_path / "s").images()
    assert str(rows) in str(e.value)
    rows.write_bytes(b'{"id": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="rows.jsonl is not UTF-8"):
        open_store(tmp_path / "s").images()


def test_a_bad_token_index_is_named(store, tmp_path):
    shutil.copytree(store, tmp_path / "s")
    tok = tmp_path / "s" / "layer.1__cls" / "token_index.npy"
    tok.write_bytes(tok.read_bytes()[:20])
    with pytest.raises(ValueError, match="token_index.npy is not a readable .npy"):
        open_store(tmp_path / "s").token_index()
    np.save(tok, np.zeros(5, np.int32))
    with pytest.raises(ValueError, match=r"token_index.npy holds int32 \[5\]; expected 12"):
        open_store(tmp_path / "s").token_index()


# --- path lists ----------------------------------------------------------------------------------------------------

def test_path_lists_that_are_not_text_are_named_with_the_line(work):
    (work / "list.txt").write_bytes(b"imgs/cat/00.png\nimgs/cat/01.png\ncaf\xe9.png\n")
    refused(work, ["extract", "--model", CLIP, "--data", "list.txt", "--out", "s"],
            "list.txt is not UTF-8 text (line 3")
    (work / "nul.txt").write_bytes(b"imgs/cat/00.png\nimgs/\0cat.png\n")
    refused(work, ["extract", "--model", CLIP, "--data", "nul.txt", "--out", "s"], "nul.txt: line 2 holds a NUL byte")


def test_a_cut_path_list_keeps_the_whole_lines_and_skips_the_cut_one(work):
    (work / "list.txt").write_text("imgs/cat/00.png\nimgs/cat/01.png\nimgs/cat/0")
    out = extract("list.txt", "s")
    assert "2 images kept, 1 skipped" in out and "imgs/cat/0: cannot read" in out


# --- layer indices -------------------------------------------------------------------------------------------------

def test_a_negative_layer_is_stored_under_the_layer_it_names(work):
    out = extract("imgs", "s", "--layers", f"-1,{N_LAYERS - 1},-4")
    assert f"subdirs layer.{N_LAYERS - 1}__cls, layer.0__cls" in out.replace("--layers", "")
    m = json.loads((work / "s" / f"layer.{N_LAYERS - 1}__cls" / "manifest.json").read_text())
    assert m["hook_point"] == f"layer.{N_LAYERS - 1}" and f"encoder layer {N_LAYERS - 1} " in m["hook_point_note"]
    assert m["rows"] == 12 and manifest(work / "s")["subdirs"] == [f"layer.{N_LAYERS - 1}__cls", "layer.0__cls"]
    assert not any("-" in p.name for p in (work / "s").iterdir() if p.is_dir())


@pytest.mark.parametrize("layer", ["99", "-99", str(N_LAYERS), f"-{N_LAYERS + 1}", "layer.7"])
def test_a_layer_out_of_range_names_the_flag_and_the_range(work, layer):
    line = refused(work, ["extract", "--model", CLIP, "--data", "imgs", "--out", "s", "--layers", layer],
                   f"--layers {layer}")
    assert f"layers 0..{N_LAYERS - 1}" in line


def test_nothing_outside_the_output_changes_in_a_successful_extract(work):
    os.symlink(work / "imgs" / "dog", work / "imgs" / "dog_again", target_is_directory=True)
    before = {k: v for k, v in tree(work).items() if not k.startswith("s")}
    extract("imgs", "s")
    assert {k: v for k, v in tree(work).items() if not k.startswith("s")} == before
    assert manifest(work / "s")["rows"] == 12
