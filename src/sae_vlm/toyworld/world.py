"""A procedural world of small pictures with known concepts: the ground truth for the toy demo and tests.

Every image is 48x48 RGB (`IMAGE_SIZE`): a plain background (black, gray, white) and 1-3 objects, each in its
own quadrant of the 2x2 grid. 48 px is the smallest size where a 12 px object still shows 3 stripes or a 3x3
grid of dots, and it cuts into 4x4 patches of 12 px (2x2 per quadrant) for the tiny CLIP, which keeps its
sequence at 17 tokens and training at a few CPU minutes.

Concepts (two-level families for shape and colour):

  shape    round: circle, ring              angular: square, triangle, diamond
  colour   warm:  red, orange, yellow       cool:    blue, green, purple
  pattern  solid, striped, dotted           size     small (12 px), large (20 px)
  position topleft, topright, bottomleft, bottomright          background black, gray, white

Objects are listed largest first, then in reading order of their quadrants; the first one is the *main*
object. It names the image's taxonomy path, 7 levels like iNat (shape family / shape / colour family / colour /
pattern / size / position), written as a folder label `00123_round_circle_warm_red_striped_small_topleft`
(numeric class id, then the levels) which `sae_vlm.eval.hierarchy.parse_inat_label` reads unchanged.

Generation is deterministic: sample i of `generate(n, seed)` depends only on (seed, i), so a prefix of a longer
run is the shorter run.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from sae_vlm.io import atomic_save_image, atomic_write_text

IMAGE_SIZE = 48
QUADRANT = IMAGE_SIZE // 2

SHAPE_FAMILIES = {"round": ("circle", "ring"), "angular": ("square", "triangle", "diamond")}
COLOUR_FAMILIES = {"warm": ("red", "orange", "yellow"), "cool": ("blue", "green", "purple")}
SHAPES = tuple(s for v in SHAPE_FAMILIES.values() for s in v)
COLOURS = tuple(c for v in COLOUR_FAMILIES.values() for c in v)
SHAPE_FAMILY = {s: f for f, v in SHAPE_FAMILIES.items() for s in v}
COLOUR_FAMILY = {c: f for f, v in COLOUR_FAMILIES.items() for c in v}
PATTERNS = ("solid", "striped", "dotted")
SIZES = ("small", "large")
POSITIONS = ("topleft", "topright", "bottomleft", "bottomright")  # reading order of the 2x2 grid
BACKGROUNDS = ("black", "gray", "white")
COUNT_WORDS = ("one", "two", "three")

RGB = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 40),
    "blue": (40, 80, 230), "green": (40, 175, 60), "purple": (150, 60, 200),
    "black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240),
}
SIZE_PX = {"small": 12, "large": 20}
POSITION_WORDS = {
    "topleft": "top left", "topright": "top right", "bottomleft": "bottom left", "bottomright": "bottom right"
}

# Taxonomy levels of the main object, coarse to fine (7, like kingdom..species).
TAXONOMY_LEVELS = ("shape_family", "shape", "colour_family", "colour", "pattern", "size", "position")
OBJECT_ATTRS = ("shape", "colour", "pattern", "size", "position")  # the independent draws per object
ATTR_VALUES = {"shape": SHAPES, "colour": COLOURS, "pattern": PATTERNS, "size": SIZES, "position": POSITIONS}

# Fixed concept vocabulary of the multi-hot vector: "attribute:value", image-level union over objects.
CONCEPTS: tuple[str, ...] = (
    *(f"shape_family:{f}" for f in SHAPE_FAMILIES), *(f"shape:{s}" for s in SHAPES),
    *(f"colour_family:{f}" for f in COLOUR_FAMILIES), *(f"colour:{c}" for c in COLOURS),
    *(f"pattern:{p}" for p in PATTERNS), *(f"size:{s}" for s in SIZES), *(f"position:{p}" for p in POSITIONS),
    *(f"background:{b}" for b in BACKGROUNDS), *(f"count:{c}" for c in COUNT_WORDS),
)
CONCEPT_INDEX = {c: i for i, c in enumerate(CONCEPTS)}

# Questions the toy LLaVA answers; every answer but the caption is one word about the main object.
QUESTIONS = {
    "caption": "What is shown in this image?",
    "one_word": "What is shown in this image? Use exactly one word!",
    "colour": "What colour is the object? Use exactly one word!",
    "shape": "What shape is the object? Use exactly one word!",
    "pattern": "What pattern does the object have? Use exactly one word!",
    "size": "What size is the object? Use exactly one word!",
    "count": "How many objects are there? Use exactly one word!",
}
# The prompt format of the toy LLaVA (llava-1.5 style); `<image>` is expanded by the LlavaProcessor.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"

_N_OBJECTS_P = (0.4, 0.3, 0.3)


@dataclass(frozen=True)
class ToyObject:
    shape: str
    colour: str
    pattern: str
    size: str
    position: str

    @property
    def shape_family(self) -> str:
        return SHAPE_FAMILY[self.shape]

    @property
    def colour_family(self) -> str:
        return COLOUR_FAMILY[self.colour]

    def phrase(self) -> str:
        """'a small striped red triangle in the top left'"""
        return f"a {self.size} {self.pattern} {self.colour} {self.shape} in the {POSITION_WORDS[self.position]}"

    def as_dict(self) -> dict:
        d = {a: getattr(self, a) for a in OBJECT_ATTRS}
        return {**d, "shape_family": self.shape_family, "colour_family": self.colour_family}


@dataclass(frozen=True)
class Sample:
    """One generated image with its ground truth; `objects[0]` is the main object."""

    index: int
    image: Image.Image = field(repr=False, compare=False)
    objects: tuple[ToyObject, ...]
    background: str

    @property
    def main(self) -> ToyObject:
        return self.objects[0]

    @property
    def caption(self) -> str:
        return caption_of(self.objects, self.background)

    @property
    def labels(self) -> dict:
        objects = [o.as_dict() for o in self.objects]
        return {"background": self.background, "count": len(self.objects), "objects": objects}

    @property
    def concepts(self) -> np.ndarray:
        return concept_vector(self.objects, self.background)

    @property
    def taxonomy(self) -> str:
        return taxonomy_label(self.main)

    def answer(self, kind: str) -> str:
        """The answer to `QUESTIONS[kind]`."""
        m = self.main
        answers = {"caption": self.caption, "one_word": m.shape, "colour": m.colour, "shape": m.shape,
                   "pattern": m.pattern, "size": m.size, "count": COUNT_WORDS[len(self.objects) - 1]}
        if kind not in answers:
            raise ValueError(f"question kind {kind!r} is not known; expected one of {sorted(answers)}")
        return answers[kind]


def caption_of(objects, background: str) -> str:
    return " and ".join(o.phrase() for o in objects) + f" on a {background} background"


def concept_vector(objects, background: str) -> np.ndarray:
    v = np.zeros(len(CONCEPTS), np.float32)
    names = [f"background:{background}", f"count:{COUNT_WORDS[len(objects) - 1]}"]
    for o in objects:
        names += [f"{k}:{val}" for k, val in o.as_dict().items()]
    v[[CONCEPT_INDEX[n] for n in names]] = 1.0
    return v


def _leaf_ids() -> dict[tuple[str, ...], int]:
    leaves = itertools.product(SHAPES, COLOURS, PATTERNS, SIZES, POSITIONS)
    return {(SHAPE_FAMILY[s], s, COLOUR_FAMILY[c], c, p, z, q): i for i, (s, c, p, z, q) in enumerate(leaves)}


_LEAF_ID = _leaf_ids()


def taxonomy_path(obj: ToyObject) -> tuple[str, ...]:
    return tuple(getattr(obj, lvl) for lvl in TAXONOMY_LEVELS)


def taxonomy_label(obj: ToyObject) -> str:
    """'00123_round_circle_warm_red_striped_small_topleft': class id, then the 7 levels."""
    path = taxonomy_path(obj)
    return f"{_LEAF_ID[path]:05d}_" + "_".join(path)


def parse_taxonomy(label: str) -> dict[str, str]:
    """Inverse of `taxonomy_label`: {level: value}."""
    parts = label.split("_")
    if len(parts) != len(TAXONOMY_LEVELS) + 1 or not parts[0].isdigit():
        raise ValueError(
            f"taxonomy label {label!r} is not of the form 'NNNNN_' + {len(TAXONOMY_LEVELS)} '_'-separated levels"
        )
    return dict(zip(TAXONOMY_LEVELS, parts[1:]))


# ---- drawing --------------------------------------------------------------------------------------------------
def _shape_mask(shape: str, s: int) -> np.ndarray:
    """Boolean [s, s] mask of a shape filling an s x s box (coordinates in [-1, 1] at pixel centres)."""
    t = (np.arange(s) + 0.5) / s * 2 - 1
    v, u = np.meshgrid(t, t, indexing="ij")
    r2 = u * u + v * v
    if shape == "circle":
        return r2 <= 0.95**2
    if shape == "ring":
        return (r2 <= 0.95**2) & (r2 >= 0.5**2)
    if shape == "square":
        return (np.abs(u) <= 0.8) & (np.abs(v) <= 0.8)
    if shape == "triangle":  # apex up
        return (v >= -0.9) & (v <= 0.85) & (np.abs(u) <= (v + 0.9) / 1.75)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"shape {shape!r} is not known; expected one of {SHAPES}")


def _pattern_mask(pattern: str, s: int) -> np.ndarray:
    """True where the darker pattern colour goes: 2-px horizontal stripes, or 2x2 dots on a 4-px grid."""
    y, x = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    if pattern == "solid":
        return np.zeros((s, s), bool)
    if pattern == "striped":
        return (y % 4) >= 2
    if pattern == "dotted":
        return ((y % 4) >= 2) & ((x % 4) >= 2)
    raise ValueError(f"pattern {pattern!r} is not known; expected one of {PATTERNS}")


def render(objects, background: str, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw objects on the background; `rng` adds small colour jitter, position jitter and pixel noise."""
    rng = rng if rng is not None else np.random.default_rng(0)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = RGB[background]
    for o in objects:
        s = SIZE_PX[o.size]
        qy, qx = divmod(POSITIONS.index(o.position), 2)
        oy = qy * QUADRANT + int(rng.integers(0, QUADRANT - s + 1))
        ox = qx * QUADRANT + int(rng.integers(0, QUADRANT - s + 1))
        base = np.clip(np.array(RGB[o.colour], np.float32) + rng.uniform(-15, 15, 3), 0, 255)
        fill = np.where(_pattern_mask(o.pattern, s)[..., None], base * 0.4, base)
        mask = _shape_mask(o.shape, s)
        box = img[oy : oy + s, ox : ox + s]
        box[mask] = fill[mask]
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def _draw_scene(rng: np.random.Generator) -> tuple[tuple[ToyObject, ...], str]:
    n = int(rng.choice(3, p=_N_OBJECTS_P)) + 1
    quadrants = rng.permutation(len(POSITIONS))[:n]
    objs = [
        ToyObject(SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))],
                  PATTERNS[rng.integers(len(PATTERNS))], SIZES[rng.integers(len(SIZES))], POSITIONS[q])
        for q in quadrants
    ]
    objs.sort(key=lambda o: (o.size != "large", POSITIONS.index(o.position)))  # largest first, then reading order
    return tuple(objs), BACKGROUNDS[rng.integers(len(BACKGROUNDS))]


def sample(index: int, seed: int = 0) -> Sample:
    """Sample `index` of the world with `seed` (independent of any other sample)."""
    rng = np.random.default_rng([seed, index])
    objects, background = _draw_scene(rng)
    return Sample(index, render(objects, background, rng), objects, background)


def generate(n: int, seed: int = 0, start: int = 0) -> list[Sample]:
    """Samples start..start+n-1 of the world with `seed`."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return [sample(i, seed) for i in range(start, start + n)]


def to_array(samples) -> np.ndarray:
    """uint8 [N, H, W, 3]."""
    return np.stack([np.asarray(s.image) for s in samples])


# ---- on disk --------------------------------------------------------------------------------------------------
MANIFEST = "toyworld.jsonl"


def write_folder(samples, out_dir: str | Path) -> Path:
    """ImageFolder tree `out_dir/<taxonomy label>/<index>.png` plus `toyworld.jsonl` (one record per image:
    path relative to out_dir, caption, labels, taxonomy, concept indices) and `concepts.json` (the vocabulary)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for s in samples:
        rel = Path(s.taxonomy, f"{s.index:06d}.png")
        (out / rel.parent).mkdir(exist_ok=True)
        atomic_save_image(out / rel, s.image)
        rec = {"path": rel.as_posix(), "caption": s.caption, "taxonomy": s.taxonomy, "labels": s.labels,
               "concepts": np.flatnonzero(s.concepts).tolist()}
        lines.append(json.dumps(rec))
    atomic_write_text(out / "concepts.json", json.dumps(list(CONCEPTS)))
    atomic_write_text(out / MANIFEST, "\n".join(lines) + "\n")
    return out


def read_manifest(out_dir: str | Path) -> dict[str, dict]:
    """{relative image path: record} from a folder written by `write_folder`."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a folder written by toyworld.write_folder")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["path"]: r for r in recs}


def folder_concepts(out_dir: str | Path, ids) -> np.ndarray:
    """Multi-hot concept vectors [N, len(CONCEPTS)] for images `ids` (paths relative to out_dir, e.g. the
    `id` of each row in an activation store extracted from that folder): the ground-truth embedder for MS."""
    recs = read_manifest(out_dir)
    out = np.zeros((len(ids), len(CONCEPTS)), np.float32)
    for i, rid in enumerate(ids):
        rec = recs.get(Path(rid).as_posix())
        if rec is None:
            raise ValueError(f"image {rid!r} is not in {Path(out_dir) / MANIFEST}")
        out[i, rec["concepts"]] = 1.0
    return out
