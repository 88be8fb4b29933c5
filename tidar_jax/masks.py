"""TiDAR hybrid attention masks: the rules, the layout descriptions they are evaluated on, and position ids.

Convention everywhere: a boolean mask is ``True`` where the query may attend to the key.
Decode/prefill masks are laid out over keys ``[KV cache slots 0..C-1 | current tokens]`` so the model can
concatenate cached and current keys without reordering.

There is one definition of the rules: ``training_rule``, ``prefill_rule`` and ``decode_rule`` take the per-token
structure of a query and a key (``TokenInfo``: kind, index within its half, block id, segment id) plus the
per-row lengths, and work on numpy or jnp arrays that broadcast. A *layout* (``TrainingLayout``,
``CausalLayout``, ``PrefillLayout``, ``DecodeLayout``) says what the tokens of one forward are; ``layout.block``
evaluates its rule on any (query indices, key indices) rectangle. The dense masks below (``training_mask``,
``prefill_mask``, ``decode_mask``, ...) are ``layout.block`` over all indices, and attention kernels derive what they
need (a dense mask, per-tile emptiness/fullness, a per-tile mask) from the same layout object, which the model
passes through opaquely.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CLEAN, MASK, CACHE = 0, 1, 2  # token kinds: clean token (or decode draft), [MASK] token, committed cache slot


def _check_block(seq_len: int, block_size: int):
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: must be >= 1")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if seq_len % block_size:
        raise ValueError(
            f"seq_len={seq_len} is not a multiple of block_size={block_size}; "
            f"use a sequence length that is (e.g. {seq_len - seq_len % block_size or block_size})")


class TokenInfo(NamedTuple):
    """Per-token structure; fields broadcast against each other (queries ``[..., Tq, 1]``, keys ``[..., 1, Tk]``)."""

    kind: Any  # CLEAN | MASK | CACHE
    index: Any  # index within its half (training), prompt/mask index (prefill), draft/group slot or cache slot (decode)
    block: Any  # block id: training index // B; decode group (0 = drafts); prefill 0 prompt, 1 masks
    segment: Any = None  # document id (packed training rows) or None


# ----------------------------------------------------------------------------------------------------------------
# The rules (numpy or jnp; broadcasting)
# ----------------------------------------------------------------------------------------------------------------

def training_rule(q: TokenInfo, k: TokenInfo, block_size: int):
    """clean->clean causal; clean->mask never; mask block b -> its own block and clean index < bB; same document."""
    q_clean, k_clean = q.kind == CLEAN, k.kind == CLEAN
    q_mask, k_mask = q.kind == MASK, k.kind == MASK
    clean_clean = q_clean & k_clean & (k.index <= q.index)
    mask_mask = q_mask & k_mask & (q.block == k.block)
    mask_clean = q_mask & k_clean & (k.index < q.block * block_size)
    allowed = clean_clean | mask_mask | mask_clean
    if q.segment is not None:
        allowed = allowed & (q.segment == k.segment)
    return allowed


def prefill_rule(q: TokenInfo, k: TokenInfo, prompt_len):
    """Prompt causal over real tokens (k < L, or itself for padding queries); masks see the real prompt and all
    masks. ``prompt_len`` broadcasts per row."""
    q_clean, k_clean = q.kind == CLEAN, k.kind == CLEAN
    q_mask, k_mask = q.kind == MASK, k.kind == MASK
    real_k = k.index < prompt_len
    prompt = q_clean & k_clean & (k.index <= q.index) & (real_k | (k.index == q.index))
    mask_prompt = q_mask & k_clean & real_k
    return prompt | mask_prompt | (q_mask & k_mask)


def decode_rule(q: TokenInfo, k: TokenInfo, cache_len):
    """Every step token sees the committed cache slots < L; drafts causal among drafts; group j sees drafts 0..j-1
    and its own group bidirectionally. ``cache_len`` broadcasts per row."""
    q_draft, k_draft = q.kind == CLEAN, k.kind == CLEAN
    q_group, k_group = q.kind == MASK, k.kind == MASK
    cache = (k.kind == CACHE) & (k.index < cache_len)
    draft_draft = q_draft & k_draft & (k.index <= q.index)
    group_draft = q_group & k_draft & (k.index < q.block)
    group_own = q_group & k_group & (q.block == k.block)
    return cache | draft_draft | group_draft | group_own


# ----------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------

def _xp(*arrays):
    """numpy when everything is concrete numpy/int (trace-time schedules), else jnp."""
    return np if all(a is None or isinstance(a, (np.ndarray, int, np.integer)) for a in arrays) else jnp


def _concrete(x):
    """numpy for a concrete array (dense masks are then built in numpy, fast and eager), else unchanged."""
    if x is None or isinstance(x, jax.core.Tracer):
        return x
    return np.asarray(x)


def _static(**kw):
    return dataclasses.field(metadata=dict(static=True), **kw)


class _Layout:
    """Shared behaviour. Subclasses define ``q_len``, ``k_len``, ``_info(idx, side, xp)``, ``_rule``,
    ``_row_data`` (the traced per-row arrays) and ``static_bound``."""

    def block(self, q_idx=None, k_idx=None):
        """Boolean ``[R, len(q_idx), len(k_idx)]`` (R = rows of per-row data, or 1): the rule on that rectangle.
        Indices outside ``[0, q_len)`` / ``[0, k_len)`` (tile padding) are never allowed."""
        q_idx = np.arange(self.q_len) if q_idx is None else q_idx
        k_idx = np.arange(self.k_len) if k_idx is None else k_idx
        xp = _xp(q_idx, k_idx, *self._row_data())
        q_idx, k_idx = xp.asarray(q_idx), xp.asarray(k_idx)
        q = self._info(q_idx[:, None], "q", xp)
        k = self._info(k_idx[None, :], "k", xp)
        allowed = self._rule(q, k)
        valid = (q_idx[:, None] < self.q_len) & (k_idx[None, :] < self.k_len)
        allowed = allowed & valid
        if allowed.ndim == 2:
            allowed = allowed[None]
        return allowed

    def static_rule(self, q_idx, k_idx, xp=np):
        """The static bound's rule elementwise on broadcasting index arrays (no padding check). Lengths enter as
        Python ints, so this also runs inside a Pallas kernel (splash's computable mask)."""
        bound = self.static_bound()
        return bound._bound_rule(bound._info(q_idx, "q", xp), bound._info(k_idx, "k", xp))

    @property
    def is_static(self) -> bool:
        """True when the mask depends on nothing traced (so per-tile fullness is known at trace time)."""
        return all(a is None for a in self._row_data())

    def static_key(self):
        """Hashable description of the static bound (for caching tile schedules)."""
        bound = self.static_bound()
        return (type(bound).__name__,) + tuple(
            (f.name, getattr(bound, f.name)) for f in dataclasses.fields(bound) if f.metadata.get("static"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainingLayout(_Layout):
    """``[x_0 .. x_{S-1} | MASK x S]`` against itself; optional ``segment_ids_NS`` (packed documents)."""

    seq_len: int = _static()
    block_size: int = _static()
    segment_ids_NS: Any = None

    @property
    def q_len(self):
        return 2 * self.seq_len

    @property
    def k_len(self):
        return 2 * self.seq_len

    def _row_data(self):
        return (self.segment_ids_NS,)

    def _info(self, idx, side, xp):
        s = self.seq_len
        tok = idx % s
        seg = None
        if self.segment_ids_NS is not None:
            flat = xp.clip(tok, 0, s - 1).reshape(-1)
            seg = xp.take(xp.asarray(self.segment_ids_NS), flat, axis=1).reshape((-1,) + tok.shape)
        return TokenInfo(xp.where(idx < s, CLEAN, MASK), tok, tok // self.block_size, seg)

    def _rule(self, q, k):
        return training_rule(q, k, self.block_size)

    _bound_rule = _rule

    def static_bound(self):
        return TrainingLayout(self.seq_len, self.block_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CausalLayout(_Layout):
    """Plain causal attention over ``S`` clean tokens (the AR objective), optionally per document."""

    seq_len: int = _static()
    segment_ids_NS: Any = None

    @property
    def q_len(self):
        return self.seq_len

    @property
    def k_len(self):
        return self.seq_len

    def _row_data(self):
        return (self.segment_ids_NS,)

    def _info(self, idx, side, xp):
        seg = None
        if self.segment_ids_NS is not None:
            flat = xp.clip(idx, 0, self.seq_len - 1).reshape(-1)
            seg = xp.take(xp.asarray(self.segment_ids_NS), flat, axis=1).reshape((-1,) + idx.shape)
        return TokenInfo(xp.zeros_like(idx) + CLEAN, idx, xp.zeros_like(idx), seg)

    def _rule(self, q, k):
        return training_rule(q, k, 1)

    _bound_rule = _rule

    def static_bound(self):
        return CausalLayout(self.seq_len)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillLayout(_Layout):
    """``[prompt (padded to P) | B masks]`` against itself; ``prompt_len_N`` is each row's real length (traced)."""

    prompt_len_N: Any
    padded_len: int = _static()
    block_size: int = _static()

    @property
    def q_len(self):
        return self.padded_len + self.block_size

    @property
    def k_len(self):
        return self.q_len

    def _row_data(self):
        return (self.prompt_len_N,)

    def _info(self, idx, side, xp):
        p = self.padded_len
        is_prompt = idx < p
        return TokenInfo(xp.where(is_prompt, CLEAN, MASK), xp.where(is_prompt, idx, idx - p),
                         xp.where(is_prompt, 0, 1))

    def _rule(self, q, k):
        xp = _xp(self.prompt_len_N)
        return prefill_rule(q, k, xp.asarray(self.prompt_len_N).reshape(-1, 1, 1))

    def _bound_rule(self, q, k):
        return prefill_rule(q, k, self.padded_len)

    def static_bound(self):
        """Every prompt token real (L = P): a superset of the mask of any row."""
        return PrefillLayout(np.array([self.padded_len]), self.padded_len, self.block_size)

    def static_key(self):
        return ("PrefillLayout", self.padded_len, self.block_size)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeLayout(_Layout):
    """A decode step's ``[d_0 .. d_{B-1} | G_{k_1} | ... | G_{k_G}]`` against ``[cache slots 0..C-1 | current
    tokens]``; ``cache_len_N`` traced per row.

    ``counts``: the accepted counts k that have a mask group (group k assumes d_0..d_{k-1} accepted: it sees those
    drafts and itself). None = every count 1..B; ``groups=False`` = none (the drafts only, e.g. the AR step's
    single token with B=1). ``cache_page``: 0 = attend over the concatenation ``[cache | current]`` through the
    attention interface; > 0 = read the cache in place, in pages of that many slots, up to the longest live row
    (``tidar_jax.attention.paged``). ``cache_kernel`` (with ``cache_page > 0``): the in-place kernel, "paged" (pages up
    to the longest live row) or "fused" (one fixed-shape split-K kernel, ``tidar_jax.attention.fused_cache``)."""

    cache_len_N: Any
    block_size: int = _static()
    cache_size: int = _static()
    groups: bool = _static(default=True)
    counts: tuple[int, ...] | None = _static(default=None)
    cache_page: int = _static(default=0)
    cache_kernel: str = _static(default="paged")

    @property
    def group_counts(self) -> tuple[int, ...]:
        if not self.groups:
            return ()
        return tuple(range(1, self.block_size + 1)) if self.counts is None else tuple(self.counts)

    @property
    def q_len(self):
        return self.block_size * (1 + len(self.group_counts))

    @property
    def k_len(self):
        return self.cache_size + self.q_len

    def _row_data(self):
        return (self.cache_len_N,)

    def _step_info(self, idx, xp):
        """``(count, slot)``: the accepted count a token's group stands for (0 = the draft row) and its slot."""
        group, slot = idx // self.block_size, idx % self.block_size
        counts = self.group_counts
        if counts == tuple(range(1, len(counts) + 1)):
            return group, slot
        count = xp.zeros_like(group)  # elementwise only, so it also runs inside a Pallas kernel
        for g, k in enumerate(counts, start=1):
            count = xp.where(group == g, k, count)
        return count, slot

    def _info(self, idx, side, xp):
        if side == "q":
            count, slot = self._step_info(idx, xp)
            return TokenInfo(xp.where(count == 0, CLEAN, MASK), slot, count)
        in_cache = idx < self.cache_size
        count, slot = self._step_info(idx - self.cache_size, xp)
        kind = xp.where(in_cache, CACHE, xp.where(count == 0, CLEAN, MASK))
        return TokenInfo(kind, xp.where(in_cache, idx, slot), xp.where(in_cache, -1, count))

    def _rule(self, q, k):
        xp = _xp(self.cache_len_N)
        return decode_rule(q, k, xp.asarray(self.cache_len_N).reshape(-1, 1, 1))

    def _bound_rule(self, q, k):
        return decode_rule(q, k, self.cache_size)

    def static_bound(self):
        """Every cache slot committed (L = C): a superset of the mask of any row."""
        return dataclasses.replace(self, cache_len_N=np.array([self.cache_size]))

    def static_key(self):
        return ("DecodeLayout", self.block_size, self.cache_size, self.group_counts)

    def local_mask(self):
        """Static numpy ``[T, T]`` among the step's own tokens (the part of the mask that no row's length changes)."""
        own = dataclasses.replace(self, cache_len_N=np.zeros((1,), np.int32))
        return own.block(np.arange(self.q_len), self.cache_size + np.arange(self.q_len))[0]

    def positions(self):
        """Positions ``[N, T]``: draft i -> L+i; slot t of group k -> L+k+t."""
        count_T, slot_T = self._step_info(np.arange(self.q_len), np)
        cache_len_N = jnp.asarray(self.cache_len_N, dtype=jnp.int32).reshape(-1)
        return (cache_len_N[:, None] + jnp.asarray(count_T + slot_T, jnp.int32)[None, :]).astype(jnp.int32)


def is_layout(mask) -> bool:
    return isinstance(mask, _Layout)


# ----------------------------------------------------------------------------------------------------------------
# Training: [x_0 .. x_{S-1} | MASK x S]
# ----------------------------------------------------------------------------------------------------------------

def training_positions(seq_len: int, segment_ids_NS=None):
    """Positions of the doubled sequence: ``0..S-1`` twice (or restarting per document when packed)."""
    if segment_ids_NS is None:
        pos_S = jnp.arange(seq_len, dtype=jnp.int32)
        return jnp.concatenate([pos_S, pos_S])
    seg_NS = jnp.asarray(segment_ids_NS)
    idx_S = jnp.arange(seq_len, dtype=jnp.int32)
    is_start_NS = jnp.concatenate(
        [jnp.ones_like(seg_NS[:, :1], dtype=bool), seg_NS[:, 1:] != seg_NS[:, :-1]], axis=1)
    # index of the most recent document start at or before each token
    start_NS = _cummax(jnp.where(is_start_NS, idx_S, 0))
    pos_NS = idx_S - start_NS
    return jnp.concatenate([pos_NS, pos_NS], axis=1).astype(jnp.int32)


def _cummax(x_NS):
    return jax.lax.cummax(x_NS, axis=1)


def training_layout(seq_len: int, block_size: int, segment_ids_NS=None) -> TrainingLayout:
    """The TiDAR training layout, validated (``seq_len`` a multiple of ``block_size``; segment ids ``[N, S]``)."""
    _check_block(seq_len, block_size)
    if segment_ids_NS is not None:
        seg_NS = jnp.asarray(segment_ids_NS)
        if seg_NS.ndim != 2 or seg_NS.shape[1] != seq_len:
            raise ValueError(f"segment_ids shape {seg_NS.shape}: expected [N, {seq_len}]")
        segment_ids_NS = seg_NS
    return TrainingLayout(seq_len, block_size, segment_ids_NS)


def causal_layout(seq_len: int, segment_ids_NS=None) -> CausalLayout:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: must be >= 1")
    if segment_ids_NS is not None:
        segment_ids_NS = jnp.asarray(segment_ids_NS)
    return CausalLayout(seq_len, segment_ids_NS)


def training_mask(seq_len: int, block_size: int, segment_ids_NS=None):
    """Boolean ``[2S, 2S]`` (or ``[N, 2S, 2S]`` with segment ids) mask of the TiDAR training layout.

    clean->clean: causal.  clean->mask: never.  mask block b (indices [bB, (b+1)B) of the mask half):
    its own block bidirectionally and clean tokens with index < bB; never other mask blocks.
    With ``segment_ids_NS`` ([N, S], packed documents) attention is further restricted to the same document.
    """
    layout = training_layout(seq_len, block_size, segment_ids_NS)
    layout = dataclasses.replace(layout, segment_ids_NS=_concrete(layout.segment_ids_NS))
    allow = jnp.asarray(layout.block())
    return allow[0] if segment_ids_NS is None else allow


# ----------------------------------------------------------------------------------------------------------------
# Decode step: [d_0 .. d_{B-1} | G_1 (B masks) | ... | G_B (B masks)] against [cache | current]
# ----------------------------------------------------------------------------------------------------------------

def decode_layout(block_size: int):
    """Static per-token structure of a decode step: ``(group_T, slot_T)``; group 0 is the draft row."""
    q_len = block_size * (block_size + 1)
    idx_T = jnp.arange(q_len)
    return idx_T // block_size, idx_T % block_size


def decode_positions(cache_len_N, block_size: int):
    """Positions ``[N, B(B+1)]``: draft i -> L+i; group j slot t -> L+j+t."""
    group_T, slot_T = decode_layout(block_size)
    cache_len_N = jnp.asarray(cache_len_N, dtype=jnp.int32).reshape(-1)
    return (cache_len_N[:, None] + (group_T + slot_T)[None, :]).astype(jnp.int32)


def decode_attention_layout(cache_len_N, block_size: int, cache_size: int, groups: bool = True,
                            counts: tuple[int, ...] | None = None, cache_page: int = 0,
                            cache_kernel: str = "paged") -> DecodeLayout:
    """The decode-step layout (``groups=False``: ``block_size`` causal drafts only, e.g. the AR step with 1;
    ``counts``: only these mask groups; ``cache_page``: read the cache in place, see ``DecodeLayout``)."""
    if counts is not None:
        counts = tuple(int(k) for k in counts)
        if list(counts) != sorted(set(counts)) or not all(1 <= k <= block_size for k in counts):
            raise ValueError(f"counts={counts}: must be increasing accepted counts in 1..{block_size}")
    return DecodeLayout(jnp.asarray(cache_len_N, dtype=jnp.int32).reshape(-1), block_size, cache_size, groups,
                        counts, cache_page, cache_kernel)


def ar_step_layout(cache_len_N, cache_size: int, cache_page: int = 0, cache_kernel: str = "paged") -> DecodeLayout:
    """The AR decode step: one token that sees the committed cache and itself (a decode step with B=1 and no
    mask groups)."""
    return decode_attention_layout(cache_len_N, 1, cache_size, groups=False, cache_page=cache_page,
                                   cache_kernel=cache_kernel)


def decode_step_mask(block_size: int):
    """Boolean ``[T, T]`` mask among the B(B+1) step tokens (independent of the cache)."""
    layout = DecodeLayout(np.zeros((1,), np.int32), block_size, 0)
    return jnp.asarray(layout.block()[0])


def decode_mask(cache_len_N, block_size: int, cache_size: int):
    """Boolean ``[N, T, C+T]`` decode-step mask over keys ``[cache slots 0..C-1 | step tokens]``.

    Every step token sees the committed prefix (cache slots < L of its row); drafts are causal among drafts;
    group j sees drafts 0..j-1 and its own group bidirectionally; nothing else.
    """
    layout = decode_attention_layout(cache_len_N, block_size, cache_size)
    return jnp.asarray(dataclasses.replace(layout, cache_len_N=_concrete(layout.cache_len_N)).block())


# ----------------------------------------------------------------------------------------------------------------
# Prefill: [prompt (padded to P) | B masks]
# ----------------------------------------------------------------------------------------------------------------

def prefill_positions(prompt_len_N, padded_len: int, block_size: int):
    """Positions ``[N, P+B]``: prompt 0..P-1 (pad slots keep counting), masks L..L+B-1 (L = real length)."""
    prompt_len_N = jnp.asarray(prompt_len_N, dtype=jnp.int32).reshape(-1)
    n = prompt_len_N.shape[0]
    prompt_NP = jnp.broadcast_to(jnp.arange(padded_len, dtype=jnp.int32)[None], (n, padded_len))
    masks_NB = prompt_len_N[:, None] + jnp.arange(block_size, dtype=jnp.int32)[None]
    return jnp.concatenate([prompt_NP, masks_NB], axis=1)


def prefill_layout(prompt_len_N, padded_len: int, block_size: int) -> PrefillLayout:
    return PrefillLayout(jnp.asarray(prompt_len_N, dtype=jnp.int32).reshape(-1), padded_len, block_size)


def prefill_mask(prompt_len_N, padded_len: int, block_size: int):
    """Boolean ``[N, P+B, P+B]`` prefill mask: prompt causal over its real tokens (k < L); the B mask tokens
    see the whole real prompt and each other.  Padding queries see only real earlier tokens and themselves, so
    every row has at least one allowed key; their outputs are never used."""
    layout = prefill_layout(prompt_len_N, padded_len, block_size)
    return jnp.asarray(dataclasses.replace(layout, prompt_len_N=_concrete(layout.prompt_len_N)).block())
