"""The command line every script shares (lore.cli): flag types and their bounds, the one-line error
and exit 2, and the results every sweep writes."""
import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lore.checks import InputError  # noqa: E402
from lore.cli import command_line, float_list, positive_int, rank_list, shot_list  # noqa: E402
from lore.io import read_json  # noqa: E402
from lore.pairs import SETS  # noqa: E402
from lore.results import plot_accuracy_vs_rank, save_results  # noqa: E402


def test_command_line_helpers(tmp_path, capsys):
    assert rank_list("0,1,5") == [0, 1, 5]
    assert float_list("0,1e4") == [0.0, 1e4]
    for bad in ("-1,2", "a", "", "2,2", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            rank_list(bad)
    assert shot_list("1,5") == [1, 5] and positive_int("20") == 20
    for fn, bad in ((shot_list, "0,5"), (positive_int, "0"), (positive_int, "2,3")):
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)

    @command_line
    def main(args):
        raise InputError("data/x.safetensors: no such file")
    with pytest.raises(SystemExit) as e:
        main(None)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "error: data/x.safetensors: no such file"

    records = [{"method": "lore", "K": K, "alpha": 0.0, **{m: 0.1 * K for m in SETS},
                **{f"{m}_std": 0.01 for m in SETS}} for K in (0, 2)]
    save_results(records, str(tmp_path))
    plot_accuracy_vs_rank(records, str(tmp_path / "accuracy_vs_rank.png"))
    assert read_json(str(tmp_path / "results.json")) == records
    assert sorted(os.listdir(tmp_path)) == ["accuracy_vs_rank.png", "results.csv", "results.json"]


def test_data_files_refuse_a_split_given_twice(capsys):
    """--data-files train=A train=B once used B silently: one line, exit 2."""
    from lore.cli import ArgumentParser, add_prepare_args
    parser = add_prepare_args(ArgumentParser("doc"), "RedditTLDR")
    assert parser.parse_args(["--data-files", "train=A", "validation=B"]).data_files == [("train", "A"),
                                                                                         ("validation", "B")]
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--data-files", "train=A", "train=B"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip() == "error: --data-files gives the split 'train' twice (see --help)"


def test_library_noise_is_not_printed_before_the_error_line(tiny_model_dir, tmp_path, capfd, monkeypatch):
    """transformers' load report and loading bar, and datasets' own log line of an error it raises, do
    not reach stderr: a script's stderr is its one error line."""
    import datasets
    from lore.extract import load_reward_model, model_features
    from lore.io import load_splits
    capfd.readouterr()
    model, _ = load_reward_model(tiny_model_dir, "cpu")
    assert model_features(tiny_model_dir) == model.config.hidden_size == 64
    assert capfd.readouterr().err == ""

    def failing(*args, **kwargs):
        datasets.utils.logging.get_logger("datasets.packaged_modules.json.json").error("Failed to load JSON from file")
        raise ValueError("unreadable")
    monkeypatch.setattr(datasets, "load_dataset", failing)
    (tmp_path / "t.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(InputError, match="t.jsonl: cannot read it as json"):
        load_splits("hub/id", ["train"], {"train": str(tmp_path / "t.jsonl")})
    assert "Failed to load JSON" not in capfd.readouterr().err


def test_ctrl_c_before_main_is_one_line_not_a_traceback(tmp_path):
    """Ctrl-C while a script imports torch or parses its flags (before command_line wraps main): one
    line and the SIGINT exit, no traceback. A program that merely imports lore keeps Python's hook."""
    import signal
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(repo, "tools", "compare.py")
    code = (f"import sys; sys.argv[0] = {script!r}; sys.path.insert(0, {repo!r}); import lore; import torch; "
            f"raise KeyboardInterrupt")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == -signal.SIGINT and done.stderr == "interrupted: nothing of this run was written\n", \
        done.stderr
    code = f"import sys; sys.path.insert(0, {repo!r}); import lore; raise KeyboardInterrupt"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo)
    assert "Traceback" in done.stderr


def test_under_torchrun_a_bad_input_is_one_line_from_rank_0_and_its_exit_code_is_2(tmp_path):
    """2 gloo processes under torchrun, --data missing: every rank finds it; rank 0 prints the one
    error line and exits 2, rank 1 waits (lore.cli.RANK_GRACE) and is ended by torchrun without a word.
    torchrun itself then prints its ChildFailedError summary, whose root cause is rank 0's exit code
    2, and exits 1: its launcher's convention (docs/failures.md)."""
    import socket
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-port",
                           str(port), os.path.join(repo, "PersonalLLM", "train_basis.py"), "--data",
                           str(tmp_path / "missing"), "--out", str(tmp_path / "R"), "--device", "cpu"],
                          capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path / 'missing'}: no data.json, so not a prepared data folder (or its "
                      f"prepare.py did not finish): run prepare.py"], done.stderr
    root_cause = done.stderr.split("Root Cause")[1]
    assert "rank      : 0 (local_rank: 0)" in root_cause and "exitcode  : 2" in root_cause, done.stderr
    assert done.returncode == 1 and not os.listdir(tmp_path)
