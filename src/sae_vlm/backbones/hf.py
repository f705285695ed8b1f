"""Hugging Face vision encoders behind one small interface: preprocess, hook points, capture, patch.

Hook points:
  "layer.<i>"  residual stream after encoder layer i (0-based), equal to HF `hidden_states[i + 1]`, [B, T, D]
  "last"       the pooled image vector, [B, D]: CLIP `image_embeds` (after `visual_projection`; the pooled
               `post_layernorm` output for a CLIPVisionModel without projection), SigLIP `pooler_output`
               (MAP head), DINOv2 `pooler_output` (layer-normed CLS).
Everything is done with forward hooks on the unmodified model, so the same object can be steered by `patch`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

CLIP_TYPES = {"clip", "clip_vision_model"}
SIGLIP_TYPES = {"siglip", "siglip_vision_model"}
DINO_TYPES = {"dinov2", "dinov2_with_registers"}
LLAVA_TYPES = {"llava"}


class _StopForward(Exception):
    """Raised by a capture hook once every requested point is seen, so later layers are not computed."""


def parse_hook_point(name: str | int) -> str:
    """'11' or 11 -> 'layer.11'; 'layer.11' and 'last' stay as they are."""
    s = str(name).strip()
    if s == "last":
        return s
    if s.startswith("layer."):
        s = s[len("layer.") :]
    if not s.lstrip("-").isdigit():
        raise ValueError(f"hook point {name!r} is not understood; expected an int, 'layer.<i>' or 'last'")
    return f"layer.{int(s)}"


def _first(obj, *paths: str):
    for p in paths:
        cur = obj
        for part in p.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


class Backbone:
    """A vision encoder (or a LLaVA vision tower) with named hook points.

    `family` is one of clip | siglip | dinov2; `n_prefix` is the number of non-patch tokens before the
    patches (CLS + registers); `has_cls` tells whether token 0 is a CLS token.
    """

    def __init__(self, model: nn.Module, processor=None, model_id: str = "local", revision: str = "local"):
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.revision = revision
        cfg = model.config
        mt = cfg.model_type
        self.default_layer: str | None = None
        if mt in LLAVA_TYPES:
            tower = _first(model, "model.vision_tower", "vision_tower")
            vcfg = cfg.vision_config
            n_layers = vcfg.num_hidden_layers
            fl = cfg.vision_feature_layer
            fl = fl[-1] if isinstance(fl, (list, tuple)) else fl
            # hidden_states has n_layers + 1 entries; hidden_states[fl] is the output of layer fl - 1
            hs_index = fl % (n_layers + 1)
            self.default_layer = f"layer.{hs_index - 1}"
            inner_type = vcfg.model_type
            self._proj = None
            self._run = lambda pv: tower(pixel_values=pv)
        else:
            tower = model
            inner_type = mt
            vcfg = getattr(cfg, "vision_config", cfg)
            self._proj = getattr(model, "visual_projection", None)
            if mt == "clip":  # full CLIPModel: only run the vision side
                vm = model.vision_model

                def run(pv):
                    pooled = vm(pixel_values=pv).pooler_output
                    return self._proj(pooled)

                self._run = run
            else:
                self._run = lambda pv: model(pixel_values=pv)
        if inner_type in CLIP_TYPES:
            self.family = "clip"
        elif inner_type in SIGLIP_TYPES:
            self.family = "siglip"
        elif inner_type in DINO_TYPES:
            self.family = "dinov2"
        else:
            raise ValueError(f"model type {inner_type!r} is not supported; expected CLIP, SigLIP, DINOv2 or LLaVA")
        self.vision_config = vcfg
        self.tower = tower
        layers = _first(tower, "encoder.layers", "encoder.layer", "vision_model.encoder.layers", "vision_model.encoder.layer")
        if layers is None:
            raise ValueError(f"cannot find encoder layers in {type(tower).__name__}")
        self.layers = layers
        self.n_registers = int(getattr(vcfg, "num_register_tokens", 0) or 0) if self.family == "dinov2" else 0
        self.has_cls = self.family != "siglip"
        self.n_prefix = int(self.has_cls) + self.n_registers
        self.d_model = vcfg.hidden_size
        # module whose output gives "last", and how to turn that output into [B, D]
        self._last_select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
        if self.family == "clip":
            self._last = self._proj if self._proj is not None else _first(tower, "post_layernorm", "vision_model.post_layernorm")
        elif self.family == "siglip":
            self._last = _first(tower, "head", "vision_model.head")
        else:
            self._last = _first(tower, "layernorm", "vision_model.layernorm")
            self._last_select = lambda t: t[:, 0]
        if mt in LLAVA_TYPES:
            self._last = None  # LLaVA reads a layer, not the pooled vector

    # ---- interface -------------------------------------------------------------------------------------
    def hook_points(self) -> list[str]:
        pts = [f"layer.{i}" for i in range(len(self.layers))]
        return pts + (["last"] if self._last is not None else [])

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> pixel_values [B, 3, H, W] (float32, CPU) with the model's own image processor."""
        if self.processor is None:
            raise ValueError(f"no image processor was found for {self.model_id}; save one beside the model")
        return torch.as_tensor(self.processor(images=list(images), return_tensors="np")["pixel_values"])

    def _module(self, point: str) -> tuple[nn.Module, Callable]:
        point = parse_hook_point(point)
        if point == "last":
            if self._last is None:
                raise ValueError(f"hook point 'last' is not available for {self.model_id}; choose from {self.hook_points()}")
            return self._last, self._last_select
        i = int(point.split(".")[1])
        n = len(self.layers)
        if not -n <= i < n:
            raise ValueError(f"hook point {point!r} is out of range; the model has layers 0..{n - 1}")
        return self.layers[i % n], lambda t: t

    def _order(self, point: str) -> int:
        point = parse_hook_point(point)
        return len(self.layers) if point == "last" else int(point.split(".")[1]) % len(self.layers)

    @torch.inference_mode()
    def capture(self, pixel_values: torch.Tensor, hook_points) -> dict[str, torch.Tensor]:
        """One forward pass; returns {hook point: [B, T, D] for layers, [B, D] for 'last'} (model dtype)."""
        points = [parse_hook_point(p) for p in hook_points]
        out: dict[str, torch.Tensor] = {}
        stop_at = max(self._order(p) for p in points)
        handles = []
        for p in dict.fromkeys(points):
            mod, select = self._module(p)

            def hook(_m, _inp, output, p=p, select=select):
                t = output[0] if isinstance(output, (tuple, list)) else output
                out[p] = select(t)
                if self._order(p) == stop_at and len(out) == len(set(points)):
                    raise _StopForward

            handles.append(mod.register_forward_hook(hook))
        try:
            self._run(pixel_values.to(self.device(), self.dtype()))
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = set(points) - set(out)
        if missing:
            raise RuntimeError(f"hook points {sorted(missing)} did not fire in the forward pass")
        return out

    @contextlib.contextmanager
    def patch(self, hook_point: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, the hook point's module output `t` is replaced by `fn(t)` (for every forward)."""
        mod, _ = self._module(hook_point)

        def hook(_m, _inp, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + tuple(output[1:])
            if isinstance(output, list):
                return [fn(output[0])] + output[1:]
            return fn(output)

        # prepend: transformers 5 records hidden_states with its own hooks; ours must run before them.
        h = mod.register_forward_hook(hook, prepend=True)
        try:
            yield
        finally:
            h.remove()


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A torch dtype from 'fp32' | 'fp16' | 'bf16' (or their long names) or a dtype; None / 'auto': fp16 on
    CUDA, fp32 elsewhere. Anything else is a ValueError naming the choices."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not understood; expected auto or one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' load report and weight progress bar, silenced for one load."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def load_image_processor(model_id_or_dir: str, revision: str | None = None):
    """The model's own image processor, PIL backend (torchvision is optional)."""
    import transformers
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        kw = {"backend": "pil"}
    else:
        kw = {"use_fast": False}
    try:
        return AutoImageProcessor.from_pretrained(model_id_or_dir, revision=revision, **kw)
    except (OSError, ValueError):
        return None


def load_backbone(model_id_or_dir: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                  revision: str | None = None) -> Backbone:
    """Load a hub id or local directory with `from_pretrained`, dispatching on the config's model_type."""
    from transformers import AutoConfig

    torch_dtype = resolve_dtype(dtype, device)  # validated before anything is loaded
    if str(model_id_or_dir).startswith((".", "/", "~")) and not Path(model_id_or_dir).expanduser().is_dir():
        raise FileNotFoundError(f"model directory {model_id_or_dir} does not exist; expected a hub id or a directory")
    cfg = AutoConfig.from_pretrained(model_id_or_dir, revision=revision)
    mt = cfg.model_type
    import transformers as tf

    if mt == "clip":
        # a full CLIP checkpoint: load only the vision side plus projection
        cls = tf.CLIPVisionModelWithProjection
    elif mt == "clip_vision_model":
        archs = getattr(cfg, "architectures", None) or []
        cls = tf.CLIPVisionModelWithProjection if "CLIPVisionModelWithProjection" in archs else tf.CLIPVisionModel
    elif mt == "siglip":
        cls = tf.SiglipVisionModel
    elif mt == "siglip_vision_model":
        cls = tf.SiglipVisionModel
    elif mt == "dinov2":
        cls = tf.Dinov2Model
    elif mt == "dinov2_with_registers":
        cls = tf.Dinov2WithRegistersModel
    elif mt == "llava":
        cls = tf.LlavaForConditionalGeneration
    else:
        raise ValueError(f"model type {mt!r} of {model_id_or_dir} is not supported; expected clip, siglip, dinov2 or llava")
    with quiet_loading():  # a full CLIP checkpoint loaded as its vision side lists every text weight as unused
        model = cls.from_pretrained(model_id_or_dir, revision=revision, dtype=torch_dtype)
    model.to(device)
    rev = getattr(model.config, "_commit_hash", None) or ("local" if Path(model_id_or_dir).exists() else (revision or "unknown"))
    return Backbone(model, load_image_processor(model_id_or_dir, revision), model_id=str(model_id_or_dir), revision=rev)
