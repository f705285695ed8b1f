"""The `--tokens` grammar: which tokens of a hook point's output become store rows, checked when the config is built
(config.py) and carried out in `sae_vlm.data.tokens`, which says what each selection means."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenSelection:
    name: str  # as written in the store subdir: cls | mean | all | random-2 | pooled
    kind: str  # cls | mean | all | random | pooled
    k: int = 1


POOLED = TokenSelection("pooled", "pooled")


def parse_tokens(spec: str | list[str]) -> list[TokenSelection]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for raw in items:
        s = raw.strip()
        if s in ("cls", "first", "mean", "all", "pooled"):
            out.append(TokenSelection(s, s))
        elif s.startswith("random-") and s[len("random-") :].isdigit() and int(s[len("random-") :]) > 0:
            out.append(TokenSelection(s, "random", int(s[len("random-") :])))
        else:
            raise ValueError(f"token selection {s!r} is not understood; expected cls, first, mean, all or random-<k>")
    return list(dict.fromkeys(out))
