"""Prefill, one decode step and the whole-generation ``while_loop`` for TiDAR and the AR baseline.

Everything here is a pure function of the params ``state`` (the model is rebuilt with ``nnx.merge`` at trace
time). Shapes are static: ``N`` rows, prompts right-padded to ``P``, a cache of ``C`` slots, an output buffer of
``max_new_tokens + B`` tokens.

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
from flax import nnx

from tidar_jax import masks
from tidar_jax.decode import kv as kvops
from tidar_jax.decode.acceptance import greedy_accept, sampled_accept
from tidar_jax.decode.options import DecodeOptions
from tidar_jax.decode.sampling import greedy_token, sample_inverse_cdf, verifier_probs
from tidar_jax.model import KVCache


class DecodeState(NamedTuple):
    cache: KVCache
    pending_NB: jax.Array  # TiDAR: drafts d_0..d_{B-1} (d_0 already emitted); AR: the emitted, uncached token
    out_NM: jax.Array  # emitted tokens; only the first n_out_N of each row are meaningful
    n_out_N: jax.Array
    done_N: jax.Array
    key: jax.Array
    nfe_N: jax.Array  # forwards while the row was active (prefill included)
    accept_hist_K: jax.Array  # [B+1]: how many active row-steps accepted k drafts
    steps: jax.Array  # decode steps run (NFE = steps + 1)
    eos_token: jax.Array  # scalar; -1 = no EOS (a runtime value so that changing it does not recompile)


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


def emit(state: DecodeState, chunk_NT, count_N, opts: DecodeOptions):
    """Append the first ``count`` tokens of ``chunk`` to each active row; cut at max_new_tokens and after EOS."""
    m = state.out_NM.shape[1]
    j_T = jnp.arange(chunk_NT.shape[1])
    count_N = jnp.where(state.done_N, 0, jnp.minimum(count_N, opts.max_new_tokens - state.n_out_N)).astype(jnp.int32)
    is_eos_NT = (chunk_NT == state.eos_token) & (j_T[None] < count_N[:, None])
    eos_hit_N = jnp.any(is_eos_NT, axis=1)
    count_N = jnp.where(eos_hit_N, jnp.argmax(is_eos_NT, axis=1) + 1, count_N).astype(jnp.int32)
    cols_NT = jnp.where(j_T[None] < count_N[:, None], state.n_out_N[:, None] + j_T[None], m)
    out_NM = state.out_NM.at[jnp.arange(chunk_NT.shape[0])[:, None], cols_NT].set(chunk_NT, mode="drop")
    n_out_N = state.n_out_N + count_N
    done_N = state.done_N | eos_hit_N | (n_out_N >= opts.max_new_tokens)
    return state._replace(out_NM=out_NM, n_out_N=n_out_N, done_N=done_N)


def _initial_state(cache, pending_NB, key, eos_token, opts: DecodeOptions) -> DecodeState:
    n = pending_NB.shape[0]
    return DecodeState(
        cache=cache, pending_NB=pending_NB, out_NM=jnp.zeros((n, output_len(opts)), jnp.int32),
        n_out_N=jnp.zeros((n,), jnp.int32), done_N=jnp.zeros((n,), bool), key=key,
        nfe_N=jnp.ones((n,), jnp.int32), accept_hist_K=jnp.zeros((opts.draft_len + 1,), jnp.int32),
        steps=jnp.zeros((), jnp.int32), eos_token=jnp.asarray(eos_token, jnp.int32))


def _gather_rows(x_NTD, idx_NS):
    return jnp.take_along_axis(x_NTD, idx_NS[:, :, None], axis=1)


# ----------------------------------------------------------------------------------------------------------------
# TiDAR
# ----------------------------------------------------------------------------------------------------------------

def tidar_prefill(model, opts: DecodeOptions, cache_size: int, prompt_NP, prompt_len_N, key,
                  eos_token) -> DecodeState:
    """One forward over [prompt | B masks]: prompt K/V into the cache, first drafts from the masks."""
    cfg = model.cfg
    n, p = prompt_NP.shape
    b = opts.block_size
    tokens_NT = jnp.concatenate([prompt_NP, jnp.full((n, b), cfg.mask_token_id, prompt_NP.dtype)], axis=1)
    positions_NT = masks.prefill_positions(prompt_len_N, p, b)
    layout = masks.prefill_layout(prompt_len_N, p, b)
    hidden_NTD, step_kv = model.hidden(tokens_NT, positions_NT, layout)
    cache = kvops.prefill_cache(KVCache.empty(cfg, n, cache_size), step_kv, prompt_len_N, p)
    diff_NBV = model.logits(hidden_NTD[:, p:])
    drafts_NB = greedy_token(diff_NBV)
    key, sub = jax.random.split(key)
    if opts.slot0 == "verifier" or not opts.greedy:
        last_N1D = _gather_rows(hidden_NTD, (prompt_len_N - 1)[:, None])
        verifier_NV = model.logits(last_N1D)[:, 0]
        if opts.beta != 1.0:
            verifier_NV = opts.beta * verifier_NV + (1.0 - opts.beta) * diff_NBV[:, 0]
        d0_N = _next_token(verifier_NV, opts, jax.random.uniform(sub, (n,), verifier_NV.dtype))
        drafts_NB = drafts_NB.at[:, 0].set(d0_N)
    state = _initial_state(cache, drafts_NB, key, eos_token, opts)
    return emit(state, drafts_NB[:, :1], jnp.ones((n,), jnp.int32), opts)


def tidar_step(model, opts: DecodeOptions, state: DecodeState) -> DecodeState:
    """One forward over [d_0..d_{B-1} | G_1..G_B]; verify, commit accepted drafts' K/V, pick group k's drafts."""
    cfg = model.cfg
    cache, drafts_NB = state.cache, state.pending_NB
    n, b = drafts_NB.shape
    length_N = cache.length_B
    active_N = ~state.done_N
    tokens_NQ = jnp.concatenate([drafts_NB, jnp.full((n, b * b), cfg.mask_token_id, drafts_NB.dtype)], axis=1)
    positions_NQ = masks.decode_positions(length_N, b)
    layout = masks.decode_attention_layout(length_N, b, cache.k_LBCKD.shape[2])
    hidden_NQD, step_kv = model.hidden(tokens_NQ, positions_NQ, layout, cache)

    # LM head only where needed: the B draft rows (+ each group's slot 0 when beta < 1), then group k.
    if opts.full_logits:  # the straightforward way (benchmark baseline): logits and argmax at every position
        all_NQV = model.logits(hidden_NQD)
        argmax_NQ = greedy_token(all_NQV)
        head = lambda idx_NS: _gather_rows(all_NQV, idx_NS)  # noqa: E731
        group_argmax = lambda idx_NS: jnp.take_along_axis(argmax_NQ, idx_NS, axis=1)  # noqa: E731
    else:
        head = lambda idx_NS: model.logits(_gather_rows(hidden_NQD, idx_NS))  # noqa: E731
        group_argmax = lambda idx_NS: greedy_token(head(idx_NS))  # noqa: E731
    draft_idx_NB = jnp.broadcast_to(jnp.arange(b)[None], (n, b))
    verifier_NBV = head(draft_idx_NB)  # AR logits at draft i predict position L+i+1
    if opts.beta != 1.0:
        diff0_NBV = head(draft_idx_NB * b + b)  # group j+1 slot 0 sits at index (j+1)*B, position L+j+1
        verifier_NBV = opts.beta * verifier_NBV + (1.0 - opts.beta) * diff0_NBV

    key, k_acc, k_tok = jax.random.split(state.key, 3)
    if opts.greedy:
        accepted_N, token_N = greedy_accept(drafts_NB, verifier_NBV)
    else:
        probs_NBV = verifier_probs(verifier_NBV, opts.temperature, opts.top_k, opts.top_p)
        u_acc_NM = jax.random.uniform(k_acc, (n, b - 1), probs_NBV.dtype)
        u_tok_N = jax.random.uniform(k_tok, (n,), probs_NBV.dtype)
        accepted_N, token_N = sampled_accept(drafts_NB, probs_NBV, u_acc_NM, u_tok_N)

    next_NB = group_argmax(accepted_N[:, None] * b + jnp.arange(b)[None])
    if opts.slot0 == "verifier" or not opts.greedy:
        next_NB = next_NB.at[:, 0].set(token_N)

    # Commit: drafts' K/V go to slots L..L+B-1; only the accepted k become visible. Mask K/V is never written.
    cache = kvops.write_tokens(cache, step_kv, b, length_N)
    cache = kvops.advance(cache, jnp.where(active_N, accepted_N, 0))

    j_B = jnp.arange(b)[None]
    shifted_NB = jnp.concatenate([drafts_NB[:, 1:], drafts_NB[:, :1]], axis=1)
    chunk_NB = jnp.where(j_B < (accepted_N - 1)[:, None], shifted_NB, next_NB[:, :1])
    hist_K = state.accept_hist_K + jnp.sum(
        jax.nn.one_hot(accepted_N, b + 1, dtype=jnp.int32) * active_N[:, None], axis=0, dtype=jnp.int32)
    state = state._replace(
        cache=cache, pending_NB=jnp.where(active_N[:, None], next_NB, drafts_NB), key=key,
        nfe_N=state.nfe_N + active_N.astype(jnp.int32), accept_hist_K=hist_K, steps=state.steps + 1)
    return emit(state, chunk_NB, accepted_N, opts)


# ----------------------------------------------------------------------------------------------------------------
# AR baseline (same cache, same loop)
# ----------------------------------------------------------------------------------------------------------------

def ar_prefill(model, opts: DecodeOptions, cache_size: int, prompt_NP, prompt_len_N, key,
               eos_token) -> DecodeState:
    cfg = model.cfg
    n, p = prompt_NP.shape
    positions_NP = masks.prefill_positions(prompt_len_N, p, 0)
    layout = masks.prefill_layout(prompt_len_N, p, 0)
    hidden_NPD, step_kv = model.hidden(prompt_NP, positions_NP, layout)
    cache = kvops.prefill_cache(KVCache.empty(cfg, n, cache_size), step_kv, prompt_len_N, p)
    logits_NV = model.logits(_gather_rows(hidden_NPD, (prompt_len_N - 1)[:, None]))[:, 0]
    key, sub = jax.random.split(key)
    token_N = _next_token(logits_NV, opts, jax.random.uniform(sub, (n,), logits_NV.dtype))
    state = _initial_state(cache, token_N[:, None], key, eos_token, opts)
    return emit(state, token_N[:, None], jnp.ones((n,), jnp.int32), opts)


def ar_step(model, opts: DecodeOptions, state: DecodeState) -> DecodeState:
    cache, token_N1 = state.cache, state.pending_NB
    n = token_N1.shape[0]
    length_N = cache.length_B
    active_N = ~state.done_N
    # the AR step is a decode step with one draft and no mask groups: [cache < L | itself]
    layout = masks.decode_attention_layout(length_N, 1, cache.k_LBCKD.shape[2], groups=False)
    hidden_N1D, step_kv = model.hidden(token_N1, length_N[:, None], layout, cache)
    logits_NV = model.logits(hidden_N1D)[:, 0]
    key, sub = jax.random.split(state.key)
    next_N = _next_token(logits_NV, opts, jax.random.uniform(sub, (n,), logits_NV.dtype))
    cache = kvops.advance(kvops.write_tokens(cache, step_kv, 1, length_N), active_N)
    ones_N = jnp.ones((n,), jnp.int32)
    state = state._replace(
        cache=cache, pending_NB=jnp.where(active_N[:, None], next_N[:, None], token_N1), key=key,
        nfe_N=state.nfe_N + active_N.astype(jnp.int32),
        accept_hist_K=state.accept_hist_K.at[1].add(jnp.sum(active_N, dtype=jnp.int32)), steps=state.steps + 1)
    return emit(state, next_N[:, None], ones_N, opts)


# ----------------------------------------------------------------------------------------------------------------
# Pure entry points (jit these with graphdef/opts/cache_size bound by functools.partial)
# ----------------------------------------------------------------------------------------------------------------

def prefill(graphdef, opts: DecodeOptions, cache_size: int, params, prompt_NP, prompt_len_N, key,
            eos_token) -> DecodeState:
    model = nnx.merge(graphdef, params)
    fn = tidar_prefill if opts.mode == "tidar" else ar_prefill
    return fn(model, opts, cache_size, prompt_NP, prompt_len_N, key, eos_token)


def step(graphdef, opts: DecodeOptions, params, state: DecodeState) -> DecodeState:
    model = nnx.merge(graphdef, params)
    fn = tidar_step if opts.mode == "tidar" else ar_step
    return fn(model, opts, state)


def generate_loop(graphdef, opts: DecodeOptions, cache_size: int, params, prompt_NP, prompt_len_N, key,
                  eos_token):
    """The whole generation: prefill, then ``while_loop`` over steps until every row is done."""
    state = prefill(graphdef, opts, cache_size, params, prompt_NP, prompt_len_N, key, eos_token)
    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done_N), lambda s: step(graphdef, opts, params, s), state)
    return state
