"""A procedural world of small pictures with a known phylogeny: the ground truth for the toy demo and tests.

Every image is 48x48 RGB (`IMAGE_SIZE`): a plain background (black, gray, white) and one creature in one
quadrant of the 2x2 grid. 48 px is the smallest size where a 12 px creature still shows 3 stripes or a 3x3 grid
of dots, and it cuts into 4x4 patches of 12 px (2x2 per quadrant) for the tiny CLIP, which keeps its sequence at
17 tokens and training at a few CPU minutes.

Creatures form a 5-level taxonomy, branching 2 at every level (2 kingdoms ... 32 species). Each node adds one
visual trait that its whole subtree inherits and no other subtree has, as a genus's traits are inherited by its
species in iNat:

  kingdom  body plan        round                                      angular
  phylum   shape            circle            ring                     square           triangle
  class    hue              red     orange    yellow    green          cyan     blue    purple   pink
  order    shade            light / dark of the class's hue (16 colours, each in one order only)
  species  pattern          striped / dotted, inked in a darker tone of the order's colour

A hue, a shade of it and a pattern in it occur in one subtree only, so a latent for "red" finds circles, and a
latent for "dark red" finds dark red circles: the top images of finer concepts share longer taxonomy paths. Size,
position and background are drawn independently of the species (nuisances, like pose and habitat).

An image's label names its species like an iNat folder: `00011_round_circle_orange_dark_dotted` (class id,
then the 5 levels), which `sae_vlm.eval.hierarchy.parse_inat_label` reads. Generation is deterministic: sample i
of `generate(n, seed)` depends only on (seed, i), so a prefix of a longer run is the shorter run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from sae_vlm.io import atomic_save_image, atomic_write_text

IMAGE_SIZE = 48
QUADRANT = IMAGE_SIZE // 2

# The tree, written as each level's children of each node.
KINGDOMS = ("round", "angular")
SHAPES_OF = {"round": ("circle", "ring"), "angular": ("square", "triangle")}
COLOURS_OF = {"circle": ("red", "orange"), "ring": ("yellow", "green"), "square": ("cyan", "blue"),
              "triangle": ("purple", "pink")}
SHADES = ("light", "dark")
PATTERNS = ("striped", "dotted")
TAXONOMY_LEVELS = ("kingdom", "shape", "colour", "shade", "pattern")  # kingdom, phylum, class, order, species

SHAPES = tuple(s for k in KINGDOMS for s in SHAPES_OF[k])
COLOURS = tuple(c for s in SHAPES for c in COLOURS_OF[s])
KINGDOM_OF = {s: k for k, v in SHAPES_OF.items() for s in v}
SHAPE_OF = {c: s for s, v in COLOURS_OF.items() for c in v}
SPECIES = tuple((KINGDOM_OF[SHAPE_OF[c]], SHAPE_OF[c], c, sh, p) for c in COLOURS for sh in SHADES for p in PATTERNS)

SIZES = ("small", "large")
POSITIONS = ("topleft", "topright", "bottomleft", "bottomright")  # reading order of the 2x2 grid
BACKGROUNDS = ("black", "gray", "white")
NUISANCES = {"size": SIZES, "position": POSITIONS, "background": BACKGROUNDS}

HUE_RGB = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (235, 215, 40), "green": (40, 175, 60),
    "cyan": (30, 190, 200), "blue": (40, 80, 230), "purple": (150, 60, 200), "pink": (240, 110, 180),
}
BACKGROUND_RGB = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
SIZE_PX = {"small": 12, "large": 20}
POSITION_WORDS = {
    "topleft": "top left", "topright": "top right", "bottomleft": "bottom left", "bottomright": "bottom right"
}


def node_name(path: tuple[str, ...]) -> str:
    """A taxonomy node as a concept name: 'taxon:round/circle/red'."""
    return "taxon:" + "/".join(path)


# Every node of the tree (kingdoms first, species last), then the nuisances.
NODES: tuple[tuple[str, ...], ...] = tuple(
    dict.fromkeys(sp[:depth] for depth in range(1, len(TAXONOMY_LEVELS) + 1) for sp in SPECIES))
CONCEPTS: tuple[str, ...] = (*(node_name(n) for n in NODES),
                             *(f"{attr}:{v}" for attr, values in NUISANCES.items() for v in values))
CONCEPT_INDEX = {c: i for i, c in enumerate(CONCEPTS)}

# Questions the toy LLaVA answers; every answer but the caption is one word about the creature.
QUESTIONS = {
    "caption": "What is shown in this image?",
    "one_word": "What is shown in this image? Use exactly one word!",
    "colour": "What colour is the object? Use exactly one word!",
    "shade": "How light is the object? Use exactly one word!",
    "shape": "What shape is the object? Use exactly one word!",
    "pattern": "What pattern does the object have? Use exactly one word!",
    "size": "What size is the object? Use exactly one word!",
}
# The prompt format of the toy LLaVA (llava-1.5 style); `<image>` is expanded by the LlavaProcessor.
PROMPT_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass(frozen=True)
class ToyObject:
    """A creature: its species (shape, colour, shade, pattern) and where and how large it is drawn."""

    shape: str
    colour: str
    shade: str
    pattern: str
    size: str
    position: str

    @property
    def kingdom(self) -> str:
        return KINGDOM_OF[self.shape]

    def phrase(self) -> str:
        """'a small striped dark red circle in the top left'"""
        where = POSITION_WORDS[self.position]
        return f"a {self.size} {self.pattern} {self.shade} {self.colour} {self.shape} in the {where}"

    def as_dict(self) -> dict:
        return {"kingdom": self.kingdom, "shape": self.shape, "colour": self.colour, "shade": self.shade,
                "pattern": self.pattern, "size": self.size, "position": self.position}


class Box(NamedTuple):
    """The square a creature is drawn in, in pixels: rows top..top+side-1, columns left..left+side-1."""

    top: int
    left: int
    side: int


@dataclass(frozen=True)
class Sample:
    """One generated image with its ground truth; `objects[0]` (the only object) is the creature."""

    index: int
    image: Image.Image = field(repr=False, compare=False)
    objects: tuple[ToyObject, ...]
    background: str
    boxes: tuple[Box, ...] = field(default=(), compare=False)  # where each creature was drawn

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
        answers = {"caption": self.caption, "one_word": m.shape, "colour": m.colour, "shade": m.shade,
                   "shape": m.shape, "pattern": m.pattern, "size": m.size}
        if kind not in answers:
            raise ValueError(f"question kind {kind!r} is not known; expected one of {sorted(answers)}")
        return answers[kind]


def caption_of(objects, background: str) -> str:
    return " and ".join(o.phrase() for o in objects) + f" on a {background} background"


def taxonomy_path(obj: ToyObject) -> tuple[str, ...]:
    return (obj.kingdom, obj.shape, obj.colour, obj.shade, obj.pattern)


def concept_vector(objects, background: str) -> np.ndarray:
    """Multi-hot over CONCEPTS: every node on each creature's path, its size and position, the background."""
    v = np.zeros(len(CONCEPTS), np.float32)
    names = [f"background:{background}"]
    for o in objects:
        path = taxonomy_path(o)
        names += [node_name(path[:d]) for d in range(1, len(path) + 1)]
        names += [f"size:{o.size}", f"position:{o.position}"]
    v[[CONCEPT_INDEX[n] for n in names]] = 1.0
    return v


_SPECIES_ID: dict[tuple[str, ...], int] = {sp: i for i, sp in enumerate(SPECIES)}


def taxonomy_label(obj: ToyObject) -> str:
    """'00011_round_circle_orange_dark_dotted': species id, then the 5 levels."""
    path = taxonomy_path(obj)
    return f"{_SPECIES_ID[path]:05d}_" + "_".join(path)


def parse_taxonomy(label: str) -> dict[str, str]:
    """Inverse of `taxonomy_label`: {level: value}."""
    parts = label.split("_")
    if len(parts) != len(TAXONOMY_LEVELS) + 1 or not parts[0].isdigit():
        raise ValueError(
            f"taxonomy label {label!r} is not of the form 'NNNNN_' + {len(TAXONOMY_LEVELS)} '_'-separated levels"
        )
    return dict(zip(TAXONOMY_LEVELS, parts[1:]))


# ---- drawing --------------------------------------------------------------------------------------------------
def body_rgb(colour: str, shade: str) -> np.ndarray:
    """The order's colour: the class hue mixed halfway to white (light) or darkened to 55% (dark)."""
    hue = np.array(HUE_RGB[colour], np.float32)
    return hue + 0.5 * (255 - hue) if shade == "light" else hue * 0.55


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
    raise ValueError(f"shape {shape!r} is not known; expected one of {SHAPES}")


def _pattern_mask(pattern: str, s: int) -> np.ndarray:
    """True where the darker ink goes: 2-px horizontal stripes, or 2x2 dots on a 4-px grid."""
    y, x = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    if pattern == "striped":
        return (y % 4) >= 2
    if pattern == "dotted":
        return ((y % 4) >= 2) & ((x % 4) >= 2)
    raise ValueError(f"pattern {pattern!r} is not known; expected one of {PATTERNS}")


def render(objects, background: str, rng: np.random.Generator | None = None) -> tuple[Image.Image, tuple[Box, ...]]:
    """Draw the creatures on the background, and say where; `rng` adds small colour and position jitter and pixel
    noise."""
    rng = rng if rng is not None else np.random.default_rng(0)
    boxes = []
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    img[:] = BACKGROUND_RGB[background]
    for o in objects:
        s = SIZE_PX[o.size]
        qy, qx = divmod(POSITIONS.index(o.position), 2)
        oy = qy * QUADRANT + int(rng.integers(0, QUADRANT - s + 1))
        ox = qx * QUADRANT + int(rng.integers(0, QUADRANT - s + 1))
        base = np.clip(body_rgb(o.colour, o.shade) + rng.uniform(-10, 10, 3), 0, 255)
        fill = np.where(_pattern_mask(o.pattern, s)[..., None], base * 0.45, base)
        mask = _shape_mask(o.shape, s)
        box = img[oy : oy + s, ox : ox + s]
        box[mask] = fill[mask]
        boxes.append(Box(oy, ox, s))
    img += rng.normal(0, 4, img.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB"), tuple(boxes)


def _draw_scene(rng: np.random.Generator) -> tuple[tuple[ToyObject, ...], str]:
    _, shape, colour, shade, pattern = SPECIES[rng.integers(len(SPECIES))]
    obj = ToyObject(shape, colour, shade, pattern, SIZES[rng.integers(len(SIZES))],
                    POSITIONS[rng.integers(len(POSITIONS))])
    return (obj,), BACKGROUNDS[rng.integers(len(BACKGROUNDS))]


def sample(index: int, seed: int = 0) -> Sample:
    """Sample `index` of the world with `seed` (independent of any other sample)."""
    rng = np.random.default_rng([seed, index])
    objects, background = _draw_scene(rng)
    image, boxes = render(objects, background, rng)
    return Sample(index, image, objects, background, boxes)


def generate(n: int, seed: int = 0, start: int = 0) -> list[Sample]:
    """Samples start..start+n-1 of the world with `seed`."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    return [sample(i, seed) for i in range(start, start + n)]


def to_array(samples) -> np.ndarray:
    """uint8 [N, H, W, 3]."""
    return np.stack([np.asarray(s.image) for s in samples])


def species_sample(species: tuple[str, ...], size: str = "large", position: str = "topleft",
                   background: str = "gray", seed: int = 0) -> Sample:
    """One picture of a given species (for probes and quality checks)."""
    _, shape, colour, shade, pattern = species
    objects = (ToyObject(shape, colour, shade, pattern, size, position),)
    image, boxes = render(objects, background, np.random.default_rng(seed))
    return Sample(-1, image, objects, background, boxes)


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
               "concepts": np.flatnonzero(s.concepts).tolist(), "box": list(s.boxes[0])}
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


def folder_records(out_dir: str | Path, ids) -> list[dict]:
    """The manifest records of images `ids` (paths relative to out_dir), in that order."""
    recs = read_manifest(out_dir)
    out = []
    for rid in ids:
        rec = recs.get(Path(rid).as_posix())
        if rec is None:
            raise ValueError(f"image {rid!r} is not in {Path(out_dir) / MANIFEST}")
        out.append(rec)
    return out


def write_labels(folders, path: str | Path) -> Path:
    """A labels CSV (`image,label,...`, as `evaluate --labels` reads) of every image of the folders `write_folder`
    wrote: its taxonomy nodes ('round', 'round/circle', ...) and nuisance values ('size:small', ...), each image
    named by its path relative to its folder (the store's image id)."""
    lines = ["image,labels"]
    for folder in folders:
        for rel, rec in read_manifest(folder).items():
            lines.append(",".join([rel, *(CONCEPTS[c].removeprefix("taxon:") for c in rec["concepts"])]))
    atomic_write_text(Path(path), "\n".join(lines) + "\n")
    return Path(path)


def folder_boxes(out_dir: str | Path, ids) -> np.ndarray:
    """[N, 3] (top, left, side) of the creature of images `ids`, as `write_folder` recorded it."""
    recs = folder_records(out_dir, ids)
    if any("box" not in r for r in recs):
        raise ValueError(f"{Path(out_dir) / MANIFEST} records no creature boxes (written by an older sae-vlm); "
                         "delete the folder to generate it again")
    return np.array([r["box"] for r in recs], np.int64).reshape(-1, 3)


def folder_concepts(out_dir: str | Path, ids) -> np.ndarray:
    """Multi-hot concept vectors [N, len(CONCEPTS)] for images `ids` (paths relative to out_dir, e.g. the
    `id` of each row in an activation store extracted from that folder): the ground-truth embedder for MS."""
    out = np.zeros((len(ids), len(CONCEPTS)), np.float32)
    for i, rec in enumerate(folder_records(out_dir, ids)):
        out[i, rec["concepts"]] = 1.0
    return out

