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
