"""SGLang's own weight-loading code, run on CPU over our exports.

SGLang 0.5.5 (the base of the authors' TiDAR fork) ships as a pure-Python wheel, fetched here with
``pip download --no-deps`` into pytest's cache (once per machine; the tests skip, saying why, where it cannot be
fetched). Importing its model modules would pull in CUDA kernels and its distributed runtime, so the functions that
load weights are taken out of the wheel's source one by one (``ast``) and run unchanged: ``load_weights`` of
``Qwen2ForCausalLM``/``Qwen3ForCausalLM`` and the ``weight_loader`` of every layer it calls (QKV, merged gate/up,
row-parallel, vocabulary embedding, the default loader). Their ``self`` is a stub holding the attributes those
functions read, for one GPU (tensor/pipeline parallel size 1); the parameters are created with the shapes and
attributes SGLang's layers give them for the export's ``config.json``.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import logging
import os
import re
import subprocess
import sys
import types
import typing
import zipfile

import pytest

VERSION = "0.5.5"
WHEEL = f"sglang-{VERSION}-py3-none-any.whl"
SHA256 = "3c57f135ec0a7a5cf6ae4ed5e0b231d7bf7e0fae588bbc1a881560f1c18db995"  # the wheel these tests were written for
VOCAB_PADDING = 64  # vocab_parallel_embedding.DEFAULT_VOCAB_PADDING_SIZE: embedding rows are padded to it


def fetch_wheel(cache_dir: str) -> str:
    """The wheel's path in ``cache_dir``, downloaded without dependencies when missing; ``pytest.skip`` (with the
    reason) where it cannot be fetched or is not the wheel the tests were written for."""
    path = os.path.join(cache_dir, WHEEL)
    if not os.path.isfile(path):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", f"sglang=={VERSION}", "-d", cache_dir]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"sglang=={VERSION} cannot be fetched: {type(e).__name__}")
        if done.returncode != 0 or not os.path.isfile(path):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(f"sglang=={VERSION} cannot be fetched (pip download: {last})")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != SHA256:
        pytest.skip(f"{path}: sha256 {digest} is not the sglang=={VERSION} wheel these tests were written for")
    return path


def _take(source: str, filename: str, names: list[str], namespace: dict) -> dict:
    """Define the top-level functions and ``Class.method``s ``names`` of ``source`` in ``namespace``, unchanged
    except for their annotations (dropped, so the types they name need not be importable)."""
    tree = ast.parse(source, filename)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef):
                    found[f"{node.name}.{sub.name}"] = sub
    out = {}
    for name in names:
        fn = found[name]
        for arg in fn.args.args + fn.args.kwonlyargs + fn.args.posonlyargs:
            arg.annotation = None
        fn.returns = None
        module = ast.Module(body=[fn], type_ignores=[])
        exec(compile(ast.fix_missing_locations(module), filename, "exec"), namespace)
        out[name] = namespace[fn.name]
    return out


class Loaders:
    """The wheel's weight-loading functions, defined in one namespace (the globals they read included)."""

    def __init__(self, wheel_path: str):
        import torch
        from torch.nn.parameter import Parameter, UninitializedParameter

        self.zip = zipfile.ZipFile(wheel_path)

        class BasevLLMParameter(Parameter):  # only named in isinstance checks on quantized paths
            pass

        ns = {"torch": torch, "re": re, "itertools": itertools, "logger": logging.getLogger("sglang-wheel"),
              "Parameter": Parameter, "UninitializedParameter": UninitializedParameter,
              "BasevLLMParameter": BasevLLMParameter, "_is_cpu": False,  # the server's path: CUDA, not CPU
              **{k: getattr(typing, k) for k in ("Optional", "List", "Tuple", "Dict", "Iterable", "Union")}}
        self.ns = ns
        f = self._take
        f("sglang/srt/utils/common.py", ["add_prefix"])
        f("sglang/srt/layers/utils.py", ["get_layer_id", "pad_or_narrow_weight"])
        f("sglang/srt/model_loader/weight_utils.py", ["default_weight_loader", "maybe_remap_kv_scale_name"])
        f("sglang/srt/layers/linear.py", ["adjust_marlin_shard", "adjust_bitsandbytes_4bit_shard",
                                          "adjust_scalar_to_fused_array", "adjust_shard_offsets"])
        self.qkv = f("sglang/srt/layers/linear.py", ["QKVParallelLinear.weight_loader"])[
            "QKVParallelLinear.weight_loader"]
        self.merged = f("sglang/srt/layers/linear.py", ["MergedColumnParallelLinear.weight_loader"])[
            "MergedColumnParallelLinear.weight_loader"]
        self.row = f("sglang/srt/layers/linear.py", ["RowParallelLinear.weight_loader"])[
            "RowParallelLinear.weight_loader"]
        self.vocab = f("sglang/srt/layers/vocab_parallel_embedding.py", ["VocabParallelEmbedding.weight_loader"])[
            "VocabParallelEmbedding.weight_loader"]
        self.load_weights = {
            family: f(f"sglang/srt/models/{family}.py", [f"{cls}.load_weights"])[f"{cls}.load_weights"]
            for family, cls in (("qwen2", "Qwen2ForCausalLM"), ("qwen3", "Qwen3ForCausalLM"))}

    def _take(self, path, names):
        return _take(self.zip.read(path).decode(), f"{WHEEL}/{path}", names, self.ns)


def _param(shape, weight_loader=None, **attrs):
    import torch

    p = torch.nn.Parameter(torch.full(shape, float("nan"), dtype=torch.float32), requires_grad=False)
    for k, v in attrs.items():
        setattr(p, k, v)
    if weight_loader is not None:
        p.weight_loader = weight_loader
    return p


def build_model(loaders: Loaders, hf: dict, name_or_path: str = ""):
    """A stub ``Qwen2ForCausalLM``/``Qwen3ForCausalLM`` for ``config.json`` ``hf``: the parameters SGLang's layers
    create (names, shapes, ``output_dim``/``input_dim``, each layer's real ``weight_loader``), NaN-filled; and
    ``calls``, where every loader call is counted per (parameter, shard id)."""
    family = hf["model_type"]
    d, heads, kv, inter, vocab = (hf[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                                  "intermediate_size", "vocab_size"))
    hd = hf.get("head_dim") or d // heads
    qkv_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
    calls: dict = {}

    def bound(fn, layer, name):
        method = types.MethodType(fn, layer)
        layer.weight_loader = method  # a fused loader calls itself back for weights fused on disk

        def counted(param, loaded_weight, *shard):
            key = (name, *shard)
            calls[key] = calls.get(key, 0) + 1
            return method(param, loaded_weight, *shard)

        return counted

    def layer(**attrs):
        return types.SimpleNamespace(tp_rank=0, tp_size=1, use_presharded_weights=False, **attrs)

    def vocab_param(name):
        padded = (vocab + VOCAB_PADDING - 1) // VOCAB_PADDING * VOCAB_PADDING
        emb = layer(shard_indices=types.SimpleNamespace(org_vocab_start_index=0, org_vocab_end_index=vocab),
                    org_vocab_size=vocab)
        return _param((padded, d), bound(loaders.vocab, emb, name), output_dim=0, input_dim=1)

    params = {"model.embed_tokens.weight": vocab_param("model.embed_tokens.weight"),
              "model.norm.weight": _param((d,))}
    for i in range(hf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = layer(num_heads=heads, num_kv_heads=kv, head_size=hd, total_num_heads=heads, total_num_kv_heads=kv,
                    num_kv_head_replicas=1)
        for suffix, shape in (("weight", ((heads + 2 * kv) * hd, d)), ("bias", ((heads + 2 * kv) * hd,))):
            if suffix == "weight" or qkv_bias:
                name = p + "self_attn.qkv_proj." + suffix
                params[name] = _param(shape, bound(loaders.qkv, qkv, name), output_dim=0,
                                      **({"input_dim": 1} if suffix == "weight" else {}))
        name = p + "self_attn.o_proj.weight"
        params[name] = _param((d, heads * hd), bound(loaders.row, layer(), name), output_dim=0, input_dim=1)
        if family == "qwen3":
            params[p + "self_attn.q_norm.weight"] = _param((hd,))
            params[p + "self_attn.k_norm.weight"] = _param((hd,))
        name = p + "mlp.gate_up_proj.weight"
        params[name] = _param((2 * inter, d), bound(loaders.merged, layer(output_sizes=[inter, inter]), name),
                              output_dim=0, input_dim=1)
        name = p + "mlp.down_proj.weight"
        params[name] = _param((d, inter), bound(loaders.row, layer(), name), output_dim=0, input_dim=1)
        params[p + "input_layernorm.weight"] = _param((d,))
        params[p + "post_attention_layernorm.weight"] = _param((d,))
    if not hf.get("tie_word_embeddings", False):  # tied: SGLang's lm_head is embed_tokens, one parameter
        params["lm_head.weight"] = vocab_param("lm_head.weight")

    model = types.SimpleNamespace(
        config=types.SimpleNamespace(tie_word_embeddings=hf.get("tie_word_embeddings", False),
                                     name_or_path=name_or_path),
        pp_group=types.SimpleNamespace(world_size=1, is_last_rank=True),
        model=types.SimpleNamespace(start_layer=0, end_layer=hf["num_hidden_layers"]),
        named_parameters=lambda: list(params.items()))
    return model, params, calls
