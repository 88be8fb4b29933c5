"""Chunked cross-entropy (tidar_jax.chunked_loss) equals the dense losses of tidar_jax.objective: values,
metrics and gradients, with loss masks and segment ids."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tidar_jax.chunked_loss import chunked_ar_loss, chunked_tidar_loss
from tidar_jax.objective import ar_loss, tidar_loss

N, S, E, V = 2, 8, 6, 11


def _case():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(N, 2 * S, E)))
    w_EV = jnp.asarray(rng.normal(size=(E, V)))
    tokens = jnp.asarray(rng.integers(0, V, (N, S)))
    loss_mask = jnp.asarray(rng.random((N, S)) > 0.25)
    segment_ids = jnp.asarray(np.sort(rng.integers(0, 3, (N, S)), axis=1))
    return hidden, w_EV, tokens, loss_mask, segment_ids


def _head(w_EV):
    return lambda h: jnp.einsum("nte,ev->ntv", h, w_EV)


@pytest.mark.parametrize("objective", ["tidar", "ar"])
def test_chunked_equals_dense_values_metrics_and_grads(objective):
    with jax.enable_x64(True):
        hidden, w_EV, tokens, loss_mask, segment_ids = _case()
        if objective == "ar":
            hidden = hidden[:, :S]

        def dense(h, w, mask, seg):
            if objective == "ar":
                return ar_loss(_head(w)(h), tokens, mask, seg)
            return tidar_loss(_head(w)(h), tokens, mask, seg, alpha=0.7)

        def chunked(h, w, mask, seg, chunk):
            if objective == "ar":
                return chunked_ar_loss(_head(w), h, tokens, mask, seg, chunk=chunk)
            return chunked_tidar_loss(_head(w), h, tokens, mask, seg, alpha=0.7, chunk=chunk)

        @jax.jit
        def all_cases(h, w):
            out = []
            for mask, seg in ((None, None), (loss_mask, None), (loss_mask, segment_ids)):
                ref = jax.value_and_grad(dense, argnums=(0, 1), has_aux=True)(h, w, mask, seg)
                got = [jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(h, w, mask, seg, c)
                       for c in (2, S)]
                out.append((ref, got))
            return out

        for ((loss_r, m_r), g_r), got in all_cases(hidden, w_EV):
            assert float(m_r[f"{'ar' if objective == 'ar' else 'diff'}_tokens"]) > 0
            for (loss_c, m_c), g_c in got:
                np.testing.assert_allclose(float(loss_c), float(loss_r), rtol=1e-12)
                assert m_c.keys() == m_r.keys()
                for k in m_r:
                    np.testing.assert_allclose(float(m_c[k]), float(m_r[k]), rtol=1e-12, err_msg=k)
                for a, b in zip(g_c, g_r):
                    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-13)


def test_chunk_must_divide_length():
    hidden, w_EV, tokens, _, _ = _case()
    with pytest.raises(ValueError, match="loss chunk 3 must be a positive divisor of the length 8"):
        chunked_tidar_loss(_head(w_EV), hidden, tokens, chunk=3)
