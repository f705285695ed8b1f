"""SigLIP vision towers. No CLS token; "last" is the MAP head's `pooler_output`."""

from __future__ import annotations

from sae_vlm.backbones.base import Family, Parts, encoder_layers, first_attr, identity, register


def hf_class(config) -> type:
    import transformers as tf

    return tf.SiglipVisionModel


def parts(model) -> Parts:
    vcfg = getattr(model.config, "vision_config", model.config)

    def run(pv):
        return model(pixel_values=pv)

    return Parts("siglip", run, encoder_layers(model), first_attr(model, "head", "vision_model.head"), identity,
                 vcfg.hidden_size, vcfg.hidden_size, has_cls=False,
                 last_note="the MAP head's pooler_output, before L2 normalisation")


FAMILY = register(Family("siglip", ("siglip", "siglip_vision_model"), hf_class, parts))
