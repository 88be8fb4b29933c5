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
    """[Q][C+Q] bools: keys are cache slots 0..C-1 then the step tokens (drafts, then groups 1..B)."""
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
