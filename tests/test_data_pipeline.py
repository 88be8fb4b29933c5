"""The grain training pipeline: window content, epochs, determinism, exact resume, process sharding, eval batches.

The data dirs here hold ``tokens = arange(n)``, so a window identifies itself: window i is ``[i*S, (i+1)*S)``.
"""

import json
import os

import numpy as np
import pytest

from tidar_jax.data import (DataError, TrainIterator, eval_batches, global_batch_from_processes, make_train_iterator,
                            prepare_corpus)
from tidar_jax.data.corpus import FORMAT_VERSION

S = 8
N_WINDOWS = 37  # prime: batches straddle epoch boundaries for every batch size used below


def _write_data_dir(path, n_train_tokens, n_eval_tokens=100, fingerprint="f" * 64):
    os.makedirs(path)
    np.arange(n_train_tokens, dtype=np.uint16).tofile(os.path.join(path, "train.bin"))
    (np.arange(n_eval_tokens, dtype=np.uint16) + 50000).tofile(os.path.join(path, "eval.bin"))
    manifest = {"format_version": FORMAT_VERSION, "fingerprint": fingerprint, "dtype": "uint16",
                "splits": {"train": {"file": "train.bin", "tokens": n_train_tokens},
                           "eval": {"file": "eval.bin", "tokens": n_eval_tokens}}}
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return str(path)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # 5 extra tokens: the tail shorter than S is never used.
    return _write_data_dir(tmp_path_factory.mktemp("d") / "data", N_WINDOWS * S + 5)


def _window_ids(tokens_NS):
    """Window index of every row, after checking each row is exactly that window's tokens."""
    tokens_NS = np.asarray(tokens_NS)
    ids = tokens_NS[:, 0] // S
    expected = ids[:, None] * S + np.arange(S)[None, :]
    assert np.array_equal(tokens_NS, expected), "row is not a whole, aligned window"
    return ids.tolist()


def _take(it, n):
    return [next(it)["tokens"] for _ in range(n)]


def test_batches_are_whole_windows_with_the_right_shape(data_dir):
    it = make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=0)
    assert isinstance(it, TrainIterator)
    batch = next(it)
    assert set(batch) == {"tokens"}
    assert batch["tokens"].shape == (4, S) and batch["tokens"].dtype == np.int32
    _window_ids(batch["tokens"])


def test_every_window_once_per_epoch_and_epochs_differ(data_dir):
    it = make_train_iterator(data_dir, seq_len=S, global_batch=5, seed=1)
    stream = [w for b in _take(it, (3 * N_WINDOWS) // 5 + 1) for w in _window_ids(b)]
    epochs = [stream[e * N_WINDOWS:(e + 1) * N_WINDOWS] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(N_WINDOWS))
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    assert epochs[0] != list(range(N_WINDOWS))  # actually shuffled


def test_deterministic_per_seed(data_dir):
    a = _take(make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=7), 12)
    b = _take(make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=7, prefetch=0), 12)
    c = _take(make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=8), 12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # Seeds s and s+1 must not be the same permutations shifted by one epoch (grain seeds epoch e with seed + e).
    s7 = [w for x in _take(make_train_iterator(data_dir, seq_len=S, global_batch=N_WINDOWS, seed=7), 2)
          for w in _window_ids(x)]
    s8 = [w for x in _take(make_train_iterator(data_dir, seq_len=S, global_batch=N_WINDOWS, seed=8), 1)
          for w in _window_ids(x)]
    assert s7[N_WINDOWS:] != s8


@pytest.mark.parametrize("k", [0, 1, 6, 9])
def test_state_restores_exactly_the_next_batch(data_dir, k):
    reference = _take(make_train_iterator(data_dir, seq_len=S, global_batch=6, seed=3), k + 5)
    it = make_train_iterator(data_dir, seq_len=S, global_batch=6, seed=3)
    _take(it, k)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, and survives a round trip
    resumed = make_train_iterator(data_dir, seq_len=S, global_batch=6, seed=3)
    _take(resumed, 2)  # a used iterator is repositioned, not just a fresh one
    resumed.set_state(state)
    for want, got in zip(reference[k:], _take(resumed, 5)):
        assert np.array_equal(want, got)


def test_resume_through_orbax_with_grain_checkpoint_args(data_dir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    reference = _take(make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=5), 7)
    it = make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=5)
    _take(it, 4)
    mngr = ocp.CheckpointManager(os.path.abspath(tmp_path / "ckpt"))
    mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    fresh = make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=5)
    mngr.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    mngr.close()
    for want, got in zip(reference[4:], _take(fresh, 3)):
        assert np.array_equal(want, got)


def test_state_from_another_pipeline_is_refused(data_dir):
    it = make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=0)
    next(it)
    other = make_train_iterator(data_dir, seq_len=S, global_batch=8, seed=0)
    with pytest.raises(DataError, match="global_batch: saved 4 vs now 8"):
        other.set_state(it.get_state())
    with pytest.raises(DataError, match="not a TrainIterator state"):
        other.set_state({"next_index": 3})


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_batches_concatenate_to_the_global_batch(data_dir, process_count):
    global_batch, steps = 8, 12
    single = _take(make_train_iterator(data_dir, seq_len=S, global_batch=global_batch, seed=2), steps)
    per_process = [_take(make_train_iterator(data_dir, seq_len=S, global_batch=global_batch, seed=2,
                                             process_index=p, process_count=process_count), steps)
                   for p in range(process_count)]
    first_epoch_rows = []
    for t in range(steps):
        local = [per_process[p][t] for p in range(process_count)]
        assert all(b.shape == (global_batch // process_count, S) for b in local)
        assert np.array_equal(global_batch_from_processes(local), single[t])
        first_epoch_rows += [w for b in local for w in _window_ids(b)]
    # No window is given to two processes (within an epoch).
    assert len(set(first_epoch_rows[:N_WINDOWS])) == N_WINDOWS


def test_sharded_iterator_resumes_per_process(data_dir):
    kw = dict(seq_len=S, global_batch=6, seed=4, process_index=1, process_count=3)
    reference = _take(make_train_iterator(data_dir, **kw), 8)
    it = make_train_iterator(data_dir, **kw)
    _take(it, 5)
    resumed = make_train_iterator(data_dir, **kw)
    resumed.set_state(it.get_state())
    assert all(np.array_equal(a, b) for a, b in zip(reference[5:], _take(resumed, 3)))


def test_eval_batches_are_consecutive_windows(data_dir):
    batches = eval_batches(data_dir, seq_len=S, batch_size=3, max_batches=10)
    assert len(batches) == 100 // S // 3 == 4  # 12 windows -> 4 full batches; the cap is not reached
    flat = np.concatenate(batches).reshape(-1)
    assert np.array_equal(flat, np.arange(len(flat)) + 50000)
    assert all(b.dtype == np.int32 and b.shape == (3, S) for b in batches)
    assert len(eval_batches(data_dir, seq_len=S, batch_size=3, max_batches=2)) == 2
    with pytest.raises(DataError, match="fewer than batch_size=13"):
        eval_batches(data_dir, seq_len=S, batch_size=13)


def test_bad_arguments(data_dir, tmp_path):
    with pytest.raises(DataError, match="divisible by process_count=3"):
        make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=0, process_count=3)
    with pytest.raises(DataError, match="process_index=2"):
        make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=0, process_index=2, process_count=2)
    with pytest.raises(DataError, match="fewer than seq_len=1000"):
        make_train_iterator(data_dir, seq_len=1000, global_batch=4, seed=0)
    with pytest.raises(DataError, match="split='test'"):
        make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=0, split="test")
    with pytest.raises(DataError, match="no manifest.json"):
        make_train_iterator(str(tmp_path), seq_len=S, global_batch=4, seed=0)


def test_pipeline_on_a_real_prepared_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x * {j}\n" for j in range(30)))
    m = prepare_corpus(tmp_path / "data", sources=[str(src)], vocab_size=300, heldout_fraction=0.2)
    it = make_train_iterator(tmp_path / "data", seq_len=16, global_batch=4, seed=0)
    tokens = np.concatenate([np.fromfile(tmp_path / "data" / s["file"], dtype=m["dtype"])
                             for s in m["splits"]["train"]["shards"]]).astype(np.int32)
    windows = {tuple(tokens[i * 16:(i + 1) * 16]) for i in range(len(tokens) // 16)}
    for tokens_NS in _take(it, 5):
        assert all(tuple(row) in windows for row in tokens_NS)
        assert tokens_NS.max() < m["vocab_size"]
    assert eval_batches(tmp_path / "data", seq_len=16, batch_size=2, max_batches=1)[0].shape == (2, 16)


@pytest.mark.slow
def test_worker_processes_keep_the_order_and_resume(data_dir):
    reference = _take(make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=9), 10)
    it = make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=9, worker_count=2)
    got = _take(it, 6)
    state = it.get_state()
    resumed = make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=9, worker_count=2)
    resumed.set_state(state)
    got += _take(resumed, 4)
    assert all(np.array_equal(a, b) for a, b in zip(reference, got))


_KILL_WORKER = r"""
import json, os, sys, time
import numpy as np
from tidar_jax.data import make_train_iterator
data_dir, journal, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
it = make_train_iterator(data_dir, seq_len=8, global_batch=4, seed=11, prefetch=2)
consumed = []
if os.path.exists(journal):
    with open(journal) as f:
        saved = json.load(f)
    consumed = saved["consumed"]
    it.set_state(saved["state"])
print("ready", flush=True)
while len(consumed) < total:
    consumed.append(next(it)["tokens"][:, 0].tolist())
    tmp = journal + ".tmp"
    with open(tmp, "w") as f:  # batch log and iterator state are committed together, like a checkpoint
        json.dump({"consumed": consumed, "state": it.get_state()}, f)
    os.replace(tmp, journal)
    time.sleep(0.02)
"""


def test_kill_9_and_resume_skips_and_repeats_nothing(data_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    total = 60
    reference = [b[:, 0].tolist() for b in _take(make_train_iterator(data_dir, seq_len=S, global_batch=4, seed=11),
                                                 total)]
    script, journal = tmp_path / "worker.py", tmp_path / "journal.json"
    script.write_text(_KILL_WORKER)
    cmd = [sys.executable, str(script), data_dir, str(journal), str(total)]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 60
    while not journal.exists() or len(json.loads(journal.read_text())["consumed"]) < 10:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(json.loads(journal.read_text())["consumed"])
    assert 10 <= killed_at < total
    subprocess.run(cmd, env=env, check=True, timeout=120, stdout=subprocess.DEVNULL)
    assert json.loads(journal.read_text())["consumed"] == reference
