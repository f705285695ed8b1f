"""The names settings are checked against, kept apart from what they name so that config.py loads neither torch
nor `sae/`: the architectures (their records are registered in `sae/arch.py`, which adds any new one here) and the
libraries whose SAEs `sae/formats` reads."""

from __future__ import annotations

ARCH_NAMES: list[str] = ["relu", "topk", "batchtopk", "matryoshka", "jumprelu"]  # in sae/arch.py's order
FORMAT_NAMES = ("dictionary-learning", "sae-lens", "saev", "sparsify", "overcomplete")


def add_arch_name(name: str) -> None:
    if name not in ARCH_NAMES:
        ARCH_NAMES.append(name)


def check_arch(name: str) -> str:
    if name not in ARCH_NAMES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {', '.join(ARCH_NAMES)}")
    return name
