"""Document packing: fixed-length training sequences made of whole documents, with segment ids.

Layout (what ``PackedDocuments[i]`` returns, and what the train step relies on):
  * every document becomes a *unit*: its tokens, one eos, then padding up to a multiple of ``block_size``, so each
    document starts on a block boundary and a TiDAR mask block never holds two documents;
  * the units of a split are laid end to end (in document order) and cut into windows of ``seq_len`` tokens;
    window ``i`` is ``[i*S, (i+1)*S)`` of that stream (the tail shorter than S is unused). A document longer than
    the rest of a window continues at position 0 of the next window as a new segment;
  * ``segment_ids``: 1, 2, 3, ... for the document pieces of a window in order, 0 for padding. Padding tokens are the
    eos id; the loss ignores segment 0 and attention never crosses segments, so their value does not matter.
Per-document positions follow from the segment ids (``tidar_jax.masks.training_positions``).
"""

from __future__ import annotations

import numpy as np

from tidar_jax.data.shards import TokenStream


def unit_starts(lengths_Z: np.ndarray, block_size: int) -> np.ndarray:
    """int64 ``[D+1]``: where each document's unit starts in the packed stream (last entry: the stream length)."""
    units_Z = -(-(np.asarray(lengths_Z, np.int64) + 1) // block_size) * block_size
    return np.concatenate([np.zeros(1, np.int64), np.cumsum(units_Z)])


class PackedDocuments:
    """Random-access source of packed windows ``{"tokens": int32 [S], "segment_ids": int32 [S]}``."""

    def __init__(self, stream: TokenStream, spans_Z2: np.ndarray, seq_len: int, block_size: int, eos_id: int):
        self.stream, self.seq_len, self.block_size, self.eos_id = stream, seq_len, block_size, eos_id
        self.offsets_Z = np.ascontiguousarray(spans_Z2[:, 0])
        self.lengths_Z = np.ascontiguousarray(spans_Z2[:, 1])
        self.starts = unit_starts(self.lengths_Z, block_size)
        self.num_tokens = int(self.starts[-1])

    def __len__(self) -> int:
        return self.num_tokens // self.seq_len

    def __getitem__(self, index) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        lo, hi = index * self.seq_len, (index + 1) * self.seq_len
        tokens = np.full(self.seq_len, self.eos_id, dtype=np.int32)
        segments = np.zeros(self.seq_len, dtype=np.int32)
        d = int(np.searchsorted(self.starts, lo, side="right")) - 1
        segment = 0
        while d < len(self.lengths_Z) and self.starts[d] < hi:
            unit_lo = int(self.starts[d])
            length = int(self.lengths_Z[d])
            u0 = max(lo, unit_lo) - unit_lo  # first unit position inside this window
            u1 = min(hi - unit_lo, length + 1)  # one past the last real position (tokens + eos) inside it
            if u1 > u0:
                segment += 1
                at = unit_lo + u0 - lo
                real = min(u1, length) - u0  # document tokens in this piece (the eos, if here, is already eos_id)
                if real > 0:
                    start = int(self.offsets_Z[d]) + u0
                    tokens[at:at + real] = self.stream.read(start, start + real)
                segments[at:at + u1 - u0] = segment
            d += 1
        return {"tokens": tokens, "segment_ids": segments}
