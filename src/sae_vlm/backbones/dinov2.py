"""DINOv2, with or without registers. "last" is `pooler_output`: the layer-normed CLS token."""

from __future__ import annotations

from sae_vlm.backbones.base import Family, Parts, encoder_layers, first_attr, register


def hf_class(config) -> type:
    import transformers as tf

    return tf.Dinov2WithRegistersModel if config.model_type == "dinov2_with_registers" else tf.Dinov2Model


def cls_token(t):
    return t[:, 0]


def parts(model) -> Parts:
    cfg = model.config

    def run(pv):
        return model(pixel_values=pv)

    return Parts("dinov2", run, encoder_layers(model), first_attr(model, "layernorm", "vision_model.layernorm"),
                 cls_token, cfg.hidden_size, cfg.hidden_size, has_cls=True,
                 n_registers=int(getattr(cfg, "num_register_tokens", 0) or 0),
                 last_note="the layer-normed CLS token (pooler_output)")


FAMILY = register(Family("dinov2", ("dinov2", "dinov2_with_registers"), hf_class, parts))
