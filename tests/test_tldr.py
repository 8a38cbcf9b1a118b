"""Reddit TLDR: prepare (the hub's schema, both splits, the worker split and the draws, the data
layout), load_data, train_basis, vary_fewshot, bad inputs.

The fixture: 9 workers over 2 splits in the hub's `comparisons` schema, written by the test (train as
JSON lines, validation as Parquet), with a CNN/DM row (post None) and summaries shown to several workers."""
import json
import os
import random
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from conftest import REPO, load_script

sys.path.insert(0, REPO)
import utils  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.data import DATA_FILES, load_data, write_data_folder  # noqa: E402
from lore.extract import embed_conversations, read_reward_head  # noqa: E402
from lore.io import load_tensors, read_json, read_table, save_tensors  # noqa: E402
from lore.pairs import SETS  # noqa: E402

FOLDER = os.path.join(REPO, "RedditTLDR")
prepare = load_script(os.path.join(FOLDER, "prepare.py"), "tldr_prepare")
train_basis = load_script(os.path.join(FOLDER, "train_basis.py"), "tldr_train_basis")
vary_fewshot = load_script(os.path.join(FOLDER, "vary_fewshot.py"), "tldr_vary_fewshot")

# comparisons per worker; w0, w1 have the fewest train comparisons, w6 has no validation ones, w8 no
# train ones: the workers in both splits after the drop are w2, w3, w4, w5, w7
TRAIN = {"w3": 7, "w0": 1, "w2": 6, "w4": 8, "w1": 2, "w5": 9, "w6": 10, "w7": 5}
VALIDATION = {"w1": 2, "w2": 3, "w3": 3, "w4": 4, "w5": 3, "w7": 3, "w8": 2}
COMMON = ["w2", "w3", "w4", "w5", "w7"]
BY_COUNT = sorted(COMMON, key=TRAIN.get)          # the order of the draws (and of the users)
DRAWS = ["--max-train-pairs", "4"]                # seen workers draw 4; unseen workers a pool of all (<= 100)
FAST = ["--k-list", "0,1,2", "--iters", "20", "--fewshot-iters", "20", "--device", "cpu", "--fewshot-pairs", "3"]
RECORD_KEYS = {"method", "K", "alpha", *SETS, *(f"{s}_std" for s in SETS), "converged", "loss_fall",
               "stop", "stopped", "steps", "passes", "fewshot_stop", "fewshot_stopped", "fewshot_rule", "fewshot_steps"}


def hub_rows(counts, split, n_posts, first_post):
    """Comparisons in the hub's schema: comparison j of the split is about post j % n_posts and two of
    its 4 summaries; the same (post, pair of summaries) comes back for several workers."""
    rows, j = [], 0
    for worker, n in counts.items():
        for _ in range(n):
            p = first_post + j % n_posts
            a, b = [(0, 1), (2, 3), (1, 2), (0, 3), (1, 1)][j % 5]    # (1, 1): a summary against itself
            rows.append({"info": {"id": f"t3_{p}", "post": f"post {p}: my cat " + "and dog " * (p % 4),
                                  "title": f"title {p}", "subreddit": "cats"},
                         "summaries": [{"text": f"summary {s}" + f" of {p}" * (s < 2), "policy": f"policy{s}",
                                        "note": None} for s in (a, b)],
                         "choice": j % 2, "worker": worker, "batch": "batch3", "split": split,
                         "extra": {"confidence": 1 + j % 9}})
            j += 1
    return rows


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """-> (train rows, validation rows, ["train=PATH", "validation=PATH"])."""
    folder = tmp_path_factory.mktemp("hub")
    train = hub_rows(TRAIN, "train", 6, 0)
    validation = hub_rows(VALIDATION, "valid1", 4, 100)
    validation.insert(3, {"info": {"id": "cnn_1", "post": None, "title": None, "subreddit": None},
                          "summaries": [{"text": "news a", "policy": "x", "note": None},
                                        {"text": "news b", "policy": "y", "note": None}],
                          "choice": 0, "worker": "w2", "batch": "cnndm1", "split": "valid1", "extra": {"confidence": 3}})
    with open(folder / "train.jsonl", "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in train)
    pd.DataFrame(validation).to_parquet(folder / "validation.parquet")
    return train, validation, [f"train={folder / 'train.jsonl'}", f"validation={folder / 'validation.parquet'}"]


def run_prepare(hub, model, out, *flags):
    prepare.main(prepare.parse_args(["--out", out, "--model", str(model), "--device", "cpu",
                                     "--data-files", *hub[2], *DRAWS, *flags]))
    return out


@pytest.fixture(scope="module")
def data(hub, tiny_model_dir, tmp_path_factory):
    return run_prepare(hub, tiny_model_dir, str(tmp_path_factory.mktemp("tldr") / "data"))


def exit_code_and_message(capsys, main, args):
    """-> (exit code, the last line on stderr: the error; progress bars may come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def table_of(folder):
    return load_tensors(os.path.join(folder, "embeddings.safetensors"), ["embeddings"])["embeddings"]


def v_ref_of(folder):
    return load_tensors(os.path.join(folder, "v_ref.safetensors"), ["v_ref"])["v_ref"]


def expected_split(split_seed=0, max_train=4, max_fewshot=100):
    """The recipe, transcribed: drop w0 and w1 (the fewest train comparisons), shuffle the sorted common
    workers with random.Random(seed), the first half seen; then with the same generator, by ascending
    train count, each worker draws its train comparisons (indices into its own, in source order).
    -> (seen, unseen, {worker: drawn indices in draw order})."""
    rng = random.Random(split_seed)
    common = sorted(COMMON)
    rng.shuffle(common)
    seen = [w for w in BY_COUNT if w in common[:2]]
    unseen = [w for w in BY_COUNT if w in common[2:]]
    draws = {w: rng.sample(range(TRAIN[w]), min(TRAIN[w], max_train if w in seen else max_fewshot))
             for w in BY_COUNT}
    return seen, unseen, draws


def train_rows(worker):
    """Rows (in the train split) of a worker's train comparisons, in source order."""
    start = 0
    for w, n in TRAIN.items():
        if w == worker:
            return list(range(start, start + n))
        start += n


def test_prepare_files(hub, data, tiny_model_dir, tmp_path):
    train, validation, _ = hub
    table = table_of(data)
    v_ref = v_ref_of(data)
    assert torch.equal(v_ref, read_reward_head(str(tiny_model_dir)))
    source = {"train": train, "validation": validation}
    kept = [r for r in train + validation if r["info"]["post"] is not None]
    distinct = {(r["info"]["post"], s["text"]) for r in kept for s in r["summaries"]}
    assert table.shape == (len(distinct), v_ref.shape[0]) and len(kept) == len(train) + len(validation) - 1
    # conversations.parquet: row i of the table is [user: post, assistant: summary]
    conversations = read_table(os.path.join(data, "conversations.parquet"))
    assert list(conversations.columns) == ["row", "messages", "post_id"]
    assert conversations["row"].tolist() == list(range(len(table)))
    messages = [json.loads(m) for m in conversations["messages"]]
    assert {(m[0]["content"], m[1]["content"]) for m in messages} == distinct
    assert all([x["role"] for x in m] == ["user", "assistant"] for m in messages)
    summary = pd.Series([m[1]["content"] for m in messages])
    post = pd.Series([m[0]["content"] for m in messages])
    # pairs.parquet: every pair is its source comparison, by (split, row)
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    assert list(pairs.columns) == ["set", "user", "chosen", "rejected", "draw", "split", "row", "post_id"]
    rows = [source[s][i] for s, i in zip(pairs["split"], pairs["row"])]
    assert pairs["user"].tolist() == [r["worker"] for r in rows]
    assert pairs["post_id"].tolist() == [r["info"]["id"] for r in rows]
    assert summary[pairs["chosen"]].tolist() == [r["summaries"][r["choice"]]["text"] for r in rows]
    assert summary[pairs["rejected"]].tolist() == [r["summaries"][1 - r["choice"]]["text"] for r in rows]
    assert post[pairs["chosen"]].tolist() == [r["info"]["post"] for r in rows]
    assert conversations["post_id"][pairs["chosen"]].tolist() == pairs["post_id"].tolist()
    # held out: every validation comparison of the kept workers, in source order, but the CNN/DM row 3
    held_out = pairs[pairs["split"] == "validation"]
    assert sorted(held_out["row"]) == [i for i, r in enumerate(validation) if r["worker"] in COMMON and i != 3]
    # a summary shown to several workers is one row; the same text under another post is another row
    assert pairs.groupby("chosen")["user"].nunique().max() > 1
    assert conversations.groupby(summary)["post_id"].nunique().max() > 1
    i = int(pairs["chosen"].iloc[-1])
    alone = embed_conversations([messages[i]], str(tmp_path / "one.safetensors"), str(tiny_model_dir),
                                      device="cpu")
    assert torch.allclose(table[i].float(), alone[0].float(), atol=1e-2, rtol=1e-2)
    assert not torch.allclose(table[i - 1].float(), alone[0].float(), atol=1e-2, rtol=1e-2)


def test_layout_split_and_draws(data):
    info = read_json(os.path.join(data, "data.json"))
    assert set(info) == {"dataset", "users", "pairs", "embeddings", "files", "config", "dropped"}
    assert info["dataset"] == "RedditTLDR" and sorted(info["files"]) == sorted(DATA_FILES)
    assert info["dropped"] == {"w0": 1, "w1": 2}
    config = info["config"]
    assert (config["split_seed"], config["drop_smallest"], config["max_train_pairs"], config["max_fewshot_pairs"]) \
        == (0, 2, 4, 100)
    seen, unseen, draws = expected_split()
    assert info["users"] == {"seen": seen, "unseen": unseen}
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    assert sorted(pairs["set"].unique()) == sorted(SETS)
    assert info["pairs"] == pairs.groupby("set").size().to_dict()
    # the draws: the workers by ascending train count, each with its drawn comparisons in draw order
    for name, group in (("seen_train", seen), ("unseen_fewshot", unseen)):
        part = pairs[pairs["set"] == name]
        assert (part["split"] == "train").all() and part["user"].unique().tolist() == group
        for w in group:
            mine = part[part["user"] == w]
            assert mine["row"].tolist() == [train_rows(w)[i] for i in draws[w]]
            assert mine["draw"].tolist() == list(range(len(draws[w])))
    assert pairs[pairs["set"] == "seen_train"].groupby("user").size().max() == 4
    assert pairs[pairs["set"] == "unseen_fewshot"].groupby("user").size().to_dict() == {w: TRAIN[w] for w in unseen}
    for name, group in (("seen_test", seen), ("unseen_test", unseen)):
        part = pairs[pairs["set"] == name]
        assert (part["split"] == "validation").all() and (part["draw"] == -1).all()
        assert sorted(part["user"].unique()) == sorted(group)
        assert part.groupby("user").size().to_dict() == {w: VALIDATION[w] for w in group}   # w2: and a CNN/DM row, skipped


def test_load_data(data):
    loaded = load_data(data, "cpu")
    info = read_json(os.path.join(data, "data.json"))
    assert loaded.users == info["users"] and loaded.info == info
    assert torch.equal(loaded.table, table_of(data)) and torch.equal(loaded.v_ref, v_ref_of(data))
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    assert list(loaded.sets) == list(SETS)
    for name, p in loaded.sets.items():
        users = info["users"]["unseen" if name.startswith("unseen") else "seen"]
        assert p.n_users == len(users) and p.group is None
        # user i of the set is users[i]; a user's pairs keep their order in pairs.parquet
        expected = pairs[pairs["set"] == name].assign(i=lambda d: d["user"].map(users.index)).sort_values(
            "i", kind="stable")
        assert p.user.tolist() == expected["i"].tolist()
        assert p.chosen.tolist() == expected["chosen"].tolist() and p.rejected.tolist() == expected["rejected"].tolist()


def test_fewshot_pairs_are_the_first_draws(data, tmp_path, monkeypatch):
    """train_basis --fewshot-pairs n fits each unseen worker on exactly its first n drawn comparisons
    (all of them when its pool is smaller)."""
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    unseen = read_json(os.path.join(data, "data.json"))["users"]["unseen"]
    seen_sets = []
    sweep = utils.sweep
    monkeypatch.setattr(utils, "sweep", lambda **kw: seen_sets.append(kw) or sweep(**kw))
    for n in (1, 3, 6):
        train_basis.main(train_basis.parse_args(["--data", data, "--out", str(tmp_path / f"n{n}"), *FAST,
                                                 "--k-list", "0", "--fewshot-pairs", str(n)]))
        got = seen_sets[-1]["unseen_fewshot"]
        pool = pairs[pairs["set"] == "unseen_fewshot"]
        first = pool[pool["draw"] < n]
        assert got.counts().tolist() == [min(n, TRAIN[w]) for w in unseen]
        assert [unseen[u] for u in got.user.tolist()] == first["user"].tolist()
        assert got.chosen.tolist() == first["chosen"].tolist() and got.rejected.tolist() == first["rejected"].tolist()
        # the other sets are whole
        assert len(seen_sets[-1]["unseen_test"]) == (pairs["set"] == "unseen_test").sum()
        assert len(seen_sets[-1]["seen_train"]) == (pairs["set"] == "seen_train").sum()


def test_prepare_log_counts_the_skipped_rows_and_reruns_give_the_same_files(hub, data, tiny_model_dir, capsys):
    before = {name: open(os.path.join(data, name), "rb").read() for name in ("pairs.parquet", "conversations.parquet")}
    embedded = os.path.getmtime(os.path.join(data, "embeddings.safetensors"))
    capsys.readouterr()
    run_prepare(hub, tiny_model_dir, data)    # same inputs: the embeddings are reused
    log = capsys.readouterr().out
    assert "train: 48 comparisons of 8 workers; skipped 0 rows without a post" in log
    assert "validation: 20 comparisons of 7 workers; skipped 1 rows without a post" in log
    assert "dropped 2 with the fewest (w0: 1, w1: 2); 5 in both splits: 2 seen, 3 unseen" in log
    assert os.path.getmtime(os.path.join(data, "embeddings.safetensors")) == embedded
    for name, content in before.items():
        assert open(os.path.join(data, name), "rb").read() == content, name
    load_data(data, "cpu")


def test_split_rule():
    # first appearance: a b c d e f g h i j; fewest: b, c, e (1 each): b and c are dropped
    counts = pd.Series({"a": 5, "b": 1, "c": 1, "d": 3, "e": 1, "f": 9, "g": 4, "h": 2, "i": 7, "j": 6})
    validation = {"a", "b", "d", "e", "f", "g", "i", "j", "x"}              # not h, not c; x has no train
    seen, unseen, dropped = prepare.split_workers(counts, validation, 2, random.Random(0))
    assert dropped == ["b", "c"]
    common = ["a", "d", "e", "f", "g", "i", "j"]
    assert sorted(seen + unseen) == common and not set(seen) & set(unseen) and len(seen) == 3
    shuffled = sorted(common)
    random.seed(0)                 # the recipe: random.seed(0), shuffle the common workers, halve
    random.shuffle(shuffled)
    assert sorted(seen) == sorted(shuffled[:3]) and sorted(unseen) == sorted(shuffled[3:])
    order = counts.sort_values(kind="stable").index.tolist()
    assert seen == [w for w in order if w in seen] and unseen == [w for w in order if w in unseen]
    # a seed gives one split; the order of appearance breaks the ties of the drop
    assert prepare.split_workers(counts, validation, 2, random.Random(0)) == (seen, unseen, dropped)
    reversed_ = prepare.split_workers(counts[::-1], validation, 2, random.Random(0))
    assert reversed_[2] == ["e", "c"] and sorted(reversed_[0] + reversed_[1]) == ["a", "b", "d", "f", "g", "i", "j"]
    other = prepare.split_workers(counts, validation, 2, random.Random(1))
    assert sorted(other[0] + other[1]) == common and other[0] != seen
    assert prepare.split_workers(counts, validation, 0, random.Random(0))[2] == []
    with pytest.raises(InputError, match="1 workers left in both splits after dropping the 9"):
        prepare.split_workers(counts, validation, 9, random.Random(0))


def reference_accuracy(table, v_ref, pairs, workers):
    """K = 0 by hand: mean over workers of the fraction of pairs with (chosen - rejected) . v_ref > 0,
    and its std across workers x 0.25."""
    scores = table.float() @ v_ref.float()                                                # [E, 1]
    margin = scores[pairs["chosen"].tolist()] - scores[pairs["rejected"].tolist()]
    acc = pd.Series((margin[:, 0] > 0).numpy()).groupby(pairs["user"].to_numpy()).mean()[workers]
    return acc.mean(), 0.25 * acc.std(ddof=0)


def test_train_basis_from_another_directory(data, tmp_path):
    out = str(tmp_path / "results")
    proc = subprocess.run([sys.executable, os.path.join(FOLDER, "train_basis.py"), "--data", data,
                           "--out", out, *FAST], cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == sorted([".lore-run.json"] +
        ["config.json", "results.json", "results.csv", "accuracy_vs_rank.png", "basis_reports.csv", "basis_health.png",
         "loss_curves.png", *(f"lore_K{K}_alpha0{ext}" for K in (0, 1, 2)
                              for ext in (".safetensors", ".report.json", ".fit.json"))])
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["alpha"], r["K"]) for r in records] == [("lore", 0.0, 0), ("lore", 0.0, 1), ("lore", 0.0, 2)]
    assert set(records[0]) == RECORD_KEYS
    assert len(pd.read_csv(os.path.join(out, "results.csv"))) == 3
    assert read_json(os.path.join(out, "config.json"))["script"] == "RedditTLDR/train_basis.py"

    # K = 0 is the reward model's head: its four accuracies by hand, from the prepared split
    seen, unseen, _ = expected_split()
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    table, v_ref = table_of(data), v_ref_of(data)
    for name, workers in (("seen_train", seen), ("seen_test", seen), ("unseen_fewshot", unseen),
                          ("unseen_test", unseen)):
        rows = pairs[pairs["set"] == name]
        if name == "unseen_fewshot":
            rows = rows[rows["draw"] < 3]
        mean, std = reference_accuracy(table, v_ref, rows, workers)
        assert records[0][name] == pytest.approx(mean) and records[0][f"{name}_std"] == pytest.approx(std)
    basis = load_tensors(os.path.join(out, "lore_K2_alpha0.safetensors"), ["V", "W", "W_unseen"])
    assert basis["V"].shape == (table.shape[1], 2) and basis["W"].shape == (2, 2) and basis["W_unseen"].shape == (3, 2)
    defaults = train_basis.parse_args([])
    assert defaults.out == os.path.join(FOLDER, "results", "train_basis") and defaults.fewshot_pairs == 50
    assert defaults.k_list == [0, 1, 2, 3, 4, 5, 6] and defaults.method == ["lore"]
    defaults = prepare.parse_args([])
    assert (defaults.drop_smallest, defaults.split_seed, defaults.max_train_pairs, defaults.max_fewshot_pairs) \
        == (2, 0, 150, 100)


def test_train_basis_is_deterministic_and_the_split_seed_alone_moves_the_split(hub, data, tiny_model_dir, tmp_path):
    def run(name, *flags):
        out = str(tmp_path / name)
        train_basis.main(train_basis.parse_args(["--data", data, "--out", out, *FAST, "--k-list", "2", *flags]))
        return (read_json(os.path.join(out, "results.json")),
                load_tensors(os.path.join(out, "lore_K2_alpha0.safetensors"))["V"])
    a, b, c = run("a"), run("b"), run("c", "--seed", "5")
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert not torch.equal(c[1], a[1])                   # --seed: the same data, another initialization
    # --split-seed (prepare): another split and other draws, the same embeddings
    other = str(tmp_path / "other")
    os.makedirs(tmp_path / ".other.cache")   # the extraction cache of --out other: the same embeddings, reused
    shutil.copyfile(os.path.join(data, "embeddings.safetensors"), tmp_path / ".other.cache" / "embeddings.safetensors")
    run_prepare(hub, tiny_model_dir, other, "--split-seed", "3")
    users = lambda folder: read_json(os.path.join(folder, "data.json"))["users"]
    seen, unseen, _ = expected_split(3)
    assert users(other) == {"seen": seen, "unseen": unseen} and users(other)["seen"] != users(data)["seen"]
    assert torch.equal(table_of(other), table_of(data))


def test_vary_fewshot(data, tmp_path):
    out = str(tmp_path / "fewshot")
    vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--k-list", "0,2", "--trials", "3",
                                               "--shots", "1,2,5", "--iters", "20", "--fewshot-iters", "20",
                                               "--device", "cpu", "--select", "random,active"]))
    assert sorted(os.listdir(out)) == [".lore-run.json", "accuracy_vs_shots.png", "config.json", "results.csv",
                                       "results.json"]
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["K"], r["select"], r["shots"]) for r in records] == [
        (K, how, s) for K in (0, 2) for how in ("random", "active") for s in (1, 2, 5)]
    records = [r for r in records if r["select"] == "random"]
    assert read_json(os.path.join(out, "config.json"))["script"] == "RedditTLDR/vary_fewshot.py"
    # K = 0 does not adapt: held-out accuracy is the head's, the same in every trial
    _, unseen, _ = expected_split()
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    mean, _ = reference_accuracy(table_of(data), v_ref_of(data), pairs[pairs["set"] == "unseen_test"], unseen)
    for r in records[:3]:
        assert r["unseen_test"] == pytest.approx(mean) and r["unseen_test_std"] == 0
    assert all(0 <= r["unseen_fewshot"] <= 1 for r in records)
    defaults = vary_fewshot.parse_args([])
    assert defaults.out == os.path.join(FOLDER, "results", "vary_fewshot")
    assert (defaults.k_list, defaults.trials, defaults.shots) == ([5], 20, list(range(5, 51, 5)))


def test_bad_hub_files_exit_with_2(hub, tiny_model_dir, tmp_path, capsys):
    train_path, validation_path = (f.split("=", 1)[1] for f in hub[2])
    bad = lambda *files: exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--out", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--device", "cpu", "--data-files", *files]))
    code, err = bad(f"train={train_path}")
    assert code == 2 and "--data-files has no validation=PATH" in err
    code, err = bad(f"train={train_path}", f"validation={tmp_path / 'none.parquet'}")
    assert code == 2 and "none.parquet: no such file (the validation split)" in err
    (tmp_path / "garbage.parquet").write_bytes(b"not a parquet file")
    code, err = bad(f"train={train_path}", f"validation={tmp_path / 'garbage.parquet'}")
    assert code == 2 and "garbage.parquet: cannot read it as parquet" in err
    rows = hub[0][:3]
    for name, change, message in (
            ("noworker", lambda r: r.pop("worker"), "train split: no column 'worker'"),
            ("choice", lambda r: r.update(choice=2), "train split, row 2: 'choice' must be 0 or 1, got 2"),
            ("summaries", lambda r: r["summaries"].pop(), "train split, row 2: 'summaries' must be 2 summaries"),
            ("noposts", None, "train split: none of its 3 rows has a post")):
        edited = json.loads(json.dumps(rows))
        for r in (edited if name in ("noworker", "noposts") else edited[2:]):
            if change is None:
                r["info"]["post"] = None
            else:
                change(r)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in edited))
        code, err = bad(f"train={path}", f"validation={validation_path}")
        assert code == 2 and message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_malformed_info_is_refused_naming_the_row_before_the_extraction(hub, tiny_model_dir, tmp_path, capsys,
                                                                        monkeypatch):
    """`info` a string, or `info.id` an object: one line naming the row, exit 2, before any embedding
    (an object id once failed only when pairs.parquet was written, after the whole extraction)."""
    validation_path = hub[2][1].split("=", 1)[1]
    monkeypatch.setattr(prepare, "embed_conversations", lambda *a, **k: pytest.fail("embedded a malformed split"))
    for name, change, message in (
            ("info_str", lambda r: r.update(info="post 1: my cat"), "train split, row 0: 'info' must be an object"),
            ("id_obj", lambda r: r["info"].update(id={"t3": 1}), "train split, row 0: 'info.id' must be a string "
                                                                  "or integer, got {'t3': 1}")):
        edited = json.loads(json.dumps(hub[0][:3]))
        for r in edited:
            change(r)
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in edited))
        code, err = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
            ["--out", str(tmp_path / "out"), "--model", str(tiny_model_dir), "--device", "cpu",
             "--data-files", f"train={path}", f"validation={validation_path}"]))
        assert code == 2 and err.startswith("error: ") and message in err, err
    assert not os.path.exists(tmp_path / "out")


def test_bad_splits_exit_with_2(hub, data, tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "r")
    code, err = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--out", out, "--model", str(tiny_model_dir), "--device", "cpu", "--data-files", *hub[2],
         "--drop-smallest", "6"]))
    assert code == 2 and "1 workers left in both splits after dropping the 6" in err
    assert not os.path.exists(out)                       # the split fails before the embedding
    code, err = exit_code_and_message(capsys, vary_fewshot.main, vary_fewshot.parse_args(
        ["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "f")]))
    assert code == 2 and "nothing: no data.json" in err
    with pytest.raises(SystemExit) as e:
        vary_fewshot.parse_args(["--data", data, "--out", str(tmp_path / "f"), "--shots", "0,5"])
    assert e.value.code == 2 and "distinct shots >= 1" in capsys.readouterr().err
    # held-out is required: a listed worker without validation comparisons is named
    folder = str(tmp_path / "no_held_out")
    save_tensors(os.path.join(folder, "embeddings.safetensors"), {"embeddings": torch.randn(6, 4)})
    write_data_folder(
        folder, dataset="RedditTLDR", users={"seen": ["a", "b"], "unseen": ["c"]}, v_ref=torch.randn(4, 1), config={},
        pairs=pd.DataFrame({"set": ["seen_train", "seen_train", "seen_test", "unseen_fewshot", "unseen_test"],
                            "user": ["a", "b", "a", "c", "c"], "chosen": [0, 2, 4, 0, 2], "rejected": [1, 3, 5, 1, 3]}),
        conversations=pd.DataFrame({"row": range(6), "messages": ["[]"] * 6}))
    with pytest.raises(InputError, match="seen_test: user 'b' has no pairs"):
        load_data(folder, "cpu")
    code, err = exit_code_and_message(capsys, train_basis.main, train_basis.parse_args(
        ["--data", folder, "--out", str(tmp_path / "t"), *FAST]))
    assert code == 2 and "seen_test: user 'b' has no pairs" in err


def test_pairs_of_another_split_are_refused(hub, data, tiny_model_dir, tmp_path, capsys):
    """pairs.parquet of a prepare with another --split-seed, copied over: the hash in data.json tells."""
    other = str(tmp_path / "other")
    os.makedirs(tmp_path / ".other.cache")   # the extraction cache of --out other: the same embeddings, reused
    shutil.copyfile(os.path.join(data, "embeddings.safetensors"), tmp_path / ".other.cache" / "embeddings.safetensors")
    run_prepare(hub, tiny_model_dir, other, "--split-seed", "3")
    mixed = str(tmp_path / "mixed")
    shutil.copytree(data, mixed)
    shutil.copyfile(os.path.join(other, "pairs.parquet"), os.path.join(mixed, "pairs.parquet"))
    code, err = exit_code_and_message(capsys, train_basis.main, train_basis.parse_args(
        ["--data", mixed, "--out", str(tmp_path / "r"), *FAST]))
    assert code == 2 and os.path.join(mixed, "pairs.parquet") in err and "rerun prepare.py" in err


# the baselines beside LoRe on this dataset's fixture: small networks, one epoch (the recipe's sizes are the papers')
BASELINES = ["--pal-dim", "8", "--vpl-hidden", "8", "--vpl-epochs", "1", "--vpl-duplicates", "1"]


def test_every_method_runs_on_the_workers(data, tmp_path):
    out = str(tmp_path / "tb")
    train_basis.main(train_basis.parse_args(["--data", data, "--out", out, *FAST, "--method", "lore,pal,vpl",
                                             *BASELINES]))
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["K"]) for r in records] == [("lore", 0), ("lore", 1), ("lore", 2), ("pal", 1),
                                                        ("pal", 2), ("vpl", 1), ("vpl", 2)]
    assert all(0 <= r[s] <= 1 for r in records for s in SETS)
    out = str(tmp_path / "vf")
    vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--k-list", "2", "--iters", "20",
                                               "--fewshot-iters", "20", "--shots", "1,2", "--trials", "1",
                                               "--method", "lore,pal,vpl", *BASELINES]))
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["shots"]) for r in records] == [(m, s) for m in ("lore", "pal", "vpl") for s in (1, 2)]
    assert "accuracy_vs_shots.png" in os.listdir(out)
