"""MultiPref: prepare (the hub's schema, ties, strengths, workers and aspects, the split by prompt, the
data layout), train_basis, vary_fewshot with lore, pal and vpl, tools/compare.py, bad rows.

The fixture, written by the test in the hub's schema (one row per comparison, lists of normal and
expert annotations): 36 comparisons of 30 prompts (6 prompts compared twice), each judged by 3 of 8
normal and 2 of 4 expert evaluators with random labels (ties among them), and the odd cases: a
comparison of a completion with itself, an annotation without an overall judgement, an evaluator who
judges one comparison twice, an evaluator with 2 judgements (dropped);
a prompt's two comparisons have the same evaluators."""
import json
import os
import random
import sys

import pandas as pd
import pytest

from conftest import REPO, load_script

sys.path.insert(0, REPO)
import utils  # noqa: E402
from lore import compare  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import load_splits, load_tensors, read_json, read_table  # noqa: E402
from lore.pairs import SETS  # noqa: E402
from lore.methods import METHODS  # noqa: E402

FOLDER = os.path.join(REPO, "MultiPref")
prepare = load_script(os.path.join(FOLDER, "prepare.py"), "multipref_prepare")
train_basis = load_script(os.path.join(FOLDER, "train_basis.py"), "multipref_train_basis")
vary_fewshot = load_script(os.path.join(FOLDER, "vary_fewshot.py"), "multipref_vary_fewshot")
compare_tool = load_script(os.path.join(REPO, "tools", "compare.py"), "multipref_compare")

LABELS = list(prepare.PREFS)
SPLIT = ["--min-pairs", "3"]
FAST = ["--iters", "20", "--fewshot-iters", "10", "--device", "cpu"]
BASELINES = ["--pal-dim", "8", "--vpl-hidden", "8", "--vpl-epochs", "1", "--vpl-duplicates", "1",
             "--pal-epochs", "1", "--pal-fewshot-epochs", "2"]


def annotation(rng, evaluator, **labels):
    a = {"evaluator": evaluator, "time_spent": rng.randint(30, 600), "timestamp": "2024-05-01 10:00:00"}
    for aspect in prepare.ASPECTS:
        a[f"{aspect}_pref"] = labels.get(aspect, rng.choice(LABELS))
        a[f"{aspect}_confidence"] = "confident"
        a[f"{aspect}_checked_reasons"] = ["reason"]
    return a


def make_rows():
    rng = random.Random(0)
    normal, expert = [f"n{i}" for i in range(8)], [f"e{i}" for i in range(4)]
    prompts = [f"p{i:02d}" for i in range(30)] + [f"p{i:02d}" for i in range(6)]
    rows = []
    for j, prompt in enumerate(prompts):
        text = f"question {prompt}: " + " ".join(f"w{rng.randrange(150)}" for _ in range(3))
        a, b = (f"answer {c} to {prompt} #{j}" for c in "ab")
        if j == 7:
            b = a                                  # a completion against itself
        first = j % 30                             # a prompt's second comparison: the same evaluators
        normals = [annotation(rng, normal[(first + k) % 8]) for k in (0, 1, 3)]
        if j == 3:
            normals[0]["overall_pref"] = None      # no overall judgement
        if j == 5:
            normals.append(annotation(rng, normals[1]["evaluator"]))   # judged twice: the second dropped
        if j in (0, 1):
            normals.append(annotation(rng, "rare", overall="A-is-clearly-better"))
        rows.append({"comparison_id": f"cmp{j}", "prompt_id": prompt, "text": text, "model_a": "m1",
                     "completion_a": a, "model_b": "m2", "completion_b": b, "source": "s", "category": "c",
                     "subject_study": "x", "highest_level_degree": "x", "normal_worker_annotations": normals,
                     "expert_worker_annotations": [annotation(rng, expert[(first + k) % 4]) for k in (0, 1)]})
    return rows


def reference_pairs(rows, workers=("normal", "expert"), aspect="overall", clearly_only=False):
    """The pairs by hand: per row, per list, per annotation: skip a missing judgement, a second one
    of the evaluator, a tie (and a slight one with clearly_only). -> [(evaluator, chosen text,
    rejected text, strength, worker, comparison_id)]."""
    out = []
    for row in rows:
        judged = set()
        for worker in workers:
            for a in row[f"{worker}_worker_annotations"]:
                label = a[f"{aspect}_pref"]
                if label is None or a["evaluator"] in judged:
                    continue
                judged.add(a["evaluator"])
                if label == "Tie" or clearly_only and "slightly" in label:
                    continue
                first, second = (row["completion_a"], row["completion_b"])[::1 if label.startswith("A") else -1]
                out.append((a["evaluator"], first, second, label.split("-")[-2], worker, row["comparison_id"]))
    return out


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multipref_hub")
    rows = make_rows()
    pd.DataFrame(rows).to_parquet(folder / "train.parquet")
    return rows, str(folder / "train.parquet")


@pytest.fixture(scope="module")
def data(hub, tiny_model_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multipref") / "data")
    prepare.main(prepare.parse_args(["--out", out, "--model", tiny_model_dir, "--device", "cpu",
                                     "--data-files", f"train={hub[1]}", *SPLIT]))
    return out


def records_of(path, *flags):
    args = prepare.parse_args(["--data-files", f"train={path}", *flags])
    return prepare.judgement_pairs(load_splits(None, ("train",), dict(args.data_files))["train"], args, {})


def decoded(records_or_pairs, messages):
    return [(r["user"], messages[r["chosen"]][1]["content"], messages[r["rejected"]][1]["content"], r["strength"],
             r["worker"], r["comparison_id"]) for r in records_or_pairs]


def exit_code_and_message(capsys, main, args):
    """-> (exit code, the last line on stderr: the error)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_pairs_ties_and_strengths(hub, data):
    rows, _ = hub
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    assert list(pairs.columns) == prepare.PAIR_COLUMNS
    conversations = read_table(os.path.join(data, "conversations.parquet"))
    messages = [json.loads(m) for m in conversations["messages"]]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in messages)
    assert len({json.dumps(c) for c in messages}) == len(messages)        # each (prompt, completion) once
    info = read_json(os.path.join(data, "data.json"))
    reference = reference_pairs(rows)
    kept = set(info["users"]["seen"] + info["users"]["unseen"])
    got = decoded(pairs.sort_values("row", kind="stable").to_dict("records"), messages)
    assert sorted(got) == sorted(r for r in reference if r[0] in kept)
    # each pair's prompt is its comparison's
    by_id = {r["comparison_id"]: r for r in rows}
    assert [messages[c][0]["content"] for c in pairs["chosen"]] == [by_id[c]["text"] for c in pairs["comparison_id"]]
    assert pairs["prompt_id"].tolist() == [by_id[c]["prompt_id"] for c in pairs["comparison_id"]]
    assert pairs["group"].equals(pairs["prompt_id"]) and set(pairs["strength"]) == {"clearly", "slightly"}
    counts = info["counts"]
    labels = [a["overall_pref"] for r in rows for w in ("normal", "expert") for a in r[f"{w}_worker_annotations"]]
    assert counts["annotations"] == len(labels) and counts["no_judgement"] == 1 and counts["repeated"] == 1
    repeated = rows[5]["normal_worker_annotations"][-1]["overall_pref"]   # counted as repeated, not as a tie
    assert counts["ties"] == sum(label == "Tie" for label in labels) - (repeated == "Tie")
    assert counts["identical_completions"] == 1 and counts["pairs"] == len(reference)
    assert info["dataset"] == "MultiPref" and "rare" in info["dropped"]
    table = load_tensors(os.path.join(data, "embeddings.safetensors"))["embeddings"]
    assert table.shape == (len(messages), 64)


def test_the_split_is_by_prompt(hub, data):
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    info = read_json(os.path.join(data, "data.json"))
    train = set(pairs.loc[pairs["set"].isin(["seen_train", "unseen_fewshot"]), "prompt_id"])
    test = set(pairs.loc[pairs["set"].isin(["seen_test", "unseen_test"]), "prompt_id"])
    assert train and test and not train & test                             # no prompt on both sides
    # the rule by hand: shuffle the sorted prompts, half of them test; drop evaluators under --min-pairs
    rng = random.Random(0)
    records, _ = records_of(hub[1], *SPLIT)
    prompts = sorted({r["prompt_id"] for r in records})
    rng.shuffle(prompts)
    assert test <= set(prompts[:len(prompts) // 2]) and train <= set(prompts[len(prompts) // 2:])
    side = pd.DataFrame(records).assign(test=lambda d: d["prompt_id"].isin(prompts[:len(prompts) // 2]))
    sizes = side.groupby(["user", "test"]).size().unstack(fill_value=0)
    assert info["dropped"] == {u: [int(sizes.at[u, False]), int(sizes.at[u, True])] for u in sizes.index
                               if min(sizes.loc[u]) < 3}
    kept = sorted(u for u in sizes.index if min(sizes.loc[u]) >= 3)
    rng.shuffle(kept)
    assert info["users"] == {"seen": kept[:int(len(kept) * 0.8)], "unseen": kept[int(len(kept) * 0.8):]}
    for user in kept:
        mine = pairs[pairs["user"] == user]
        assert len(mine) == sizes.at[user, False] + sizes.at[user, True]
        own = mine[mine["draw"] >= 0]
        # draw ranks the user's train prompts: one rank per prompt, 0, 1, ... in order
        assert own.groupby("prompt_id")["draw"].nunique().max() == 1
        assert own.drop_duplicates("prompt_id")["draw"].tolist() == list(range(own["prompt_id"].nunique()))
    assert pairs["set"].map(SETS.index).is_monotonic_increasing
    # a prompt's pairs are drawn together: a shot is a prompt, whole
    pool = load_data(data, "cpu").sets["unseen_fewshot"]
    sampled = utils.sample_shots(pool, 1)
    for user in range(pool.n_users):
        picked = sampled.group[sampled.user == user].unique()
        assert len(picked) == 1
        assert (sampled.user == user).sum() == ((pool.user == user) & (pool.group == picked[0])).sum()
    assert pairs.groupby(["user", "prompt_id"]).size().max() == 2      # an evaluator's prompt with 2 comparisons


def test_workers_aspect_strength_and_file_forms(hub, tmp_path):
    rows, path = hub
    for flags, kwargs in ((["--workers", "expert"], {"workers": ("expert",)}),
                          (["--aspect", "helpful"], {"aspect": "helpful"}),
                          (["--min-strength", "clearly"], {"clearly_only": True})):
        records, counts = records_of(path, *flags)
        got = [(r["user"], r["strength"], r["worker"], r["comparison_id"]) for r in records]
        assert got == [(e, s, w, c) for e, _, _, s, w, c in reference_pairs(rows, **kwargs)], flags
    # CSV (the annotation lists as JSON text) and JSON lines read as the Parquet file
    df = pd.read_parquet(path)
    as_lists = pd.DataFrame(rows)
    csv = as_lists.assign(**{c: as_lists[c].map(json.dumps) for c in ("normal_worker_annotations",
                                                                     "expert_worker_annotations")})
    csv.to_csv(tmp_path / "train.csv", index=False)
    df.to_json(tmp_path / "train.jsonl", orient="records", lines=True)
    reference = records_of(path)
    for other in (tmp_path / "train.csv", tmp_path / "train.jsonl"):
        assert records_of(str(other)) == reference, other


def test_train_basis_vary_fewshot_with_every_method_and_compare(data, tmp_path, monkeypatch):
    out = str(tmp_path / "tb")
    records = train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--k-list", "0,2", *FAST,
                                                       "--fewshot-pairs", "2"]))
    table = load_tensors(os.path.join(data, "embeddings.safetensors"))["embeddings"].float()
    v_ref = load_tensors(os.path.join(data, "v_ref.safetensors"))["v_ref"]
    reward = (table @ v_ref)[:, 0].numpy()
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    for name in SETS:   # K = 0 by hand; the few-shot set is the first 2 prompts of each pool
        part = pairs[(pairs["set"] == name) & (pairs["draw"] < (2 if name == "unseen_fewshot" else 1 << 30))]
        right = pd.Series(reward[part["chosen"]] > reward[part["rejected"]]).groupby(part["user"].to_numpy()).mean()
        assert records[0][name] == pytest.approx(right.mean(), abs=1e-6), name
    assert read_json(os.path.join(out, "config.json"))["script"] == "MultiPref/train_basis.py"
    out = str(tmp_path / "vf")
    records = vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--k-list", "2", "--shots", "1,2",
                                                         "--trials", "1", *FAST, "--method", "lore,pal,vpl", *BASELINES]))
    assert [(r["method"], r["shots"]) for r in records] == [(m, s) for m in ("lore", "pal", "vpl") for s in (1, 2)]
    assert all(0 <= r["unseen_test"] <= 1 for r in records) and "accuracy_vs_shots.png" in os.listdir(out)
    # tools/compare.py on the folder: the recipe's few-shot size (10 prompts); short fits, and no
    # figures (test_community_alignment.py draws them)
    monkeypatch.setattr(compare_tool.results, "save_comparison", lambda *args, **kwargs: None)
    monkeypatch.setattr(METHODS["lore"], "search_space", {"K": [2], "iters": [20], "fewshot_iters": [10]})
    monkeypatch.setattr(compare, "FIXED_ROWS", tuple((label, name, {**config, "iters": 20, "fewshot_iters": 10})
                                                    for label, name, config in compare.FIXED_ROWS))
    result = compare_tool.main(compare_tool.parse_args(["--data", data, "--method", "lore", "--budget", "1",
                                                        "--seeds", "1", "--out", str(tmp_path / "cmp"), "--device", "cpu"]))
    assert result["data"]["dataset"] == "MultiPref" and result["data"]["fewshot_pairs"] == 10
    assert sorted(os.listdir(tmp_path / "cmp")) == [".lore-run.json", "comparison.json", "config.json"]
    assert [r["method"] for r in result["methods"]] == ["reference", "bt", "lore"]
    defaults = train_basis.parse_args([])
    assert (defaults.method, defaults.k_list, defaults.iters, defaults.fewshot_pairs) == (["lore"], list(range(7)), 1000, 10)
    defaults = vary_fewshot.parse_args([])
    assert (defaults.k_list, defaults.shots, defaults.trials) == ([5], [1, 2, 5, 10], 20)
    defaults = prepare.parse_args([])
    assert (defaults.workers, defaults.aspect, defaults.min_pairs, defaults.test_fraction) == \
        (["normal", "expert"], "overall", 10, 0.5)


def test_bad_rows_and_flags_exit_with_2(hub, tiny_model_dir, tmp_path, capsys):
    rows = hub[0][:8]

    def bad(edit, *flags):
        edited = json.loads(json.dumps(rows))
        edit(edited)
        path = tmp_path / "bad.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in edited))
        return exit_code_and_message(capsys, prepare.main, prepare.parse_args(
            ["--out", str(tmp_path / "out"), "--model", tiny_model_dir, "--device", "cpu",
             "--data-files", f"train={path}", *flags]))
    for edit, message in (
            (lambda r: r[2]["expert_worker_annotations"][1].update(overall_pref="A-is-better"),
             "train split, row 2: expert_worker_annotations[1]: 'overall_pref' is 'A-is-better', expected one of"),
            (lambda r: r[4]["normal_worker_annotations"][0].update(evaluator=None),
             "train split, row 4: normal_worker_annotations[0]: 'evaluator' must be a non-empty pseudonym"),
            (lambda r: r[6].update(completion_b=None), "train split, row 6: 'completion_b' must be text, got a null cell"),
            (lambda r: r[1].update(prompt_id=""), "train split, row 1: 'prompt_id' must be a non-empty id"),
            (lambda r: [x.pop("expert_worker_annotations") for x in r],
             "train split: no column 'expert_worker_annotations'")):
        code, err = bad(edit)
        assert code == 2 and message in err, err
    code, err = bad(lambda r: None, "--min-pairs", "50")
    assert code == 2 and "0 seen and 0 unseen evaluators" in err
    assert not os.path.exists(tmp_path / "out")
    for flags in (["--workers", "normal,crowd"], ["--aspect", "funny"], ["--test-fraction", "1"]):
        with pytest.raises(SystemExit) as e:
            prepare.parse_args(flags)
        assert e.value.code == 2, flags
