"""Export target ``sglang-tidar``: the directory the authors' SGLang TiDAR server loads (``Jingyu6/sglang``,
``tidar_sglang/``), and the one-line refusals for models it cannot serve.

What that server reads, as found in its code (files and commits in docs/hf.md):

- ``config.json`` ``architectures[0]`` picks the model class: ``TiDARSmallForCausalLM`` (a plain subclass of
  SGLang's ``Qwen2ForCausalLM``) or ``TiDARForCausalLM`` (of ``Qwen3ForCausalLM``); a name starting with ``TiDAR``
  also switches the speculative algorithm to ``TIDAR`` (``server_args.py``). There is no Llama class.
- weights: the Qwen loaders' Hugging Face names, the plain export's (``tidar_jax.hf.keys``); ``lm_head.weight`` is
  skipped when ``tie_word_embeddings`` is set, so a tied model is written without it, as the plain export does.
- the mask token is hard-coded in the worker: id 151662 (``<|fim_pad|>`` in the Qwen vocabulary); the block size is
  the server argument ``--speculative-tidar-b`` (default 16), not a config field, so the export prints it and puts
  it first in its README.
- ``generation_config.json`` gives the server's default sampling settings, and the worker accepts drafts at that
  temperature: the export requires the source model's (``tidar_jax.hf.serving``).
- its ``config.json`` most likely goes through transformers 4.x ``AutoConfig`` (SGLang of that period; the fork's
  pin is not visible), which reads ``rope_theta`` and ``torch_dtype`` at top level and ignores the transformers-5
  ``rope_parameters``; both layouts are written, and transformers 4.57.1 was checked to read them (docs/hf.md).
"""

from __future__ import annotations

import os

from tidar_jax.config import QWEN_MASK_TOKEN_ID, ModelConfig
from tidar_jax.hf.keys import HFFormatError

TARGET = "sglang-tidar"
# family -> the class the server's model registry resolves (tidar_small.py, tidar.py)
ARCHITECTURES = {"qwen2": "TiDARSmallForCausalLM", "qwen3": "TiDARForCausalLM"}
SERVER_MASK_TOKEN_ID = QWEN_MASK_TOKEN_ID  # tidar_worker.py: self.mask_token_id = 151662
DEFAULT_SERVER_BLOCK_SIZE = 16  # server_args.py: speculative_tidar_b: int = 16
# two fixed ids of the Qwen2/Qwen2.5/Qwen3 tokenizers: the mask token the worker feeds, and the end-of-text token
QWEN_VOCAB_ANCHORS = {151643: "<|endoftext|>", QWEN_MASK_TOKEN_ID: "<|fim_pad|>"}
DEFAULT_DTYPE = "bfloat16"  # what the authors' Qwen checkpoints (and the server's CUDA graphs) run in
README = "README.md"
# settings the authors' README says their implementation requires (batch 1, no overlap, no radix cache, no chunked
# prefill) and the CUDA-graph batch size their configs use
SERVER_FLAGS = ("--max-running-requests 1", "--disable-overlap-schedule", "--disable-radix-cache",
                "--chunked-prefill-size -1", "--cuda-graph-max-bs 1")


def check_servable(config: ModelConfig, tokenizer) -> None:
    """Raise ``HFFormatError`` (one line) when the server cannot serve this model as trained."""
    if config.family not in ARCHITECTURES:
        raise HFFormatError(f"--for {TARGET}: the server has TiDAR classes for the Qwen2 and Qwen3 families only "
                            f"(TiDARSmallForCausalLM, TiDARForCausalLM); this model is family {config.family!r}")
    if config.mask_token_id != SERVER_MASK_TOKEN_ID:
        raise HFFormatError(f"--for {TARGET}: mask token id {config.mask_token_id}: the server's worker hard-codes "
                            f"{SERVER_MASK_TOKEN_ID} (<|fim_pad|>), so the model must be trained with that mask token")
    if tokenizer is None:
        raise HFFormatError(f"--for {TARGET}: the checkpoint has no tokenizer; the server loads it from the model "
                            "directory, and it shows whether the vocabulary is Qwen's")
    for tid, name in QWEN_VOCAB_ANCHORS.items():
        found = tokenizer.id_to_token(tid)
        if found != name:
            raise HFFormatError(f"--for {TARGET}: the vocabulary is not Qwen's (token {tid} is {found!r}, not "
                                f"{name!r}); the server feeds id {SERVER_MASK_TOKEN_ID} as the mask token")
    if config.block_size is None:
        raise HFFormatError(f"--for {TARGET}: the checkpoint records no trained block size (an AR-only model); "
                            "the server drafts blocks of --speculative-tidar-b tokens with the TiDAR mask")


def config_overrides(config: ModelConfig, dtype: str) -> dict:
    """``config.json`` keys beside the plain export's: the TiDAR class, and the transformers-4 fields."""
    return {"architectures": [ARCHITECTURES[config.family]], "rope_theta": config.rope_theta, "torch_dtype": dtype}


def server_command(out_dir: str, config: ModelConfig) -> str:
    name = os.path.basename(os.path.normpath(out_dir))
    flags = [f"--model-path {out_dir}", f"--served-model-name {name}",
             f"--speculative-tidar-b {config.block_size}", *SERVER_FLAGS]
    return "python -m sglang.launch_server \\\n    " + " \\\n    ".join(flags)


def check_generation_config(record: dict | None) -> None:
    """The server takes its default sampling settings from ``generation_config.json``, and its worker uses the
    temperature in its acceptance test: without the source model's file it would sample at 1.0."""
    if not (record or {}).get("generation_config"):
        raise HFFormatError(f"--for {TARGET}: the checkpoint carries no generation_config.json from its source model "
                            "(the server would sample at temperature 1.0, and its worker accepts drafts by it); pass "
                            "--generation-config FILE")


def block_size_notice(block_size: int | None, out_dir: str | None) -> str:
    """The line the export command prints: the block size the server must be given (``out_dir``: a server export,
    whose README has the command; None: a plain export)."""
    if block_size is None:
        return "no trained block size (an AR model): config.json block_size is null"
    if out_dir is None:
        return (f"trained block size {block_size} (config.json block_size): a TiDAR server must be given it, e.g. "
                f"--speculative-tidar-b {block_size}")
    risk = "" if block_size == DEFAULT_SERVER_BLOCK_SIZE else \
        f"; without it the server drafts {DEFAULT_SERVER_BLOCK_SIZE} and serves this model wrongly"
    return (f"trained block size {block_size}: start the server with --speculative-tidar-b {block_size}{risk} "
            f"(config.json block_size; the full command is in {os.path.join(out_dir, README)})")


def _generation_line(fields: dict) -> str:
    gen = fields.get("generation_config") or {}
    settings = ", ".join(f"{k} {gen[k]}" for k in ("temperature", "top_p", "top_k", "min_p") if k in gen)
    return (f"generation_config.json ({settings or 'no sampling defaults'}): the server's default sampling "
            "settings, and the worker accepts drafts at that temperature")


def readme(out_dir: str, config: ModelConfig, dtype: str, source: str, fields: dict) -> str:
    """The README written into the export: the block size first, what the directory carries, the server command."""
    arch = ARCHITECTURES[config.family]
    eos = fields.get("eos_token_id")
    eos_line = (f"EOS token id(s) {eos} (config.json and generation_config.json; the server stops on them)."
                if eos is not None else "No EOS token id was recorded: the server stops only at max_new_tokens.")
    template = ("chat template in tokenizer_config.json: `/v1/chat/completions` works"
                if fields.get("chat_template") is not None else
                "no chat template (none was carried or given): use `/v1/completions`, or pass `--chat-template` "
                "to the server")
    context = fields.get("max_position_embeddings")
    context_line = (f"context length {context} (max_position_embeddings, from the source model)" if context else
                    "context length: the family default (no source model recorded one)")
    default = "" if config.block_size == DEFAULT_SERVER_BLOCK_SIZE else \
        f" The server's default is {DEFAULT_SERVER_BLOCK_SIZE}: left out, it would serve this model wrongly."
    return f"""# TiDAR model for the authors' SGLang TiDAR server

> **Block size {config.block_size}: start the server with `--speculative-tidar-b {config.block_size}`.**{default}
> (`config.json` records it as `block_size`; the server reads no config field for it.)

Exported by tidar_jax (`python -m tidar_jax.convert export-hf ... --for {TARGET}`) from `{source}`.

- architecture `{arch}` (family {config.family}); {config.num_layers} layers, hidden size {config.hidden_size}
- trained block size **{config.block_size}**: pass it as `--speculative-tidar-b`
- mask token id {config.mask_token_id} (`<|fim_pad|>`, the id the server's worker hard-codes)
- weights in {dtype}; {'tied' if config.tie_embeddings else 'untied'} LM head
- {eos_line}
- {_generation_line(fields)}
- {template}
- {context_line}

Serve it with the SGLang fork at https://github.com/Jingyu6/sglang (`cd tidar_sglang && pip install -e python`),
on one CUDA GPU:

```bash
{server_command(os.path.abspath(out_dir), config)}
```

The architecture name switches on the TiDAR algorithm (`--speculative-algorithm TIDAR` is implied). The worker
serves batch size 1 only, with a page size of 1. `--speculative-tidar-b` must equal the block size above: the model
drafts exactly as many masked positions as it was trained to fill.
"""
