"""Community Alignment: prepare (the hub's schema, the odd cells, the split by conversation, the data
layout), train_basis, vary_fewshot and tools/compare.py with lore, pal and vpl, bad rows.

The fixture, written by the test in the hub's schema (one row per conversation of one annotator, four
turns of four candidates): 9 annotators with 4-6 conversations of 1-4 turns, and the odd cases the
recipe has rules for: an `EMPTY STRING` candidate, an empty and a null one, a candidate repeating the
winner and one repeating another loser, a missing turn followed by a present one (cut), a preferred
response whose text is `EMPTY STRING` (cut), a conversation whose every loser is unusable (no pair,
dropped), a conversation in French (skipped), an annotator with 3 conversations (dropped)."""
import json
import os
import random
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import REPO, load_script

sys.path.insert(0, REPO)
import utils  # noqa: E402
from lore import compare  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import load_splits, load_tensors, read_json, read_table  # noqa: E402
from lore.pairs import SETS  # noqa: E402
from lore.methods import METHODS  # noqa: E402

FOLDER = os.path.join(REPO, "CommunityAlignment")
prepare = load_script(os.path.join(FOLDER, "prepare.py"), "ca_prepare")
train_basis = load_script(os.path.join(FOLDER, "train_basis.py"), "ca_train_basis")
vary_fewshot = load_script(os.path.join(FOLDER, "vary_fewshot.py"), "ca_vary_fewshot")
compare_tool = load_script(os.path.join(REPO, "tools", "compare.py"), "ca_compare")

TURNS, LETTERS = prepare.TURNS, "abcd"
FAST = ["--iters", "20", "--fewshot-iters", "10", "--device", "cpu", "--alpha-list", "0"]
BASELINES = ["--pal-dim", "8", "--vpl-hidden", "8", "--vpl-epochs", "1", "--vpl-duplicates", "1",
             "--pal-epochs", "1", "--pal-fewshot-epochs", "2"]


def words(rng, k=None):
    return " ".join(f"w{rng.randrange(150)}" for _ in range(k or rng.randint(2, 5)))


def make_rows():
    """-> (rows in the hub's schema, expected {conversation_id: [(turn, chosen messages, rejected
    messages, rejected response)]} of the conversations that give pairs, built from the plan)."""
    rng = random.Random(0)
    rows, expected = [], {}
    plan = [(f"a{u}", 4 + u % 3) for u in range(8)] + [("a8", 3)]
    for user, n in plan:
        for j in range(n):
            cid = f"c{user}_{j}"
            row = {"conversation_id": cid, "annotator_id": user, "assigned_lang": "en", "wave": 1 + j % 2,
                   "annotator_age": "25-34", "annotator_gender": "x", "annotator_education_level": "x",
                   "annotator_political": "x", "annotator_ethnicity": "x", "annotator_country": "x",
                   "in_balanced_subset": j % 2 == 0, "is_pregenerated_first_prompt": j == 0}
            n_turns = 1 if cid in ("ca4_1", "ca5_5") else 3 if cid == "ca3_0" else rng.randint(1, 4)
            history, pairs = [], []
            for t, name in enumerate(TURNS):
                cells = {"prompt": None, **{f"response_{x}": None for x in LETTERS},
                         "preferred_response": None, "feedback": None}
                if t < n_turns:
                    prompt = words(rng)
                    texts = {x: f"{words(rng)} ({cid} t{t}{x})" for x in LETTERS}
                    preferred = rng.choice(LETTERS)
                    losers = [x for x in LETTERS if x != preferred]
                    bad = {}
                    if (cid, t) == ("ca0_0", 0):
                        bad = {losers[0]: "EMPTY STRING", losers[1]: ""}
                    if (cid, t) == ("ca1_1", 0):
                        bad = {losers[0]: texts[preferred], losers[2]: texts[losers[1]]}
                    if (cid, t) == ("ca2_0", 0):
                        bad = {losers[2]: None}
                    if cid == "ca5_5" and t == 0:   # every loser unusable: no pair, the history goes on
                        bad = {losers[0]: "EMPTY STRING", losers[1]: texts[preferred], losers[2]: ""}
                    texts.update(bad)
                    cells.update(prompt=prompt, preferred_response=f"response_{preferred}", feedback=words(rng),
                                 **{f"response_{x}": texts[x] for x in LETTERS})
                    history.append({"role": "user", "content": prompt})
                    pairs += [(t, history + [{"role": "assistant", "content": texts[preferred]}],
                               history + [{"role": "assistant", "content": texts[x]}], f"response_{x}")
                              for x in losers if x not in bad]
                    history.append({"role": "assistant", "content": texts[preferred]})
                row.update({f"{name}_turn_{k}": v for k, v in cells.items()})
            rows.append(row)
            if pairs:
                expected[cid] = pairs
    # a missing second turn with a third one present: the third is cut
    row = next(r for r in rows if r["conversation_id"] == "ca3_0")
    row.update({f"second_turn_{k}": None for k in ("prompt", *(f"response_{x}" for x in LETTERS), "preferred_response")})
    row.update(third_turn_prompt="late", **{f"third_turn_response_{x}": f"late {x}" for x in LETTERS},
               third_turn_preferred_response="response_b", fourth_turn_prompt=None)
    expected["ca3_0"] = [p for p in expected["ca3_0"] if p[0] == 0]
    # the winner of the first turn is EMPTY STRING: nothing of the conversation is read
    row = next(r for r in rows if r["conversation_id"] == "ca4_1")
    row[f"first_turn_{row['first_turn_preferred_response']}"] = "EMPTY STRING"
    expected.pop("ca4_1")
    assert "ca5_5" not in expected
    # a French conversation: skipped under --lang en
    french = dict(rows[0], conversation_id="fr_0", assigned_lang="fr")
    rows.insert(5, french)
    return rows, expected


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ca_hub")
    rows, expected = make_rows()
    pd.DataFrame(rows).to_parquet(folder / "train.parquet")
    return rows, expected, str(folder / "train.parquet")


@pytest.fixture(scope="module")
def data(hub, tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ca") / "data")
    prepare.main(prepare.parse_args(["--out", out, "--model", tiny_model_dir, "--device", "cpu",
                                     "--data-files", f"train={hub[2]}"]))
    return out


def exit_code_and_message(capsys, main, args):
    """-> (exit code, the last line on stderr: the error)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_pairs_are_every_turns_winner_against_each_usable_loser(hub, data, tiny_model_dir):
    rows, expected, _ = hub
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    assert list(pairs.columns) == prepare.PAIR_COLUMNS
    conversations = read_table(os.path.join(data, "conversations.parquet"))
    messages = [json.loads(m) for m in conversations["messages"]]
    assert conversations["row"].tolist() == list(range(len(messages)))
    assert len(set(map(json.dumps, messages))) == len(messages)        # each conversation embedded once
    # the kept annotators' conversations, each pair by (conversation, turn, loser), in the plan's order
    kept = set(pairs["conversation_id"])
    got = {}
    for r in pairs.sort_values(["conversation_id", "turn", "rejected_response"]).itertuples():
        got.setdefault(r.conversation_id, []).append((r.turn, messages[r.chosen], messages[r.rejected],
                                                      r.rejected_response))
    assert got == {c: sorted(p, key=lambda x: (x[0], x[3])) for c, p in expected.items() if not c.startswith("ca8")}
    assert kept == {c for c in expected if not c.startswith("ca8")}
    source = {r["conversation_id"]: i for i, r in enumerate(rows)}
    assert pairs["row"].tolist() == pairs["conversation_id"].map(source).tolist()
    assert (pairs["user"] == pairs["conversation_id"].str.slice(1, 3)).all() and (pairs["lang"] == "en").all()
    assert pairs["group"].equals(pairs["conversation_id"])
    # a table row holds the conversation it was embedded from: phi . v_ref is the model's own score
    table = load_tensors(os.path.join(data, "embeddings.safetensors"))["embeddings"]
    v_ref = load_tensors(os.path.join(data, "v_ref.safetensors"))["v_ref"]
    assert table.shape == (len(messages), 64)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    last = pairs.loc[pairs["turn"].idxmax()]                              # a later turn: a history of several messages
    for row in (int(last["chosen"]), int(last["rejected"])):
        assert len(messages[row]) > 2
        ids = tokenizer.apply_chat_template(messages[row], return_tensors="pt", return_dict=True)
        with torch.no_grad():
            score = model(**ids).logits[0, 0]
        assert torch.allclose(table[row].float() @ v_ref[:, 0], score, atol=1e-4)
    info = read_json(os.path.join(data, "data.json"))
    assert info["dataset"] == "CommunityAlignment" and info["dropped"] == {"a8": 3}
    counts = info["counts"]
    assert (counts["rows"], counts["other_language"], counts["conversations"]) == (len(rows), 1, len(rows) - 1)
    assert (counts["empty_string"], counts["empty"], counts["duplicate"]) == (2, 3, 3)
    assert counts["conversations_without_pairs"] == 2                              # ca4_1, ca5_5
    assert counts["turns_cut"] == 2                  # ca4_1's first turn (its winner), ca3_0's third (after a gap)
    assert counts["pairs"] == sum(map(len, expected.values()))


def test_the_split_is_by_conversation_and_no_conversation_is_on_both_sides(data):
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    info = read_json(os.path.join(data, "data.json"))
    users = info["users"]
    assert sorted(users["seen"] + users["unseen"]) == [f"a{u}" for u in range(8)]
    assert len(users["seen"]) == int(8 * 0.8) and not set(users["seen"]) & set(users["unseen"])
    # every conversation (and so every pair of every turn of it) in exactly one set
    sides = pairs.groupby("conversation_id")["set"].nunique()
    assert (sides == 1).all()
    train = set(pairs.loc[pairs["set"].isin(["seen_train", "unseen_fewshot"]), "conversation_id"])
    test = set(pairs.loc[pairs["set"].isin(["seen_test", "unseen_test"]), "conversation_id"])
    assert train and test and not train & test
    # and so no sibling pair: no (conversation, turn) has pairs on both sides
    turn = pairs["conversation_id"] + "/" + pairs["turn"].astype(str)
    assert not set(turn[pairs["set"].isin(["seen_train", "unseen_fewshot"])]) & set(
        turn[pairs["set"].isin(["seen_test", "unseen_test"])])
    for group, names in (("seen", ("seen_train", "seen_test")), ("unseen", ("unseen_fewshot", "unseen_test"))):
        for user in users[group]:
            mine = pairs[pairs["user"] == user]
            assert set(mine["set"]) == set(names)
            n = mine["conversation_id"].nunique()
            train_ids = mine.loc[mine["set"] == names[0], "conversation_id"].unique().tolist()
            assert len(train_ids) == n // 2
            # draw ranks the train conversations 0, 1, ...: one rank per conversation, in order
            draws = mine[mine["set"] == names[0]].groupby("conversation_id", sort=False)["draw"].unique()
            assert [list(d) for d in draws] == [[k] for k in range(len(train_ids))]
            assert (mine.loc[mine["set"] == names[1], "draw"] == -1).all()
    # the sets in order, each user's pairs together in data.json's order
    assert pairs["set"].map(SETS.index).is_monotonic_increasing
    for name in SETS:
        part = pairs[pairs["set"] == name]
        group = users["unseen" if name.startswith("unseen") else "seen"]
        assert part["user"].map(group.index).is_monotonic_increasing


def test_split_rule_seed_and_min_conversations(hub):
    """The split by hand: drop annotators under --min-conversations, shuffle the sorted rest, 80% seen,
    each annotator's conversations shuffled and halved, one generator."""
    records, _ = prepare.conversation_pairs(load_splits(None, ("train",), {"train": hub[2]})["train"], ["en"], {})
    args = prepare.parse_args(["--seed", "3", "--min-conversations", "5"])
    users, dropped, sets = prepare.split(records, args)
    convs = pd.DataFrame(records).groupby("user", sort=False)["conversation_id"].unique()
    rng = random.Random(3)
    kept = sorted(u for u, c in convs.items() if len(c) >= 5)
    rng.shuffle(kept)
    assert users == {"seen": kept[:int(len(kept) * 0.8)], "unseen": kept[int(len(kept) * 0.8):]}
    assert dropped == {u: len(c) for u, c in convs.items() if len(c) < 5}
    for user in kept:
        ids = list(convs[user])
        rng.shuffle(ids)
        mine = sets[sets["user"] == user]
        train = mine.loc[mine["draw"] >= 0].drop_duplicates("conversation_id")
        assert train["conversation_id"].tolist() == ids[:len(ids) // 2]
        assert set(mine.loc[mine["draw"] < 0, "conversation_id"]) == set(ids[len(ids) // 2:])
    assert prepare.split(records, args)[2].equals(sets)                         # same seed, same split
    assert prepare.split(records, prepare.parse_args(["--seed", "4", "--min-conversations", "5"]))[0] != users
    # --lang all keeps the French conversation
    assert len(prepare.conversation_pairs(load_splits(None, ("train",), {"train": hub[2]})["train"], ["all"], {})[0]) \
        > len(records)


def test_csv_and_json_lines_give_the_same_pairs(hub, tmp_path):
    df = pd.read_parquet(hub[2])
    df.to_csv(tmp_path / "train.csv", index=False)
    df.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    read = lambda path: prepare.conversation_pairs(load_splits(None, ("train",), {"train": path})["train"], ["en"], {})
    reference = read(hub[2])
    for path in (tmp_path / "train.csv", tmp_path / "train.jsonl"):
        assert read(str(path)) == reference, path


def test_few_shot_pools_are_whole_conversations(data):
    loaded = load_data(data, "cpu")
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    pool = loaded.sets["unseen_fewshot"]
    assert pool.group is not None and len(pool) == (pairs["set"] == "unseen_fewshot").sum()
    sampled = utils.sample_shots(pool, 1)
    for user in range(pool.n_users):
        picked = sampled.group[sampled.user == user].unique()
        assert len(picked) == 1
        assert (sampled.user == user).sum() == ((pool.user == user) & (pool.group == picked[0])).sum()
    # --fewshot-conversations n keeps the first n conversations of each pool, whole
    first = load_data(data, "cpu", fewshot_pairs=1).sets["unseen_fewshot"]
    part = pairs[(pairs["set"] == "unseen_fewshot") & (pairs["draw"] < 1)]
    assert len(first) == len(part) and first.chosen.tolist() == part["chosen"].tolist()


def reference_accuracy(data, name):
    """K = 0 by hand: per annotator, the fraction of its pairs that v_ref orders right; their mean."""
    table = load_tensors(os.path.join(data, "embeddings.safetensors"))["embeddings"].float()
    v_ref = load_tensors(os.path.join(data, "v_ref.safetensors"))["v_ref"]
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    reward = (table @ v_ref)[:, 0].numpy()
    part = pairs[pairs["set"] == name]
    return (pd.Series(reward[part["chosen"]] > reward[part["rejected"]]).groupby(part["user"].to_numpy()).mean()).mean()


def test_train_basis_with_every_method_vary_fewshot_and_compare(data, tmp_path, monkeypatch):
    out = str(tmp_path / "tb")
    records = train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--k-list", "0,2", *FAST,
                                                       "--method", "lore,pal,vpl", *BASELINES]))
    assert [(r["method"], r["K"]) for r in records] == [("lore", 0), ("lore", 2), ("pal", 2), ("vpl", 2)]
    for name in SETS:
        assert records[0][name] == pytest.approx(reference_accuracy(data, name), abs=1e-6)
    assert all(0 <= r[s] <= 1 for r in records for s in SETS)
    assert {"results.json", "accuracy_vs_rank.png", "lore_K2_alpha0.safetensors"} <= set(os.listdir(out))
    assert read_json(os.path.join(out, "config.json"))["script"] == "CommunityAlignment/train_basis.py"
    out = str(tmp_path / "vf")
    records = vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--k-list", "0,2",
                                                         "--shots", "1,2", "--trials", "2", *FAST, "--method", "lore"]))
    assert [(r["K"], r["shots"]) for r in records] == [(K, s) for K in (0, 2) for s in (1, 2)]
    assert records[0]["unseen_test"] == pytest.approx(reference_accuracy(data, "unseen_test"), abs=1e-6)
    assert "accuracy_vs_shots.png" in os.listdir(out)
    # tools/compare.py on the folder: the recipe's few-shot size (all conversations); short fits
    monkeypatch.setattr(METHODS["lore"], "search_space", {"K": [2], "iters": [20], "fewshot_iters": [10]})
    monkeypatch.setattr(compare, "FIXED_ROWS", tuple((label, name, {**config, "iters": 20, "fewshot_iters": 10})
                                                    for label, name, config in compare.FIXED_ROWS))
    result = compare_tool.main(compare_tool.parse_args(["--data", data, "--method", "lore", "--budget", "1",
                                                        "--seeds", "1", "--out", str(tmp_path / "cmp"), "--device", "cpu"]))
    assert result["data"]["dataset"] == "CommunityAlignment" and result["data"]["fewshot_pairs"] is None
    assert [r["method"] for r in result["methods"]] == ["reference", "bt", "lore"]
    assert "comparison.md" in os.listdir(tmp_path / "cmp")
    defaults = train_basis.parse_args([])
    assert (defaults.method, defaults.k_list, defaults.alpha_list, defaults.iters, defaults.fewshot_conversations) == \
        (["lore_regularized"], [0, 1, 5, 10, 15, 20, 25, 50], [1e4], 20000, None)
    defaults = vary_fewshot.parse_args([])
    assert (defaults.method, defaults.k_list, defaults.shots, defaults.trials) == (["lore_regularized"], [10], [1, 2, 3], 5)


def test_bad_rows_and_flags_exit_with_2(hub, tiny_model_dir, tmp_path, capsys):
    rows = hub[0][:6]

    def bad(edit, *flags):
        edited = json.loads(json.dumps(rows))
        edit(edited)
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in edited))
        return exit_code_and_message(capsys, prepare.main, prepare.parse_args(
            ["--out", str(tmp_path / "out"), "--model", tiny_model_dir, "--device", "cpu",
             "--data-files", f"train={path}", *flags]))
    for edit, message in (
            (lambda r: r[2].update(first_turn_preferred_response="response_e"),
             "train split, row 2: 'first_turn_preferred_response' is 'response_e', expected one of response_a"),
            (lambda r: r[3].update(annotator_id=""), "train split, row 3: 'annotator_id' must be a non-empty id"),
            (lambda r: r[4].update(conversation_id=r[1]["conversation_id"]),
             "train split, row 4: conversation_id 'ca0_1' appears twice (rows 1 and 4)"),
            (lambda r: [x.pop("fourth_turn_prompt") for x in r], "train split: no column 'fourth_turn_prompt'")):
        code, err = bad(edit)
        assert code == 2 and message in err, err
    code, err = bad(lambda r: None, "--min-conversations", "9")
    assert code == 2 and "0 seen and 0 unseen annotators" in err
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        prepare.parse_args(["--lang", "all,en"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        prepare.parse_args(["--min-conversations", "1"])
    assert e.value.code == 2 and "--min-conversations must be at least 2" in capsys.readouterr().err
