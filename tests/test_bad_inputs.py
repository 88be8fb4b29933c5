"""Bad input, tried as a new user would, on every command line: one ``error:`` line naming the value and what is
allowed, a non-zero exit, no traceback, and nothing half-written (complements tests/test_output_paths.py)."""

import os
import sys

import pytest

from tidar_jax.output_paths import OutputPathError, check_output_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # train.py, decode.py
TINY = os.path.join(REPO, "configs", "tiny.yaml")


def one_line_exit(capsys, fn, argv, needle):
    with pytest.raises(SystemExit) as info:
        fn(argv)
    message = str(info.value.code)
    assert info.value.code not in (0, None) and needle in message and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err
    return message


@pytest.fixture(scope="module")
def params_checkpoint(tmp_path_factory):
    import jax
    import jax.numpy as jnp

    from tidar_jax.checkpoint.params import save_params
    from tidar_jax.config import ModelConfig
    from tidar_jax.model.functional import abstract_model

    cfg = ModelConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_size=16,
                      mask_token_id=63, qkv_bias=True, family="qwen2")
    state = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype), abstract_model(cfg)[1])  # values unused
    return save_params(str(tmp_path_factory.mktemp("bad_inputs") / "ck"), cfg, state)


def test_argument_errors_are_one_line(capsys):
    import decode
    import train
    from tidar_jax.convert import main as convert_main
    from tidar_jax.data.merge import main as merge_main
    from tidar_jax.data.prepare import main as prepare_main
    from tidar_jax.demo import main as demo_main

    one_line_exit(capsys, convert_main, ["export-hf", "a", "b", "--for", "vllm"],
                  "error: argument --for: invalid choice: 'vllm' (choose from 'sglang-tidar')")
    one_line_exit(capsys, convert_main, ["import-hf", "a", "b", "--dtype", "fp8"], "argument --dtype: invalid choice")
    one_line_exit(capsys, convert_main, ["export"], "invalid choice: 'export'")
    one_line_exit(capsys, decode.main, ["--checkpoint", "x", "--max-new-tokens", "many"],
                  "argument --max-new-tokens: invalid int value: 'many'")
    one_line_exit(capsys, train.main, ["--run-dir", "r", "--steps", "ten"], "argument --steps: invalid int value")
    one_line_exit(capsys, prepare_main, ["--out", "o", "--vocab-size", "big"], "argument --vocab-size")
    one_line_exit(capsys, prepare_main, [], "the following arguments are required: --out")
    one_line_exit(capsys, merge_main, [], "error: ")
    one_line_exit(capsys, demo_main, ["--prompts", "four"], "argument --prompts: invalid int value: 'four'")


def test_train_data_dir_that_is_a_file(tmp_path, capsys):
    """The case that used to say the directory "was filled by another process with a different corpus"."""
    import train

    f = tmp_path / "corpus.txt"
    f.write_text("not a corpus dir")
    for extra in ([], ["data.prepare=false"]):
        run = tmp_path / "run"
        message = one_line_exit(capsys, train.main, ["--run-dir", str(run), "--config", TINY, f"data.dir={f}", *extra],
                                f"data.dir='{f}': is a file, not a directory")
        assert "another process" not in message and not run.exists()
    one_line_exit(capsys, train.main, ["--run-dir", str(tmp_path / "run"), "--config", TINY,
                                       f"data.dir={f / 'corpus'}"], f"lies under {f}, which is a file")
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]  # no run dir, no .partial corpus beside it


def test_truncated_token_file_stops_train_and_leaves_no_run_dir(train_corpus, tmp_path, capsys):
    """A damaged prepared corpus (a token file shorter than its manifest says) stops train.py with one line, and the
    new run dir (with the recipe's ``phases/``) is not left behind."""
    import shutil

    import train

    data = tmp_path / "data"
    shutil.copytree(train_corpus, data)
    token_file = next(p for p in sorted(data.iterdir()) if p.name.startswith("train-") and p.suffix == ".bin")
    with open(token_file, "r+b") as f:
        f.truncate(1000)
    run = tmp_path / "runs" / "new"
    one_line_exit(capsys, train.main, ["--run-dir", str(run), "--config", TINY, f"data.dir={data}"],
                  "the data dir is damaged")
    assert not (tmp_path / "runs").exists()


def test_prepare_corpus_checks_its_location_before_reading(tmp_path):
    from tidar_jax.data import DataError, prepare_corpus

    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(DataError, match=f"^out_dir {f}: is a file, not a directory$"):
        prepare_corpus(f, sources=[str(tmp_path / "does-not-exist")])  # the location is checked first
    with pytest.raises(DataError, match="lies under"):
        prepare_corpus(f / "sub", sources=[str(tmp_path / "does-not-exist")])
    assert os.listdir(tmp_path) == ["f"]


def test_damaged_checkpoint_is_one_line(params_checkpoint, tmp_path, capsys):
    import shutil

    import decode
    from tidar_jax.convert import main as convert_main

    bad_json = tmp_path / "bad_json"
    shutil.copytree(params_checkpoint, bad_json)
    (bad_json / "model_config.json").write_text("{broken")
    bad_params = tmp_path / "bad_params"
    shutil.copytree(params_checkpoint, bad_params)
    for sub in os.listdir(bad_params / "params"):  # the tensors' stores gone, orbax's metadata left
        if (bad_params / "params" / sub).is_dir():
            shutil.rmtree(bad_params / "params" / sub)
    out = tmp_path / "out"
    one_line_exit(capsys, convert_main, ["export-hf", str(bad_json), str(out)],
                  f"{bad_json / 'model_config.json'}: not valid JSON")
    one_line_exit(capsys, convert_main, ["export-hf", str(bad_params), str(out)],
                  f"checkpoint '{bad_params}' could not be loaded")
    one_line_exit(capsys, decode.main, ["--checkpoint", str(bad_json), "--prompt-ids", "1,2"], "not valid JSON")
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["bad_json", "bad_params"]


def test_decode_prompt_file_that_is_a_directory(params_checkpoint, tmp_path, capsys):
    import decode

    one_line_exit(capsys, decode.main, ["--checkpoint", params_checkpoint, "--prompt-file", str(tmp_path)],
                  "is a directory, not a file")


def test_demo_json_location_checked_before_the_demo_runs(tmp_path, capsys):
    from tidar_jax.demo import main as demo_main

    f = tmp_path / "f"
    f.write_text("x")
    # the run dir does not exist either: the --json location is reported first, before any work
    one_line_exit(capsys, demo_main, ["--run-dir", str(tmp_path / "none"), "--json", str(f / "s.json")],
                  f"--json {f / 's.json'}: lies under {f}, which is a file")
    one_line_exit(capsys, demo_main, ["--run-dir", str(tmp_path / "none"), "--json", str(tmp_path)],
                  "is a directory, not a file")


def test_check_output_file(tmp_path):
    target = tmp_path / "a" / "summary.json"
    assert check_output_file(str(target)) == str(target) and not (tmp_path / "a").exists()
    with pytest.raises(OutputPathError, match=f"^{tmp_path}: is a directory, not a file$"):
        check_output_file(str(tmp_path))
    f = tmp_path / "f"
    f.write_text("x")
    assert check_output_file(str(f)) == str(f)  # an existing file is replaced
    with pytest.raises(OutputPathError, match=f"lies under {f}, which is a file"):
        check_output_file(str(f / "x.json"))
    if os.path.isdir("/sys"):
        with pytest.raises(OutputPathError, match="read-only"):
            check_output_file("/sys/tidar_summary.json")
    assert sorted(os.listdir(tmp_path)) == ["f"]  # the probe leaves nothing
