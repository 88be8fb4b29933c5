"""Recommend the TiDAR block size B and mask groups for a target from its compiled decode steps.

For each candidate (B, groups) the TiDAR step is compiled for the deviceless target and its time ESTIMATED at two
levels (docs/estimates.md): the ceiling (the cost model, datasheet peaks) and the expected time (peaks derated by
public measurements), on a GPU with eager launches and with the step as one CUDA graph. The projected tokens/s is
``batch * expected tokens per step / step time``; candidates are ranked at the expected level. The expected tokens
per step comes from an acceptance ASSUMPTION, never from a measurement here:

* a per-slot acceptance rate ``alpha`` (each draft after the always-accepted first is accepted with probability
  ``alpha`` while the previous ones were), or
* a tokens-per-forward table ``{B: T/NFE}`` with all groups, from which ``alpha`` is solved per B, or
* by default the paper's T/NFE at B = 16 with all groups (7.45 at Qwen2.5-1.5B, 8.25 at Qwen3-8B), ``alpha`` solved
  from it and applied to every B ("the paper's T/NFE scaled").

Pruned groups (``--groups G``: mask groups only for accepted counts 1..G) change where the next drafts come from
(``tidar_jax.decode.layout``): after an uncovered count k the next drafts are the nearest covered group j's
predictions shifted by ``k - j``, so only ``B - (k - j)`` of them exist (the rest are clamped copies, assumed
rejected), and with no covered j only the verifier's token is right. The expected tokens per step is then the
mean under the stationary distribution of that Markov chain over "usable drafts next step". The drafts that do
exist are assumed accepted at ``alpha`` (optimistic for pruned groups: their predictions did not see the tokens
accepted after j).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# The paper's tokens per forward with B = 16 and all groups (arXiv 2511.08923)
PAPER_TOKENS_PER_NFE = {"qwen2.5-1.5b": 7.45, "qwen3-8b": 8.25}
DEFAULT_BLOCKS = (4, 8, 16)


def _k_distribution(cap: int, alpha: float) -> np.ndarray:
    """P(k = i), i = 1..cap: accepted count of a step whose first ``cap`` drafts can be right."""
    p = np.array([alpha ** (i - 1) * (1 - alpha) for i in range(1, cap)] + [alpha ** (cap - 1)])
    return p


def expected_tokens_per_step(block_size: int, groups: tuple[int, ...] | None, alpha: float) -> float:
    """Mean accepted count per step (tokens per forward) at per-slot acceptance ``alpha`` with mask groups for the
    accepted counts ``groups`` (None: all 1..B); see the module docstring for the model."""
    b = block_size
    covered = set(range(1, b + 1) if groups is None else groups)
    trans = np.zeros((b + 1, b + 1))  # from cap c to cap c' (index = cap, 1..B)
    mean_k = np.zeros(b + 1)
    for cap in range(1, b + 1):
        p = _k_distribution(cap, alpha)
        mean_k[cap] = float(np.dot(np.arange(1, cap + 1), p))
        for k, pk in zip(range(1, cap + 1), p):
            j = max([c for c in covered if c <= k], default=0)
            nxt = b if j == k else (1 if j == 0 else max(1, b - (k - j)))
            trans[cap, nxt] += pk
    pi = np.zeros(b + 1)
    pi[b] = 1.0
    for _ in range(10_000):
        new = pi @ trans
        if np.abs(new - pi).sum() < 1e-13:
            break
        pi = new
    return float(np.dot(pi, mean_k))


def alpha_for(tokens_per_nfe: float, block_size: int) -> float:
    """The per-slot acceptance at which all groups give ``tokens_per_nfe`` at ``block_size`` (bisection)."""
    if not 1.0 <= tokens_per_nfe <= block_size:
        raise ValueError(f"tokens per forward {tokens_per_nfe} at B={block_size}: must be in [1, {block_size}]")
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if expected_tokens_per_step(block_size, None, mid) < tokens_per_nfe:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """Where the expected tokens per step come from: ``alpha`` per B (and the label printed beside it)."""

    alpha_by_block: dict[int, float]
    label: str

    def tokens_per_step(self, block_size: int, groups: tuple[int, ...] | None) -> float:
        return expected_tokens_per_step(block_size, groups, self.alpha_by_block[block_size])


def acceptance(blocks, alpha: float | None = None, table: dict[int, float] | None = None,
               preset: str | None = None) -> Acceptance:
    """The acceptance assumption (see the module docstring); ``ValueError`` with one line when none applies."""
    if alpha is not None:
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"--acceptance={alpha}: must be in [0, 1)")
        return Acceptance({b: alpha for b in blocks}, f"per-slot acceptance {alpha:g} (given)")
    if table is not None:
        missing = [b for b in blocks if b not in table]
        if missing:
            raise ValueError(f"--tokens-per-nfe table has no entry for B={missing[0]} (blocks {list(blocks)})")
        return Acceptance({b: alpha_for(table[b], b) for b in blocks},
                          "tokens per forward with all groups (given): " + ", ".join(
                              f"B={b}: {table[b]:g}" for b in blocks))
    if preset not in PAPER_TOKENS_PER_NFE:
        raise ValueError(f"no default acceptance for {preset or 'this model'}: give --acceptance ALPHA or "
                         f"--tokens-per-nfe B=T,... (defaults exist for {', '.join(PAPER_TOKENS_PER_NFE)})")
    t = PAPER_TOKENS_PER_NFE[preset]
    a = alpha_for(t, 16)
    return Acceptance({b: a for b in blocks}, f"ASSUMED: the paper's T/NFE {t} at B=16 ({preset}), as per-slot "
                                             f"acceptance {a:.4f} applied to every B")


def parse_tokens_per_nfe(text: str) -> float | dict[int, float]:
    """``"7.45"`` (one value) or ``"4=3.1,8=5.0,16=7.45"`` (per B); ``ValueError`` naming the bad part."""
    text = text.strip()
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--tokens-per-nfe={text!r}: must be a number or B=T,... (e.g. 4=3.1,16=7.45)")
    out = {}
    for part in text.split(","):
        try:
            b, t = part.split("=")
            out[int(b)] = float(t)
        except ValueError:
            raise ValueError(f"--tokens-per-nfe={text!r}: {part!r} is not B=T (e.g. 4=3.1,16=7.45)") from None
    return out


def candidates(blocks) -> list[tuple[int, tuple[int, ...] | None]]:
    """(B, groups) to compile: all groups, and the counts 1..B/2 (half the step's mask tokens)."""
    out = []
    for b in blocks:
        out.append((b, None))
        if b >= 4:
            out.append((b, tuple(range(1, b // 2 + 1))))
    return out


LEVELS = ("ceiling", "expected")


def launch_variants(chip) -> tuple[str, ...]:
    """How the step is launched: eagerly or as one CUDA graph on a GPU; one program on a TPU."""
    return ("program",) if chip.platform == "tpu" else ("eager", "graph")


def recommend(cfg, devices, chip, *, batch: int, context: int, blocks, accept: Acceptance,
              max_new_tokens: int = 256) -> dict:
    """Compile the AR step and the TiDAR step of every candidate for ``devices``; estimate them at both levels
    (``analysis.decode_plan.program_estimate``: the ceiling and the expected time) and rank by the projected
    tokens/s at the expected level (on a GPU with the step as one CUDA graph, eager beside it). Returns the rows,
    the winner, and the winner at the ceiling."""
    from tidar_jax.analysis.decode_plan import compile_decode, program_estimate

    launches = launch_variants(chip)

    def step_times(block, groups, mode):
        progs = compile_decode(cfg, devices, batch=batch, block_size=block, context=context,
                               max_new_tokens=max_new_tokens, modes=(mode,), with_prefill=False, groups=groups)
        p = progs[f"{mode} step"]
        out = {}
        for launch in launches:
            e = program_estimate(p, chip, graph=launch == "graph", live_cache_slots=context, step=True)
            out.update({(launch, level): e[f"{level}_s"] for level in LEVELS})
        return out

    ar = step_times(1, None, "ar")
    rows = []
    for block, groups in candidates(blocks):
        t = step_times(block, groups, "tidar")
        tokens = accept.tokens_per_step(block, groups)
        row = {"block_size": block, "groups": "all" if groups is None else f"1..{groups[-1]}",
               "tokens_per_step": tokens}
        for (launch, level), step_s in t.items():
            row[f"step_ms_{launch}_{level}"] = step_s * 1e3
            row[f"tokens_per_s_{launch}_{level}"] = batch * tokens / step_s
            row[f"speedup_{launch}_{level}"] = tokens * ar[launch, level] / step_s
        rows.append(row)
    primary = launches[-1]
    out = {"batch": batch, "context": context, "acceptance": accept.label, "launches": list(launches),
           "ranked_by": f"tokens_per_s_{primary}_expected",
           "ar_step_ms": {f"{launch}_{level}": v * 1e3 for (launch, level), v in ar.items()},
           "ar_tokens_per_s": {f"{launch}_{level}": batch / v for (launch, level), v in ar.items()}, "rows": rows,
           "best": max(rows, key=lambda r: r[f"tokens_per_s_{primary}_expected"]),
           "best_ceiling": max(rows, key=lambda r: r[f"tokens_per_s_{primary}_ceiling"])}
    if "eager" in launches:
        out["best_eager"] = max(rows, key=lambda r: r["tokens_per_s_eager_expected"])
    return out


def _groups_flag(row) -> str:
    return "" if row["groups"] == "all" else f" --groups {row['groups'].split('..')[1]}"


def format_recommendation(rec: dict, target: str) -> str:
    launches = rec["launches"]
    primary = launches[-1]
    label = {"graph": "one CUDA graph", "eager": "eager launches", "program": "one TPU program"}
    ar = rec["ar_step_ms"]
    lines = [f"TiDAR block size and groups for {target}, batch {rec['batch']}, context {rec['context']} "
             f"(ESTIMATES of the compiled steps, ceiling and expected (docs/estimates.md); acceptance "
             f"{rec['acceptance']})",
             "AR step: " + ", ".join(f"{ar[f'{launch}_ceiling']:.3f} / {ar[f'{launch}_expected']:.3f} ms "
                                     f"{label[launch]}" for launch in launches)
             + f" (ceiling / expected) -> {rec['ar_tokens_per_s'][f'{primary}_expected']:.0f} tokens/s expected",
             " B  groups  tokens/step  " + "  ".join(f"step ms {launch} (ceil/exp)" for launch in launches)
             + f"  tokens/s {primary} exp  speedup {primary} (ceil/exp)"]
    for r in rec["rows"]:
        steps = "  ".join(f"{r[f'step_ms_{launch}_ceiling']:>9.3f} / {r[f'step_ms_{launch}_expected']:<9.3f}"
                          for launch in launches)
        lines.append(f"{r['block_size']:>2}  {r['groups']:>6}  {r['tokens_per_step']:>11.2f}  {steps}  "
                     f"{r[f'tokens_per_s_{primary}_expected']:>14.0f}  {r[f'speedup_{primary}_ceiling']:>6.2f}x / "
                     f"{r[f'speedup_{primary}_expected']:.2f}x")
    b = rec["best"]
    lines.append(f"recommended: --block-size {b['block_size']}{_groups_flag(b)} (projected "
                 f"{b[f'tokens_per_s_{primary}_expected']:.0f} tokens/s, {b[f'speedup_{primary}_expected']:.2f}x AR "
                 f"at the expected level, {label[primary]})")
    c = rec["best_ceiling"]
    if (c["block_size"], c["groups"]) != (b["block_size"], b["groups"]):
        lines.append(f"at the ceiling the best would be B={c['block_size']} groups {c['groups']} "
                     f"({c[f'speedup_{primary}_ceiling']:.2f}x AR)")
    e = rec.get("best_eager")
    if e and (e["block_size"], e["groups"]) != (b["block_size"], b["groups"]):
        lines.append(f"with eager launches the best is B={e['block_size']} groups {e['groups']} "
                     f"({e['speedup_eager_expected']:.2f}x AR, expected)")
    return "\n".join(lines)
