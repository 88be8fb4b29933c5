"""Python API: ``Decoder.generate`` (whole generation in one compiled ``while_loop``) and ``Decoder.stream``
(a Python generator over the separately compiled prefill and step functions), plus ``generate(...)``.

Compilation is ahead-of-time and cached per static signature (options, batch, prompt bucket, cache size), so
timings never include compilation and prompts of different lengths within a bucket reuse one program.
"""

from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.decode import engine
from tidar_jax.decode.options import DecodeError, DecodeOptions

MIN_BUCKET = 16
DEFAULT_MAX_CACHE_LEN = 4096
_DEFAULT = object()


def prompt_bucket(length: int, cap: int) -> int:
    """Padded prompt length: the next power of two >= max(length, 16), but never above ``cap``."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return max(length, min(bucket, cap))


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]  # generated ids per row (EOS kept when hit)
    texts: list[str] | None  # decoded generations when a tokenizer is available
    stats: dict[str, Any]


def _stats(state: engine.DecodeState, opts: DecodeOptions, wall_s: float, compile_s: float) -> dict[str, Any]:
    new_tokens = [int(x) for x in np.asarray(state.n_out_N)]
    nfe_rows = [int(x) for x in np.asarray(state.nfe_N)]
    hist = [int(x) for x in np.asarray(state.accept_hist_K)]
    steps_total = sum(hist)
    total = sum(new_tokens)
    return {
        "mode": opts.mode,
        "block_size": opts.block_size if opts.mode == "tidar" else 1,
        "nfe": int(state.steps) + 1,  # forwards run for the batch, prefill included
        "nfe_per_row": nfe_rows,  # forwards while each row was still generating
        "new_tokens": new_tokens,
        "tokens_per_nfe": total / max(sum(nfe_rows), 1),
        "mean_accepted": (sum(k * c for k, c in enumerate(hist)) / steps_total) if steps_total else None,
        "accepted_length_hist": {str(k): c for k, c in enumerate(hist) if k >= 1},
        "wall_s": wall_s,
        "tokens_per_s": total / wall_s if wall_s > 0 else float("inf"),
        "compile_s": compile_s,
    }


class Decoder:
    """A loaded model plus its compiled decode programs."""

    def __init__(self, cfg, graphdef, params, tokenizer=None, trained_block_size: int | None = None,
                 eos_token_id: int | None = None, max_cache_len: int = DEFAULT_MAX_CACHE_LEN):
        self.cfg, self.graphdef, self.params = cfg, graphdef, params
        self.tokenizer = tokenizer
        self.trained_block_size = trained_block_size
        self.eos_token_id = eos_token_id
        self.max_cache_len = max_cache_len
        self._compiled: dict[tuple, Any] = {}
        self.compile_count = 0

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> "Decoder":
        return cls(bundle.config, bundle.graphdef, bundle.params, bundle.tokenizer, bundle.trained_block_size,
                   bundle.eos_token_id, **kwargs)

    @classmethod
    def from_model(cls, model, **kwargs) -> "Decoder":
        graphdef, params = nnx.split(model)
        return cls(model.cfg, graphdef, params, **kwargs)

    # -- inputs ----------------------------------------------------------------------------------------------

    def options(self, mode="tidar", block_size=None, beta=1.0, slot0="verifier", temperature=0.0, top_k=0,
                top_p=1.0, max_new_tokens=64, allow_untrained_block_size=False,
                full_logits=False) -> DecodeOptions:
        trained = self.trained_block_size
        if block_size is None:
            block_size = trained or self.cfg.block_size
        if mode == "tidar" and trained and block_size != trained and not allow_untrained_block_size:
            raise DecodeError(
                f"block_size={block_size}: this checkpoint was trained with block size {trained}; use "
                f"{trained} or allow another explicitly (allow_untrained_block_size / --allow-untrained-block-size)")
        if mode == "ar":  # the AR program ignores the TiDAR-only options: normalise them so it compiles once
            block_size, beta, slot0, full_logits = 1, 1.0, "verifier", False
        opts = DecodeOptions(
            mode=mode, block_size=block_size, beta=float(beta), slot0=slot0, temperature=float(temperature),
            top_k=top_k, top_p=float(top_p), max_new_tokens=max_new_tokens, full_logits=full_logits)
        return opts.validate()

    def eos(self, eos_token_id=_DEFAULT) -> int:
        """The runtime EOS id: the model's default unless given; None or -1 = no EOS."""
        if eos_token_id is _DEFAULT:
            eos_token_id = self.eos_token_id
        if eos_token_id is None:
            return -1
        if not isinstance(eos_token_id, (int, np.integer)) or not -1 <= eos_token_id < self.cfg.vocab_size:
            raise DecodeError(
                f"eos_token_id={eos_token_id!r}: must be -1/None (no EOS) or a token id in [0, {self.cfg.vocab_size})")
        return int(eos_token_id)

    def encode(self, prompts) -> list[list[int]]:
        """Token-id rows from a string, a list of strings, a list of ids or a list of id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                        and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not isinstance(prompts, Sequence) or not prompts:
            raise DecodeError("prompts: must be a non-empty string, list of strings, id list or list of id lists")
        rows = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise DecodeError(f"prompt {i} is text but this model has no tokenizer; pass token ids")
                p = self.tokenizer.encode(p).ids
            ids = [int(t) for t in p]
            if not ids:
                raise DecodeError(f"prompt {i} is empty: need at least one token")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise DecodeError(f"prompt {i} has token id {bad[0]}: ids must be in [0, {self.cfg.vocab_size})")
            rows.append(ids)
        return rows

    def _layout(self, rows: list[list[int]], opts: DecodeOptions):
        longest = max(len(r) for r in rows)
        room = self.max_cache_len - opts.max_new_tokens - opts.draft_len
        if longest > room:
            raise DecodeError(
                f"prompt of {longest} tokens is too long: with max_new_tokens={opts.max_new_tokens} and block "
                f"size {opts.draft_len} the cache (max_cache_len={self.max_cache_len}) holds prompts of at most "
                f"{max(room, 0)} tokens")
        padded = prompt_bucket(longest, room)
        prompt_NP = np.zeros((len(rows), padded), np.int32)
        for i, r in enumerate(rows):
            prompt_NP[i, :len(r)] = r
        lengths_N = np.array([len(r) for r in rows], np.int32)
        return prompt_NP, lengths_N, engine.required_cache_size(padded, opts)

    # -- compilation -----------------------------------------------------------------------------------------

    def _compile(self, name: str, fn, opts: DecodeOptions, cache_size: int, args):
        shapes = tuple((getattr(a, "shape", None), str(getattr(a, "dtype", type(a)))) for a in
                       jax.tree.leaves(args[1:]))
        key = (name, opts, cache_size, shapes, jax.config.jax_enable_x64)
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(fn).lower(*args).compile()
            self.compile_count += 1
            self._last_compile_s = time.perf_counter() - t0
        else:
            self._last_compile_s = 0.0
        return self._compiled[key]

    def compiled_generate(self, opts: DecodeOptions, cache_size: int, args):
        fn = partial(engine.generate_loop, self.graphdef, opts, cache_size)
        return self._compile("generate", fn, opts, cache_size, args)

    # -- decoding --------------------------------------------------------------------------------------------

    def _decode_texts(self, tokens):
        if self.tokenizer is None:
            return None
        return [self.tokenizer.decode(t) for t in tokens]

    def _inputs(self, prompts, seed, eos_token_id, option_kwargs):
        opts = self.options(**option_kwargs)
        eos = self.eos(eos_token_id)
        rows = self.encode(prompts)
        prompt_NP, lengths_N, cache_size = self._layout(rows, opts)
        args = (self.params, jnp.asarray(prompt_NP), jnp.asarray(lengths_N), jax.random.key(seed),
                jnp.asarray(eos, jnp.int32))
        return opts, cache_size, args

    def generate(self, prompts, seed: int = 0, eos_token_id=_DEFAULT, **option_kwargs) -> GenerateResult:
        """Generate for every prompt row in one compiled ``while_loop``; see ``Decoder.options`` for options."""
        opts, cache_size, args = self._inputs(prompts, seed, eos_token_id, option_kwargs)
        compiled = self.compiled_generate(opts, cache_size, args)
        compile_s = self._last_compile_s
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(*args))
        state = jax.device_get(state)
        wall_s = time.perf_counter() - t0
        out = np.asarray(state.out_NM)
        tokens = [out[i, :n].tolist() for i, n in enumerate(np.asarray(state.n_out_N))]
        return GenerateResult(tokens, self._decode_texts(tokens), _stats(state, opts, wall_s, compile_s))

    def stream(self, prompts, seed: int = 0, eos_token_id=_DEFAULT, **option_kwargs) -> "DecodeStream":
        """Iterate per forward pass over the rows' newly emitted tokens (one accepted chunk per row)."""
        opts, cache_size, args = self._inputs(prompts, seed, eos_token_id, option_kwargs)
        prefill_fn = partial(engine.prefill, self.graphdef, opts, cache_size)
        prefill = self._compile("prefill", prefill_fn, opts, cache_size, args)
        compile_s = self._last_compile_s
        state0 = jax.eval_shape(prefill_fn, *args)
        step = self._compile("step", partial(engine.step, self.graphdef, opts), opts, cache_size,
                             (self.params, state0))
        compile_s += self._last_compile_s
        return DecodeStream(self, opts, prefill, step, args, compile_s)


class DecodeStream:
    """Iterator of per-forward chunks: each item is a list (one per row) of newly emitted token ids.
    After exhaustion, ``result`` holds the same ``GenerateResult`` that ``generate`` would return."""

    def __init__(self, decoder: Decoder, opts, prefill, step, args, compile_s):
        self.decoder, self.opts = decoder, opts
        self._prefill, self._step, self._args = prefill, step, args
        self._compile_s = compile_s
        self.result: GenerateResult | None = None
        self.state: engine.DecodeState | None = None  # the latest state (for inspection between chunks)

    def __iter__(self) -> Iterator[list[list[int]]]:
        t0 = time.perf_counter()
        params = self._args[0]
        state = self.state = self._prefill(*self._args)
        seen = np.zeros(state.n_out_N.shape, np.int64)
        while True:
            out, n_out, done = jax.device_get((state.out_NM, state.n_out_N, state.done_N))
            yield [out[i, seen[i]:n_out[i]].tolist() for i in range(len(seen))]
            seen = np.asarray(n_out, np.int64)
            if bool(np.all(done)):
                break
            state = self.state = self._step(params, state)
        state = jax.device_get(state)
        wall_s = time.perf_counter() - t0
        out = np.asarray(state.out_NM)
        tokens = [out[i, :n].tolist() for i, n in enumerate(np.asarray(state.n_out_N))]
        self.result = GenerateResult(tokens, self.decoder._decode_texts(tokens),
                                     _stats(state, self.opts, wall_s, self._compile_s))


def generate(model, prompts, seed: int = 0, eos_token_id=_DEFAULT, **option_kwargs) -> GenerateResult:
    """One-shot convenience: ``model`` is a ``Decoder``, an ``InferenceBundle`` or an nnx ``Transformer``.

    Options: mode ("tidar"/"ar"), block_size, beta, slot0 ("verifier"/"diffusion"), temperature, top_k, top_p,
    max_new_tokens, eos_token_id, allow_untrained_block_size. Returns tokens, texts and stats (NFE, tokens per
    NFE, accepted-length histogram, wall time).
    """
    if not isinstance(model, Decoder):
        model = Decoder.from_bundle(model) if hasattr(model, "graphdef") else Decoder.from_model(model)
    return model.generate(prompts, seed=seed, eos_token_id=eos_token_id, **option_kwargs)
