"""CLIP: CLIPModel (vision side only), CLIPVisionModel and CLIPVisionModelWithProjection.

"last" is the output of `visual_projection` (not L2-normalised); without a projection, the pooled `post_layernorm`
output.
"""

from __future__ import annotations

from sae_vlm.backbones.base import Family, Parts, encoder_layers, first_attr, identity, register

PROJECTED = ("the image embedding after visual_projection, before L2 normalisation: what get_image_features "
             "returns, not CLIPModel(...).image_embeds, which is normalised")


def hf_class(config) -> type:
    import transformers as tf

    # a full CLIP checkpoint loads as its vision side plus the projection
    with_proj = config.model_type == "clip" or "CLIPVisionModelWithProjection" in (config.architectures or [])
    return tf.CLIPVisionModelWithProjection if with_proj else tf.CLIPVisionModel


def parts(model) -> Parts:
    cfg = model.config
    vcfg = getattr(cfg, "vision_config", cfg)
    proj = getattr(model, "visual_projection", None)
    if cfg.model_type == "clip":  # a full CLIPModel: run only the vision side, then the projection
        vision, projection = model.vision_model, model.visual_projection
        run = lambda pv: projection(vision(pixel_values=pv).pooler_output)  # noqa: E731
    else:
        run = lambda pv: model(pixel_values=pv)  # noqa: E731
    last = proj if proj is not None else first_attr(model, "post_layernorm", "vision_model.post_layernorm")
    note = (PROJECTED if proj is not None else "the pooled CLS token after post_layernorm (pooler_output), without "
            "a projection")
    return Parts("clip", run, encoder_layers(model), last, identity,
                 proj.out_features if proj is not None else vcfg.hidden_size, vcfg.hidden_size, has_cls=True,
                 last_note=note)


FAMILY = register(Family("clip", ("clip", "clip_vision_model"), hf_class, parts))
