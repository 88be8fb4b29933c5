"""Checkpoints written before checkpoint I/O moved into ``tidar_jax.checkpoint`` still load and resume.

``tests/fixtures/run_v1`` (a 2-step run dir) and ``tests/fixtures/params_v1`` (its params as a params checkpoint)
were written by the code of commit 72e71ca (``tests/fixtures/make_v1_checkpoints.py``); ``run_v1_expected.npz``
holds their params as that code read them back.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_V1 = os.path.join(HERE, "fixtures", "run_v1")
PARAMS_V1 = os.path.join(HERE, "fixtures", "params_v1")
EXPECTED = os.path.join(HERE, "fixtures", "run_v1_expected.npz")


def _flat(state) -> dict:
    return {"/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))}


@pytest.mark.parametrize("path", [RUN_V1, os.path.join(RUN_V1, "checkpoints", "2"), PARAMS_V1])
def test_v1_checkpoint_loads_for_inference(path):
    from tidar_jax.loading import load_for_inference

    bundle = load_for_inference(path)
    expected = np.load(EXPECTED)
    got = _flat(bundle.params)
    assert sorted(got) == sorted(expected.files)
    for key in expected.files:
        assert np.array_equal(got[key], expected[key]), key
    assert (bundle.config.block_size, bundle.config.mask_token_id) == (4, 1)
    assert (bundle.step, bundle.eos_token_id) == (2, 0)
    assert bundle.tokenizer is not None and bundle.tokenizer.get_vocab_size() == 384
    nnx.merge(bundle.graphdef, bundle.params)  # a usable model


def test_v1_run_dir_resumes(train_corpus, tmp_path):
    from tidar_jax.train.config import load_config
    from tidar_jax.train.loop import train

    run_dir = str(tmp_path / "run")
    shutil.copytree(RUN_V1, run_dir)
    cfg = load_config(os.path.join(run_dir, "config.yaml"), [f"data.dir={train_corpus}", "train.steps=3"])
    result = train(cfg, run_dir, show_progress=False)
    assert result.resumed and (result.start_step, result.final_step) == (2, 3)
    assert np.isfinite(result.losses[0][1]) and [s for s, _ in result.losses] == [3]
