"""Output locations are checked once, up front, by one helper that every CLI uses: a file, a path under a file, a
read-only location or a damaged existing directory gives one line naming the path and the problem, a non-zero
exit and no traceback; a training run that fails during setup leaves no new run directory behind."""

import os
import sys

import pytest

from tidar_jax.output_paths import OutputExistsError, OutputPathError, check_output_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # train.py


def _run_dir_damage(path):
    from tidar_jax.checkpoint.run import run_dir_problem
    return run_dir_problem(path)


def test_new_dir_and_existing_dir(tmp_path):
    assert check_output_dir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()  # checking writes nothing that stays
    with pytest.raises(OutputExistsError, match=f"{tmp_path}: already exists"):
        check_output_dir(str(tmp_path))
    assert isinstance(OutputExistsError("x"), FileExistsError)
    assert check_output_dir(str(tmp_path), existing=lambda p: None) == str(tmp_path)
    assert os.listdir(tmp_path) == []  # the write probe is removed


def test_file_and_path_under_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(OutputPathError, match=f"^{f}: is a file, not a directory$"):
        check_output_dir(str(f), existing=lambda p: None)
    with pytest.raises(OutputPathError, match=f"^{f / 'sub' / 'run'}: lies under {f}, which is a file$"):
        check_output_dir(str(f / "sub" / "run"))


def test_read_only_location(tmp_path):
    # sysfs refuses new files to every user, root included (root passes chmod-based permission checks)
    if os.path.isdir("/sys") and not os.access("/sys", os.W_OK) or os.geteuid() == 0 and os.path.isdir("/sys"):
        with pytest.raises(OutputPathError, match="^/sys/tidar_out: cannot write there \\(/sys is read-only\\)$"):
            check_output_dir("/sys/tidar_out")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            with pytest.raises(OutputPathError, match="read-only"):
                check_output_dir(str(ro / "run"))
        finally:
            ro.chmod(0o755)


def test_damaged_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert check_output_dir(str(run), existing=_run_dir_damage) == str(run)  # an empty dir starts a run
    (run / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(OutputPathError, match="config.yaml cannot be read .*damaged run dir"):
        check_output_dir(str(run), existing=_run_dir_damage)
    (run / "config.yaml").unlink()
    (run / "checkpoints").write_text("")
    with pytest.raises(OutputPathError, match="checkpoints is not a directory"):
        check_output_dir(str(run), existing=_run_dir_damage)


def _one_line_exit(capsys, fn, argv, needle):
    with pytest.raises(SystemExit) as info:
        fn(argv)
    message = str(info.value.code)
    assert info.value.code not in (0, None) and needle in message and "\n" not in message, message
    assert "Traceback" not in capsys.readouterr().err


def test_every_cli_checks_its_output_first(tmp_path, capsys):
    import train
    from tidar_jax.convert import main as convert_main
    from tidar_jax.data.prepare import main as prepare_main

    f = tmp_path / "f"
    f.write_text("x")
    _one_line_exit(capsys, train.main, ["--run-dir", str(f), "--config", os.path.join(REPO, "configs", "tiny.yaml")],
                   f"{f}: is a file, not a directory")
    _one_line_exit(capsys, prepare_main, ["--out", str(f / "corpus")], f"lies under {f}, which is a file")
    damaged = tmp_path / "corpus"
    damaged.mkdir()
    (damaged / "manifest.json").write_text("{not json")
    _one_line_exit(capsys, prepare_main, ["--out", str(damaged)], "manifest.json cannot be read (a damaged corpus dir)")
    # import/export targets are checked before the input is read (the input here does not even exist)
    _one_line_exit(capsys, convert_main, ["import-hf", str(tmp_path / "nope"), str(f)], f"{f}: is a file")
    _one_line_exit(capsys, convert_main, ["export-hf", str(tmp_path / "nope"), str(f / "hf")], "which is a file")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model_config.json").write_text("[1, 2")
    _one_line_exit(capsys, train.main, ["--run-dir", str(run), "--config", os.path.join(REPO, "configs", "tiny.yaml")],
                   "model_config.json cannot be read")


def test_setup_failure_leaves_no_run_dir(tmp_path, train_corpus):
    from tidar_jax.config import ConfigError
    from tidar_jax.train.config import load_config
    from tidar_jax.train.loop import train

    tiny = os.path.join(REPO, "configs", "tiny.yaml")
    run_dir = tmp_path / "runs" / "new"
    bad_data = load_config(tiny, [f"data.dir={tmp_path / 'no_corpus'}", "data.prepare=false"])
    with pytest.raises(ConfigError, match="holds no prepared corpus"):
        train(bad_data, str(run_dir), show_progress=False)
    assert not run_dir.exists()
    bad_model = load_config(tiny, [f"data.dir={train_corpus}", "model.vocab_size=256"])
    with pytest.raises(ConfigError, match="model.vocab_size=256: smaller than the data tokenizer"):
        train(bad_model, str(run_dir), show_progress=False)
    assert not run_dir.exists()


def test_nothing_below_train_imports_it():
    """The layering: ``tidar_jax.train`` sits on top of the runtime; no other runtime module imports it (the analysis
    floor, ``tidar_jax.analysis``, is above the runtime and compiles the train step)."""
    import ast

    root = os.path.join(REPO, "tidar_jax")
    offenders = []
    for base, _, files in os.walk(root):
        if os.path.relpath(base, root).split(os.sep)[0] in ("train", "analysis"):
            continue
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(base, name)
            for node in ast.walk(ast.parse(open(path).read())):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if isinstance(node, ast.ImportFrom) and node.module == "tidar_jax":
                    mods = [f"tidar_jax.{a.name}" for a in node.names]
                offenders += [f"{os.path.relpath(path, REPO)}: {m}" for m in mods
                              if m == "tidar_jax.train" or m.startswith("tidar_jax.train.")]
    assert offenders == []
