"""Independent plain-Python reference implementations, written straight from the rules in the spec."""


def training_mask_ref(S, B, segments=None):
    """[2S][2S] list of bools for one sequence; ``segments`` is a length-S list of document ids or None."""
    T = 2 * S
    seg = (list(segments) * 2) if segments is not None else [0] * T
    out = [[False] * T for _ in range(T)]
    for q in range(T):
        for k in range(T):
            if seg[q] != seg[k]:
                continue
            q_clean, k_clean = q < S, k < S
            qi, ki = q % S, k % S
            if q_clean and k_clean:
                out[q][k] = ki <= qi
            elif q_clean and not k_clean:
                out[q][k] = False  # clean never sees masks
            elif not q_clean and k_clean:
                block_start = (qi // B) * B
                out[q][k] = ki < block_start
            else:
                out[q][k] = (qi // B) == (ki // B)
    return out


def decode_mask_ref(L, B, C):
    """[T][C+T] bools: keys are cache slots 0..C-1 then the step tokens (drafts, then groups 1..B)."""
    Q = B * (B + 1)
    out = [[False] * (C + Q) for _ in range(Q)]
    positions = []
    for q in range(Q):
        g, t = divmod(q, B)
        positions.append(L + g + t)
        for s in range(C):
            out[q][s] = s < L
        for k in range(Q):
            gk, tk = divmod(k, B)
            if g == 0:
                out[q][C + k] = gk == 0 and tk <= t
            else:
                out[q][C + k] = (gk == 0 and tk < g) or gk == g
    return out, positions


def prefill_mask_ref(L, P, B):
    """[P+B][P+B] bools for prompt of real length L padded to P, then B mask tokens."""
    T = P + B
    out = [[False] * T for _ in range(T)]
    positions = list(range(P)) + [L + i for i in range(B)]
    for q in range(T):
        for k in range(T):
            if q < P:
                out[q][k] = k < P and k <= q and (k < L or k == q)
            else:
                out[q][k] = (k < L) or k >= P
    return out, positions


def decode_step_mask_groups_ref(B, counts):
    """[T][T] bools among a pruned step's tokens: drafts 0..B-1, then one group of B masks per covered count k
    (slot t at position L+k+t) that sees drafts 0..k-1 and its own group."""
    rows = [("d", 0, t) for t in range(B)] + [("g", k, t) for k in counts for t in range(B)]
    out = []
    for kind_q, k_q, t_q in rows:
        line = []
        for kind_k, k_k, t_k in rows:
            if kind_q == "d":
                line.append(kind_k == "d" and t_k <= t_q)
            else:
                line.append((kind_k == "d" and t_k < k_q) or (kind_k == "g" and k_k == k_q))
        out.append(line)
    positions = [t for t in range(B)] + [k + t for k in counts for t in range(B)]
    return out, positions


def next_drafts_ref(k, B, counts, drafts, group_argmax, verifier_token):
    """Next drafts after accepting k: group k's argmax (slot 0 = verifier token) when k is covered; otherwise the
    verifier token, then the later slots of the nearest lower covered group j (the current drafts when none),
    the slot for position L+k+t being j's slot k-j+t, clamped to B-1. ``group_argmax[k]`` = group k's argmaxes."""
    lower = [c for c in counts if c <= k]
    j = max(lower) if lower else 0
    src = group_argmax[j] if j else drafts
    nxt = [src[min(k - j + t, B - 1)] for t in range(B)]
    nxt[0] = verifier_token
    return nxt
