"""The jitted train and eval steps over a ``(data, fsdp, tensor)`` mesh.

Train state is a plain dict ``{"params": pure dict, "opt": optax state, "step": int32}``; params are the model's
``nnx.State`` as a pure nested dict (``nnx.to_pure_dict(state)``), which is what optax, orbax and the shardings
see.  The TiDAR objective runs both losses in one forward over the doubled sequence ``[tokens | MASK * S]``; the
AR objective (baseline) runs a causal forward over the clean ``S`` tokens only.  There is no randomness in either objective (full masking, no
dropout), so a step is a deterministic function of (state, batch): the basis of bitwise resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tidar_jax.config import ModelConfig
from tidar_jax.masks import causal_layout, training_layout, training_positions
from flax import nnx

from tidar_jax.model.functional import merge
from tidar_jax.chunked_loss import chunked_ar_loss, chunked_tidar_loss
from tidar_jax.draft_loss import DraftLoss
from tidar_jax.objective import ar_loss, tidar_loss
from tidar_jax.sharding import activation_mesh, batch_spec, replicated, state_shardings

BATCH_SPEC = batch_spec()  # [batch, length] tokens, from the rules table


def batch_sharding(mesh: Mesh, shape=None, strict: bool = False) -> NamedSharding:
    """Token batches' sharding; with ``shape`` (and ``strict``), checked against the mesh like any tensor."""
    return NamedSharding(mesh, batch_spec(mesh, shape, strict) if shape is not None else BATCH_SPEC)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer
# ----------------------------------------------------------------------------------------------------------------

def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """Linear warm-up (``warmup_frac`` of the run, at least 1 step when > 0) then cosine to ``min_lr``."""
    warmup = int(round(optim.warmup_frac * total_steps))
    if optim.warmup_frac > 0:
        warmup = max(warmup, 1)
    if optim.schedule == "constant":
        if warmup == 0:
            return optax.constant_schedule(optim.lr)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, optim.lr, warmup), optax.constant_schedule(optim.lr)], [warmup])
    decay = max(total_steps - warmup, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim.lr, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=warmup + decay, end_value=optim.min_lr)


def _decay_mask(params):
    """Weight decay on matrices only (not on norm scales or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim, total_steps: int):
    """``(optax transformation, schedule)``: optional global-norm clipping, then Adam/AdamW with the schedule."""
    schedule = make_schedule(optim, total_steps)
    parts = []
    if optim.clip_norm is not None:
        parts.append(optax.clip_by_global_norm(optim.clip_norm))
    if optim.name == "adamw":
        parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                                 weight_decay=optim.weight_decay, mask=_decay_mask))
    else:
        parts.append(optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps))
    return optax.chain(*parts), schedule


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------

def tidar_inputs(tokens_NS, cfg: ModelConfig, segment_ids_NS=None):
    """Doubled tokens ``[N, 2S]``, positions and the training attention layout (``masks``): positions ``[1, 2S]``,
    or per row ``[N, 2S]`` restarting per document when packed (the layout then carries the segment ids, so no
    query sees another document's keys)."""
    n, s = tokens_NS.shape
    masks_NS = jnp.full((n, s), cfg.mask_token_id, tokens_NS.dtype)
    tokens_N2S = jnp.concatenate([tokens_NS, masks_NS], axis=1)
    if segment_ids_NS is None:
        return tokens_N2S, training_positions(s)[None], training_layout(s, cfg.block_size)
    return (tokens_N2S, training_positions(s, segment_ids_NS),
            training_layout(s, cfg.block_size, segment_ids_NS))


def causal_inputs(seq_len: int, segment_ids_NS=None):
    """Positions ``[1, S]`` (or ``[N, S]`` per document) and the causal attention layout of the AR objective."""
    if segment_ids_NS is None:
        return jnp.arange(seq_len, dtype=jnp.int32)[None], causal_layout(seq_len)
    positions_NS = training_positions(seq_len, segment_ids_NS)[:, :seq_len]
    return positions_NS, causal_layout(seq_len, segment_ids_NS)


def packed_loss_mask(segment_ids_NS):
    """Segment 0 is padding (``tidar_jax.data.packing``): no loss there."""
    return None if segment_ids_NS is None else segment_ids_NS > 0


def to_model(graphdef, template, params):
    """Rebuild the model from a pure params dict (``template``: the abstract ``nnx.State``; not mutated)."""
    state = jax.tree.map(lambda x: x, template)  # fresh Variables
    nnx.replace_by_pure_dict(state, params)
    return merge(graphdef, state)


def make_loss_fn(graphdef, template, cfg: ModelConfig, objective: str = "tidar", alpha: float = 1.0,
                 draft: DraftLoss | None = None, loss_chunk: int = 0):
    """``loss_fn(params, tokens_NS, segment_ids_NS=None) -> (loss, metrics)`` for the chosen objective.

    ``draft``: draft-loss options. ``loss_chunk > 0``: the cross-entropy runs over chunks of that many target
    positions (``tidar_jax.chunked_loss``), so the full-vocabulary logits of the whole sequence never exist at once.
    """
    if loss_chunk and draft is not None and draft.active:
        raise ValueError("train.loss_chunk > 0 with draft-loss options: the chunked loss has no draft terms yet")

    def tidar(params, tokens_NS, segment_ids_NS=None):
        tokens_N2S, pos, mask = tidar_inputs(tokens_NS, cfg, segment_ids_NS)
        model = to_model(graphdef, template, params)
        loss_mask = packed_loss_mask(segment_ids_NS)
        if loss_chunk:
            hidden, _ = model.hidden(tokens_N2S, pos, mask)
            return chunked_tidar_loss(model.logits, hidden, tokens_NS, loss_mask, segment_ids_NS, alpha=alpha,
                                      chunk=loss_chunk)
        logits, _ = model(tokens_N2S, pos, mask)
        return tidar_loss(logits, tokens_NS, loss_mask, segment_ids_NS, alpha=alpha, draft=draft,
                          block_size=cfg.block_size)

    def ar(params, tokens_NS, segment_ids_NS=None):
        pos, mask = causal_inputs(tokens_NS.shape[1], segment_ids_NS)
        model = to_model(graphdef, template, params)
        loss_mask = packed_loss_mask(segment_ids_NS)
        if loss_chunk:
            hidden, _ = model.hidden(tokens_NS, pos, mask)
            return chunked_ar_loss(model.logits, hidden, tokens_NS, loss_mask, segment_ids_NS, chunk=loss_chunk)
        logits, _ = model(tokens_NS, pos, mask)
        return ar_loss(logits, tokens_NS, loss_mask, segment_ids_NS)

    if objective == "tidar":
        return tidar
    if objective == "ar":
        return ar
    raise ValueError(f"objective={objective!r}: must be one of tidar, ar")


def make_eval_fn(graphdef, template, cfg: ModelConfig):
    """Held-out metrics: AR mode (the model as a plain causal LM over S) and the diffusion half of the TiDAR layout."""

    def evaluate(params, tokens_NS, segment_ids_NS=None):
        model = to_model(graphdef, template, params)
        loss_mask = packed_loss_mask(segment_ids_NS)
        pos, mask = causal_inputs(tokens_NS.shape[1], segment_ids_NS)
        logits_ar, _ = model(tokens_NS, pos, mask)
        _, ar_m = ar_loss(logits_ar, tokens_NS, loss_mask, segment_ids_NS)
        out = {"ar_loss": ar_m["ar_loss"], "ar_acc": ar_m["ar_acc"]}
        if cfg.block_size is not None:  # a TiDAR model (an AR-only one has no diffusion half to evaluate)
            tokens_N2S, pos2, mask2 = tidar_inputs(tokens_NS, cfg, segment_ids_NS)
            logits, _ = model(tokens_N2S, pos2, mask2)
            _, tm = tidar_loss(logits, tokens_NS, loss_mask, segment_ids_NS)
            out.update(diff_loss=tm["diff_loss"], diff_acc=tm["diff_acc"])
        return out

    return evaluate


# ----------------------------------------------------------------------------------------------------------------
# Train state and its shardings
# ----------------------------------------------------------------------------------------------------------------

def opt_state_shardings(tx, abstract_params, param_shardings, mesh: Mesh):
    """Optimizer-state shardings: param-shaped leaves follow their param; scalars (adam count) replicate."""
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    return optax.tree_utils.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_shardings,
        transform_non_params=lambda _: replicated(mesh))


def param_shardings(abstract_state, mesh: Mesh, strict: bool = False):
    """Pure-dict NamedShardings of the params (from the Params' ``logical_axes``)."""
    return nnx.to_pure_dict(state_shardings(abstract_state, mesh, strict=strict))


def train_state_shardings(tx, abstract_state, mesh: Mesh, strict: bool = False):
    param_sh = param_shardings(abstract_state, mesh, strict)
    abstract_params = nnx.to_pure_dict(abstract_state)
    return {"params": param_sh, "opt": opt_state_shardings(tx, abstract_params, param_sh, mesh),
            "step": replicated(mesh)}


def abstract_train_state(tx, abstract_state, shardings):
    """ShapeDtypeStructs carrying the *target* shardings (what a restore fills in)."""
    abstract_params = nnx.to_pure_dict(abstract_state)
    abstract = {"params": abstract_params, "opt": jax.eval_shape(tx.init, abstract_params),
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def init_train_state(tx, params, shardings):
    """Fresh optimizer state for ``params`` (pure dict or ``nnx.State``, already sharded) on the target shardings.

    The optimizer state is all zeros and counts, built eagerly and placed (no compile of a sharded init program).
    """
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    params = jax.device_put(params, shardings["params"])
    opt = jax.device_put(tx.init(params), shardings["opt"])
    return {"params": params, "opt": opt, "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])}


# ----------------------------------------------------------------------------------------------------------------
# The step functions
# ----------------------------------------------------------------------------------------------------------------

class _OptionalSegments:
    """A jitted ``f(x, tokens_NS, segment_ids_NS)`` callable, lowerable and compilable with the segment ids left
    out (None: one unpacked sequence per row), as jit itself needs every positional argument."""

    def __init__(self, jitted, compiled=None):
        self._jitted, self._compiled = jitted, compiled

    def __call__(self, x, tokens_NS, segment_ids_NS=None):
        return (self._compiled or self._jitted)(x, tokens_NS, segment_ids_NS)

    def lower(self, x, tokens_NS, segment_ids_NS=None):
        return _LoweredOptionalSegments(self._jitted.lower(x, tokens_NS, segment_ids_NS))


class _LoweredOptionalSegments:
    def __init__(self, lowered):
        self._lowered = lowered

    def compile(self, *args, **kwargs):
        compiled = self._lowered.compile(*args, **kwargs)
        wrapped = _OptionalSegments(None, compiled)
        for name in ("memory_analysis", "cost_analysis", "as_text"):
            setattr(wrapped, name, getattr(compiled, name))
        return wrapped

    def __getattr__(self, name):  # cost_analysis, as_text, ... of the lowered program
        return getattr(self._lowered, name)


@dataclasses.dataclass
class StepFns:
    train_step: Callable  # (state, tokens_NS, segment_ids_NS=None) -> (state, metrics)
    eval_step: Callable  # (params, tokens_NS, segment_ids_NS=None) -> metrics
    template: Any  # abstract nnx.State (to rebuild a model from pure params)
    state_shardings: Any
    batch_sharding: NamedSharding
    schedule: Callable
    tx: Any


def _accumulate(loss_fn, params, tokens_NS, accum: int, mesh: Mesh, segment_ids_NS=None):
    """Mean loss/grads over ``accum`` micro-batches (``lax.scan``; grads summed in float32)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum == 1:
        (loss, metrics), grads = grad_fn(params, tokens_NS, segment_ids_NS)
        return loss, metrics, grads
    n, s = tokens_NS.shape
    micro_sh = NamedSharding(mesh, P(None, *BATCH_SPEC))

    def micro(x_NS):
        # rows j*accum + a form micro-batch a, so every micro-batch keeps the batch sharding of the full batch
        x_UNS = jnp.swapaxes(x_NS.reshape(n // accum, accum, s), 0, 1)
        return jax.lax.with_sharding_constraint(x_UNS, micro_sh)

    micro_UNS = (micro(tokens_NS), None if segment_ids_NS is None else micro(segment_ids_NS))

    def body(carry, micro_batch):
        g_acc, m_acc = carry
        (_, metrics), grads = grad_fn(params, *micro_batch)
        g_acc = jax.tree.map(lambda a, g: a + g.astype(a.dtype), g_acc, grads)
        m_acc = jax.tree.map(lambda a, m: a + m, m_acc, metrics)
        return (g_acc, m_acc), None

    zeros_g = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32)), params)
    _, abstract_m = jax.eval_shape(loss_fn, params, *jax.tree.map(lambda x: x[0], micro_UNS))
    zeros_m = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), abstract_m)
    (g_sum, m_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m), micro_UNS)
    grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), g_sum, params)
    metrics = {k: (v if k.endswith("_tokens") else v / accum) for k, v in m_sum.items()}
    return metrics["loss"], metrics, grads


def make_step_fns(graphdef, cfg: ModelConfig, abstract_state, mesh: Mesh, optim, total_steps: int,
                  objective: str = "tidar", alpha: float = 1.0, draft: DraftLoss | None = None,
                  loss_chunk: int = 0, strict: bool = False, batch_shape=None) -> StepFns:
    """``abstract_state``: the model's ``nnx.State`` (abstract or concrete; only shapes/metadata are used).

    Activations are pinned at layer boundaries by the rules table (``sharding.constrain``). ``strict``: a mesh
    axis that does not divide a parameter, activation or (given ``batch_shape``) batch dimension raises a
    ``ShardingError`` instead of replicating that dimension.
    """
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_state)
    tx, schedule = make_optimizer(optim, total_steps)
    shardings = train_state_shardings(tx, template, mesh, strict)
    batch_sh = batch_sharding(mesh, batch_shape, strict)
    loss_fn = make_loss_fn(graphdef, template, cfg, objective, alpha, draft, loss_chunk)
    accum = optim.grad_accum

    def train_step(state, tokens_NS, segment_ids_NS):
        params = state["params"]
        with activation_mesh(mesh, strict):
            loss, metrics, grads = _accumulate(loss_fn, params, tokens_NS, accum, mesh, segment_ids_NS)
        grad_norm = optax.tree.norm(grads)
        updates, opt = tx.update(grads, state["opt"], params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # a non-finite step leaves the state untouched, so the caller can stop with the last good state intact
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = {"params": jax.tree.map(keep, new_params, params),
                     "opt": jax.tree.map(keep, opt, state["opt"]),
                     "step": state["step"] + finite.astype(jnp.int32)}
        metrics = dict(metrics, grad_norm=grad_norm, lr=schedule(state["step"]), finite=finite)
        return new_state, metrics

    train_jit = jax.jit(train_step, in_shardings=(shardings, batch_sh, batch_sh),
                        out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
    eval_jit = jax.jit(make_eval_fn(graphdef, template, cfg),
                       in_shardings=(shardings["params"], batch_sh, batch_sh), out_shardings=replicated(mesh))

    # segment ids are optional (None: one unpacked sequence per row); jit needs every positional argument
    train, evaluate = _OptionalSegments(train_jit), _OptionalSegments(eval_jit)
    return StepFns(train, evaluate, template, shardings, batch_sh, schedule, tx)
