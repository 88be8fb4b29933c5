"""Draft data from the verifier's own words: the AR model's greedy continuations, as a prepared corpus dir.

In lossless decoding a draft counts only when it equals the AR head's greedy token *given the AR model's own
earlier output*. A small AR model's greedy continuations are not like its training text (at the main job's size
they fall into short loops such as ``_get_get_get``), so a drafter trained on real text alone does not predict
them: the levers study (docs/studies/recipe_levers.md) measured slot 2 of B=4 accepted 6% of the time on the
model's loops while 18% of the time on real text. The paper's successors and speculative decoding in general
(Medusa-2, EAGLE) train the drafter on the target model's own generations; this module makes that data for the
TiDAR phase of the recipe:

* prompts: the first ``prompt_tokens`` tokens of train-split documents (the demo's and decode's prompts are the
  starts of held-out documents), then windows at seeded random offsets when more rows are asked for;
* each row: the prompt and the init model's greedy AR continuation, ``seq_len - block_size`` tokens in all, so
  that a row plus its eos fills exactly one packed window (``tidar_jax.data.packing``): the drafter sees every
  generated token in the context the verifier produced it in. Token ids are written as generated (re-tokenizing
  the decoded text changes some rows: 16 of 512 at the main job's size);
* the dir is an ordinary prepared corpus (train split = the rows; eval split and tokenizer copied from the
  source corpus), built under a temporary name and renamed into place, so a crash leaves nothing half-written
  and a rerun with the same settings reuses it.

``tidar_jax.train.loop`` mixes it with the real corpus at ``data.selfgen_weight`` (``data.selfgen_rows > 0``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np

from tidar_jax.checkpoint.atomic import publish_dir

SELFGEN_DIR = "selfgen"
GENERATE_BATCH = 64


def selfgen_settings(init_from: str, rows: int, prompt_tokens: int, seq_len: int, block_size: int,
                     seed: int) -> dict:
    return {"init_from": os.path.abspath(init_from), "rows": rows, "prompt_tokens": prompt_tokens,
            "row_tokens": seq_len - block_size, "seed": seed}


def _fingerprint(settings: dict, source_fingerprint: str, init_meta: bytes) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    h.update(source_fingerprint.encode())
    h.update(init_meta)
    return h.hexdigest()


def _init_identity(init_from: str) -> bytes:
    """What pins the init model's weights: its newest checkpoint's path and orbax metadata (which records when it was
    saved, so a retrained AR run gives new data), or the path of a params/HF checkpoint."""
    from tidar_jax.checkpoint.run import run_and_steps

    try:
        _, steps = run_and_steps(init_from)
    except FileNotFoundError:
        return os.path.abspath(init_from).encode()
    stamp = os.path.join(steps[0], "_CHECKPOINT_METADATA")
    saved = b""
    if os.path.isfile(stamp):
        with open(stamp, "rb") as f:
            saved = f.read()
    return steps[0].encode() + saved


def train_prompts(data_dir: str, manifest: dict, count: int, prompt_tokens: int, seed: int) -> list[list[int]]:
    """Document starts of the train split (in order), then seeded random windows to reach ``count``."""
    from tidar_jax.data.shards import TokenStream, document_spans, split_parts

    stream = TokenStream(split_parts(data_dir, manifest, "train"), manifest.get("dtype", "uint16"))
    spans = document_spans(data_dir, manifest, "train")
    prompts = [stream.read(int(off), int(off) + prompt_tokens).tolist()
               for off, length in spans if length >= prompt_tokens][:count]
    rng = np.random.default_rng(seed)
    while len(prompts) < count:
        off = int(rng.integers(0, stream.num_tokens - prompt_tokens))
        prompts.append(stream.read(off, off + prompt_tokens).tolist())
    return prompts


def build_selfgen(init_from: str, data_dir: str, out_dir: str, rows: int, prompt_tokens: int, seq_len: int,
                  block_size: int, seed: int = 0, log=print) -> str:
    """Make (or reuse) the self-generated corpus in ``out_dir``; returns ``out_dir``."""
    from tidar_jax.data import load_manifest
    from tidar_jax.data.shards import SplitWriter

    manifest = load_manifest(data_dir)
    settings = selfgen_settings(init_from, rows, prompt_tokens, seq_len, block_size, seed)
    fingerprint = _fingerprint(settings, manifest["fingerprint"], _init_identity(init_from))
    existing = os.path.join(out_dir, "manifest.json")
    if os.path.isfile(existing):
        with open(existing) as f:
            if json.load(f).get("fingerprint") == fingerprint:
                return out_dir
        shutil.rmtree(out_dir)  # made from another model or with other settings: make it again

    import time

    from tidar_jax.decode import Decoder
    from tidar_jax.loading import load_for_inference

    t0 = time.perf_counter()
    decoder = Decoder.from_bundle(load_for_inference(init_from))
    new_tokens = settings["row_tokens"] - prompt_tokens
    prompts = train_prompts(data_dir, manifest, rows, prompt_tokens, seed)
    tmp = out_dir + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    writer = SplitWriter(tmp, "train", np.dtype(manifest["dtype"]), int(manifest["eos_token_id"]), 1 << 28)
    for i in range(0, rows, GENERATE_BATCH):
        batch = prompts[i:i + GENERATE_BATCH]
        res = decoder.generate(batch, mode="ar", max_new_tokens=new_tokens, eos_token_id=None)
        for prompt, tokens in zip(batch, res.tokens):
            writer.add(np.asarray(prompt + list(tokens), dtype=manifest["dtype"]))
    writer.close()
    for name in ("tokenizer.json",) + tuple(f for s in manifest["splits"]["eval"].get("shards", [])
                                             for f in (s["file"], s["docs_file"])):
        shutil.copy(os.path.join(data_dir, name), tmp)
    train = {**writer.info(), "files": 0, "bytes": 0}
    out_manifest = {k: manifest[k] for k in ("format", "format_version", "tokenizer", "vocab_size", "eos_token_id",
                                             "mask_token_id", "dtype") if k in manifest}
    out_manifest.update(fingerprint=fingerprint, corpus_fingerprint=fingerprint, selfgen=settings,
                        source_fingerprint=manifest["fingerprint"],
                        splits={"train": train, "eval": manifest["splits"]["eval"]})
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(out_manifest, f, indent=1)
    if not publish_dir(tmp, out_dir):
        raise OSError(f"{out_dir}: not empty")
    log(f"self-generated draft data: {rows} rows of {prompt_tokens} prompt + {new_tokens} greedy AR tokens from "
        f"{init_from} in {out_dir} ({time.perf_counter() - t0:.1f} s)")
    return out_dir
