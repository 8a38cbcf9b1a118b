"""PRISM: prepare (qualification, the seeded split, examples), generate-prism-embeddings, train_basis,
vary_fewshot, eval_rb2 (a planted RewardBench 2 fixture) and bad inputs.

The fixture, written by the test in the survey / conversations schema: 16 regular users with 6-8
multi-turn dialogs (1-3 rejected replies per turn, the chosen reply at a random place among them),
conversation lines in a shuffled order, and the cases the recipe has rules for: a dialog without any
rejected reply (u03, dropped), a turn without rejected replies (u04: no example, the history goes on),
a turn without a chosen reply (u05: the dialog stops there), a user left with 5 qualified dialogs
(u16), a user with 0 completed conversations (u17), a user whose every dialog is unqualified (u18,
dropped), a survey user without dialogs (u19, stays in the shuffle), a user with 3 dialogs (u20)."""
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import REPO, load_script

sys.path.insert(0, REPO)
import utils  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.data import DATA_FILES, load_data  # noqa: E402
from lore.extract import read_reward_head  # noqa: E402
from lore.io import load_tensors, read_json, read_table, save_tensors, write_json, write_table  # noqa: E402
from lore.pairs import SETS  # noqa: E402
from lore.recipes import load_recipe  # noqa: E402

FOLDER = os.path.join(REPO, "PRISM")
prepare = load_script(os.path.join(FOLDER, "prepare.py"), "prism_prepare")
embed = load_script(os.path.join(FOLDER, "generate-prism-embeddings.py"), "prism_embed")
train_basis = load_script(os.path.join(FOLDER, "train_basis.py"), "prism_train_basis")
vary_fewshot = load_script(os.path.join(FOLDER, "vary_fewshot.py"), "prism_vary_fewshot")
eval_rb2 = load_script(os.path.join(FOLDER, "eval_rb2.py"), "prism_eval_rb2")

FAST = ["--iters", "30", "--fewshot-iters", "20", "--device", "cpu"]
COLUMNS = ["split", "user", "user_group", "dialog", "turn", "rejected_index", "chosen", "rejected"]
PAIR_COLUMNS = ["set", "user", "chosen", "rejected", "group", "dialog", "turn", "rejected_index"]
SET_OF = {("seen", "train"): "seen_train", ("seen", "test"): "seen_test", ("unseen", "train"): "unseen_fewshot",
          ("unseen", "test"): "unseen_test"}
RECORD_KEYS = {"method", "K", "alpha", *SETS, *(f"{s}_std" for s in SETS), "converged", "loss_fall",
               "stop", "stopped", "steps", "passes", "fewshot_stop", "fewshot_stopped", "fewshot_rule", "fewshot_steps"}
TURN = {"user": True, "chosen": True}


def words(rng, k=None):
    return " ".join(f"w{rng.randrange(200)}" for _ in range(k or rng.randint(2, 6)))


def dialog_plan(rng, unqualified=False):
    return [{**TURN, "rejected": 0 if unqualified else rng.randint(1, 3)} for _ in range(rng.randint(2, 3))]


def make_prism(folder):
    """Writes survey.jsonl and conversations.jsonl into folder. -> (survey, conversations, expected):
    expected {dialog: [(turn, rejected_index, chosen conversation, rejected conversation)]} of the
    dialogs that give examples, built here from the plan (independently of prepare.py)."""
    rng = random.Random(0)
    plan = {f"u{i:02d}": [dialog_plan(rng) for _ in range(6 + i % 3)] for i in range(16)}
    plan["u03"].append(dialog_plan(rng, unqualified=True))
    plan["u04"][0] = [{**TURN, "rejected": 2}, {**TURN, "rejected": 0}, {**TURN, "rejected": 1}]
    plan["u05"][0] = [{**TURN, "rejected": 1}, {"user": True, "chosen": False, "rejected": 2},
                      {**TURN, "rejected": 3}]
    plan["u16"] = [dialog_plan(rng) for _ in range(5)] + [dialog_plan(rng, unqualified=True)]
    plan["u17"] = [dialog_plan(rng)]
    plan["u18"] = [dialog_plan(rng, unqualified=True) for _ in range(2)]
    plan["u19"] = []
    plan["u20"] = [dialog_plan(rng) for _ in range(3)]
    survey = [{"user_id": u, "num_completed_conversations": 0 if u == "u17" else max(len(d), 1),
               "age": "25-34 years old"} for u, d in plan.items()]
    conversations, expected = [], {}
    for u, dialogs in plan.items():
        for j, turns in enumerate(dialogs):
            cid = f"c{u[1:]}_{j}"
            history, rows, messages, stopped = [], [], [], False
            for t, spec in enumerate(turns):
                user, chosen = words(rng), words(rng)
                rejected = [words(rng) for _ in range(spec["rejected"])]
                replies = [(r, False) for r in rejected]
                if spec["chosen"]:
                    replies.insert(rng.randint(0, len(rejected)), (chosen, True))
                history.append({"turn": t, "role": "user", "content": user, "if_chosen": None,
                                "within_turn_id": None, "model_name": None})
                history += [{"turn": t, "role": "model", "content": text, "if_chosen": c, "within_turn_id": k,
                             "model_name": f"model{k}", "score": 50} for k, (text, c) in enumerate(replies)]
                stopped = stopped or not spec["chosen"]
                if stopped:
                    continue
                messages.append({"role": "user", "content": user})
                rows += [(t, i, messages + [{"role": "assistant", "content": chosen}],
                          messages + [{"role": "assistant", "content": r}]) for i, r in enumerate(rejected)]
                messages.append({"role": "assistant", "content": chosen})
            conversations.append({"conversation_id": cid, "user_id": u, "conversation_turns": len(turns),
                                  "conversation_history": history, "open_feedback": "ok"})
            if rows:
                expected[cid] = rows
    rng.shuffle(conversations)
    for name, lines in (("survey.jsonl", survey), ("conversations.jsonl", conversations)):
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    return survey, conversations, expected


def original_split(survey, conversations, qualified, seed=123):
    """The split of the original research code (PRISM/prepare.py), transcribed: users with a completed
    conversation; drop unqualified dialogs, and a user with its last dialog; np.random.seed, shuffle,
    80% seen; users with > 5 dialogs have their dialogs shuffled and halved, seen users first."""
    data_user = {s["user_id"]: [] for s in survey if s["num_completed_conversations"] != 0}
    for c in conversations:
        if c["user_id"] in data_user:
            data_user[c["user_id"]].append(c["conversation_id"])
    for c in conversations:
        if c["user_id"] in data_user and c["conversation_id"] not in qualified:
            data_user[c["user_id"]].remove(c["conversation_id"])
            if not data_user[c["user_id"]]:
                del data_user[c["user_id"]]
    np.random.seed(seed)
    user_ids = np.array(list(data_user.keys()))
    np.random.shuffle(user_ids)
    split = {"seed": seed, "seen_users": [], "unseen_users": [], "dialogs": {}}
    cut = int(len(user_ids) * 0.8)
    for group, users in (("seen", user_ids[:cut]), ("unseen", user_ids[cut:])):
        for user in users:
            ids = np.array(data_user[user])
            if len(ids) > 5:
                split[f"{group}_users"].append(str(user))
                np.random.shuffle(ids)
                split["dialogs"][str(user)] = {"train": ids[:int(len(ids) * 0.5)].tolist(),
                                               "test": ids[int(len(ids) * 0.5):].tolist()}
    return split


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prism_raw")
    return str(folder), *make_prism(str(folder))


@pytest.fixture(scope="module")
def data(raw, tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prism") / "data")
    prepare.main(prepare.parse_args(["--data-dir", raw[0], "--out", out]))
    embed.main(embed.parse_args(["--data", out, "--model", tiny_model_dir, "--device", "cpu"]))
    return out


def exit_code_and_message(capsys, main, args):
    """-> (exit code, the last line on stderr: the error)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_split_is_the_originals(raw, data):
    _, survey, conversations, expected = raw
    split = read_json(os.path.join(data, "split.json"))
    assert split == original_split(survey, conversations, set(expected))
    assert len(split["seen_users"]) >= 2 and len(split["unseen_users"]) >= 2   # the fixture covers both
    kept = split["seen_users"] + split["unseen_users"]
    assert sorted(kept) == [f"u{i:02d}" for i in range(16)]     # u16-u20: too few, none, or dropped
    for user in kept:
        dialogs = split["dialogs"][user]
        n = len(dialogs["train"]) + len(dialogs["test"])
        own = [c["conversation_id"] for c in conversations
               if c["user_id"] == user and c["conversation_id"] in expected]
        assert n > 5 and len(dialogs["train"]) == n // 2 and sorted(dialogs["train"] + dialogs["test"]) == sorted(own)
    # u03's 7th dialog has no rejected reply: dropped, u03 keeps its 6 others
    assert sorted(split["dialogs"]["u03"]["train"] + split["dialogs"]["u03"]["test"]) == [f"c03_{j}" for j in range(6)]


def test_examples(raw, data):
    _, _, _, expected = raw
    split = read_json(os.path.join(data, "split.json"))
    df = read_table(os.path.join(data, "examples.parquet"))
    assert list(df.columns) == COLUMNS
    side = {d: s for u in split["dialogs"] for s in ("train", "test") for d in split["dialogs"][u][s]}
    group = {u: g for g in ("seen", "unseen") for u in split[f"{g}_users"]}
    assert len(df) == sum(len(expected[d]) for d in side)
    got = {}
    for r in df.itertuples():
        assert r.split == side[r.dialog] and r.user_group == group[r.user] and r.dialog.startswith(f"c{r.user[1:]}_")
        got.setdefault(r.dialog, []).append((r.turn, r.rejected_index, json.loads(r.chosen), json.loads(r.rejected)))
    assert got == {d: expected[d] for d in side}
    # train dialogs first, seen users first, users and dialogs in the split's order
    order = [(s, u, d) for s in ("train", "test") for g in ("seen", "unseen") for u in split[f"{g}_users"]
             for d in split["dialogs"][u][s]]
    assert list(dict.fromkeys(zip(df["split"], df["user"], df["dialog"]))) == order
    # the turn without rejected replies gives no example; the one without a chosen reply ends the dialog
    assert sorted(set(t for t, *_ in got["c04_0"])) == [0, 2] and sorted(set(t for t, *_ in got["c05_0"])) == [0]
    assert len(got["c04_0"][2][2]) == 6    # turn 2 sees turns 0 and 1 (with their chosen replies)


def test_chosen_and_rejected_differ_only_in_the_last_reply(data):
    df = read_table(os.path.join(data, "examples.parquet"))
    for chosen, rejected in zip(df["chosen"], df["rejected"]):
        chosen, rejected = json.loads(chosen), json.loads(rejected)
        assert len(chosen) == len(rejected) and len(chosen) % 2 == 0 and chosen[:-1] == rejected[:-1]
        assert [m["role"] for m in chosen] == ["user", "assistant"] * (len(chosen) // 2)
        assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in chosen + rejected)
        assert chosen[-1] != rejected[-1]
    # a turn's several rejected replies share one chosen conversation
    assert df.groupby(["dialog", "turn"])["chosen"].nunique().max() == 1
    assert df.groupby(["dialog", "turn"]).size().max() == 3


def test_split_is_reused_and_deterministic(raw, data, tmp_path, capsys):
    out = str(tmp_path / "again")
    prepare.main(prepare.parse_args(["--data-dir", raw[0], "--out", out]))
    with open(os.path.join(data, "split.json")) as a, open(os.path.join(out, "split.json")) as b:
        assert a.read() == b.read()
    # a split.json already there is used as it is: swap one user's halves
    split = read_json(os.path.join(out, "split.json"))
    user = split["seen_users"][0]
    split["dialogs"][user] = {"train": split["dialogs"][user]["test"], "test": split["dialogs"][user]["train"]}
    write_json(os.path.join(out, "split.json"), split)
    capsys.readouterr()
    prepare.main(prepare.parse_args(["--data-dir", raw[0], "--out", out]))
    assert "reusing" in capsys.readouterr().out
    df = read_table(os.path.join(out, "examples.parquet"))
    mine = df[df["user"] == user]
    assert set(mine.loc[mine["split"] == "train", "dialog"]) == set(split["dialogs"][user]["train"])
    code, message = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--data-dir", raw[0], "--out", out, "--seed", "7"]))
    assert code == 2 and "seed 123" in message and "--seed 7" in message
    split["dialogs"][user]["train"].append("c99_0")
    write_json(os.path.join(out, "split.json"), split)
    code, message = exit_code_and_message(capsys, prepare.main,
                                          prepare.parse_args(["--data-dir", raw[0], "--out", out]))
    assert code == 2 and "c99_0" in message and user in message


def table_of(folder):
    return load_tensors(os.path.join(folder, "embeddings.safetensors"), ["embeddings"])["embeddings"]


def v_ref_of(folder):
    return load_tensors(os.path.join(folder, "v_ref.safetensors"), ["v_ref"])["v_ref"]


def test_embeddings_and_pairs(data, tiny_model_dir):
    examples = read_table(os.path.join(data, "examples.parquet"))
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    table, v_ref = table_of(data), v_ref_of(data)
    distinct = set(examples["chosen"]) | set(examples["rejected"])
    assert table.shape == (len(distinct), 64) and torch.isfinite(table.float()).all()
    assert torch.equal(v_ref, read_reward_head(tiny_model_dir))
    # one pair per example, in its order: the set from (user group, split), the dialog as the group
    assert list(pairs.columns) == PAIR_COLUMNS
    assert pairs["set"].tolist() == [SET_OF[k] for k in zip(examples["user_group"], examples["split"])]
    assert pairs["group"].tolist() == examples["dialog"].tolist()
    ids = ["user", "dialog", "turn", "rejected_index"]
    assert pairs[ids].equals(examples[ids])
    # conversations.parquet: one row per row of the table, holding the conversation embedded there;
    # the same row wherever the conversation appears
    conversations = read_table(os.path.join(data, "conversations.parquet"))
    assert list(conversations.columns) == ["row", "messages"]
    assert conversations["row"].tolist() == list(range(len(table)))
    assert set(conversations["messages"]) == distinct
    for column in ("chosen", "rejected"):
        assert conversations["messages"][pairs[column]].tolist() == examples[column].tolist()
    # rows hold phi(conversation): phi . v_ref is the reward model's own score of that conversation
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for i in [0, 1, len(pairs) - 1]:
        for column in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(json.loads(examples[column][i]), return_tensors="pt",
                                                return_dict=True)
            with torch.no_grad():
                score = model(**ids).logits[0, 0]
            assert torch.allclose(table[pairs[column][i]].float() @ v_ref[:, 0], score, atol=1e-4)


def test_layout_and_load_data(data):
    split = read_json(os.path.join(data, "split.json"))
    info = read_json(os.path.join(data, "data.json"))
    assert set(info) == {"dataset", "users", "pairs", "embeddings", "files", "config"}
    assert info["dataset"] == "PRISM" and sorted(info["files"]) == sorted(DATA_FILES)
    assert info["users"] == {"seen": split["seen_users"], "unseen": split["unseen_users"]}
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    assert info["pairs"] == {name: int((pairs["set"] == name).sum()) for name in SETS}
    assert all(info["pairs"].values())
    loaded = load_data(data, "cpu")
    assert loaded.users == info["users"] and list(loaded.sets) == list(SETS)
    assert torch.equal(loaded.table, table_of(data))
    for name, p in loaded.sets.items():
        users = info["users"]["unseen" if name.startswith("unseen") else "seen"]
        part = pairs[pairs["set"] == name]
        assert p.n_users == len(users) and p.counts().tolist() == [int((part["user"] == u).sum()) for u in users]
        # the users in data.json's order (= the split's), each with its pairs in pairs.parquet's order
        order = part.assign(i=part["user"].map(users.index)).sort_values("i", kind="stable")
        assert p.user.tolist() == order["i"].tolist() and p.chosen.tolist() == order["chosen"].tolist()
        # the dialogs are the groups the shots are drawn by: one group id per (user, dialog)
        assert len(set(zip(p.user.tolist(), p.group.tolist()))) == len(set(zip(order["user"], order["dialog"])))
        assert (pd.Series(p.group.tolist()).groupby(order["dialog"].to_numpy()).nunique() == 1).all()


def test_a_changed_file_is_refused(data, tmp_path, capsys):
    mixed = str(tmp_path / "mixed")
    shutil.copytree(data, mixed)
    conversations = read_table(os.path.join(mixed, "conversations.parquet"))
    conversations.loc[0, "messages"] = "[]"
    write_table(os.path.join(mixed, "conversations.parquet"), conversations)
    with pytest.raises(InputError, match="conversations.parquet is not the file data.json was written with"):
        load_data(mixed, "cpu")
    code, message = exit_code_and_message(capsys, vary_fewshot.main, vary_fewshot.parse_args(
        ["--data", mixed, "--out", str(tmp_path / "r"), *FAST]))
    assert code == 2 and os.path.join(mixed, "conversations.parquet") in message


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prism_results"))
    train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--k-list", "0,1,2", *FAST]))
    return out


def test_train_basis(data, results, tmp_path, capsys):
    records = read_json(os.path.join(results, "results.json"))
    assert [(r["method"], r["alpha"], r["K"]) for r in records] == [("lore_regularized", 1e4, k) for k in (0, 1, 2)]
    assert set(records[0]) == RECORD_KEYS
    assert sorted(os.listdir(results)) == sorted([".lore-run.json", "results.json", "results.csv", "accuracy_vs_rank.png",
                                                  "config.json", "basis_reports.csv", "basis_health.png", "loss_curves.png",
                                                  *(f"lore_regularized_K{k}_alpha10000{ext}" for k in (0, 1, 2)
                                                    for ext in (".safetensors", ".report.json", ".fit.json"))])
    assert read_json(os.path.join(results, "config.json"))["script"] == "PRISM/train_basis.py"
    split = read_json(os.path.join(data, "split.json"))
    basis = load_tensors(os.path.join(results, "lore_regularized_K2_alpha10000.safetensors"), ["V", "W", "W_unseen"])
    assert basis["W"].shape[0] == len(split["seen_users"]) and basis["W_unseen"].shape[0] == len(split["unseen_users"])
    # K = 0 is the reward model: per user, the fraction of its pairs that v_ref orders right
    table, v_ref = table_of(data), v_ref_of(data)
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    reward = (table.float() @ v_ref)[:, 0].numpy()
    pairs["right"] = reward[pairs["chosen"]] > reward[pairs["rejected"]]
    for name in SETS:
        per_user = pairs[pairs["set"] == name].groupby("user")["right"].mean()
        assert records[0][name] == pytest.approx(per_user.mean(), abs=1e-6)
        assert records[0][f"{name}_std"] == pytest.approx(0.25 * per_user.std(ddof=0), abs=1e-6)
    # vary_fewshot into train_basis's --out: refused, and nothing there changes
    before = {n: open(os.path.join(results, n), "rb").read() for n in os.listdir(results)}
    code, message = exit_code_and_message(capsys, vary_fewshot.main, vary_fewshot.parse_args(
        ["--data", data, "--out", results, "--k-list", "0", "--shots", "1", *FAST]))
    assert code == 2 and "PRISM/train_basis.py" in message
    assert {n: open(os.path.join(results, n), "rb").read() for n in os.listdir(results)} == before
    defaults = train_basis.parse_args([])
    assert (defaults.method, defaults.k_list, defaults.alpha_list) == (["lore_regularized"], load_recipe("PRISM")["train_basis"]["k_list"], [1e4])
    assert defaults.out == os.path.join(FOLDER, "results", "train_basis")


def test_train_basis_is_deterministic(data, results, tmp_path):
    out = str(tmp_path / "again")
    train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--k-list", "0,1,2", *FAST]))
    read = lambda folder: read_json(os.path.join(folder, "results.json"))
    assert read(out) == read(results)
    name = "lore_regularized_K2_alpha10000.safetensors"
    assert (load_tensors(os.path.join(out, name))["V"] == load_tensors(os.path.join(results, name))["V"]).all()


def test_prepare_from_another_directory(raw, data, tmp_path):
    """Relative paths resolve against the working directory, whatever it is; the same files come out."""
    os.symlink(raw[0], tmp_path / "raw")
    run = subprocess.run([sys.executable, os.path.join(FOLDER, "prepare.py"), "--data-dir", "raw", "--out", "out"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "split.json").read_text() == open(os.path.join(data, "split.json")).read()
    assert read_table(str(tmp_path / "out" / "examples.parquet")).equals(
        read_table(os.path.join(data, "examples.parquet")))


def test_shots_are_dialogs(data):
    pool = load_data(data, "cpu").sets["unseen_fewshot"]
    for shots in (1, 2):
        sampled = utils.sample_shots(pool, shots)
        for user in range(pool.n_users):
            dialogs = sampled.group[sampled.user == user].unique()
            assert len(dialogs) == shots
            # every pair of a sampled dialog comes along
            assert (pool.group[pool.user == user][:, None] == dialogs).any(1).sum() == (sampled.user == user).sum()


def test_vary_fewshot(data, tmp_path):
    out = str(tmp_path / "fewshot")
    vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--k-list", "0,2", "--shots", "1,3",
                                               "--trials", "2", "--select", "random,active", *FAST]))
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["K"], r["select"], r["shots"]) for r in records] == [
        (K, how, s) for K in (0, 2) for how in ("random", "active") for s in (1, 3)]
    # active asks whole dialogs, as random draws them: the same K = 0 accuracy (nothing to fit)
    assert records[0]["unseen_test"] == records[2]["unseen_test"]
    records = [r for r in records if r["select"] == "random"]
    assert all(0 <= r["unseen_test"] <= 1 and 0 <= r["unseen_fewshot"] <= 1 for r in records)
    # K = 0 has nothing to fit: its held-out accuracy does not depend on the shots
    assert records[0]["unseen_test"] == records[1]["unseen_test"]
    assert sorted(os.listdir(out)) == [".lore-run.json", "accuracy_vs_shots.png", "config.json", "results.csv",
                                       "results.json"]
    assert read_json(os.path.join(out, "config.json"))["script"] == "PRISM/vary_fewshot.py"
    defaults = vary_fewshot.parse_args([])
    assert (defaults.k_list, defaults.alpha_list, defaults.shots, defaults.trials) == ([50], [0.0], [1, 2, 3], 1)


# ------------------------------------------------------------------------------------------------
# RewardBench 2 with a planted scorer: the tiny model's own rewards decide which replies are chosen
# ------------------------------------------------------------------------------------------------

# per subset, whether each prompt is made correct (chosen = the best reply) or wrong (a better reply rejected)
PLAN = {"Factuality": [True, True], "Precise IF": [True, False], "Math": [False, False],
        "Safety": [True, True, True], "Focus": [False, True]}


def strict(chosen, rejected):
    return min(chosen) > max(rejected)


def official_ties(samples):
    """RewardBench 2's Ties score, transcribed: samples {(kind, n): (chosen scores, rejected scores)}."""
    stats = {}
    for key, (c, r) in samples.items():
        stats[key] = (strict(c, r), max(c) - min(c) if len(c) > 1 else None, min(c) - max(r))
    ref = {n: s for (k, n), s in stats.items() if k == "ref"}
    tied = {n: s for (k, n), s in stats.items() if k == "tied"}
    both = sorted(set(ref) & set(tied))
    spread = np.array([tied[n][1] for n in both])
    margin_tied, margin_ref = np.array([tied[n][2] for n in both]), np.array([ref[n][2] for n in both])
    hard = np.minimum(margin_ref, margin_tied)
    return (0.3 * np.mean([s[0] for s in tied.values()]) + 0.3 * np.mean([s[0] for s in ref.values()])
            + 0.2 * np.mean(margin_tied > spread) + 0.2 * np.mean(hard > spread)
            + 0.01 * np.mean(np.nan_to_num(np.tanh(hard / spread - 1), nan=0.0)))


@pytest.fixture(scope="module")
def rb2(tiny_model_dir, tmp_path_factory):
    """A RewardBench-2-shaped JSONL file. -> (path, rows, scores): scores[i] = the tiny model's reward of
    every reply of row i, chosen first."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rng = random.Random(1)

    def candidates():
        """A prompt and 4 replies from best to worst by the model, its scores at least 1e-4 apart."""
        while True:
            prompt, replies = words(rng, 8), [words(rng) for _ in range(4)]
            conversations = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": r}]
                             for r in replies]
            ids = tokenizer.apply_chat_template(conversations, padding=True, return_tensors="pt", return_dict=True)
            with torch.no_grad():
                scored = sorted(zip(model(**ids).logits[:, 0].tolist(), replies), reverse=True)
            if min(a[0] - b[0] for a, b in zip(scored, scored[1:])) > 1e-4:
                return prompt, [r for _, r in scored], [s for s, _ in scored]

    rows, scores = [], []
    for subset, plan in PLAN.items():
        for right in plan:
            prompt, replies, s = candidates()
            pick = 0 if right else 1                 # wrong: the best reply is among the rejected
            rows.append({"prompt": prompt, "chosen": [replies[pick]], "rejected": replies[:pick] + replies[pick + 1:],
                         "subset": subset, "id": str(len(rows))})
            scores.append(([s[pick]], s[:pick] + s[pick + 1:]))
    for n, (ref_pick, tied_pick) in enumerate([([0], [0, 1]), ([3], [0, 3]), ([0], [1, 2])]):
        for kind, pick in (("ref", ref_pick), ("tied", tied_pick)):
            prompt, replies, s = candidates()
            rows.append({"prompt": prompt, "chosen": [replies[i] for i in pick],
                         "rejected": [replies[i] for i in range(4) if i not in pick], "subset": "Ties",
                         "id": f"{kind}:{n}"})
            scores.append(([s[i] for i in pick], [s[i] for i in range(4) if i not in pick]))
    path = tmp_path_factory.mktemp("rb2") / "test.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path), rows, scores


def expected_record(rows, scores, sign=1.0):
    """The accuracy per subset of the reward sign * (the model's reward), overall, Ties_rb2, overall_rb2."""
    signed = [([sign * v for v in c], [sign * v for v in r]) for c, r in scores]
    record = {}
    for subset in [*PLAN, "Ties"]:
        right = [strict(c, r) for (c, r), row in zip(signed, rows) if row["subset"] == subset]
        record[subset] = sum(right) / len(right)
    record["overall"] = np.mean(list(record.values()))
    record["Ties_rb2"] = official_ties({tuple(row["id"].split(":")): s for s, row in zip(signed, rows)
                                        if row["subset"] == "Ties"})
    record["overall_rb2"] = np.mean([record[s] for s in PLAN] + [record["Ties_rb2"]])
    return record


def test_eval_rb2_planted_accuracy(rb2, tiny_model_dir, tmp_path):
    path, rows, scores = rb2
    v_ref = read_reward_head(tiny_model_dir)
    head = str(tmp_path / "basis.safetensors")       # V = [v_ref, -v_ref]; users: w = e0, e1
    save_tensors(head, {"V": torch.cat([v_ref, -v_ref], 1), "W": torch.eye(2)})
    out = str(tmp_path / "rb2")
    eval_rb2.main(eval_rb2.parse_args(["--model", tiny_model_dir, "--data-files", f"test={path}", "--rm-head", head,
                                       "--user-weights", "W", "--out", out, "--device", "cpu"]))
    records = read_json(os.path.join(out, "rb2_results.json"))
    assert [r["head"] for r in records] == ["v_ref", "V[:, 0]", "V[:, 1]", "V W[0]", "V W[1]", "V mean(W)"]
    plain, flipped = expected_record(rows, scores), expected_record(rows, scores, -1.0)
    # the plan: 1, 1/2, 0, 1, 1/2 and Ties: 2 of 3 ref and 1 of 3 tied prompts right
    assert [plain[s] for s in [*PLAN, "Ties"]] == [1.0, 0.5, 0.0, 1.0, 0.5, 0.5]
    for record, want in zip(records, [plain, plain, flipped, plain, flipped]):
        assert list(record) == ["head", *PLAN, "Ties", "overall", "Ties_rb2", "overall_rb2"]
        assert record == pytest.approx({"head": record["head"], **want}, abs=1e-6)  # Ties_rb2's tanh term
    # mean(W) = (1/2, 1/2): V w = 0 scores every reply 0, and a tie is never correct
    assert all(v == 0 for k, v in records[-1].items() if k in [*PLAN, "Ties", "overall"])
    for name in ("rb2_results.csv", "rb2_embeddings.safetensors", "config.json"):
        assert os.path.isfile(os.path.join(out, name))


def test_eval_rb2_reference_head_alone(rb2, tiny_model_dir, tmp_path):
    path, rows, scores = rb2
    out = str(tmp_path / "rb2")
    eval_rb2.main(eval_rb2.parse_args(["--model", tiny_model_dir, "--data-files", f"test={path}", "--out", out,
                                       "--device", "cpu"]))
    records = read_json(os.path.join(out, "rb2_results.json"))
    assert len(records) == 1
    assert records[0] == pytest.approx({"head": "v_ref", **expected_record(rows, scores)}, abs=1e-6)


# ------------------------------------------------------------------------------------------------
# Bad inputs: exit code 2, one line naming the file (and line) at fault
# ------------------------------------------------------------------------------------------------

def test_bad_prism_files(raw, tmp_path, capsys):
    folder = str(raw[0])
    code, message = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]))
    assert code == 2 and os.path.join(str(tmp_path), "survey.jsonl") in message
    for name, line, edit, words_ in [
            ("conversations.jsonl", 3, lambda s: s[:40], "not valid JSON"),
            ("survey.jsonl", 2, lambda s: json.dumps({"user_id": "u01"}), "no field 'num_completed_conversations'"),
            ("conversations.jsonl", 5, lambda s: s.replace('"role": "user"', '"role": "system"', 1), "'system'"),
            ("conversations.jsonl", 4, lambda s: s.replace('"if_chosen": true', '"if_chosen": "yes"', 1),
             "'if_chosen' is 'yes'")]:
        bad = tmp_path / f"bad_{name}_{line}"
        bad.mkdir()
        for f in ("survey.jsonl", "conversations.jsonl"):
            lines = open(os.path.join(folder, f)).read().splitlines()
            if f == name:
                lines[line - 1] = edit(lines[line - 1])
            (bad / f).write_text("\n".join(lines) + "\n")
        code, message = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
            ["--data-dir", str(bad), "--out", str(tmp_path / "out")]))
        assert code == 2 and f"{bad / name}:{line}" in message and words_ in message, message


def test_offline_download_asks_for_data_dir(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([sys.executable, os.path.join(FOLDER, "prepare.py"), "--out", str(tmp_path / "out")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--data-dir" in run.stderr.strip().splitlines()[-1]


def test_bad_folders_and_rb2_files(data, rb2, tiny_model_dir, tmp_path, capsys):
    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    code, message = exit_code_and_message(capsys, embed.main,
                                          embed.parse_args(["--data", empty, "--model", tiny_model_dir]))
    assert code == 2 and os.path.join(empty, "examples.parquet") in message
    for script in (train_basis, vary_fewshot):
        code, message = exit_code_and_message(capsys, script.main, script.parse_args(
            ["--data", empty, "--out", str(tmp_path / "r"), *FAST]))
        assert code == 2 and f"{empty}: no data.json" in message
    rb2_args = ["--model", tiny_model_dir, "--out", str(tmp_path / "rb2"), "--device", "cpu"]
    code, message = exit_code_and_message(capsys, eval_rb2.main, eval_rb2.parse_args(
        ["--data-files", f"test={tmp_path / 'nope.jsonl'}", *rb2_args]))
    assert code == 2 and "nope.jsonl" in message
    no_subset = tmp_path / "no_subset.jsonl"
    no_subset.write_text("".join(json.dumps({k: v for k, v in row.items() if k != "subset"}) + "\n"
                                 for row in rb2[1]))
    code, message = exit_code_and_message(capsys, eval_rb2.main, eval_rb2.parse_args(
        ["--data-files", f"test={no_subset}", *rb2_args]))
    assert code == 2 and str(no_subset) in message and "subset" in message
    code, message = exit_code_and_message(capsys, eval_rb2.main, eval_rb2.parse_args(
        ["--data-files", f"test={rb2[0]}", "--user-weights", "W", *rb2_args]))
    assert code == 2 and "--rm-head" in message
    code, message = exit_code_and_message(capsys, eval_rb2.main, eval_rb2.parse_args(
        ["--data-files", f"test={rb2[0]}", "--rm-head", os.path.join(data, "v_ref.safetensors"), *rb2_args]))
    assert code == 2 and "v_ref.safetensors" in message and "'V'" in message


def test_every_method_runs_on_the_dialogs(data, tmp_path):
    baselines = ["--pal-dim", "8", "--vpl-hidden", "8", "--vpl-epochs", "1", "--vpl-duplicates", "1"]
    out = str(tmp_path / "tb")
    train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--k-list", "0,2", *FAST,
                                             "--method", "lore_regularized,pal,vpl", *baselines]))
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["K"]) for r in records] == [("lore_regularized", 0), ("lore_regularized", 2),
                                                        ("pal", 2), ("vpl", 2)]
    out = str(tmp_path / "vf")
    vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--k-list", "2", *FAST, "--shots", "1,2",
                                               "--method", "lore,pal,vpl", *baselines]))
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["shots"]) for r in records] == [(m, s) for m in ("lore", "pal", "vpl") for s in (1, 2)]


def test_a_new_split_drops_the_embedding_steps_files(raw, data, tiny_model_dir, tmp_path, capsys):
    """PRISM's two steps share a folder, written by one prepare as a whole: a re-prepare of the same
    split keeps the second step's files; one of another split drops them (train_basis would train on
    the old users); the second step into a folder of another prepare is refused."""
    d = str(tmp_path / "d")
    shutil.copytree(data, d)
    info = open(os.path.join(d, "data.json"), "rb").read()
    prepare.main(prepare.parse_args(["--data-dir", raw[0], "--out", d]))         # the same split again
    assert open(os.path.join(d, "data.json"), "rb").read() == info
    load_data(d, "cpu")
    os.remove(os.path.join(d, "split.json"))                                      # as the message says
    prepare.main(prepare.parse_args(["--data-dir", raw[0], "--out", d, "--seed", "5"]))
    assert "made from other examples" in capsys.readouterr().out
    assert not {"data.json", "pairs.parquet", "embeddings.safetensors"} & set(os.listdir(d))
    assert read_json(os.path.join(d, "split.json"))["seed"] == 5
    before = {name: open(os.path.join(d, name), "rb").read() for name in os.listdir(d) if not name.startswith(".")}
    code, message = exit_code_and_message(capsys, embed.main, embed.parse_args(
        ["--data", data, "--out", d, "--model", tiny_model_dir, "--device", "cpu"]))
    assert code == 2 and "another prepare.py" in message
    assert {name: open(os.path.join(d, name), "rb").read() for name in before} == before
