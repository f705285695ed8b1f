"""A planted-feature world: synthetic activations whose features form a known tree, so hierarchy is scored exactly.

The tree: `branching[0]` roots, then every feature at level l has `branching[l + 1]` children (`sae-vlm planted`'s
default 4,3,3,3: 4 + 12 + 36 + 108 = 160 features). Features are numbered level by level, roots first, so each
level is one contiguous range (as Matryoshka groups are). Each feature's direction is a random unit vector in R^d
(Gaussian, normalised); with more features than dimensions (160 in d = 40 by default) they are in superposition.

A row is drawn top down: each root fires independently with probability `root_prob`; a firing feature picks at
most one child: with probability `child_prob` one of its children, uniformly, fires too, else none does. So a
child fires only when its parent fires, and siblings never fire together. A firing feature's magnitude is uniform
in [0.5, 1.5], independent of every other; the row is Σ magnitude · direction plus isotropic Gaussian noise of
standard deviation `noise` per dimension. Expected active features per row: roots · root_prob · Σ_l child_prob^l.

Everything derives from `seed`: the directions from the seed alone, a sample from (seed, sample seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sae_vlm.config import check_world

MAGNITUDE = (0.5, 1.5)  # a firing feature's magnitude is uniform in this range


@dataclass(frozen=True)
class PlantedWorld:
    """The tree and its directions. `parent_C` is -1 for a root; `depth_C` 0 for a root."""

    branching: tuple[int, ...]
    directions_CD: np.ndarray  # float32, unit rows
    parent_C: np.ndarray  # int64
    depth_C: np.ndarray  # int64
    root_prob: float
    child_prob: float
    noise: float
    seed: int

    @property
    def n_features(self) -> int:
        return len(self.parent_C)

    @property
    def d(self) -> int:
        return self.directions_CD.shape[1]

    @property
    def level_sizes(self) -> tuple[int, ...]:
        return tuple(int(n) for n in np.bincount(self.depth_C))

    @property
    def expected_active(self) -> float:
        """Mean number of firing features per row."""
        return self.branching[0] * self.root_prob * sum(self.child_prob ** lvl for lvl in range(len(self.branching)))

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(x_ND float32, active_NC bool): `n` rows and which features fired in each."""
        rng = np.random.default_rng([self.seed, 1, seed])  # stream 0 drew the directions
        active_NC = np.zeros((n, self.n_features), bool)
        active_NC[:, : self.branching[0]] = rng.random((n, self.branching[0])) < self.root_prob
        start = 0
        for size, b in zip(self.level_sizes, self.branching[1:]):
            # parent i of this level (global index start + i) has children child_start + i·b .. + b − 1
            child_start = start + size
            parents_NP = active_NC[:, start:child_start]
            picks_NP = parents_NP & (rng.random((n, size)) < self.child_prob)
            rows, local = np.nonzero(picks_NP)
            active_NC[rows, child_start + local * b + rng.integers(0, b, len(rows))] = True
            start = child_start
        magnitude_NC = np.zeros((n, self.n_features))
        magnitude_NC[active_NC] = rng.uniform(*MAGNITUDE, int(active_NC.sum()))
        x_ND = magnitude_NC @ self.directions_CD.astype(np.float64)
        x_ND += self.noise * rng.standard_normal((n, self.d))
        return x_ND.astype(np.float32), active_NC


def make_world(branching, d: int, root_prob: float, child_prob: float, noise: float, seed: int) -> PlantedWorld:
    """The tree of `branching` (roots first) with random unit directions in R^d, drawn from `seed`."""
    branching = tuple(int(b) for b in branching)
    check_world(branching, d, root_prob, child_prob, noise, seed)
    sizes = np.cumprod(branching)
    depth_C = np.repeat(np.arange(len(branching)), sizes)
    parent_C = np.full(len(depth_C), -1, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for lvl in range(1, len(branching)):  # child j of level lvl belongs to parent j // b of the level above
        local = np.arange(sizes[lvl])
        parent_C[starts[lvl] : starts[lvl + 1]] = starts[lvl - 1] + local // branching[lvl]
    rng = np.random.default_rng([seed, 0])
    dirs_CD = rng.standard_normal((len(depth_C), d))
    dirs_CD /= np.linalg.norm(dirs_CD, axis=1, keepdims=True)
    return PlantedWorld(branching, dirs_CD.astype(np.float32), parent_C, depth_C, float(root_prob),
                        float(child_prob), float(noise), int(seed))
