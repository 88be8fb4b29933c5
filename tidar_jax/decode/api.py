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
# Capacities of the runtime stop criteria: their contents are runtime values (no recompile when they change); only
# exceeding a capacity (it then doubles) changes the program's shapes.
EOS_CAPACITY = 8
STOP_CAPACITY = 8
STOP_WINDOW = 16
DTYPES = ("float32", "bfloat16", "float64")


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


def _capacity(n: int, minimum: int) -> int:
    cap = minimum
    while cap < n:
        cap *= 2
    return cap


def default_dtype(cfg, platform: str | None = None) -> str:
    """Decode weight/compute dtype when none is asked for: bf16 on GPU/TPU (half the weight bytes per step);
    on CPU the checkpoint's own compute dtype when it is float32/float64, else float32."""
    from tidar_jax.targets import platform_kind

    if platform_kind(platform or jax.default_backend()) in ("gpu", "tpu"):
        return "bfloat16"
    return cfg.dtype if cfg.dtype in ("float32", "float64") else "float32"


def cast_params(params, dtype, shardings=None):
    """Floating-point params cast once to ``dtype`` (into ``shardings`` when given, never gathered)."""
    def cast(tree):
        return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
    if shardings is None:
        return jax.jit(cast)(params)
    return jax.jit(cast, out_shardings=shardings)(params)


def cut_at_stop_text(tokens: list[int], stop_strings, decode) -> list[int] | None:
    """The shortest prefix of ``tokens`` whose decoded text contains one of ``stop_strings`` (None if none does).

    Text semantics: generation stops at the first token that completes a stop string in the decoded generated
    text, whatever the tokenization; that whole token is kept (as Hugging Face's stop strings do)."""
    def hit(n):
        text = decode(tokens[:n])
        return any(s in text for s in stop_strings)

    if not stop_strings or not tokens or not hit(len(tokens)):
        return None
    lo, hi = 1, len(tokens)  # hit(hi) holds; find the smallest n with hit(n)
    while lo < hi:
        mid = (lo + hi) // 2
        if hit(mid):
            hi = mid
        else:
            lo = mid + 1
    return tokens[:lo]


def _stats(state: engine.GenerateOutput, opts: DecodeOptions, wall_s: float, compile_s: float,
           tokens: list[list[int]]) -> dict[str, Any]:
    new_tokens = [len(t) for t in tokens]  # after the host-side stop-string cut (if any)
    nfe_rows = [int(x) for x in np.asarray(state.nfe_N)]
    hist = [int(x) for x in np.asarray(state.accept_hist_A)]
    steps_total = sum(hist)
    total = sum(new_tokens)
    return {
        "mode": opts.mode,
        "block_size": opts.block_size if opts.mode == "tidar" else 1,
        "groups": list(opts.group_counts) if opts.mode == "tidar" else [1],
        "head": opts.head,
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
    """A loaded model plus its compiled decode programs.

    dtype: weight and compute dtype, applied once here (None = ``default_dtype``: bf16 on GPU/TPU, the
        checkpoint's fp32 on CPU). mesh: a ``(data, fsdp, tensor)`` mesh; params are sharded by the one rules
        table and the KV cache over batch and kv heads. eos_token_id: default EOS id(s) (an int or a list).
    ``cfg.block_size`` is the block size the weights were trained with (None: none, an AR-only model) and the
    default TiDAR block size; ``check_block_size`` (set for checkpoints, ``from_bundle``) refuses any other unless
    ``allow_untrained_block_size`` is given.
    """

    def __init__(self, cfg, graphdef, params, tokenizer=None, check_block_size: bool = False,
                 eos_token_id=None, max_cache_len: int = DEFAULT_MAX_CACHE_LEN, dtype: str | None = None,
                 mesh=None):
        dtype = default_dtype(cfg) if dtype is None else dtype
        if dtype not in DTYPES:
            raise DecodeError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
        shardings = None
        if mesh is not None:
            from tidar_jax.sharding import state_shardings

            shardings = state_shardings(params, mesh)
            params = jax.device_put(params, shardings)
        if dtype != cfg.dtype or dtype != cfg.param_dtype:
            from tidar_jax.model import abstract_model

            cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
            graphdef = abstract_model(cfg)[0]
            params = cast_params(params, jnp.dtype(dtype), shardings)
        from tidar_jax.model.layer_major import to_layer_major

        # one buffer per layer, converted once: a scan over stacked weights copies each layer's weights per step
        self.cfg, self.graphdef, self.params = cfg, graphdef, to_layer_major(params)
        self.dtype, self.mesh = dtype, mesh
        self.tokenizer = tokenizer
        self.check_block_size = check_block_size
        self.eos_token_id = eos_token_id
        self.max_cache_len = max_cache_len
        self._compiled: dict[tuple, Any] = {}
        self.compile_count = 0

    @classmethod
    def from_bundle(cls, bundle, **kwargs) -> "Decoder":
        eos = getattr(bundle, "eos_token_ids", None) or bundle.eos_token_id
        kwargs.setdefault("check_block_size", True)
        return cls(bundle.config, bundle.graphdef, bundle.params, bundle.tokenizer,
                   eos_token_id=list(eos) if isinstance(eos, tuple) else eos, **kwargs)

    @classmethod
    def from_model(cls, model, **kwargs) -> "Decoder":
        graphdef, params = nnx.split(model)
        return cls(model.cfg, graphdef, params, **kwargs)

    # -- inputs ----------------------------------------------------------------------------------------------

    def options(self, mode="tidar", block_size=None, beta=1.0, slot0="verifier", temperature=0.0, top_k=0,
                top_p=1.0, max_new_tokens=64, allow_untrained_block_size=False, head="one_pass", groups=None,
                cache_dtype=None, cache_attention="auto", cache_page=128, full_logits=False) -> DecodeOptions:
        """Static options. ``block_size``: None = the model's trained one (``cfg.block_size``). ``groups``: None
        (all B), an int G (counts 1..G) or a list of covered counts. ``full_logits=True`` is the old name of
        ``head="one_pass"``."""
        trained = self.cfg.block_size
        if mode == "tidar" and self.cfg.mask_token_id is None:
            raise DecodeError("this model has no [MASK] token (a stock checkpoint): decode with mode='ar' (--mode ar), "
                              "or add an untrained <|mask|> for TiDAR (--add-mask-token --block-size B "
                              "--allow-untrained-block-size; its drafts are rejected until trained, docs/hf.md)")
        if mode == "tidar" and block_size is None and trained is None:
            raise DecodeError("block_size: this model records no trained block size (an AR-only model, or an HF "
                              "checkpoint without TiDAR fields); decode with mode='ar' (--mode ar), or give a block "
                              "size with allow_untrained_block_size (--block-size B --allow-untrained-block-size)")
        if block_size is None:
            block_size = trained
        if mode == "tidar" and self.check_block_size and block_size != trained and not allow_untrained_block_size:
            what = f"was trained with block size {trained}; use {trained} or allow another" if trained is not None \
                else "records no trained block size (an AR-only model); allow one"
            raise DecodeError(f"block_size={block_size}: this checkpoint {what} explicitly (allow_untrained_block_size "
                              "/ --allow-untrained-block-size)")
        if mode == "ar" and block_size is None:
            block_size = 1
        if full_logits:
            head = "one_pass"
        if isinstance(groups, (int, np.integer)) and not isinstance(groups, bool):
            if not 1 <= groups <= block_size:
                raise DecodeError(f"groups={groups}: must be in 1..block_size={block_size}")
            groups = tuple(range(1, int(groups) + 1))
        elif groups is not None:
            groups = tuple(int(g) if isinstance(g, (int, np.integer)) else g for g in groups)
        if groups is not None and mode == "tidar" and groups == tuple(range(1, block_size + 1)):
            groups = None  # all groups: one program
        if mode == "ar":  # the AR program ignores the TiDAR-only options: normalise them so it compiles once
            block_size, beta, slot0, head, groups = 1, 1.0, "verifier", "one_pass", None
        opts = DecodeOptions(
            mode=mode, block_size=block_size, beta=float(beta), slot0=slot0, temperature=float(temperature),
            top_k=top_k, top_p=float(top_p), max_new_tokens=max_new_tokens, head=head, groups=groups,
            cache_dtype=cache_dtype, cache_attention=cache_attention, cache_page=cache_page)
        return opts.validate()

    def eos_ids(self, eos_token_id=_DEFAULT) -> list[int]:
        """The runtime EOS ids: the model's default unless given; None, -1 or [] = no EOS."""
        if eos_token_id is _DEFAULT:
            eos_token_id = self.eos_token_id
        if eos_token_id is None:
            return []
        ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple, np.ndarray)) else [eos_token_id]
        for t in ids:
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not -1 <= t < self.cfg.vocab_size:
                raise DecodeError(f"eos_token_id={eos_token_id!r}: must be -1/None (no EOS), a token id in "
                                  f"[0, {self.cfg.vocab_size}) or a list of them")
        return sorted({int(t) for t in ids if t != -1})

    def stop_sequences(self, stop) -> tuple[list[list[int]], list[str]]:
        """``(token sequences matched on device, strings checked on the host text)`` from ``stop``: a list of
        strings (tokenized without special tokens; needs a tokenizer) and/or token-id lists."""
        if stop is None:
            return [], []
        if isinstance(stop, str) or (isinstance(stop, Sequence) and stop and isinstance(stop[0], (int, np.integer))):
            stop = [stop]
        seqs, strings = [], []
        for s in stop:
            if isinstance(s, str):
                if not s:
                    raise DecodeError("stop string '': must be non-empty")
                if self.tokenizer is None:
                    raise DecodeError(f"stop string {s!r} needs a tokenizer; this model has none: pass token ids")
                strings.append(s)
                ids = self.tokenizer.encode(s, add_special_tokens=False).ids
            else:
                ids = [int(t) for t in s] if isinstance(s, Sequence) else None
                if not ids or any(not 0 <= t < self.cfg.vocab_size for t in ids):
                    raise DecodeError(f"stop sequence {s!r}: must be a non-empty string or a non-empty list of "
                                      f"token ids in [0, {self.cfg.vocab_size})")
            if ids:
                seqs.append(ids)
        return seqs, strings

    def stops(self, eos_token_id=_DEFAULT, stop=None) -> tuple[engine.Stops, list[str]]:
        """Runtime stop arrays (fixed capacities, so their values never recompile) and the host-side strings."""
        eos = self.eos_ids(eos_token_id)
        seqs, strings = self.stop_sequences(stop)
        eos_I = np.full((_capacity(len(eos), EOS_CAPACITY),), -1, np.int32)
        eos_I[:len(eos)] = eos
        window = _capacity(max((len(q) for q in seqs), default=0), STOP_WINDOW)
        stop_QW = np.full((_capacity(len(seqs), STOP_CAPACITY), window), -1, np.int32)
        stop_len_Q = np.zeros((stop_QW.shape[0],), np.int32)
        for i, q in enumerate(seqs):
            stop_QW[i, window - len(q):] = q
            stop_len_Q[i] = len(q)
        return engine.Stops(jnp.asarray(eos_I), jnp.asarray(stop_QW), jnp.asarray(stop_len_Q)), strings

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

    def _compile(self, name: str, fn, opts: DecodeOptions, cache_size: int, args, donate=()):
        shapes = tuple((getattr(a, "shape", None), str(getattr(a, "dtype", type(a)))) for a in
                       jax.tree.leaves(args[1:]))
        key = (name, opts, cache_size, shapes, jax.config.jax_enable_x64)
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
            self.compile_count += 1
            self._last_compile_s = time.perf_counter() - t0
        else:
            self._last_compile_s = 0.0
        return self._compiled[key]

    def compiled_generate(self, opts: DecodeOptions, cache_size: int, args):
        fn = partial(engine.generate_loop, self.graphdef, opts, cache_size, mesh=self.mesh)
        return self._compile("generate", fn, opts, cache_size, args)

    # -- decoding --------------------------------------------------------------------------------------------

    def _decode_texts(self, tokens):
        if self.tokenizer is None:
            return None
        return [self.tokenizer.decode(t) for t in tokens]

    def result(self, output: engine.GenerateOutput, opts: DecodeOptions, tokens: list[list[int]], wall_s: float,
               compile_s: float) -> GenerateResult:
        """What ``generate`` returns and a finished ``stream`` holds: the rows' tokens (after any stop-string
        cut), their texts and the statistics of the run."""
        return GenerateResult(tokens, self._decode_texts(tokens), _stats(output, opts, wall_s, compile_s, tokens))

    def _cut_text_stops(self, tokens, strings):
        """Apply the host-side text check of stop strings (see ``cut_at_stop_text``)."""
        if not strings or self.tokenizer is None:
            return tokens
        return [cut_at_stop_text(t, strings, self.tokenizer.decode) or t for t in tokens]

    def _inputs(self, prompts, seed, eos_token_id, stop, option_kwargs):
        opts = self.options(**option_kwargs)
        stops, strings = self.stops(eos_token_id, stop)
        rows = self.encode(prompts)
        prompt_NP, lengths_N, cache_size = self._layout(rows, opts)
        args = (self.params, jnp.asarray(prompt_NP), jnp.asarray(lengths_N), jax.random.key(seed), stops)
        return opts, cache_size, args, strings

    def generate(self, prompts, seed: int = 0, eos_token_id=_DEFAULT, stop=None, **option_kwargs) -> GenerateResult:
        """Generate for every prompt row in one compiled ``while_loop``; see ``Decoder.options`` for options.
        Only tokens and statistics come back to the host (the KV cache stays on the device and is freed)."""
        opts, cache_size, args, strings = self._inputs(prompts, seed, eos_token_id, stop, option_kwargs)
        compiled = self.compiled_generate(opts, cache_size, args)
        compile_s = self._last_compile_s
        t0 = time.perf_counter()
        output = jax.device_get(compiled(*args))
        wall_s = time.perf_counter() - t0
        out = np.asarray(output.out_NM)
        tokens = self._cut_text_stops([out[i, :n].tolist() for i, n in enumerate(np.asarray(output.n_out_N))],
                                      strings)
        return self.result(output, opts, tokens, wall_s, compile_s)

    def stream(self, prompts, seed: int = 0, eos_token_id=_DEFAULT, stop=None, **option_kwargs) -> "DecodeStream":
        """Iterate per forward pass over the rows' newly emitted tokens (one accepted chunk per row). The step is
        compiled with its state donated, so the cache is updated in place."""
        opts, cache_size, args, strings = self._inputs(prompts, seed, eos_token_id, stop, option_kwargs)
        prefill_fn = partial(engine.prefill, self.graphdef, opts, cache_size, mesh=self.mesh)
        prefill = self._compile("prefill", prefill_fn, opts, cache_size, args)
        compile_s = self._last_compile_s
        state0 = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                              jax.eval_shape(prefill_fn, *args), prefill.output_shardings)
        step = self._compile("step", partial(engine.step, self.graphdef, opts, mesh=self.mesh), opts, cache_size,
                             (self.params, state0), donate=(1,))
        compile_s += self._last_compile_s
        return DecodeStream(self, opts, prefill, step, args, compile_s, strings)


class DecodeStream:
    """Iterator of per-forward chunks: each item is a list (one per row) of newly emitted token ids.
    After exhaustion, ``result`` holds the same ``GenerateResult`` that ``generate`` would return.
    ``state`` is the latest device state; it is donated to the next step, so read it before resuming."""

    def __init__(self, decoder: Decoder, opts, prefill, step, args, compile_s, stop_strings=()):
        self.decoder, self.opts = decoder, opts
        self._prefill, self._step, self._args = prefill, step, args
        self._compile_s = compile_s
        self._strings = list(stop_strings)
        self.result: GenerateResult | None = None
        self.state: engine.DecodeState | None = None  # the latest state (for inspection between chunks)

    def __iter__(self) -> Iterator[list[list[int]]]:
        t0 = time.perf_counter()
        params = self._args[0]
        state = self.state = self._prefill(*self._args)
        seen = np.zeros(state.n_out_N.shape, np.int64)
        tokens = [[] for _ in range(len(seen))]
        text_stopped = np.zeros(len(seen), bool)
        tok = self.decoder.tokenizer
        while True:
            out, n_out, done = jax.device_get((state.out_NM, state.n_out_N, state.done_N))
            chunk = []
            for i in range(len(seen)):
                new = [] if text_stopped[i] else out[i, seen[i]:n_out[i]].tolist()
                if new and self._strings and tok is not None:
                    cut = cut_at_stop_text(tokens[i] + new, self._strings, tok.decode)
                    if cut is not None:  # a stop string completed in the text (any tokenization): stop this row
                        new, text_stopped[i] = cut[len(tokens[i]):], True
                tokens[i] += new
                chunk.append(new)
            yield chunk
            seen = np.asarray(n_out, np.int64)
            if bool(np.all(done | text_stopped)):
                break
            state = self.state = self._step(params, state)
        output = jax.device_get(engine.output_of(state))
        wall_s = time.perf_counter() - t0
        self.result = self.decoder.result(output, self.opts, tokens, wall_s, self._compile_s)


def generate(model, prompts, seed: int = 0, eos_token_id=_DEFAULT, stop=None, **option_kwargs) -> GenerateResult:
    """One-shot convenience: ``model`` is a ``Decoder``, an ``InferenceBundle`` or an nnx ``Transformer``.

    Options: mode ("tidar"/"ar"), block_size, beta, slot0 ("verifier"/"diffusion"), temperature, top_k, top_p,
    max_new_tokens, head, groups, cache_dtype, eos_token_id (an id or a list), stop (strings / id lists),
    allow_untrained_block_size. Returns tokens, texts and stats (NFE, tokens per
    NFE, accepted-length histogram, wall time).
    """
    if not isinstance(model, Decoder):
        model = Decoder.from_bundle(model) if hasattr(model, "graphdef") else Decoder.from_model(model)
    return model.generate(prompts, seed=seed, eos_token_id=eos_token_id, stop=stop, **option_kwargs)
