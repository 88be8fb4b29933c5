"""The training loop end to end: kill -9 + resume is bitwise exact, corrupt checkpoints fall back, restore onto
another mesh, TensorBoard events, inference loading, NaN stop.

One in-process reference run (8 fake devices, 12 steps, checkpoints every 4) is shared by the tests; the kill -9
test runs ``train.py`` twice as a subprocess with the same config and compares its final params bit for bit.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tidar_jax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12


def _overrides(train_corpus):
    return [f"data.dir={train_corpus}", "data.vocab_size=384", "model.vocab_size=384", "model.hidden_size=32",
            "model.num_layers=1", "model.mlp_size=64", "model.num_heads=4", "model.num_kv_heads=2",
            "data.seq_len=16", "data.global_batch=8", "data.eval_batch_size=8", "data.eval_batches=1",
            "checkpoint.every=4", "checkpoint.keep=5", "logging.every=1", f"logging.eval_every={STEPS}",
            "logging.decode_probe_prompts=0", "mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1",
            f"train.steps={STEPS}", "optim.warmup_frac=0.1"]


@pytest.fixture(scope="module")
def reference(train_corpus, tmp_path_factory):
    from tidar_jax.train.loop import train

    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"), _overrides(train_corpus))
    result = train(cfg, run_dir, show_progress=False)
    return cfg, run_dir, result


def _params_of(run_dir, step=None):
    """Host copies of the params of a checkpoint (independent loader: a plain orbax restore of the state item)."""
    import orbax.checkpoint as ocp

    ckdir = os.path.join(run_dir, "checkpoints")
    step = step if step is not None else max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    path = os.path.join(ckdir, str(step), "state")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.PyTreeCheckpointer() as c:
        meta = c.metadata(path)
        meta = meta.item_metadata
        meta = getattr(meta, "tree", meta)["params"]
        target = {"params": jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)}
        tree = c.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return _flat(tree)


def _flat(tree):
    """``{"[params][layers][0][attn][q_proj]": array}`` (int and str dict keys print the same)."""
    return {jax.tree_util.keystr(k).replace("'", ""): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def test_reference_run_checkpoints_and_learns(reference):
    cfg, run_dir, result = reference
    assert result.final_step == STEPS and not result.resumed
    assert sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit()) == [4, 8, 12]
    for name in ("config.yaml", "model_config.json", "tokenizer.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    assert load_config(os.path.join(run_dir, "config.yaml")) == cfg  # the resolved config round-trips
    losses = [loss for _, loss in result.losses]
    assert [s for s, _ in result.losses] == list(range(1, STEPS + 1))
    assert np.mean(losses[-3:]) < losses[0]


def test_tensorboard_events_are_readable(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, result = reference
    ea = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    expected = {"train/loss", "train/ar_loss", "train/diff_loss", "train/ar_acc", "train/diff_acc", "train/lr",
                "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s", "eval/ar_loss", "eval/diff_loss",
                "eval/unigram_entropy"}
    assert expected <= tags, expected - tags
    logged = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in logged], [v for _, v in result.losses], rtol=1e-6)


def _train_cmd(train_corpus, run_dir):
    return [sys.executable, os.path.join(REPO, "train.py"), "--no-phases", "--config",
            os.path.join(REPO, "configs", "tiny.yaml"), "--run-dir", run_dir, *_overrides(train_corpus)]


@pytest.mark.slow  # two train.py subprocesses: ~40 s on an idle 2-core machine, minutes when it is busy
def test_kill9_then_rerun_is_bitwise_equal_to_uninterrupted(reference, train_corpus, tmp_path):
    _, ref_dir, ref_result = reference
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, TIDAR_TRAIN_STEP_SLEEP="0.3", PYTHONPATH=REPO)
    proc = subprocess.Popen(_train_cmd(train_corpus, run_dir), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    first = os.path.join(run_dir, "checkpoints", "4")
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.45)  # land somewhere in steps 5-6: after checkpoint 4, before checkpoint 8
    os.kill(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    done = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert done and max(done) < STEPS, done

    env.pop("TIDAR_TRAIN_STEP_SLEEP")
    rerun = subprocess.run(_train_cmd(train_corpus, run_dir), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    assert f"resumed at {max(done)}" in rerun.stdout
    # the resumed steps saw exactly the batches of the uninterrupted run (same per-step losses)
    lines = [ln for ln in rerun.stdout.splitlines() if ln.startswith("step ")]
    resumed = {int(ln.split()[1].split("/")[0]): float(ln.split()[3]) for ln in lines}
    assert sorted(resumed) == list(range(max(done) + 1, STEPS + 1))
    ref = dict(ref_result.losses)
    for step, loss in resumed.items():
        assert loss == pytest.approx(ref[step], abs=6e-5), step
    a, b = _params_of(ref_dir), _params_of(run_dir)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _corrupt(step_dir):
    """Overwrite every file of the state item with garbage of the same size."""
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for name in files:
            path = os.path.join(root, name)
            size = os.path.getsize(path)
            with open(path, "wb") as f:
                f.write(b"\x00garbage" * (size // 8 + 1))


def test_corrupt_latest_checkpoint_falls_back_with_warning(reference, tmp_path):
    from tidar_jax.checkpoint import run as ck
    from tidar_jax.train.step import abstract_train_state, make_step_fns
    from tidar_jax.model.functional import abstract_model
    from tidar_jax.sharding import make_mesh

    from tidar_jax.checkpoint.metadata import read_model_config

    cfg, ref_dir, _ = reference
    run_dir = str(tmp_path / "run")
    shutil.copytree(ref_dir, run_dir)
    _corrupt(os.path.join(run_dir, "checkpoints", "12"))
    mcfg = read_model_config(run_dir)
    graphdef, abstract = abstract_model(mcfg)
    mesh = make_mesh(8, 1, 1)
    fns = make_step_fns(graphdef, mcfg, abstract, mesh, cfg.optim, STEPS)
    ckpts = ck.RunCheckpoints(run_dir, keep=5)
    with pytest.warns(ck.CheckpointFallbackWarning, match="checkpoints/12"):
        step, state, meta = ckpts.restore_latest(abstract_train_state(fns.tx, fns.template, fns.state_shardings))
    ckpts.close()
    assert step == 8 and meta["step"] == 8 and int(state["step"]) == 8
    expected = _params_of(ref_dir, 8)
    got = _flat({"params": state["params"]})
    assert got
    for key, value in got.items():
        np.testing.assert_array_equal(value, expected[key], err_msg=key)
    # inference loading falls back the same way
    with pytest.warns(ck.CheckpointFallbackWarning):
        bundle = ck.load_run(run_dir)
    assert bundle.step == 8


def test_restore_onto_a_different_mesh_shape(reference):
    from flax import nnx

    from tidar_jax.sharding import make_mesh
    from tidar_jax.checkpoint import run as ck

    _, run_dir, _ = reference
    expected = _params_of(run_dir, STEPS)
    for shape in ((1, 4, 2), (8, 1, 1)):
        mesh = make_mesh(*shape)
        bundle = ck.load_run(run_dir, mesh=mesh)
        assert bundle.step == STEPS and bundle.config.block_size == 4 and bundle.tokenizer is not None
        pure = nnx.to_pure_dict(bundle.params)
        leaves = jax.tree_util.tree_leaves_with_path({"params": pure})
        assert any(leaf.sharding.mesh.devices.shape == shape for _, leaf in leaves)
        got = _flat({"params": pure})
        assert got
        for key, value in got.items():
            np.testing.assert_array_equal(value, expected[key], err_msg=key)
    # one device, no mesh
    bundle = ck.load_run(os.path.join(run_dir, "checkpoints", "8"))
    assert bundle.step == 8
    got = _flat({"params": nnx.to_pure_dict(bundle.params)})
    exp8 = _params_of(run_dir, 8)
    for key, value in got.items():
        np.testing.assert_array_equal(value, exp8[key])


@pytest.mark.slow  # a third compile of the train step; restore onto other meshes is covered above by default
def test_resume_on_a_different_mesh_continues_training(reference, tmp_path):
    """A full train-state restore (params + Adam moments) onto mesh (1,2,4) and two more steps."""
    from tidar_jax.train.loop import train

    cfg, ref_dir, ref_result = reference
    run_dir = str(tmp_path / "run")
    shutil.copytree(ref_dir, run_dir)
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "12"))
    more = cfg.replace(**{"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 4, "train.steps": STEPS})
    result = train(more, run_dir, show_progress=False)
    assert result.resumed and result.start_step == 8 and result.final_step == STEPS
    ref = dict(ref_result.losses)
    for step, loss in result.losses:
        assert loss == pytest.approx(ref[step], rel=1e-4)


def test_nan_loss_stops_with_last_good_checkpoint(train_corpus, tmp_path):
    from tidar_jax.train.loop import TrainingDiverged, train

    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      _overrides(train_corpus) + ["optim.lr=1e30", "optim.min_lr=1e30", "optim.warmup_frac=0",
                                              "optim.clip_norm=null", "checkpoint.every=1", "train.steps=6",
                                              "mesh.data=1", "mesh.fsdp=1", "mesh.tensor=8"])
    run_dir = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match="non-finite loss at step") as info:
        train(cfg, run_dir, show_progress=False)
    good = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert good and f"step {good[-1]}" in str(info.value)
    params = _params_of(run_dir, good[-1])
    assert all(np.isfinite(v).all() for v in params.values())


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two jax.distributed processes (gloo) that each compile the step: ~1 min idle, more when busy
def test_two_processes_match_one_process_with_eight_devices(reference, train_corpus, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed on localhost) == 1 process x 8 devices: same per-step losses,
    and the final params agree."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, ref_dir, ref_result = reference
    run_dir = str(tmp_path / "run")
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
                   XLA_FLAGS="--xla_force_host_platform_device_count=4",
                   TIDAR_COORDINATOR=f"127.0.0.1:{port}", TIDAR_NUM_PROCESSES="2", TIDAR_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(_train_cmd(train_corpus, run_dir) + ["distributed.initialization_timeout=120"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=480)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outs[0] and "run finished" in outs[0]
    assert "run finished" not in outs[1]  # only process 0 prints and logs
    ea = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    got = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert [s for s, _ in got] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([v for _, v in got], [v for _, v in ref_result.losses], rtol=2e-5)
    a, b = _params_of(ref_dir), _params_of(run_dir)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=key)


@pytest.mark.slow  # one train.py subprocess
def test_sigterm_saves_a_checkpoint_and_exits(train_corpus, tmp_path):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, TIDAR_TRAIN_STEP_SLEEP="0.3", PYTHONPATH=REPO)
    proc = subprocess.Popen(_train_cmd(train_corpus, run_dir) + ["checkpoint.every=100"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tb = os.path.join(run_dir, "tb")  # created just before the loop installs its signal handlers
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (os.path.isdir(tb) and os.listdir(tb)):
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps in
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "SIGTERM received: saved a checkpoint at step" in err
    saved = sorted(int(d) for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < STEPS


def test_init_from_params_checkpoint_starts_from_those_weights(reference, train_corpus, tmp_path):
    """``model.init_from`` = a params checkpoint: the first step's loss is the loss of those weights on batch 0."""
    from tidar_jax.data import make_train_iterator
    from tidar_jax.checkpoint.params import save_params
    from tidar_jax.checkpoint import run as ck
    from tidar_jax.train.loop import train
    from tidar_jax.train.step import make_loss_fn

    cfg, ref_dir, _ = reference
    bundle = ck.load_run(ref_dir)
    params_dir = save_params(str(tmp_path / "params"), bundle.config, bundle.params,
                             tokenizer_path=os.path.join(ref_dir, "tokenizer.json"))
    fresh = cfg.replace(**{"model.init_from": params_dir, "train.steps": 1, "data.eval_batches": 0})
    result = train(fresh, str(tmp_path / "run"), show_progress=False)
    # a new run packs documents (data.packing: null -> documents), starting on block boundaries
    batch0 = next(make_train_iterator(train_corpus, cfg.data.seq_len, cfg.data.global_batch, cfg.train.seed,
                                      packing="documents", block_size=bundle.config.block_size))
    from flax import nnx

    loss, _ = make_loss_fn(bundle.graphdef, bundle.params, bundle.config)(nnx.to_pure_dict(bundle.params),
                                                                          batch0["tokens"], batch0["segment_ids"])
    assert result.losses[0][1] == pytest.approx(float(loss), rel=1e-5)
