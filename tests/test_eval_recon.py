"""Reconstruction metrics against direct formulas; CLIP zero-shot with an SAE spliced in (tiny CLIPModel)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_vlm import SAE, SAEConfig
from sae_vlm.eval.recon import accuracy_recovered, heldout_rows, reconstruction_metrics, splice_sae, zero_shot_accuracy


def _sae(d_in=12, d_sae=32, arch="batchtopk", k=4, seed=0):
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=k))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if sae.threshold.ndim == 0:
            sae.threshold.fill_(0.2)
    return sae


def test_metrics_match_direct_formulas():
    torch.manual_seed(1)
    x = torch.randn(50, 12) * torch.linspace(0.5, 3, 12) + 10.0  # a large mean must not hurt the variances
    sae = _sae()
    m = reconstruction_metrics(sae, x, device="cpu", batch_rows=7, dense_cutoff=0.3)
    with torch.no_grad():
        codes = sae.encode(x)
        x_hat = sae.decode(codes)
        xd, rd = x.double(), (x - x_hat).double()
    fve = 1 - rd.var(0, unbiased=False).sum() / xd.var(0, unbiased=False).sum()
    assert m["fve"] == pytest.approx(float(fve), abs=1e-6)  # float32 SAE math differs per chunk size
    assert m["mse"] == pytest.approx(float((rd**2).mean()), rel=1e-6)
    assert m["cosine"] == pytest.approx(float(torch.cosine_similarity(xd, x_hat.double(), dim=1).mean()), rel=1e-6)
    assert m["l0_threshold"] == pytest.approx(float((sae.encode(x, mode="threshold") > 0).sum(1).double().mean()))
    assert m["l0_topk"] == pytest.approx(float((sae.encode(x, mode="topk") > 0).sum(1).double().mean()))
    assert m["l0"] == pytest.approx(float((codes > 0).sum(1).double().mean()))  # the inference mode's own L0
    freq = (codes > 0).double().mean(0)
    assert m["dead_frac"] == pytest.approx(float((freq == 0).double().mean()))
    assert m["dense_frac"] == pytest.approx(float((freq > 0.3).double().mean()))
    whole = reconstruction_metrics(sae, x, device="cpu", batch_rows=1000, dense_cutoff=0.3)
    assert whole["fve"] == pytest.approx(m["fve"], abs=1e-6)


def test_heldout_rows_and_errors():
    rows = heldout_rows(100, 0.1, seed=3)
    assert rows.numel() == 10 and torch.equal(rows, heldout_rows(100, 0.1, seed=3)) and torch.all(rows[1:] > rows[:-1])
    sae = _sae()
    with pytest.raises(ValueError, match="width 5 but the SAE expects d_in=12"):
        reconstruction_metrics(sae, torch.zeros(4, 5), device="cpu")
    with pytest.raises(ValueError, match="empty"):
        reconstruction_metrics(sae, torch.zeros(4, 12), rows=torch.zeros(0, dtype=torch.long), device="cpu")
    relu = _sae(arch="relu", k=None)
    m = reconstruction_metrics(relu, torch.randn(9, 12), device="cpu")
    assert m["l0_topk"] is None and m["l0_threshold"] >= 0
    topk, x = _sae(arch="topk"), torch.randn(9, 12)
    m = reconstruction_metrics(topk, x, device="cpu")  # θ never learned: the threshold mode keeps every positive
    assert m["l0"] == m["l0_topk"] == pytest.approx(float((topk.encode(x) > 0).sum(1).double().mean()))
    assert m["l0_threshold"] > m["l0"]


@pytest.fixture(scope="module")
def clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=39,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )
    model = CLIPModel(cfg).eval()
    text = {"input_ids": torch.tensor([[0, 5, 39], [0, 9, 39], [0, 17, 39]]),
            "attention_mask": torch.ones(3, 3, dtype=torch.long)}
    pixels = torch.randn(12, 3, 16, 16)
    return model, text, pixels


class _Identity(nn.Module):
    def forward(self, x):
        return x


def test_splice_identity_keeps_model_and_real_sae_changes_it(clip):
    model, text, pixels = clip
    with torch.no_grad():
        base = model.get_image_features(pixel_values=pixels).pooler_output
        for hook in ("layer.0", "layer.1", "last"):
            with splice_sae(model, hook, _Identity()):
                same = model.get_image_features(pixel_values=pixels).pooler_output
            torch.testing.assert_close(same, base)
        with splice_sae(model, "layer.0", _sae(d_in=16, d_sae=32)):
            changed = model.get_image_features(pixel_values=pixels).pooler_output
        with splice_sae(model, "last", _sae(d_in=8, d_sae=16)):
            changed_last = model.get_image_features(pixel_values=pixels).pooler_output
        after = model.get_image_features(pixel_values=pixels).pooler_output
    assert not torch.allclose(changed, base) and not torch.allclose(changed_last, base)
    torch.testing.assert_close(after, base)  # the hook is gone
    with pytest.raises(ValueError, match="out of range"):
        with splice_sae(model, "layer.5", _Identity()):
            pass
    with pytest.raises(ValueError, match="not understood"):
        with splice_sae(model, "block3", _Identity()):
            pass


def test_accuracy_recovered(clip):
    model, text, pixels = clip
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        txt = torch.nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    labels = (img @ txt.T).argmax(1)  # the unmodified model is right on every image
    assert zero_shot_accuracy(model, pixels, labels, text, batch_size=5) == 1.0
    res = accuracy_recovered(model, _Identity(), "layer.1", pixels, labels, text)
    assert res == {"accuracy": 1.0, "accuracy_spliced": 1.0, "recovered": 1.0}
    res = accuracy_recovered(model, _sae(d_in=16, d_sae=32), "layer.1", pixels, labels, text)
    assert 0.0 <= res["recovered"] <= 1.0
    with pytest.raises(ValueError, match="11 labels for 12 images"):
        zero_shot_accuracy(model, pixels, labels[:11], text)
