"""The data folder as prepare.py makes it: canonical data.json, every populated value checked where
it is made, caches that an edit of the data cannot reach, and PRISM's two steps kept together."""
import argparse
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, load_script
from lore import cli, data as lore_data, extract
from lore.io import read_metadata
from lore.pairs import SETS

prepare = load_script(os.path.join(REPO, "PersonalLLM", "prepare.py"), "data_personalllm_prepare")
TINY = ["--synthetic", "--prompts-train", "60", "--prompts-test", "20", "--features", "8", "--n-users", "10",
        "--n-unseen", "6", "--train-frac", "0.2", "--pool-frac", "0.2"]


def fails(capsys, argv):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare.main(prepare.parse_args(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_data_json_is_canonical(tmp_path, monkeypatch):
    """safetensors returns a header's metadata in an order that changes between processes: the same
    prepare must still give the same data.json bytes (its hash is what checkpoints record)."""
    argv = [*TINY, "--out", str(tmp_path / "d")]
    prepare.main(prepare.parse_args(argv))
    before = open(tmp_path / "d" / "data.json", "rb").read()
    monkeypatch.setattr(lore_data, "read_metadata", lambda path: dict(reversed(read_metadata(path).items())))
    prepare.main(prepare.parse_args(argv))                  # the same prepare again, in place
    assert open(tmp_path / "d" / "data.json", "rb").read() == before


@pytest.mark.parametrize("flags, named", [(["--dirichlet", "1e-8"], "--dirichlet"),
                                          (["--dirichlet", "3e-4", "--n-users", "30"], "--dirichlet"),
                                          (["--noise", "1e39"], "--noise")])
def test_degenerate_population_is_refused_naming_the_flag(tmp_path, capsys, flags, named):
    err = fails(capsys, [*TINY, "--out", str(tmp_path / "d"), *flags])
    assert named in err
    assert not (tmp_path / "d").exists()


def test_cache_and_output_are_copies_not_links(tmp_path):
    """cache_path seeds the cache from --out's file and link_into puts it back: never the same inode,
    so an edit of the data folder's file in place does not reach the cache."""
    out = tmp_path / "D"
    table = torch.arange(6.0).reshape(3, 2)
    with cli.run_folder(argparse.Namespace(out=str(out), seed=0), "a.py") as staging:
        save_file({"embeddings": table}, os.path.join(staging, "embeddings.safetensors"))
    args = argparse.Namespace(out=str(out))
    cache = cli.cache_path(args, "embeddings.safetensors")
    assert torch.equal(load_file(cache)["embeddings"], table)
    assert os.stat(cache).st_ino != os.stat(out / "embeddings.safetensors").st_ino
    copy = cli.link_into(cache, str(tmp_path))
    assert os.stat(copy).st_ino != os.stat(cache).st_ino
    save_file({"embeddings": -table}, str(out / "embeddings.safetensors"))   # an edit of the data folder's file
    assert torch.equal(load_file(cache)["embeddings"], table) and torch.equal(load_file(copy)["embeddings"], table)


def test_an_edited_cache_is_computed_again(tiny_model_dir, tmp_path, capsys):
    """An embeddings cache records its table's hash: a table edited in place (header kept) is not reused."""
    conversations = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} b"}]
                     for i in range(6)]
    path = str(tmp_path / "emb.safetensors")
    first = extract.embed_conversations(conversations, path, tiny_model_dir, device="cpu")
    meta = read_metadata(path)
    assert meta["sha256"] == extract.table_digest(first)
    save_file({"embeddings": -load_file(path)["embeddings"]}, path, metadata=meta)   # signs flipped in place
    capsys.readouterr()
    again = extract.embed_conversations(conversations, path, tiny_model_dir, device="cpu")
    assert "edited since" in capsys.readouterr().out
    assert torch.equal(again, first) and torch.equal(load_file(path)["embeddings"], first)


def test_pairs_in_chunks_are_the_pairs_at_once(tmp_path, monkeypatch):
    """prepare.py draws and writes the pairs in chunks of users (CHUNK_PAIRS), load_data reads them
    in batches of rows (PAIR_BATCH): 7-pair chunks and 5-row batches give the same pairs.parquet
    content and the same Pairs as one chunk and one batch, against a loop-form reading of the file."""
    import pandas as pd
    argv = [*TINY, "--seen-test-prompts", "3"]
    prepare.main(prepare.parse_args([*argv, "--out", str(tmp_path / "whole")]))
    monkeypatch.setattr(prepare, "CHUNK_PAIRS", 7)
    prepare.main(prepare.parse_args([*argv, "--out", str(tmp_path / "chunks")]))
    whole = pd.read_parquet(tmp_path / "whole" / "pairs.parquet")
    chunks = pd.read_parquet(tmp_path / "chunks" / "pairs.parquet")
    assert len(whole) == 10 * 12 + 10 * 3 + 6 * 12 + 6 * 20 and whole.equals(chunks)
    import pyarrow.parquet as pq
    assert pq.ParquetFile(tmp_path / "chunks" / "pairs.parquet").metadata.num_row_groups > 4
    one = lore_data.load_data(str(tmp_path / "whole"), "cpu", fewshot_pairs=2)
    monkeypatch.setattr(lore_data, "PAIR_BATCH", 5)
    batched = lore_data.load_data(str(tmp_path / "chunks"), "cpu", fewshot_pairs=2)
    for name in SETS:
        group = "unseen" if name.startswith("unseen") else "seen"
        part = whole[(whole["set"] == name) & ((whole["draw"] < 2) | (name != "unseen_fewshot"))]
        users = one.users[group]
        # the reference: each user's pairs in the file's order, users in data.json's order
        rows = [(i, c, r) for i, u in enumerate(users) for c, r, v in
                zip(part["chosen"], part["rejected"], part["user"]) if v == u]
        for pairs in (one.sets[name], batched.sets[name]):
            assert pairs.n_users == len(users) and pairs.chosen.dtype == torch.int32 and pairs.checked
            assert [(int(u), int(c), int(r)) for u, c, r in zip(pairs.user, pairs.chosen, pairs.rejected)] == rows
    assert len(one.sets["unseen_fewshot"]) == 6 * 2


def test_pairs_file_faults_name_the_row_or_user(tmp_path, monkeypatch):
    """A pairs.parquet edited by hand, read in batches of 4 rows: the error names the row of the file
    (counted across batches), or the user and the set, as the whole-file checks did."""
    import pandas as pd
    from lore.data import read_pairs
    from lore.checks import InputError
    monkeypatch.setattr(lore_data, "PAIR_BATCH", 4)
    table = torch.zeros(6, 2)
    users = {"seen": ["a", "b"], "unseen": ["c"]}
    good = pd.DataFrame({"set": ["seen_train"] * 3 + ["seen_test"] * 2 + ["unseen_fewshot", "unseen_test"],
                         "user": ["b", "a", "b", "a", "b", "c", "c"], "chosen": [0, 2, 4, 0, 2, 1, 3],
                         "rejected": [1, 3, 5, 1, 3, 2, 4]})
    path = str(tmp_path / "pairs.parquet")

    def read(df):
        df.to_parquet(path, index=False)
        return read_pairs(path, users, table, "data.json")

    sets = read(good)   # users sorted stably: a's pair first, then b's two in the file's order
    assert sets["seen_train"].user.tolist() == [0, 1, 1] and sets["seen_train"].chosen.tolist() == [2, 0, 4]
    for edit, message in [
            (lambda d: d.assign(set=d["set"].where(d.index != 5, "seen_dev")), "row 5: set 'seen_dev' is not one of"),
            (lambda d: d.assign(rejected=d["rejected"].where(d.index != 6, 6)),
             "row 6: rejected 6 is outside the 6 rows"),
            (lambda d: d.assign(chosen=d["chosen"].where(d.index != 4, -1)), "row 4: chosen -1 is outside"),
            (lambda d: d.assign(chosen=d["chosen"].astype(float).where(d.index != 5)),
             "row 5: chosen must hold integer rows"),
            (lambda d: d.assign(user=d["user"].where(d.index != 4, "z")),
             "seen_test has pairs of user 'z', which data.json does not list as a seen user \\(1 such users\\)"),
            (lambda d: d.assign(user=d["user"].where(d.index != 6, "a")), "unseen_test has pairs of user 'a'"),
            (lambda d: d[d.index != 4], "seen_test: user 'b' has no pairs \\(1 users without pairs\\)")]:
        with pytest.raises(InputError, match=message):
            read(edit(good.copy()))
    with pytest.raises(InputError, match="missing column"):
        read(good.drop(columns="rejected"))
    # integer ids: listed integers match, a string never equals an integer
    assert read_pairs_with({"seen": [7, 8], "unseen": [9]}, good, path, table)["seen_test"].user.tolist() == [0, 1]
    with pytest.raises(InputError, match="seen_train has pairs of user 7, which"):
        read_pairs(path, {"seen": ["7", "8"], "unseen": ["9"]}, table, "data.json")


def read_pairs_with(users, df, path, table):
    from lore.data import read_pairs
    codes = {"a": 7, "b": 8, "c": 9}
    df.assign(user=df["user"].map(codes)).to_parquet(path, index=False)
    return read_pairs(path, users, table, "data.json")
