"""Top-activating images (streaming top-k, token pooling, grids) and the taxonomy / LCA analysis."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sae_vlm.eval import hierarchy as H
from sae_vlm.eval.top import render_grid, top_activating
from sae_vlm.sae.groups import level_slices
from sae_vlm.topk import load_top, save_top


def test_streaming_topk_matches_full_sort():
    g = torch.Generator().manual_seed(0)
    codes = torch.rand(70, 9, generator=g)
    vals, idx = top_activating(codes, top=16, chunk_rows=8, device="cpu")
    ref_v, ref_i = codes.T.topk(16, dim=1)
    torch.testing.assert_close(vals, ref_v)
    assert torch.equal(idx, ref_i)


def test_sparse_store_and_padding():
    idx = np.array([[0, 2], [1, 2], [2, 0]], np.int32)
    val = np.array([[1.0, 0.5], [3.0, 2.0], [4.0, 0.25]], np.float16)
    store = SimpleNamespace(rows=3, d_sae=4, indices=idx, values=val)
    v, i = top_activating(store, top=4, chunk_rows=2, device="cpu")
    assert i[2].tolist() == [2, 1, 0, -1] and v[2, -1] == float("-inf")
    assert i[0, :2].tolist() == [0, 2] and v[3, 0] == 0.0  # latent 3 never fires


def test_token_codes_mean_pooled_per_image():
    g = torch.Generator().manual_seed(1)
    ids = np.repeat([10, 11, 12, 13, 14], [3, 1, 4, 2, 5])
    codes = torch.rand(len(ids), 6, generator=g)
    pooled = torch.stack([codes[torch.as_tensor(ids == i)].mean(0) for i in [10, 11, 12, 13, 14]])
    v, i = top_activating(codes, top=3, image_ids=ids, chunk_rows=4, device="cpu")
    ref_v, ref_p = pooled.T.topk(3, dim=1)
    torch.testing.assert_close(v, ref_v)
    assert torch.equal(i, torch.tensor([10, 11, 12, 13, 14])[ref_p])
    with pytest.raises(ValueError, match="not contiguous"):
        top_activating(codes, image_ids=np.r_[ids[:-1], 10], device="cpu")
    with pytest.raises(ValueError, match="14 image ids given for 15 code rows"):
        top_activating(codes, image_ids=ids[:-1], device="cpu")


def test_save_and_grid(tmp_path):
    v, i = top_activating(torch.rand(20, 3), top=16, device="cpu")
    save_top(tmp_path, v, i)
    lv, li = load_top(tmp_path)
    assert li.shape == (3, 16) and np.array_equal(li, i.numpy())
    out = render_grid(li[0], lambda n: Image.new("RGB", (8, 8), (n * 10, 0, 0)), tmp_path / "g.png", tile=16,
                      values=lv[0])
    with Image.open(out) as im:
        assert im.size == (64, 64)
        assert im.getpixel((16 * 1 + 8, 8))[0] == int(li[0, 1]) * 10


def test_parse_inat_label_and_mapping(tmp_path):
    assert H.parse_inat_label("00012_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax") == (
        "Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "corax")
    assert H.parse_inat_label("00012_Plantae_a_b_c_d_Genus_sp_subsp")[-1] == "sp_subsp"
    assert H.parse_inat_label("cat") is None and H.parse_inat_label("0_a_b") is None
    # shorter trees keep iNat's 5-digit class id: the toy world's labels
    toy = ("round", "circle", "orange", "dark", "dotted")
    assert H.parse_inat_label("00011_" + "_".join(toy)) == toy
    assert H.parse_inat_label("00011_round") is None and H.parse_inat_label("11_a_b_c") is None
    (tmp_path / "t.csv").write_text("label,path\ncat,Animalia/Chordata/Mammalia/Carnivora/Felidae/Felis/catus\n")
    (tmp_path / "t.json").write_text('{"dog": ["A", "B"]}')
    assert H.load_taxonomy_file(tmp_path / "t.csv")["cat"][-1] == "catus"
    assert H.load_taxonomy_file(tmp_path / "t.json") == {"dog": ("A", "B")}
    taxa = H.image_taxonomy(
        labels=["cat", None, "unknown"],
        paths=["x/cat/1.jpg", "x/00001_A_B_C_D_E_F_g/2.jpg", "x/misc/3.jpg"],
        mapping=H.load_taxonomy_file(tmp_path / "t.csv"),
    )
    # with a file, only the file: an iNat-style folder it does not list is not parsed into the file's credit
    assert taxa[0][0] == "Animalia" and taxa[1] is None and taxa[2] is None
    assert H.image_taxonomy(labels=[None], paths=["x/00001_A_B_C_D_E_F_g/2.jpg"]) == [tuple("ABCDEFg")]
    with pytest.raises(ValueError, match="expected .csv or .json"):
        (tmp_path / "t.txt").write_text("")
        H.load_taxonomy_file(tmp_path / "t.txt")


def _direct_depths(top_idx, taxa):
    out_mean, out_mode = [], []
    for row in top_idx:
        ds = []
        for a, b in itertools.combinations(row, 2):
            ta, tb = taxa[a], taxa[b]
            if ta is None or tb is None:
                continue
            d = 0
            while d < min(len(ta), len(tb)) and ta[d] == tb[d]:
                d += 1
            ds.append(d)
        out_mean.append(np.floor(np.mean(ds) + 0.5))
        out_mode.append(np.bincount(ds, minlength=8).argmax())
    return np.array(out_mean), np.array(out_mode)


def test_lca_depth_against_pair_loop():
    rng = np.random.default_rng(0)
    # a small random tree: 3 choices per level, so depths spread over 0..7
    taxa = [tuple(f"L{lvl}_{c}" for lvl, c in enumerate(np.minimum.accumulate(rng.integers(0, 3, 7))))
            for _ in range(60)]
    taxa[7] = None  # missing taxonomy: excluded from pairs
    top_idx = np.stack([rng.choice(60, 16, replace=False) for _ in range(12)])
    top_val = np.ones((12, 16))
    top_val[3, -1] = 0.0  # rare: positive on 15 images
    res = H.latent_lca_depths(top_idx, top_val, taxa)
    ref_mean, ref_mode = _direct_depths(top_idx, taxa)
    live = np.arange(12) != 3
    assert np.isnan(res["mean"][3]) and res["rare"][3]
    np.testing.assert_array_equal(res["mean"][live], ref_mean[live])
    np.testing.assert_array_equal(res["mode"][live], ref_mode[live])
    assert all(res["pairs"][r] == (120 if 7 not in top_idx[r] else 105) for r in range(12))
    miss = H.missing_taxonomy(taxa, names=[f"img{i}" for i in range(60)], used_rows=top_idx)
    assert miss["count"] == int(7 in top_idx) and (miss["names"] == ["img7"] or miss["count"] == 0)


def test_per_level_and_uniqueness():
    stats = H.per_level([1.0, 2.0, np.nan, 4.0, 5.0, 6.0], (2, 4), exclude_F=[False, False, False, True, False, False])
    assert [s["count"] for s in stats] == [2, 2] and stats[1]["mean"] == 5.5
    with pytest.raises(ValueError, match="sum to 5, expected d_sae=6"):
        level_slices((2, 3), 6)
    top = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 8, 9], [5, 6, 7, 4]])
    u = H.top_set_uniqueness(top, thresholds=(0.3, 1.0))
    np.testing.assert_allclose(u["max_jaccard"], [1.0, 1.0, 2 / 6, 0.0])
    assert u["pairs_at_least"] == {"0.3": 3, "1.0": 1} and u["pairs_total"] == 6
    u2 = H.top_set_uniqueness(top, skip_F=[False, True, False, False])
    assert np.isnan(u2["max_jaccard"][1]) and u2["max_jaccard"][0] == pytest.approx(2 / 6)


def _auroc_by_pairs(score, positive):
    """P(score of a positive > score of a negative) + half the ties, over every pair."""
    p, n = score[positive], score[~positive]
    return float(((p[:, None] > n[None, :]).sum() + 0.5 * (p[:, None] == n[None, :]).sum()) / (len(p) * len(n)))


@pytest.mark.parametrize("block_cells", [H.BLOCK_CELLS, 7])  # 7: latents scored one or two at a time
def test_node_detection_against_pairwise_auroc(monkeypatch, block_cells):
    monkeypatch.setattr(H, "BLOCK_CELLS", block_cells)
    rng = np.random.default_rng(0)
    leaves = [("a", "x", "1"), ("a", "x", "2"), ("a", "y", "3"), ("b", "z", "4")]
    taxa = [leaves[i] for i in rng.integers(0, 4, 60)]
    taxa[5] = None  # an image without a taxonomy is neither positive nor negative
    codes = np.where(rng.random((60, 9)) < 0.4, np.round(rng.random((60, 9)), 1), 0.0)  # sparse, with ties
    codes[:, 3] = [t is not None and t[0] == "b" for t in taxa]  # a perfect detector of node b
    out = H.node_detection([torch.tensor(codes[:25]), torch.tensor(codes[25:])], taxa, group_sizes=[3, 6])
    valid = np.array([t is not None for t in taxa])
    nodes = {x["node"]: x for x in out["nodes"]}
    assert set(nodes) == {"/".join(leaf[:d]) for leaf in leaves for d in (1, 2, 3)}
    for name, x in nodes.items():
        path = tuple(name.split("/"))
        positive = np.array([t is not None and t[: len(path)] == path for t in taxa])[valid]
        direct = [_auroc_by_pairs(codes[valid, j], positive) for j in range(9)]
        assert x["auroc"] == pytest.approx(max(direct)) and direct[x["latent"]] == pytest.approx(max(direct)), name
        assert x["level"] == (0 if x["latent"] < 3 else 1) and x["depth"] == len(path)
    assert nodes["b"]["latent"] == 3 and nodes["b"]["auroc"] == 1.0
    depth1 = out["per_depth"][0]
    assert depth1["nodes"] == 2 and depth1["detected"] == np.mean([nodes[k]["auroc"] >= 0.9 for k in ("a", "b")])
    with pytest.raises(ValueError, match="codes have 59 rows but 60 images"):
        H.node_detection([torch.tensor(codes[:59])], taxa)
