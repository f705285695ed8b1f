"""The one interface every vision encoder is used through, and the registry of model families behind it.

Hook points:
  "layer.<i>"  residual stream after encoder layer i (0-based), equal to HF `hidden_states[i + 1]`, [B, T, D]
  "last"       the pooled image vector, [B, D] (what each family calls it: see its adapter)
Everything is done with forward hooks on the unmodified model, so the same object can be steered by `patch`.
A family adapter (clip.py, siglip.py, dinov2.py, llava.py) only says where these parts are in its models.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel


class Parts(NamedTuple):
    """Where a family keeps what the interface needs, found once per model."""

    family: str  # the vision encoder's family: clip | siglip | dinov2 (a LLaVA reports its tower's)
    run: Callable[[torch.Tensor], object]  # the vision forward on pixel values
    layers: nn.ModuleList  # encoder layers; their outputs are the "layer.<i>" points
    last: nn.Module | None  # module whose output gives "last"; None: the model has no such point
    last_select: Callable[[torch.Tensor], torch.Tensor]  # that module's output -> [B, D]
    last_width: int | None  # width of "last"
    d_model: int  # width of the residual stream
    has_cls: bool  # token 0 is a CLS token
    n_registers: int = 0  # register tokens after CLS (DINOv2 with registers)
    default_layer: str | None = None  # the layer a LLaVA projector reads
    last_note: str = ""  # what "last" is, in words (written into the store manifest)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: the transformers config types it covers, the class to load, and its parts."""

    name: str
    model_types: tuple[str, ...]
    hf_class: Callable[[object], type]  # config -> the transformers class `from_pretrained` loads
    parts: Callable[[nn.Module], Parts]


FAMILIES: dict[str, Family] = {}  # by config model_type


def register(family: Family) -> Family:
    for mt in family.model_types:
        FAMILIES[mt] = family
    return family


def family_of(model_type: str, where: str = "the model") -> Family:
    if model_type not in FAMILIES:
        names = sorted({f.name for f in FAMILIES.values()})
        raise ValueError(f"model type {model_type!r} of {where} is not supported; expected {', '.join(names)}")
    return FAMILIES[model_type]


def first_attr(obj, *paths: str) -> Any:
    """The first dotted attribute path that exists on `obj` (HF moves modules between versions), else None."""
    for p in paths:
        cur = obj
        for part in p.split("."):
            cur = getattr(cur, part, None)
            if cur is None:
                break
        if cur is not None:
            return cur
    return None


def encoder_layers(tower: nn.Module) -> nn.ModuleList:
    layers = first_attr(tower, "encoder.layers", "encoder.layer", "vision_model.encoder.layers",
                        "vision_model.encoder.layer")
    if layers is None:
        raise ValueError(f"cannot find encoder layers in {type(tower).__name__}")
    return layers


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


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


class _StopForward(Exception):
    """Raised by a capture hook once every requested point is seen, so later layers are not computed."""


def _replace_output(output, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A module output with its first tensor (or the tensor itself) replaced by fn(it)."""
    if isinstance(output, (tuple, list)):
        return type(output)([fn(output[0]), *output[1:]])
    return fn(output)


class Backbone:
    """A vision encoder (or a LLaVA vision tower) with named hook points; any registered family."""

    def __init__(self, model: PreTrainedModel, processor=None, model_id: str = "local", revision: str = "local"):
        self.model = model.eval()
        self.processor = processor
        self.model_id = model_id
        self.revision = revision
        self.parts = family_of(model.config.model_type, model_id).parts(model)
        self.family = self.parts.family
        self.has_cls = self.parts.has_cls
        self.n_registers = self.parts.n_registers
        self.n_prefix = int(self.has_cls) + self.n_registers  # non-patch tokens before the patches
        self.d_model = self.parts.d_model
        self.default_layer = self.parts.default_layer
        self.n_layers = len(self.parts.layers)

    def hook_points(self) -> list[str]:
        pts = [f"layer.{i}" for i in range(self.n_layers)]
        return pts + (["last"] if self.parts.last is not None else [])

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images) -> torch.Tensor:
        """PIL images -> pixel_values [B, 3, H, W] (float32, CPU) with the model's own image processor."""
        if self.processor is None:
            raise ValueError(f"no image processor was found for {self.model_id}; save one beside the model")
        return torch.as_tensor(self.processor(images=list(images), return_tensors="np")["pixel_values"])

    def run(self, pixel_values: torch.Tensor):
        """The plain vision forward (no hooks of ours)."""
        return self.parts.run(pixel_values.to(self.device(), self.dtype()))

    def hook_point(self, name: str | int) -> str:
        """The point's one name: a negative index counts from the end, as in Python ('-1' -> 'layer.<n - 1>'); a
        ValueError names the points that exist."""
        point = parse_hook_point(name)
        if point == "last":
            if self.parts.last is None:
                raise ValueError(f"hook point 'last' is not available for {self.model_id}; "
                                 f"choose from {self.hook_points()}")
            return point
        i, n = int(point.split(".")[1]), self.n_layers
        if not -n <= i < n:
            raise ValueError(f"hook point {name!r} is out of range; the model has layers 0..{n - 1} "
                             f"(or -{n}..-1 from the end)")
        return f"layer.{i % n}"

    def module(self, hook_point: str | int) -> nn.Module:
        """The module whose output is the hook point; a ValueError names the points that exist."""
        point = self.hook_point(hook_point)
        if point == "last" and self.parts.last is not None:  # hook_point has refused 'last' where there is none
            return self.parts.last
        return self.parts.layers[int(point.split(".")[1])]

    def width(self, hook_point: str | int) -> int:
        """Width of the vectors at a hook point, from the config (so a wrong SAE fails before any forward)."""
        self.module(hook_point)
        if parse_hook_point(hook_point) == "last" and self.parts.last_width is not None:
            return int(self.parts.last_width)
        return int(self.d_model)

    def check_sae(self, hook_point: str | int, sae) -> None:
        """Refuse an SAE whose input width is not this hook point's, naming both, before any forward."""
        self.check_width(hook_point, sae.cfg.d_in)

    def check_width(self, hook_point: str | int, d_in: int) -> None:
        """Refuse an SAE input width `d_in` that is not this hook point's, naming both."""
        want = self.width(hook_point)
        if d_in != want:
            raise ValueError(f"SAE d_in={d_in} does not match the width {want} of hook point {hook_point!r} "
                             f"of {self.model.config.model_type} {self.model_id}; expected an SAE trained on that "
                             "model and hook point")

    def describe(self, hook_point: str | int) -> str:
        """What the vectors at a hook point are, in words (the store manifest records it)."""
        point = self.hook_point(hook_point)
        if point == "last":
            return self.parts.last_note
        i = point.split(".")[1]
        return f"residual stream after encoder layer {i} (HF hidden_states[{i} + 1])"

    def _select(self, point: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.parts.last_select if point == "last" else identity

    def _order(self, point: str) -> int:
        return self.n_layers if point == "last" else int(point.split(".")[1]) % self.n_layers

    @torch.inference_mode()
    def capture(self, pixel_values: torch.Tensor, hook_points) -> dict[str, torch.Tensor]:
        """One forward pass; returns {hook point: [B, T, D] for layers, [B, D] for 'last'} (model dtype)."""
        points = list(dict.fromkeys(parse_hook_point(p) for p in hook_points))
        out: dict[str, torch.Tensor] = {}
        stop_at = max(self._order(p) for p in points)
        handles = []
        for p in points:
            def hook(_m, _inp, output, p=p, select=self._select(p)):
                out[p] = select(output[0] if isinstance(output, (tuple, list)) else output)
                if self._order(p) == stop_at and len(out) == len(points):
                    raise _StopForward

            handles.append(self.module(p).register_forward_hook(hook))
        self._run_hooked(pixel_values, handles)
        missing = set(points) - set(out)
        if missing:
            raise RuntimeError(f"hook points {sorted(missing)} did not fire in the forward pass")
        return out

    def patch_grid(self, pixel_values: torch.Tensor | None = None) -> tuple[int, int]:
        """(rows, cols) of the patch tokens: of `pixel_values` [B, 3, H, W] if given, else of the model's own size."""
        cfg = self.model.config
        vcfg = getattr(cfg, "vision_config", cfg)
        patch = int(vcfg.patch_size)
        if pixel_values is not None:
            h, w = pixel_values.shape[-2:]
        else:
            size = vcfg.image_size
            h, w = (size, size) if isinstance(size, int) else size
        return int(h) // patch, int(w) // patch

    def capture_with_input(self, pixel_values: torch.Tensor, hook_point: str | int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the first encoder layer's input [B, T, D] (patch embeddings with positions, after any pre-layer norm) as
        a leaf that requires grad, the hook point's output computed from it): one forward pass with autograd on,
        stopped at the hook point. For attribution: differentiate a function of the output w.r.t. the input."""
        point = self.hook_point(hook_point)
        seen: dict[str, torch.Tensor] = {}

        def take_input(_m, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
            seen["input"] = x
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        def take_output(_m, _inp, output):
            seen["output"] = self._select(point)(output[0] if isinstance(output, (tuple, list)) else output)
            raise _StopForward

        handles = [self.parts.layers[0].register_forward_pre_hook(take_input, with_kwargs=True),
                   self.module(point).register_forward_hook(take_output)]
        with torch.enable_grad():
            self._run_hooked(pixel_values, handles)
        return seen["input"], seen["output"]

    def _run_hooked(self, pixel_values: torch.Tensor, handles: list) -> None:
        """The forward with our hooks in, stopped where a hook raises _StopForward; the hooks are removed after."""
        try:
            self.run(pixel_values)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def patch(self, hook_point: str | int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, the hook point's module output `t` is replaced by `fn(t)` (for every forward)."""
        module = self.module(hook_point)
        # prepend: transformers 5 records hidden_states (what LLaVA's projector reads) with its own forward hooks,
        # installed lazily at the first forward; ours must run before them or the change is invisible downstream.
        handle = module.register_forward_hook(lambda _m, _inp, output: _replace_output(output, fn), prepend=True)
        try:
            yield
        finally:
            handle.remove()
