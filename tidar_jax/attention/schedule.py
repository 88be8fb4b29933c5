"""Which (query tile, key tile) pairs a layout needs, decided in numpy at trace time from the layout's rule.

A tile pair is *empty* when no entry of the layout's static bound allows it (never visited), *full* when every
entry is allowed and the layout has nothing traced (visited without evaluating the mask), else *partial* (visited,
mask evaluated in the tile). For layouts with traced per-row data (segment ids, cache or prompt lengths) the static
bound is a superset of every row's mask, so emptiness stays exact-or-conservative and no tile is called full.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_CACHE: dict = {}


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    tile_q: int
    tile_k: int
    num_q_tiles: int
    num_k_tiles: int
    full_pairs: np.ndarray  # [pairs, 2] (q tile, k tile), ordered by q tile then k tile
    partial_pairs: np.ndarray  # [pairs, 2]

    @property
    def visited_pairs(self) -> int:
        """The (query tile, key tile) pairs a kernel following this schedule visits: full plus partial."""
        return len(self.full_pairs) + len(self.partial_pairs)

    @property
    def visited_fraction(self) -> float:
        """Visited tile pairs over all tile pairs (dense attention visits 1.0)."""
        return self.visited_pairs / (self.num_q_tiles * self.num_k_tiles)


def tile_classes(layout, tile_q: int, tile_k: int):
    """``(nonempty, full)`` boolean ``[num_q_tiles, num_k_tiles]`` maps of ``layout``'s static bound."""
    bound = layout.static_bound()
    nq, nk = -(-layout.q_len // tile_q), -(-layout.k_len // tile_k)
    nonempty = np.zeros((nq, nk), bool)
    full = np.zeros((nq, nk), bool)
    k_idx = np.arange(nk * tile_k)
    for i in range(nq):  # one q-tile row at a time: O(tile x S) memory even at long S
        q_idx = np.arange(i * tile_q, (i + 1) * tile_q)
        allow = np.asarray(bound.block(q_idx, k_idx)).any(axis=0).reshape(tile_q, nk, tile_k)
        nonempty[i] = allow.any(axis=(0, 2))
        full[i] = allow[q_idx < layout.q_len].all(axis=(0, 2))
    return nonempty, full & layout.is_static


def tile_schedule(layout, tile_q: int, tile_k: int) -> TileSchedule:
    key = (layout.static_key(), layout.is_static, tile_q, tile_k)
    if key not in _CACHE:
        nonempty, full = tile_classes(layout, tile_q, tile_k)
        _CACHE[key] = TileSchedule(tile_q, tile_k, nonempty.shape[0], nonempty.shape[1],
                                   np.argwhere(full).astype(np.int32),
                                   np.argwhere(nonempty & ~full).astype(np.int32))
    return _CACHE[key]
