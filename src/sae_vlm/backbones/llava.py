"""LLaVA: its vision tower, as the tower's own family sees it, plus the layer the projector reads.

There is no "last": LLaVA reads a layer, not the pooled vector.
"""

from __future__ import annotations

from sae_vlm.backbones.base import Family, Parts, family_of, first_attr, register


def hf_class(config) -> type:
    import transformers as tf

    return tf.LlavaForConditionalGeneration


def parts(model) -> Parts:
    cfg = model.config
    tower = first_attr(model, "model.vision_tower", "vision_tower")
    if tower is None:
        raise ValueError(f"cannot find the vision tower in {type(model).__name__}")
    inner = family_of(cfg.vision_config.model_type, "LLaVA's vision tower").parts(tower)
    fl = cfg.vision_feature_layer
    fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
    # hidden_states has n_layers + 1 entries; hidden_states[fl] is the output of layer fl - 1
    hs_index = fl % (len(inner.layers) + 1)

    def run(pv):
        return tower(pixel_values=pv)

    return inner._replace(run=run, last=None, last_width=None, default_layer=f"layer.{hs_index - 1}")


FAMILY = register(Family("llava", ("llava",), hf_class, parts))
