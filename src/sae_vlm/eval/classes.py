"""Class names of labelled images, as the steering bounds embed them (paper.md §6, similarity_baseline.py).

An image's label is its folder path. ImageNet's folders are WordNet ids (n01440764); their names come from
LOC_synset_mapping.txt, found in or beside the image folder, or from `--class-names FILE` in the same format
(`<label> <name>[, <synonym>, ...]` per line). A class is named by its first synonym with spaces written as
underscores, as the paper's id_to_name table writes them ("great_white_shark"). Other labels are named by their
last folder. A WordNet id is never embedded as a name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

WNID = re.compile(r"^n\d{8}$")
MAPPING_FILE = "LOC_synset_mapping.txt"


def read_names(path: str | Path) -> dict[str, str]:
    """{label: name} from a `<label> <name>[, <synonym>...]` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class-name file {path} does not exist")
    names = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        label, _, rest = line.strip().partition(" ")
        name = rest.split(",")[0].strip()
        if not name:
            raise ValueError(f"{path} line {n} has no name after the label {label!r}; expected '<label> <name>'")
        names[label] = name.replace(" ", "_")
    return names


def find_mapping(data: str | Path | None) -> Path | None:
    """LOC_synset_mapping.txt in the image folder or in the folder that holds it."""
    if data is None:
        return None
    folder = Path(data)
    for candidate in (folder / MAPPING_FILE, folder.parent / MAPPING_FILE):
        if candidate.is_file():
            return candidate
    return None


def class_names(labels: Sequence[str], data: str | Path | None = None, names_file: str | Path | None = None
                ) -> list[str]:
    """The name of each label's class: from the names file, else the mapping beside `data`, else its last folder."""
    source = names_file if names_file is not None else find_mapping(data)
    mapping = read_names(source) if source is not None else {}
    out = []
    for label in labels:
        leaf = str(label).rstrip("/").split("/")[-1]
        name = mapping.get(str(label), mapping.get(leaf))
        if name is None and WNID.match(leaf):
            raise ValueError(f"class folder {leaf!r} is an ImageNet WordNet id with no name; put {MAPPING_FILE} in "
                             f"or beside {data} or pass --class-names FILE")
        out.append(name if name is not None else leaf)
    return out
