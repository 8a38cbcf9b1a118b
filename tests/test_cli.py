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
