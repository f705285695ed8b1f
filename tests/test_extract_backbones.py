"""Hook points capture exactly what the models compute; token selection; patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _extract_helpers import tiny_clip_config, tiny_clip_processor
from PIL import Image

from sae_vlm.backbones import Backbone, parse_hook_point
from sae_vlm.data.tokens import random_positions, select_tokens
from sae_vlm.token_selection import parse_tokens


@pytest.fixture(scope="module")
def px():
    torch.manual_seed(1)
    return torch.randn(3, 3, 32, 32)


def test_parse_hook_point():
    assert parse_hook_point("11") == "layer.11" and parse_hook_point(3) == "layer.3"
    assert parse_hook_point("layer.2") == "layer.2" and parse_hook_point("last") == "last"
    with pytest.raises(ValueError, match="hook point"):
        parse_hook_point("foo")


def test_clip_layers_and_last_equal_plain_forward(px):
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    m = CLIPVisionModelWithProjection(tiny_clip_config()).eval()
    bb = Backbone(m, tiny_clip_processor())
    assert bb.hook_points() == ["layer.0", "layer.1", "layer.2", "last"]
    got = bb.capture(px, ["layer.0", "layer.2", "last", "1"])
    with torch.no_grad():
        ref = m(pixel_values=px, output_hidden_states=True)
    for i in range(3):
        torch.testing.assert_close(got[f"layer.{i}"], ref.hidden_states[i + 1], rtol=0, atol=0)
    torch.testing.assert_close(got["last"], ref.image_embeds, rtol=0, atol=0)
    # early stop: asking for layer 0 only still returns the same tensor
    torch.testing.assert_close(bb.capture(px, ["layer.0"])["layer.0"], ref.hidden_states[1])


def test_clip_vision_model_and_full_clip(px):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(0)
    m = CLIPVisionModel(tiny_clip_config()).eval()
    bb = Backbone(m)
    with torch.no_grad():
        ref = m(pixel_values=px, output_hidden_states=True)
    got = bb.capture(px, ["layer.1", "last"])
    torch.testing.assert_close(got["layer.1"], ref.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(got["last"], ref.pooler_output, rtol=0, atol=0)

    cfg = CLIPConfig(vision_config=tiny_clip_config().to_dict(), projection_dim=16,
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=64))
    cm = CLIPModel(cfg).eval()
    got = Backbone(cm).capture(px, ["last", "layer.2"])
    with torch.no_grad():
        emb = cm.get_image_features(pixel_values=px)
        emb = getattr(emb, "pooler_output", emb)
        hs = cm.vision_model(pixel_values=px, output_hidden_states=True).hidden_states
    torch.testing.assert_close(got["last"], emb, rtol=0, atol=0)
    torch.testing.assert_close(got["layer.2"], hs[3], rtol=0, atol=0)


def test_siglip_and_dinov2(px):
    from transformers import Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(0)
    s = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)).eval()
    bb = Backbone(s)
    assert bb.family == "siglip" and not bb.has_cls and bb.n_prefix == 0
    got = bb.capture(px, ["layer.1", "last"])
    with torch.no_grad():
        ref = s(pixel_values=px, output_hidden_states=True)
    torch.testing.assert_close(got["layer.1"], ref.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(got["last"], ref.pooler_output, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no CLS"):
        select_tokens(got["layer.1"], parse_tokens("cls")[0], ["a"] * 3, has_cls=False, hook_point="layer.1")

    d = Dinov2Model(Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=32, patch_size=8)).eval()
    bb = Backbone(d)
    got = bb.capture(px, ["layer.0", "last"])
    with torch.no_grad():
        ref = d(pixel_values=px, output_hidden_states=True)
    torch.testing.assert_close(got["layer.0"], ref.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(got["last"], ref.pooler_output, rtol=0, atol=0)


def test_dinov2_registers_are_not_patches(px):
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=2, image_size=32, patch_size=8,
                                                           num_register_tokens=2)).eval()
    bb = Backbone(m)
    assert (bb.n_registers, bb.n_prefix) == (2, 3)
    got = bb.capture(px, ["layer.1", "last"])
    with torch.no_grad():
        ref = m(pixel_values=px, output_hidden_states=True)
    torch.testing.assert_close(got["last"], ref.pooler_output, rtol=0, atol=0)
    rows, _ = select_tokens(got["layer.1"], parse_tokens("mean")[0], ["a"] * 3, True, n_registers=2)
    torch.testing.assert_close(rows, ref.hidden_states[2][:, 3:].mean(1))


def test_llava_default_layer_is_what_the_projector_reads(px):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=tiny_clip_config(num_hidden_layers=4),
                      text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=2, vocab_size=64),
                      image_token_index=63, vision_feature_layer=-2)
    m = LlavaForConditionalGeneration(cfg).eval()
    bb = Backbone(m)
    assert bb.default_layer == "layer.2"  # hidden_states[-2] of 5 = output of layer 2 of 4
    seen = {}
    proj = m.model.multi_modal_projector
    h = proj.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        m.model.get_image_features(pixel_values=px, vision_feature_layer=-2, vision_feature_select_strategy="default")
    h.remove()
    got = bb.capture(px, [bb.default_layer])[bb.default_layer]
    torch.testing.assert_close(got[:, 1:], seen["x"].reshape(got[:, 1:].shape), rtol=0, atol=0)  # "default" drops CLS


def test_patch_replaces_output_and_is_removed(px):
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    m = CLIPVisionModelWithProjection(tiny_clip_config()).eval()
    bb = Backbone(m)
    base = bb.capture(px, ["layer.2", "last"])
    with bb.patch("layer.1", lambda t: t * 0):
        patched = bb.capture(px, ["layer.1", "last"])
    assert patched["layer.1"].abs().max() == 0
    assert not torch.allclose(patched["last"], base["last"])
    torch.testing.assert_close(bb.capture(px, ["last"])["last"], base["last"])  # hook removed
    with bb.patch("1", lambda t: t):  # identity patch leaves the model unchanged
        torch.testing.assert_close(bb.capture(px, ["last"])["last"], base["last"])


def test_preprocess_uses_pil_processor():
    bb = Backbone(__import__("transformers").CLIPVisionModel(tiny_clip_config()), tiny_clip_processor())
    pv = bb.preprocess([Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("RGB", (20, 60))])
    assert pv.shape == (2, 3, 32, 32) and pv.dtype == torch.float32


def test_token_selection_shapes_and_values():
    torch.manual_seed(0)
    acts = torch.randn(3, 5, 4)  # CLS + 4 patches
    ids = ["a", "b", "c"]
    cls, mean, allt, r2 = parse_tokens("cls,mean,all,random-2")
    rows, tok = select_tokens(acts, cls, ids, True)
    assert torch.equal(rows, acts[:, 0]) and tok.tolist() == [0, 0, 0]
    rows, _ = select_tokens(acts, mean, ids, True)
    torch.testing.assert_close(rows, acts[:, 1:].mean(1))
    rows, tok = select_tokens(acts, allt, ids, True)
    assert rows.shape == (15, 4) and torch.equal(rows[5:10], acts[1]) and tok[:5].tolist() == list(range(5))
    rows, tok = select_tokens(acts, r2, ids, True, seed=7)
    assert rows.shape == (6, 4)
    for b in range(3):
        for j in range(2):
            assert torch.equal(rows[2 * b + j], acts[b, tok[2 * b + j]])
    # seeded per image: same positions whatever the batch it is in
    _, tok_b = select_tokens(acts[1:2], r2, ["b"], True, seed=7)
    assert tok_b.tolist() == tok[2:4].tolist()
    # CLS takes part in the draw; registers never do
    draws = {tuple(random_positions(str(i), 5, 2, 1, 0, 0).tolist()) for i in range(200)}
    assert any(0 in d for d in draws)
    draws = np.array([random_positions(str(i), 9, 3, 1, 4, 0).tolist() for i in range(100)])
    assert not np.isin(draws, [1, 2, 3, 4]).any()
    with pytest.raises(ValueError, match="token selection"):
        parse_tokens("random-x")


def test_load_backbone_from_full_clip_and_siglip_checkpoints(tmp_path, px):
    """Hub ids like openai/clip-vit-large-patch14-336 are full CLIP checkpoints: only the vision side loads."""
    from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel

    from sae_vlm.backbones import load_backbone

    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
    torch.manual_seed(0)
    cm = CLIPModel(CLIPConfig(vision_config=tiny_clip_config().to_dict(), text_config=text, projection_dim=16)).eval()
    cm.save_pretrained(tmp_path / "clip")
    tiny_clip_processor().save_pretrained(tmp_path / "clip")
    bb = load_backbone(str(tmp_path / "clip"))
    assert bb.revision == "local" and bb.processor is not None
    with torch.no_grad():
        emb = cm.get_image_features(pixel_values=px)
    torch.testing.assert_close(bb.capture(px, ["last"])["last"], getattr(emb, "pooler_output", emb), rtol=0, atol=0)

    sv = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8)
    sm = SiglipModel(SiglipConfig(vision_config=sv, text_config=text)).eval()
    sm.save_pretrained(tmp_path / "siglip")
    bb = load_backbone(str(tmp_path / "siglip"))
    assert bb.family == "siglip"
    with torch.no_grad():
        ref = sm.vision_model(pixel_values=px, output_hidden_states=True)
    got = bb.capture(px, ["layer.0", "last"])
    torch.testing.assert_close(got["last"], ref.pooler_output, rtol=0, atol=0)
    torch.testing.assert_close(got["layer.0"], ref.hidden_states[1], rtol=0, atol=0)


def test_a_new_family_is_one_registered_adapter(px):
    """Adding a family: a `Family` record whose `parts` says where the layers and the pooled output are; capture,
    hook points, widths and patching then work unchanged (here: a plain ViT, which has no adapter of its own)."""
    from transformers import ViTConfig, ViTModel

    from sae_vlm.backbones import FAMILIES, Family, Parts, family_of, register
    from sae_vlm.backbones.base import first_attr

    def parts(model):  # transformers 5 keeps a ViT's layers at the top, 4.x under `encoder`
        return Parts("vit", lambda pv: model(pixel_values=pv), first_attr(model, "layers", "encoder.layer"),
                     model.pooler, lambda t: t, model.config.hidden_size, model.config.hidden_size, has_cls=True)

    with pytest.raises(ValueError, match="model type 'vit' .* is not supported; expected clip, dinov2, llava, siglip"):
        family_of("vit")
    register(Family("vit", ("vit",), lambda cfg: ViTModel, parts))
    try:
        torch.manual_seed(0)
        m = ViTModel(ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8)).eval()
        bb = Backbone(m)
        assert bb.hook_points() == ["layer.0", "layer.1", "last"] and bb.width("last") == 32
        with torch.no_grad():
            ref = m(pixel_values=px, output_hidden_states=True)
        got = bb.capture(px, ["layer.0", "last"])
        torch.testing.assert_close(got["layer.0"], ref.hidden_states[1], rtol=0, atol=0)
        torch.testing.assert_close(got["last"], ref.pooler_output, rtol=0, atol=0)
        with bb.patch("layer.1", torch.zeros_like), torch.no_grad():
            assert not torch.allclose(m(pixel_values=px).pooler_output, ref.pooler_output)
    finally:
        del FAMILIES["vit"]
