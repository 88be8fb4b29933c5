"""Import a local Hugging Face directory: config + params (tensor by tensor into their shardings) + tokenizer."""

from __future__ import annotations

import copy
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.checkpoint.bundle import InferenceBundle
from tidar_jax.config import QWEN_MASK_TOKEN_ID, ModelConfig, resolve_mask_token
from tidar_jax.data.tokenizer import MASK_TOKEN as ADDED_MASK_TOKEN  # the one spelling data preparation adds too
from tidar_jax.hf.hf_config import family_of, hf_config_to_model_config
from tidar_jax.hf.keys import KEY_TABLE, BoundKey, HFFormatError, bound_keys, set_path
from tidar_jax.hf.safetensors_io import TensorReader, tensor_headers, weight_map
from tidar_jax.model.functional import abstract_model
from tidar_jax.sharding import state_shardings

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
QWEN_MASK_TOKEN = "<|fim_pad|>"

# HF keys that carry no parameters of ours (recomputed buffers in old checkpoints)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_dir(path: str) -> bool:
    """A directory with a ``config.json`` (whether it is usable is decided by ``load_hf_dir``)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise HFFormatError(f"{path}: expected a JSON object")
    return value


def read_hf_config(hf_dir: str) -> dict:
    if not os.path.isdir(hf_dir):
        raise HFFormatError(f"{hf_dir}: not a directory")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise HFFormatError(f"{hf_dir}: no {CONFIG_FILE}; not a Hugging Face model directory")
    return read_json(path)


def _first_id(value) -> int | None:
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _all_ids(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    return tuple(int(v) for v in (value if isinstance(value, list) else [value]))


def token_ids(hf_dir: str, hf: dict) -> dict:
    """``bos_token_id`` / ``eos_token_id`` as recorded (``generation_config.json`` wins over ``config.json``)."""
    gen_path = os.path.join(hf_dir, GENERATION_CONFIG_FILE)
    gen = read_json(gen_path) if os.path.isfile(gen_path) else {}
    return {k: gen.get(k, hf.get(k)) for k in ("bos_token_id", "eos_token_id")}


def _resolve_mask_token(hf: dict, tokenizer, mask_token_id, add_mask_token: bool):
    """``(mask_token_id or None, rows_to_add)``. Policy (first that applies):

    ``tidar_jax.config.resolve_mask_token``: explicit argument > ``mask_token_id`` recorded in config.json >
    151662 for a Qwen vocabulary (``<|fim_pad|>`` in the tokenizer, or a Qwen architecture, with vocab_size >
    151662); then ``add_mask_token`` appends ``<|mask|>`` to the tokenizer (using a free embedding row, or growing
    the embedding by mean-initialised rows).
    """
    vocab = int(hf.get("vocab_size") or 0)
    fim_pad = tokenizer.token_to_id(QWEN_MASK_TOKEN) if tokenizer is not None else None
    qwen = fim_pad == QWEN_MASK_TOKEN_ID or family_of(hf) in ("qwen2", "qwen3")
    resolved = resolve_mask_token(mask_token_id, hf.get("mask_token_id"), vocab_size=vocab, qwen=qwen)
    if resolved is not None:
        return resolved, 0
    if not add_mask_token:
        return None, 0  # an AR-only model, or hf_config_to_model_config's one-line error
    if tokenizer is None:
        raise HFFormatError(f"add_mask_token=True needs a {TOKENIZER_FILE} to add {ADDED_MASK_TOKEN} to")
    from tokenizers import AddedToken

    existing = tokenizer.token_to_id(ADDED_MASK_TOKEN)
    if existing is None:
        tokenizer.add_special_tokens([AddedToken(ADDED_MASK_TOKEN, special=True)])
        existing = tokenizer.token_to_id(ADDED_MASK_TOKEN)
    return existing, max(0, existing + 1 - vocab)


def _check_names(files: dict[str, str], keys: list[BoundKey], cfg: ModelConfig, hf_dir: str):
    expected = {k.hf_name for k in keys}
    missing = sorted(expected - set(files))
    if missing:
        raise HFFormatError(f"{hf_dir}: missing tensor(s) {missing[:3]}{' ...' if len(missing) > 3 else ''} "
                            f"that the {cfg.family} config implies")
    extra = sorted(n for n in set(files) - expected if not n.endswith(_IGNORED_SUFFIXES)
                   and not (n == "lm_head.weight" and cfg.tie_embeddings))  # tied head stored anyway: ignored
    if extra:
        raise HFFormatError(f"{hf_dir}: unexpected tensor(s) {extra[:3]}{' ...' if len(extra) > 3 else ''} that "
                            f"this {cfg.family} model has no parameter for")


def _grow_vocab(arr: np.ndarray, rows: int, axis: int) -> np.ndarray:
    """Append ``rows`` entries along the vocab axis, each the mean of the existing ones (a neutral new token)."""
    mean = arr.astype(np.float64).mean(axis=axis, keepdims=True).astype(arr.dtype)
    return np.concatenate([arr] + [mean] * rows, axis=axis)


def load_hf_dir(path: str, mesh=None, mask_token_id: int | None = None, block_size: int | None = None,
                dtype: str | None = None, add_mask_token: bool = False,
                require_mask_token: bool = False) -> InferenceBundle:
    """Our config, params (an ``nnx.State``, each tensor placed straight into its sharding on ``mesh``, or on the
    first device) and tokenizer from a local HF directory (``config.json``, ``model.safetensors[.index.json]``,
    optional ``tokenizer.json``). Everything is validated (config, file headers, names, shapes) before any tensor
    is read; any problem raises ``HFFormatError`` with one line. A model with no [MASK] id (none given, recorded or
    added) loads with ``mask_token_id=None`` (AR decoding needs none) unless ``require_mask_token``.
    """
    hf = read_hf_config(path)
    family_of(hf)  # unsupported architecture -> clear error before anything else
    tokenizer = None
    tok_path = os.path.join(path, TOKENIZER_FILE)
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        try:
            tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:
            raise HFFormatError(f"{tok_path}: cannot be read by the tokenizers library: {e}") from None
    mask_id, grow_rows = _resolve_mask_token(hf, tokenizer, mask_token_id, add_mask_token)
    stored_vocab = int(hf.get("vocab_size") or 0)
    cfg = hf_config_to_model_config(hf, mask_token_id=mask_id, block_size=block_size, dtype=dtype,
                                    vocab_size=stored_vocab + grow_rows if grow_rows else None,
                                    require_mask_token=require_mask_token)
    src_cfg = cfg  # the shapes stored in the files
    if grow_rows:  # the stored vocabulary lacks the added rows: a view for tensor shapes only, never a model
        src_cfg = copy.copy(cfg)
        object.__setattr__(src_cfg, "vocab_size", stored_vocab)

    files = weight_map(path)
    keys = list(bound_keys(src_cfg))
    _check_names(files, keys, src_cfg, path)
    headers = tensor_headers({k.hf_name: files[k.hf_name] for k in keys})
    for k in keys:
        if tuple(headers[k.hf_name]["shape"]) != k.hf_shape:
            raise HFFormatError(f"{path}: tensor {k.hf_name} has shape {tuple(headers[k.hf_name]['shape'])} but "
                                f"config.json implies {k.hf_shape}")

    with TensorReader(files) as reader:
        graphdef, state = params_from_tensors(cfg, reader.get, mesh, grow_vocab_rows=grow_rows, source_cfg=src_cfg)
    ids = token_ids(path, hf)
    return InferenceBundle(config=cfg, graphdef=graphdef, params=state, tokenizer=tokenizer,
                           eos_token_id=_first_id(ids["eos_token_id"]), eos_token_ids=_all_ids(ids["eos_token_id"]),
                           source=os.path.abspath(path))


def params_from_tensors(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray], mesh=None, *,
                        grow_vocab_rows: int = 0, source_cfg: ModelConfig | None = None):
    """``(graphdef, state)`` from HF-named tensors fetched one at a time by ``get_tensor(hf_name)``.

    Each tensor goes through the key table, is cast to ``cfg.param_dtype`` and placed straight into its sharding
    on ``mesh`` (each device receives only its slice) or on the first device; at most one host copy is alive.
    ``source_cfg`` describes the stored shapes when the vocabulary grows by ``grow_vocab_rows`` mean rows.
    """
    graphdef, abstract = abstract_model(cfg)
    shardings = nnx.to_pure_dict(state_shardings(abstract, mesh)) if mesh is not None else None
    device = jax.devices()[0]
    param_dtype = jnp.dtype(cfg.param_dtype)
    pure: dict = {}
    # rule by rule (all layers of one parameter, then the next), so one stacked host buffer is alive at a time
    order = {rule: n for n, rule in enumerate(KEY_TABLE)}
    keys = sorted(bound_keys(source_cfg or cfg), key=lambda k: (order[k.rule], k.layer or 0))
    stacked = None
    for k in keys:
        arr = k.to_ours(np.asarray(get_tensor(k.hf_name))).astype(param_dtype, copy=False)
        if grow_vocab_rows and k.hf_name in ("model.embed_tokens.weight", "lm_head.weight"):
            arr = _grow_vocab(arr, grow_vocab_rows, axis=0 if k.our_path == ("embed",) else 1)
        if k.layer is None:
            set_path(pure, k.param_path, _place(arr, k.param_path, shardings, device))
            del arr
            continue
        if k.layer == 0:
            stacked = np.empty((cfg.num_layers,) + arr.shape, arr.dtype)
        stacked[k.layer] = arr
        del arr
        if k.layer == cfg.num_layers - 1:
            set_path(pure, k.param_path, _place(stacked, k.param_path, shardings, device))
            stacked = None
    state = nnx.State(abstract)
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def _place(arr: np.ndarray, our_path, shardings, device):
    if shardings is None:
        return jax.device_put(arr, device)
    sharding = shardings
    for p in our_path:
        sharding = sharding[p]
    # each device receives only its slice of this one host tensor
    return jax.make_array_from_callback(arr.shape, sharding, lambda index: arr[index])
