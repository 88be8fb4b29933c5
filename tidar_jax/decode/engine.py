"""Prefill, one decode step and the whole-generation ``while_loop`` for TiDAR and the AR baseline.

Everything here is a pure function of the params ``state`` (the model is rebuilt with ``layer_major.merge`` at
trace time; stacked params or, as ``Decoder`` keeps them, one buffer per layer). Shapes are static: ``N`` rows,
prompts right-padded to ``P``, a cache of ``C`` slots, an output buffer of ``max_new_tokens + B`` tokens.

Emission: a row's output is its committed tokens followed by its pending first draft. Draft 0 is always
accepted, so it is final as soon as it is drafted: prefill emits it, and a step that accepts k drafts emits
drafts 1..k-1 plus the next block's first token (k tokens). The AR baseline is the same with B = 1: prefill
emits the prompt's next token, each step emits one.

How draft 0 is chosen at prefill (the prompt's last position is L-1, the masks sit at L..L+B-1):
  * slot0="verifier" (and all sampling): the verifier at position L, i.e. beta * AR(prompt's last token) +
    (1 - beta) * Diff(mask 0), argmax or sampled. With beta=1 it is the AR token, which makes the chain AR-exact.
  * slot0="diffusion": the argmax of mask 0 (the authors' code).
Drafts 1..B-1 are always the argmax of masks 1..B-1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tidar_jax import masks
from tidar_jax.attention.choice import cache_read
from tidar_jax.decode import kv as kvops
from tidar_jax.decode import layout
from tidar_jax.decode.acceptance import greedy_accept, sampled_accept
from tidar_jax.decode.options import DecodeOptions
from tidar_jax.decode.sampling import greedy_token, sample_inverse_cdf, verifier_probs
from tidar_jax.model import KVCache, layer_major
from tidar_jax.sharding import activation_mesh


class Stops(NamedTuple):
    """Runtime stop criteria (runtime values: changing them does not recompile, only their capacity does).

    eos_I: EOS ids, padded with -1 (never a token). stop_QW: Q stop token sequences right-aligned in a window of
    W tokens, left-padded with -1 (a wildcard); stop_len_Q: each sequence's length (0 = unused slot).
    """

    eos_I: jax.Array
    stop_QW: jax.Array
    stop_len_Q: jax.Array


class DecodeState(NamedTuple):
    cache: KVCache
    pending_NB: jax.Array  # TiDAR: drafts d_0..d_{B-1} (d_0 already emitted); AR: the emitted, uncached token
    out_NM: jax.Array  # emitted tokens; only the first n_out_N of each row are meaningful
    n_out_N: jax.Array
    done_N: jax.Array
    key: jax.Array
    nfe_N: jax.Array  # forwards while the row was active (prefill included)
    accept_hist_A: jax.Array  # [A] = [B+1]: how many active row-steps accepted k drafts
    steps: jax.Array  # decode steps run (NFE = steps + 1)
    stops: Stops


class GenerateOutput(NamedTuple):
    """What ``generate`` brings back to the host: tokens and statistics, never the KV cache."""

    out_NM: jax.Array
    n_out_N: jax.Array
    nfe_N: jax.Array
    accept_hist_A: jax.Array
    steps: jax.Array


def output_of(state: DecodeState) -> GenerateOutput:
    return GenerateOutput(state.out_NM, state.n_out_N, state.nfe_N, state.accept_hist_A, state.steps)


CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


def empty_cache(cfg, opts: DecodeOptions, batch: int, cache_size: int, mesh=None) -> KVCache:
    """The fixed-size cache in ``opts.cache_dtype``; on a mesh, sharded over batch and kv heads by the rules."""
    dtype = jnp.dtype(opts.cache_dtype or cfg.dtype)
    cache = KVCache.empty(cfg, batch, cache_size, dtype)
    return constrain_cache(cache, mesh)


def state_shardings(state: DecodeState, mesh) -> DecodeState:
    """The one fixed layout of the state between steps (values or shapes): the cache by ``cache_shardings``,
    per-row arrays over batch, the rest replicated."""
    from tidar_jax.sharding import logical_sharding, replicated

    def rows(x):
        return logical_sharding(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh)

    rep = lambda _: replicated(mesh)  # noqa: E731
    return state._replace(
        cache=cache_shardings(state.cache, mesh), pending_NB=rows(state.pending_NB), out_NM=rows(state.out_NM),
        n_out_N=rows(state.n_out_N), done_N=rows(state.done_N), nfe_N=rows(state.nfe_N), key=rep(state.key),
        accept_hist_A=rep(state.accept_hist_A), steps=rep(state.steps), stops=jax.tree.map(rep, state.stops))


def constrain_state(state: DecodeState, mesh) -> DecodeState:
    """Pin the state to ``state_shardings``, so that the prefill's output, a step's input and a step's output
    agree and the donated step never reshards."""
    if mesh is None:
        return state
    return jax.tree.map(jax.lax.with_sharding_constraint, state, state_shardings(state, mesh))


def cache_shardings(cache: KVCache, mesh) -> KVCache:
    """K and V over batch and KV heads by the rules table, lengths over batch."""
    from tidar_jax.sharding import logical_sharding

    kv_sharding = logical_sharding(CACHE_AXES, cache.k_LNCKD.shape, mesh)
    return KVCache(kv_sharding, kv_sharding, logical_sharding(("batch",), cache.length_N.shape, mesh))


def constrain_cache(cache: KVCache, mesh) -> KVCache:
    if mesh is None:
        return cache
    return jax.tree.map(jax.lax.with_sharding_constraint, cache, cache_shardings(cache, mesh))


def output_len(opts: DecodeOptions) -> int:
    return opts.max_new_tokens + opts.draft_len


def required_cache_size(padded_len: int, opts: DecodeOptions) -> int:
    """Slots needed so that no write of an active row is ever dropped: an active row has emitted fewer than
    max_new tokens, so it has committed at most max_new - 2 and writes at most B slots beyond them."""
    return padded_len + opts.max_new_tokens + opts.draft_len


def _next_token(logits_NV, opts: DecodeOptions, u_N):
    if opts.greedy:
        return greedy_token(logits_NV)
    return sample_inverse_cdf(verifier_probs(logits_NV, opts.temperature, opts.top_k, opts.top_p), u_N)


def _stop_hits(out_NM, n_out_N, count_N, t: int, stops: Stops):
    """``[N, T]``: does the output ending at emitted token j (j < count) end with one of the stop sequences?"""
    w = stops.stop_QW.shape[1]
    m = out_NM.shape[1]
    j_T = jnp.arange(t)
    idx_NTW = n_out_N[:, None, None] + j_T[None, :, None] - (w - 1) + jnp.arange(w)[None, None, :]
    # before the first generated token: -2 matches no token and no wildcard-free position
    win_NTW = jnp.where(idx_NTW >= 0, jnp.take_along_axis(out_NM[:, None, :], jnp.clip(idx_NTW, 0, m - 1),
                                                          axis=2), -2)
    eq_NTQW = (stops.stop_QW[None, None] == -1) | (win_NTW[:, :, None, :] == stops.stop_QW[None, None])
    match_NTQ = jnp.all(eq_NTQW, axis=-1) & (stops.stop_len_Q > 0)[None, None]
    return jnp.any(match_NTQ, axis=-1)


def emit(state: DecodeState, chunk_NT, count_N, opts: DecodeOptions):
    """Append the first ``count`` tokens of ``chunk`` to each active row; cut at max_new_tokens and just after the
    first EOS id or completed stop sequence (both kept)."""
    n, m = state.out_NM.shape
    t = chunk_NT.shape[1]
    j_T = jnp.arange(t)
    count_N = jnp.where(state.done_N, 0, jnp.minimum(count_N, opts.max_new_tokens - state.n_out_N)).astype(jnp.int32)
    valid_NT = j_T[None] < count_N[:, None]
    cols_NT = jnp.where(valid_NT, state.n_out_N[:, None] + j_T[None], m)
    # write the whole chunk first (positions past a stop are beyond n_out, i.e. meaningless), then cut
    out_NM = state.out_NM.at[jnp.arange(n)[:, None], cols_NT].set(chunk_NT, mode="drop")
    hit_NT = jnp.any(chunk_NT[:, :, None] == state.stops.eos_I[None, None], axis=-1)
    if state.stops.stop_QW.shape[0]:
        hit_NT = hit_NT | _stop_hits(out_NM, state.n_out_N, count_N, t, state.stops)
    hit_NT = hit_NT & valid_NT
    stop_hit_N = jnp.any(hit_NT, axis=1)
    count_N = jnp.where(stop_hit_N, jnp.argmax(hit_NT, axis=1) + 1, count_N).astype(jnp.int32)
    n_out_N = state.n_out_N + count_N
    done_N = state.done_N | stop_hit_N | (n_out_N >= opts.max_new_tokens)
    return state._replace(out_NM=out_NM, n_out_N=n_out_N, done_N=done_N)


def _initial_state(cache, pending_NB, key, stops: Stops, opts: DecodeOptions) -> DecodeState:
    n = pending_NB.shape[0]
    return DecodeState(
        cache=cache, pending_NB=pending_NB, out_NM=jnp.zeros((n, output_len(opts)), jnp.int32),
        n_out_N=jnp.zeros((n,), jnp.int32), done_N=jnp.zeros((n,), bool), key=key,
        nfe_N=jnp.ones((n,), jnp.int32), accept_hist_A=jnp.zeros((opts.draft_len + 1,), jnp.int32),
        steps=jnp.zeros((), jnp.int32), stops=stops)


def _gather_rows(x_NTE, idx_NX):
    return jnp.take_along_axis(x_NTE, idx_NX[:, :, None], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# TiDAR
# ----------------------------------------------------------------------------------------------------------------

def tidar_prefill(model, opts: DecodeOptions, cache_size: int, prompt_NP, prompt_len_N, key,
                  stops: Stops, mesh=None) -> DecodeState:
    """One forward over [prompt | B masks]: prompt K/V into the cache, first drafts from the masks."""
    cfg = model.cfg
    n, p = prompt_NP.shape
    b = opts.block_size
    tokens_NT = jnp.concatenate([prompt_NP, jnp.full((n, b), cfg.mask_token_id, prompt_NP.dtype)], axis=1)
    positions_NT = masks.prefill_positions(prompt_len_N, p, b)
    layout = masks.prefill_layout(prompt_len_N, p, b)
    hidden_NTE, step_kv = model.hidden(tokens_NT, positions_NT, layout)
    cache = kvops.prefill_cache(empty_cache(cfg, opts, n, cache_size, mesh), step_kv, prompt_len_N, p)
    diff_NBV = model.logits(hidden_NTE[:, p:])
    drafts_NB = greedy_token(diff_NBV)
    key, sub = jax.random.split(key)
    if opts.slot0 == "verifier" or not opts.greedy:
        last_N1E = _gather_rows(hidden_NTE, (prompt_len_N - 1)[:, None])
        verifier_NV = model.logits(last_N1E)[:, 0]
        if opts.beta != 1.0:
            verifier_NV = opts.beta * verifier_NV + (1.0 - opts.beta) * diff_NBV[:, 0]
        d0_N = _next_token(verifier_NV, opts, jax.random.uniform(sub, (n,), verifier_NV.dtype))
        drafts_NB = drafts_NB.at[:, 0].set(d0_N)
    state = _initial_state(cache, drafts_NB, key, stops, opts)
    return emit(state, drafts_NB[:, :1], jnp.ones((n,), jnp.int32), opts)


def _verify(opts: DecodeOptions, drafts_NB, verifier_NBV, key):
    key, k_acc, k_tok = jax.random.split(key, 3)
    n, b = drafts_NB.shape
    if opts.greedy:
        accepted_N, token_N = greedy_accept(drafts_NB, verifier_NBV)
    else:
        probs_NBV = verifier_probs(verifier_NBV, opts.temperature, opts.top_k, opts.top_p)
        u_acc_NJ = jax.random.uniform(k_acc, (n, b - 1), probs_NBV.dtype)
        u_tok_N = jax.random.uniform(k_tok, (n,), probs_NBV.dtype)
        accepted_N, token_N = sampled_accept(drafts_NB, probs_NBV, u_acc_NJ, u_tok_N)
    return key, accepted_N, token_N


def tidar_step(model, opts: DecodeOptions, state: DecodeState) -> DecodeState:
    """One forward over [d_0..d_{B-1} | G_k for each covered count k]; verify, commit the accepted drafts' K/V,
    pick the next drafts (group k's, or the verifier token + the nearest lower group's later slots)."""
    cfg = model.cfg
    cache, drafts_NB = state.cache, state.pending_NB
    n, b = drafts_NB.shape
    counts = opts.group_counts
    n_groups = len(counts)
    length_N = cache.length_N
    active_N = ~state.done_N
    tokens_NT = jnp.concatenate([drafts_NB, jnp.full((n, n_groups * b), cfg.mask_token_id, drafts_NB.dtype)],
                                axis=1)
    layout_NTS = masks.decode_attention_layout(length_N, b, cache.k_LNCKD.shape[2],
                                               counts=None if opts.groups is None else counts)
    positions_NT = layout_NTS.positions()
    mask_NTS = cache_read(layout_NTS, opts.cache_attention, opts.cache_page)
    hidden_NTE, step_kv = model.hidden(tokens_NT, positions_NT, mask_NTS, cache)

    # Group slot-0 rows that mix into the verifier when beta < 1: verifier i (position L+i+1) mixes with group
    # k = i+1's slot 0 when that count is covered (uncovered: AR alone).
    mix_rows_B = [b + counts.index(i + 1) * b if (i + 1) in counts else 0 for i in range(b)]
    mix_ok_B = jnp.asarray([(i + 1) in counts for i in range(b)])
    draft_idx_NB = jnp.broadcast_to(jnp.arange(b)[None], (n, b))
    if opts.head == "one_pass":  # one pass over every row: head weights read once, B + G*B rows computed
        all_NTV = model.logits(hidden_NTE)
        verifier_NBV = all_NTV[:, :b]
        diff0_NBV = all_NTV[:, jnp.asarray(mix_rows_B)] if opts.beta != 1.0 else None
        group_argmax_NGB = greedy_token(all_NTV[:, b:]).reshape(n, n_groups, b)
        group_argmax = lambda g_N: jnp.take_along_axis(  # noqa: E731
            group_argmax_NGB, jnp.maximum(g_N - 1, 0)[:, None, None], axis=1)[:, 0]
    else:  # selective: dependent passes, only the rows that are needed
        head = lambda idx_NX: model.logits(_gather_rows(hidden_NTE, idx_NX))  # noqa: E731
        verifier_NBV = head(draft_idx_NB)  # AR logits at draft i predict position L+i+1
        diff0_NBV = head(jnp.broadcast_to(jnp.asarray(mix_rows_B)[None], (n, b))) if opts.beta != 1.0 else None
        group_argmax = lambda g_N: greedy_token(  # noqa: E731
            head(b * jnp.maximum(g_N, 1)[:, None] + jnp.arange(b)[None]))
    if opts.beta != 1.0:
        mixed_NBV = opts.beta * verifier_NBV + (1.0 - opts.beta) * diff0_NBV
        verifier_NBV = jnp.where(mix_ok_B[None, :, None], mixed_NBV, verifier_NBV)

    key, accepted_N, token_N = _verify(opts, drafts_NB, verifier_NBV, state.key)

    group_N, shift_N = layout.next_draft_source(accepted_N, b, counts)
    source_NB = jnp.where((group_N > 0)[:, None], group_argmax(group_N), drafts_NB)
    next_NB = layout.next_drafts(source_NB, shift_N, token_N, opts.slot0 == "verifier" or not opts.greedy)

    # Commit: drafts' K/V go to slots L..L+B-1; only the accepted k become visible. Mask K/V is never written.
    cache = kvops.write_tokens(cache, kvops.after(step_kv, accepted_N), b, length_N)
    cache = kvops.advance(cache, jnp.where(active_N, accepted_N, 0))

    j_B = jnp.arange(b)[None]
    shifted_NB = jnp.concatenate([drafts_NB[:, 1:], drafts_NB[:, :1]], axis=1)
    chunk_NB = jnp.where(j_B < (accepted_N - 1)[:, None], shifted_NB, next_NB[:, :1])
    hist_A = state.accept_hist_A + jnp.sum(
        jax.nn.one_hot(accepted_N, b + 1, dtype=jnp.int32) * active_N[:, None], axis=0, dtype=jnp.int32)
    state = state._replace(
        cache=cache, pending_NB=jnp.where(active_N[:, None], next_NB, drafts_NB), key=key,
        nfe_N=state.nfe_N + active_N.astype(jnp.int32), accept_hist_A=hist_A, steps=state.steps + 1)
    return emit(state, chunk_NB, accepted_N, opts)


# ----------------------------------------------------------------------------------------------------------------
# AR baseline (same cache, same loop)
# ----------------------------------------------------------------------------------------------------------------

def ar_prefill(model, opts: DecodeOptions, cache_size: int, prompt_NP, prompt_len_N, key,
               stops: Stops, mesh=None) -> DecodeState:
    cfg = model.cfg
    n, p = prompt_NP.shape
    positions_NP = masks.prefill_positions(prompt_len_N, p, 0)
    layout = masks.prefill_layout(prompt_len_N, p, 0)
    hidden_NPE, step_kv = model.hidden(prompt_NP, positions_NP, layout)
    cache = kvops.prefill_cache(empty_cache(cfg, opts, n, cache_size, mesh), step_kv, prompt_len_N, p)
    logits_NV = model.logits(_gather_rows(hidden_NPE, (prompt_len_N - 1)[:, None]))[:, 0]
    key, sub = jax.random.split(key)
    token_N = _next_token(logits_NV, opts, jax.random.uniform(sub, (n,), logits_NV.dtype))
    state = _initial_state(cache, token_N[:, None], key, stops, opts)
    return emit(state, token_N[:, None], jnp.ones((n,), jnp.int32), opts)


def ar_step(model, opts: DecodeOptions, state: DecodeState) -> DecodeState:
    cache, token_N1 = state.cache, state.pending_NB
    n = token_N1.shape[0]
    length_N = cache.length_N
    active_N = ~state.done_N
    mask_N1S = cache_read(masks.ar_step_layout(length_N, cache.k_LNCKD.shape[2]), opts.cache_attention,
                          opts.cache_page)
    hidden_N1E, step_kv = model.hidden(token_N1, length_N[:, None], mask_N1S, cache)
    logits_NV = model.logits(hidden_N1E)[:, 0]
    key, sub = jax.random.split(state.key)
    next_N = _next_token(logits_NV, opts, jax.random.uniform(sub, (n,), logits_NV.dtype))
    cache = kvops.advance(kvops.write_tokens(cache, kvops.after(step_kv, next_N), 1, length_N), active_N)
    ones_N = jnp.ones((n,), jnp.int32)
    state = state._replace(
        cache=cache, pending_NB=jnp.where(active_N[:, None], next_N[:, None], token_N1), key=key,
        nfe_N=state.nfe_N + active_N.astype(jnp.int32),
        accept_hist_A=state.accept_hist_A.at[1].add(jnp.sum(active_N, dtype=jnp.int32)), steps=state.steps + 1)
    return emit(state, next_N[:, None], ones_N, opts)


# ----------------------------------------------------------------------------------------------------------------
# Pure entry points (jit these with graphdef/opts/cache_size/mesh bound by functools.partial)
# ----------------------------------------------------------------------------------------------------------------

def prefill(graphdef, opts: DecodeOptions, cache_size: int, params, prompt_NP, prompt_len_N, key,
            stops: Stops, mesh=None) -> DecodeState:
    model = layer_major.merge(graphdef, params)
    fn = tidar_prefill if opts.mode == "tidar" else ar_prefill
    with activation_mesh(mesh):
        return constrain_state(fn(model, opts, cache_size, prompt_NP, prompt_len_N, key, stops, mesh), mesh)


def step(graphdef, opts: DecodeOptions, params, state: DecodeState, mesh=None) -> DecodeState:
    """One decode step. On a mesh the activations between layers follow the rules table (replicated over the
    tensor axis: with heads and MLP columns sharded, each block ends in one all-reduce) and a Mosaic cache kernel
    runs in a ``shard_map`` over it (``tidar_jax.sharding.activation_mesh``)."""
    model = layer_major.merge(graphdef, params)
    fn = tidar_step if opts.mode == "tidar" else ar_step
    with activation_mesh(mesh):
        return constrain_state(fn(model, opts, state), mesh)


def generate_loop(graphdef, opts: DecodeOptions, cache_size: int, params, prompt_NP, prompt_len_N, key,
                  stops: Stops, mesh=None) -> GenerateOutput:
    """The whole generation: prefill, then ``while_loop`` over steps until every row is done. Only tokens and
    statistics leave the program; the cache lives and dies on the device."""
    state = prefill(graphdef, opts, cache_size, params, prompt_NP, prompt_len_N, key, stops, mesh)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done_N),
                               lambda s: step(graphdef, opts, params, s, mesh), state)
    return output_of(state)
