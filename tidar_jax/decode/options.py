"""Static decoding options (one compiled program per distinct value) and their validation."""

from __future__ import annotations

import dataclasses

from tidar_jax.config import check_block_size

MODES = ("tidar", "ar")
SLOT0 = ("verifier", "diffusion")
HEADS = ("selective", "one_pass")
CACHE_ATTENTION = ("auto", "paged", "fused", "tpu", "dense")
CACHE_DTYPES = ("float32", "bfloat16", "float16", "float64")


class DecodeError(ValueError):
    """Bad decoding input; the message names the bad value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """Everything that shapes the compiled decode program.

    mode: "tidar" (diffusion drafts + AR verification, one forward per step) or "ar" (one token per forward).
    block_size: TiDAR draft length B (ignored for "ar").
    beta: verifier = beta * AR + (1 - beta) * Diff(group i, slot 0) on logits (1 = trust AR, 0 = trust diffusion).
    slot0: where the next block's first token comes from: "verifier" (the verifier's token at the
        rejection/bonus position; with beta=1 greedy output equals greedy AR) or "diffusion" (group k's own argmax,
        as in the authors' code). Sampling (temperature > 0) always uses "verifier" (exact speculative sampling).
    temperature: 0 = greedy; > 0 samples from the processed verifier distribution.
    top_k: 0 = off. top_p: 1.0 = off.
    max_new_tokens: exact cap on generated tokens per row. (EOS ids and stop sequences are runtime arguments,
        not options, so changing them does not recompile.)
    head: LM-head strategy of a TiDAR step. "selective": dependent passes (the B draft rows, then the B rows of
        the chosen group; reads the head weights two or three times but computes 2B-3B rows); "one_pass": one pass
        over the draft rows and every group's rows (reads the head weights once, computes B + G*B rows). Default
        one_pass: at real sizes a step is bound by reading weights, and the head (the tied 151936 x 896 embedding
        of Qwen2.5-0.5B: 27% of its weights) is the largest of them (benchmarks/cpu_flags.py measures both).
    groups: the accepted counts k in 1..B whose mask group is drafted in a step (sorted, unique); None = all B.
        For an uncovered count the next drafts are the exact verifier token followed by the later slots of the
        nearest lower covered group (group 0 = the current drafts). Verification is unchanged, so lossless mode
        stays lossless for every choice.
    cache_dtype: KV-cache dtype; None = the compute dtype.
    cache_attention: how a step attends to the cache: "paged" (``tidar_jax.attention.paged``: pages of
        ``cache_page`` slots up to the longest live row, no per-layer copy of the cache; a loop with a
        data-dependent trip count), "fused" (``tidar_jax.attention.fused_cache``: one fixed-shape split-K kernel
        per layer that skips the slots past each row's live length; GPU, Pallas interpret mode elsewhere),
        "tpu" (``tidar_jax.attention.tpu_cache``: the same contract as one Pallas TPU kernel; interpret mode
        elsewhere),
        "dense" (concatenate the whole allocated cache with the step's keys under a dense mask; the reference
        path) or "auto" (per platform, ``tidar_jax.attention.CACHE_AUTO``: fused on GPU, tpu on TPU, paged on CPU).
    """

    mode: str = "tidar"
    block_size: int = 4
    beta: float = 1.0
    slot0: str = "verifier"
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 64
    head: str = "one_pass"
    groups: tuple[int, ...] | None = None
    cache_dtype: str | None = None
    cache_attention: str = "auto"
    cache_page: int = 128

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def group_counts(self) -> tuple[int, ...]:
        """The accepted counts whose group is drafted (1..B when ``groups`` is None)."""
        return tuple(range(1, self.block_size + 1)) if self.groups is None else self.groups

    @property
    def draft_len(self) -> int:
        """Tokens kept pending per row between steps: B for TiDAR, 1 for AR."""
        return self.block_size if self.mode == "tidar" else 1

    def validate(self) -> "DecodeOptions":
        def bad(name, value, allowed):
            raise DecodeError(f"{name}={value!r}: must be {allowed}")

        if self.mode not in MODES:
            bad("mode", self.mode, "one of " + ", ".join(MODES))
        check_block_size(self.block_size, "block_size", DecodeError)
        if not 0.0 <= float(self.beta) <= 1.0:
            bad("beta", self.beta, "in [0, 1]")
        if self.slot0 not in SLOT0:
            bad("slot0", self.slot0, "one of " + ", ".join(SLOT0))
        if not float(self.temperature) >= 0.0:
            bad("temperature", self.temperature, ">= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        if not 0.0 < float(self.top_p) <= 1.0:
            bad("top_p", self.top_p, "in (0, 1] (1 = off)")
        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) \
                or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        if self.head not in HEADS:
            bad("head", self.head, "one of " + ", ".join(HEADS))
        if self.groups is not None:
            g = self.groups
            if (not isinstance(g, tuple) or not g or any(not isinstance(x, int) or isinstance(x, bool) for x in g)
                    or list(g) != sorted(set(g)) or g[0] < 1 or g[-1] > self.block_size):
                bad("groups", g, f"a non-empty sorted tuple of distinct accepted counts in 1..{self.block_size}")
        if self.cache_attention not in CACHE_ATTENTION:
            bad("cache_attention", self.cache_attention, "one of " + ", ".join(CACHE_ATTENTION))
        if not isinstance(self.cache_page, int) or isinstance(self.cache_page, bool) or self.cache_page < 1:
            bad("cache_page", self.cache_page, "an integer >= 1")
        if self.cache_dtype is not None and self.cache_dtype not in CACHE_DTYPES:
            bad("cache_dtype", self.cache_dtype, "None (the compute dtype) or one of " + ", ".join(CACHE_DTYPES))
        if self.mode == "tidar" and not self.greedy and self.slot0 != "verifier":
            bad("slot0", self.slot0, "'verifier' when temperature > 0 (exact speculative sampling samples the "
                "rejection/bonus token from the verifier)")
        return self
