"""Export our params to a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained`` loads as is.

Tensors are gathered one at a time from (possibly sharded) arrays, converted through the key table, cast to the
recorded dtype and written into safetensors shards of bounded size (``format: pt`` metadata) plus
``model.safetensors.index.json`` when there is more than one shard. The directory is written atomically
(``tidar_jax.checkpoint.atomic.atomic_dir``), so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tidar_jax.checkpoint.atomic import atomic_dir
from tidar_jax.config import ModelConfig
from tidar_jax.hf.hf_config import model_config_to_hf_config
from tidar_jax.hf.keys import BoundKey, HFFormatError, bound_keys, get_path
from tidar_jax.hf.safetensors_io import INDEX_FILE, SINGLE_FILE

DEFAULT_MAX_SHARD_BYTES = 5 * 1000 ** 3  # HF's "5GB"


def plan_shards(keys: list[BoundKey], itemsize: int, max_shard_bytes: int) -> list[list[BoundKey]]:
    """Greedy, order-preserving grouping; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[BoundKey]] = [[]]
    used = 0
    for k in keys:
        nbytes = int(np.prod(k.hf_shape)) * itemsize
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(k)
        used += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def gather(leaf) -> np.ndarray:
    """One full tensor on the host, from a local, sharded or multi-process array."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _tokenizer_config(tokenizer, eos_token_id, bos_token_id, mask_token_id) -> dict:
    def name(i):
        return None if i is None or tokenizer is None else tokenizer.id_to_token(int(i))

    out = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30}
    for key, tid in (("eos_token", eos_token_id), ("bos_token", bos_token_id), ("mask_token", mask_token_id)):
        tok = name(tid)
        if tok is not None:
            out[key] = tok
    return out


def export_hf(config: ModelConfig, params_state, out_dir: str, tokenizer_path: str | None = None,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, *, tokenizer=None, dtype: str | None = None,
              eos_token_id: int | list[int] | None = None, bos_token_id: int | None = None,
              max_position_embeddings: int | None = None, config_extra: dict | None = None,
              extra_files: dict[str, str] | None = None, generation_config: dict | None = None,
              chat_template=None) -> str:
    """Write ``out_dir`` (must not exist): safetensors shards (+ index), ``config.json`` (with the TiDAR fields
    ``mask_token_id`` and ``block_size``), ``generation_config.json`` and, when given (``tokenizer_path`` or a
    ``tokenizers.Tokenizer``), ``tokenizer.json`` + ``tokenizer_config.json``. ``dtype`` defaults to
    ``config.param_dtype``. ``generation_config``: the source model's (its sampling defaults are kept, the token ids
    are the ones given here); ``chat_template``: written into ``tokenizer_config.json`` (the place every
    transformers version reads; a template needs the tokenizer it renders for). ``tidar_jax.hf.serving`` gives
    both from a checkpoint's record. A serving target adds ``config_extra`` (keys set in ``config.json``) and
    ``extra_files`` (file name -> text, e.g. a README). Returns the absolute ``out_dir``.
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise HFFormatError(f"max_shard_bytes={max_shard_bytes!r}: must be an integer >= 1")
    dtype = dtype or config.param_dtype
    hf_config = model_config_to_hf_config(config, dtype=dtype, max_position_embeddings=max_position_embeddings,
                                          bos_token_id=bos_token_id, eos_token_id=eos_token_id, extra=config_extra)
    if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
        raise HFFormatError(f"tokenizer {tokenizer_path}: no such file")
    from tidar_jax.output_paths import check_new_dir

    out_dir = check_new_dir(out_dir)
    pure = nnx.to_pure_dict(params_state) if isinstance(params_state, nnx.State) else params_state
    keys = list(bound_keys(config))
    for k in keys:  # every parameter present with the right shape before anything is written
        try:
            leaf = get_path(pure, k.param_path)
        except (KeyError, TypeError, IndexError):
            name = ".".join(map(str, k.param_path))
            raise HFFormatError(f"params have no {name}, which the config implies") from None
        want = k.our_shape if k.layer is None else (config.num_layers,) + k.our_shape
        if tuple(leaf.shape) != want:
            raise HFFormatError(f"parameter {'.'.join(map(str, k.param_path))} has shape {tuple(leaf.shape)}, the "
                                f"config implies {want}")
    np_dtype = jnp.dtype(dtype)
    shards = plan_shards(keys, np_dtype.itemsize, max_shard_bytes)
    names = shard_file_names(len(shards))
    writer = jax.process_index() == 0

    from safetensors.numpy import save_file

    with atomic_dir(out_dir, enabled=writer) as tmp:
        weight_map, total = {}, 0
        for fname, shard in zip(names, shards):
            tensors = {}
            for k in shard:  # gather one tensor at a time; a shard holds at most max_shard_bytes on the host
                tensors[k.hf_name] = k.to_hf(gather(k.get_ours(pure))).astype(np_dtype, copy=False)
                weight_map[k.hf_name] = fname
                total += tensors[k.hf_name].nbytes
            if writer:
                save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
            del tensors
        if writer:
            _write_files(tmp, config, hf_config, len(shards), weight_map, total, tokenizer_path, tokenizer,
                         eos_token_id, bos_token_id, generation_config, chat_template)
            for name, text in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "w") as f:
                    f.write(text)
    return out_dir


def _write_files(tmp, config, hf_config, n_shards, weight_map, total, tokenizer_path, tokenizer, eos_token_id,
                 bos_token_id, generation_config, chat_template):
    """Everything beside the shards: index, config, generation config, tokenizer, chat template."""
    if n_shards > 1:
        _write_json(os.path.join(tmp, INDEX_FILE), {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(tmp, "config.json"), hf_config)
    generation = dict(generation_config or {"_from_model_config": False})
    generation.update({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id))
                       if v is not None})
    _write_json(os.path.join(tmp, "generation_config.json"), generation)
    if tokenizer_path is not None or tokenizer is not None:
        tok_out = os.path.join(tmp, "tokenizer.json")
        if tokenizer is not None:
            tokenizer.save(tok_out)
        else:
            shutil.copyfile(tokenizer_path, tok_out)
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(tok_out)
        first_eos = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
        tok_config = _tokenizer_config(tok, first_eos, bos_token_id, config.mask_token_id)
        if chat_template is not None:
            tok_config["chat_template"] = chat_template
        _write_json(os.path.join(tmp, "tokenizer_config.json"), tok_config)


def _write_json(path: str, value):
    with open(path, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
