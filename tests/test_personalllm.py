"""PersonalLLM: prepare (synthetic and the hub schema, the simulated population, the data layout),
load_data, train_basis, vary_fewshot, the output folder rules, bad inputs.

Tiny synthetic sizes: 400 train + 100 test prompts, F = 16, 60 seen + 40 unseen users (40 train pairs
each, a few-shot pool of 20)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from conftest import REPO, load_script

sys.path.insert(0, REPO)
import utils  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.data import DATA_FILES, load_data  # noqa: E402
from lore.extract import embed_conversations, read_reward_head  # noqa: E402
from lore.io import load_tensors, read_json, read_metadata, read_table, save_tensors  # noqa: E402
from lore.pairs import SETS  # noqa: E402

FOLDER = os.path.join(REPO, "PersonalLLM")
TRAIN_BASIS = os.path.join(FOLDER, "train_basis.py")
prepare = load_script(os.path.join(FOLDER, "prepare.py"), "personalllm_prepare")
train_basis = load_script(TRAIN_BASIS, "personalllm_train_basis")
vary_fewshot = load_script(os.path.join(FOLDER, "vary_fewshot.py"), "personalllm_vary_fewshot")

TINY = ["--prompts-train", "400", "--prompts-test", "100", "--features", "16"]
USERS = ["--n-users", "60", "--n-unseen", "40", "--train-frac", "0.1", "--pool-frac", "0.05"]
FAST = ["--iters", "200", "--fewshot-iters", "200", "--device", "cpu"]
QUICK = ["--iters", "20", "--fewshot-iters", "20", "--device", "cpu"]
RECORD_KEYS = {"method", "K", "alpha", *SETS, *(f"{s}_std" for s in SETS), "converged", "loss_fall",
               "stop", "stopped", "steps", "passes", "fewshot_stop", "fewshot_stopped", "fewshot_rule", "fewshot_steps"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("personalllm") / "data")
    prepare.main(prepare.parse_args(["--synthetic", "--out", out, *TINY, *USERS]))
    return out


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """Another run of prepare with the same sizes (another seed): its files must not mix with data's."""
    out = str(tmp_path_factory.mktemp("personalllm_other") / "data")
    prepare.main(prepare.parse_args(["--synthetic", "--out", out, *TINY, *USERS, "--seed", "1"]))
    return out


def exit_code_and_message(capsys, main, args):
    """-> (exit code, the last line on stderr: the error; progress bars may come before it)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def snapshot(folder):
    """{file name: bytes} of a folder."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def embeddings(folder):
    return load_tensors(os.path.join(folder, "embeddings.safetensors"), ["embeddings"])["embeddings"]


def test_synthetic_files(data):
    table = embeddings(data)
    v_ref = load_tensors(os.path.join(data, "v_ref.safetensors"), ["v_ref"])["v_ref"]
    assert table.dtype == torch.bfloat16 and table.shape == (8 * 500, 16) and v_ref.shape == (16, 1)
    scores = load_tensors(os.path.join(data, "scores.safetensors"), ["train", "test"])
    assert scores["train"].shape == (400, 8, 10) and scores["test"].shape == (100, 8, 10)
    assert scores["train"].dtype == torch.float32 and torch.isfinite(scores["train"]).all()
    with safe_open(os.path.join(data, "scores.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["offsets"]) == {"train": 0, "test": 3200}
    assert json.loads(meta["prompts"]) == {"train": 400, "test": 100}
    assert json.loads(meta["reward_models"]) == list(prepare.REWARD_MODELS)
    truth = load_tensors(os.path.join(data, "synthetic_truth.safetensors"))
    assert truth["reward_models"].shape == (16, 10) and truth["directions"].shape == (16, 3)
    assert torch.allclose(truth["mixing"].sum(1), torch.ones(10))
    # the planted directions are unit vectors with pairwise cosine -0.4
    D = truth["directions"]
    assert torch.allclose(D.T @ D, torch.full((3, 3), -0.4).fill_diagonal_(1.0), atol=1e-5)
    # the simulated users: Dirichlet mixtures of the 10 reward models
    users = load_tensors(os.path.join(data, "users.safetensors"), ["W_seen", "W_unseen"])
    assert users["W_seen"].shape == (60, 10) and users["W_unseen"].shape == (40, 10)
    assert torch.allclose(users["W_seen"].sum(1), torch.ones(60)) and (users["W_unseen"] >= 0).all()


def test_layout(data):
    info = read_json(os.path.join(data, "data.json"))
    assert set(info) == {"dataset", "users", "pairs", "embeddings", "files", "config", "reward_models",
                         "responses", "offsets", "prompts", "test_sample", "population"}
    assert info["dataset"] == "PersonalLLM"
    assert info["users"] == {"seen": [f"seen_{i}" for i in range(60)], "unseen": [f"unseen_{i}" for i in range(40)]}
    assert (info["offsets"], info["prompts"], info["responses"]) == ({"train": 0, "test": 3200},
                                                                     {"train": 400, "test": 100}, 8)
    assert info["reward_models"] == list(prepare.REWARD_MODELS)
    assert (info["config"]["n_users"], info["config"]["pool_frac"], info["config"]["synthetic"]) == (60, 0.05, True)
    # every file is hashed, the embeddings named by their size and header
    assert sorted(info["files"]) == sorted([*DATA_FILES, "scores.safetensors", "users.safetensors",
                                            "synthetic_truth.safetensors"])
    for name, digest in info["files"].items():
        assert hashlib.sha256(open(os.path.join(data, name), "rb").read()).hexdigest() == digest, name
    path = os.path.join(data, "embeddings.safetensors")
    assert info["embeddings"] == {"bytes": os.path.getsize(path), "metadata": read_metadata(path),
                                  "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}

    # conversations.parquet: one row per row of the table; row offset(split) + 8 s + r is response r of prompt s
    conversations = read_table(os.path.join(data, "conversations.parquet"))
    assert list(conversations.columns) == ["row", "messages"]
    assert conversations["row"].tolist() == list(range(len(embeddings(data))))
    for row, split, s, r in ((0, "train", 0, 0), (8 * 7 + 3, "train", 7, 3), (3200 + 8 * 99 + 7, "test", 99, 7)):
        assert json.loads(conversations["messages"][row]) == [
            {"role": "user", "content": f"synthetic {split} prompt {s}"},
            {"role": "assistant", "content": f"response {r + 1}"}]

    # pairs.parquet: the four sets; seen users 10% of the train prompts and every test prompt, unseen
    # users a pool of 5% in draw order and every test prompt
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    assert list(pairs.columns) == ["set", "user", "split", "prompt", "chosen", "rejected", "draw"]
    assert pairs["set"].unique().tolist() == list(SETS)
    per_user = {"seen_train": 40, "seen_test": 100, "unseen_fewshot": 20, "unseen_test": 100}
    for name, n in per_user.items():
        part = pairs[pairs["set"] == name]
        group = "unseen" if name.startswith("unseen") else "seen"
        assert part["user"].unique().tolist() == info["users"][group]       # contiguous, in data.json's order
        assert (part.groupby("user").size() == n).all() and info["pairs"][name] == len(part)
        assert (part.groupby("user")["prompt"].nunique() == n).all()        # drawn without replacement
        assert (part["split"] == ("test" if name.endswith("test") else "train")).all()
        assert part.groupby("user", sort=False)["draw"].apply(list).tolist() == [list(range(n))] * len(part["user"].unique())
    # a user's pair is the best and the worst of the prompt's 8 responses under the user's mixture
    scores = load_tensors(os.path.join(data, "scores.safetensors"))
    W = load_tensors(os.path.join(data, "users.safetensors"))
    for split, group in (("train", "seen"), ("test", "unseen")):
        part = pairs[(pairs["split"] == split) & pairs["user"].str.startswith(f"{group}_")]
        w = W[f"W_{group}"].double()[[int(u.split("_")[1]) for u in part["user"]]]        # [P, 10]
        rewards = torch.einsum("prm,pm->pr", scores[split].double()[part["prompt"].tolist()], w)  # [P, 8]
        base = info["offsets"][split] + 8 * part["prompt"].to_numpy()
        assert (part["chosen"].to_numpy() == base + rewards.argmax(1).numpy()).all()
        assert (part["rejected"].to_numpy() == base + rewards.argmin(1).numpy()).all()


def test_load_data(data):
    loaded = load_data(data, "cpu")
    info = read_json(os.path.join(data, "data.json"))
    assert loaded.users == info["users"] and loaded.info == info and loaded.folder == data
    assert torch.equal(loaded.table, embeddings(data)) and loaded.v_ref.shape == (16, 1)
    assert list(loaded.sets) == list(SETS)
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    for name, p in loaded.sets.items():
        users = loaded.users["unseen" if name.startswith("unseen") else "seen"]
        part = pairs[pairs["set"] == name]
        assert p.n_users == len(users) and p.table is loaded.table and p.group is None
        # row i of W is users[i]: pair p of the set belongs to users[user[p]]
        assert [users[u] for u in p.user.tolist()] == part["user"].tolist()
        assert p.chosen.tolist() == part["chosen"].tolist() and p.rejected.tolist() == part["rejected"].tolist()
    # the recipe's few-shot size: the first n pairs of each user's drawn pool
    few = load_data(data, "cpu", fewshot_pairs=5).sets["unseen_fewshot"]
    pool = pairs[(pairs["set"] == "unseen_fewshot") & (pairs["draw"] < 5)]
    assert few.counts().tolist() == [5] * 40 and few.chosen.tolist() == pool["chosen"].tolist()


def test_synthetic_scores_are_linear_in_the_embeddings(tmp_path):
    out = str(tmp_path / "clean")
    prepare.main(prepare.parse_args(["--synthetic", "--out", out, "--noise", "0", "--direction-noise", "0",
                                     "--prompts-train", "20", "--prompts-test", "5", "--features", "8",
                                     "--n-users", "3", "--n-unseen", "2", "--train-frac", "0.5", "--pool-frac", "0.5"]))
    table = embeddings(out)
    scores = load_tensors(os.path.join(out, "scores.safetensors"))
    truth = load_tensors(os.path.join(out, "synthetic_truth.safetensors"))
    expected = (table.float() @ truth["reward_models"]).reshape(25, 8, 10)
    assert torch.allclose(torch.cat([scores["train"], scores["test"]]), expected, atol=1e-5)
    # without direction noise every reward model lies in the span of the planted directions
    U, D = truth["reward_models"], truth["directions"]
    assert torch.allclose(D @ truth["mixing"].T, U, atol=1e-6)


def test_train_basis_end_to_end_from_another_directory(data, tmp_path):
    out = str(tmp_path / "results")
    proc = subprocess.run([sys.executable, TRAIN_BASIS, "--data", data, "--out", out, "--fewshot-pairs", "20",
                           "--k-list", "0,1,3", *FAST], cwd=str(tmp_path), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == sorted([".lore-run.json"] +
        ["config.json", "results.json", "results.csv", "accuracy_vs_rank.png", "oracle.json", "basis_reports.csv",
         "basis_health.png", "loss_curves.png",
         *(f"lore_K{K}_alpha0{ext}" for K in (0, 1, 3) for ext in (".safetensors", ".report.json", ".fit.json"))])
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["alpha"], r["K"]) for r in records] == [("lore", 0.0, 0), ("lore", 0.0, 1), ("lore", 0.0, 3)]
    assert set(records[0]) == RECORD_KEYS
    assert len(pd.read_csv(os.path.join(out, "results.csv"))) == 3
    config = read_json(os.path.join(out, "config.json"))
    assert config["script"] == "PersonalLLM/train_basis.py" and config["fewshot_pairs"] == 20
    acc = {r["K"]: r["unseen_test"] for r in records}
    assert acc[3] > acc[1] + 0.1                     # the planted rank beats a single direction
    oracle = read_json(os.path.join(out, "oracle.json"))
    assert set(oracle) == set(SETS) and acc[3] > oracle["unseen_test"] - 0.05
    basis = load_tensors(os.path.join(out, "lore_K3_alpha0.safetensors"), ["V", "W", "W_unseen"])
    assert basis["V"].shape == (16, 3) and basis["W"].shape == (60, 3) and basis["W_unseen"].shape == (40, 3)
    assert read_metadata(os.path.join(out, "lore_K3_alpha0.safetensors"))["method"] == "lore"
    # the defaults: the recipe, results under PersonalLLM/results/
    defaults = train_basis.parse_args([])
    assert defaults.out == os.path.join(FOLDER, "results", "train_basis") and defaults.fewshot_pairs == 9
    assert vary_fewshot.parse_args([]).out == os.path.join(FOLDER, "results", "vary_fewshot")


def test_train_basis_fits_unseen_users_on_the_first_fewshot_pairs(data, tmp_path):
    out = str(tmp_path / "r")
    train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--fewshot-pairs", "3",
                                             "--k-list", "0", *QUICK]))
    # K = 0 is v_ref: unseen_fewshot is its accuracy on each unseen user's first 3 drawn pairs
    table = embeddings(data).float()
    v_ref = load_tensors(os.path.join(data, "v_ref.safetensors"))["v_ref"]
    pairs = read_table(os.path.join(data, "pairs.parquet"))
    first = pairs[(pairs["set"] == "unseen_fewshot") & (pairs["draw"] < 3)]
    reward = (table @ v_ref)[:, 0].numpy()
    right = pd.Series(reward[first["chosen"]] > reward[first["rejected"]]).groupby(first["user"].to_numpy()).mean()
    record = read_json(os.path.join(out, "results.json"))[0]
    assert record["unseen_fewshot"] == pytest.approx(right.mean())
    assert record["unseen_fewshot_std"] == pytest.approx(0.25 * right.std(ddof=0))


def test_prepare_and_train_basis_are_deterministic_and_never_build_the_dense_tensor(data, tmp_path, monkeypatch):
    def dense(*args, **kwargs):
        raise AssertionError("the dense [users, prompts, F] tensor was built")
    monkeypatch.setattr(utils, "simulate_population", dense)
    monkeypatch.setattr(utils, "create_sparse_tensor", dense)
    folders = {}
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        folders[name] = str(tmp_path / name)
        prepare.main(prepare.parse_args(["--synthetic", "--out", folders[name], *TINY, *USERS, "--seed", seed]))
    read = lambda name, file: read_table(os.path.join(folders[name], file))
    users = lambda name: load_tensors(os.path.join(folders[name], "users.safetensors"))["W_seen"]
    assert read("a", "pairs.parquet").equals(read("b", "pairs.parquet")) and torch.equal(users("a"), users("b"))
    assert torch.equal(embeddings(folders["a"]), embeddings(folders["b"]))
    assert not read("a", "pairs.parquet").equals(read("c", "pairs.parquet")) and not torch.equal(users("a"), users("c"))
    runs = []
    for name in ("r1", "r2"):
        out = str(tmp_path / name)
        train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--fewshot-pairs", "20",
                                                 "--k-list", "0,2", "--iters", "30", "--fewshot-iters", "30",
                                                 "--device", "cpu", "--seed", "3"]))
        runs.append((read_json(os.path.join(out, "results.json")),
                     load_tensors(os.path.join(out, "lore_K2_alpha0.safetensors"))))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in ("V", "W", "W_unseen"))


def test_vary_fewshot(data, tmp_path):
    out = str(tmp_path / "fewshot")
    vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--k-list", "3", "--trials", "3",
                                               "--shots", "1,5,20", *FAST]))
    assert sorted(os.listdir(out)) == [".lore-run.json", "accuracy_vs_shots.png", "config.json", "oracle.json",
                                       "results.csv", "results.json"]
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["K"], r["shots"]) for r in records] == [("lore", 3, 1), ("lore", 3, 5), ("lore", 3, 20)]
    assert set(records[0]) == {"method", "K", "alpha", "select", "shots", "unseen_fewshot", "unseen_fewshot_std",
                               "unseen_test", "unseen_test_std", "fewshot_stop", "fewshot_rule", "fewshot_steps",
                               "fewshot_at_cap"}
    held_out = [r["unseen_test"] for r in records]
    assert held_out[2] > held_out[0] + 0.02          # more shots, better held-out accuracy
    assert all(0 <= r["unseen_test_std"] < 0.1 for r in records)
    assert read_json(os.path.join(out, "config.json"))["script"] == "PersonalLLM/vary_fewshot.py"


def hub_frame(n_prompts, first_word):
    """A table in the hub's schema. Texts use the tiny tokenizer's words (w0 .. w199) so that every
    response of every prompt is a different token sequence; the score of (prompt s, response r,
    model m) is 100 s + 10 r + m."""
    rows = []
    for s in range(n_prompts):
        row = {"prompt": f"w{first_word + s} w{first_word + s + 1} w7"}
        for r in range(8):
            row[f"response_{r + 1}"] = f"w{100 + r} w{150 + s}" + " w3" * r
            for m, model in enumerate(prepare.REWARD_MODELS):
                row[f"response_{r + 1}_{model}"] = 100.0 * s + 10 * r + m
        rows.append(row)
    return pd.DataFrame(rows)


def write_hub_files(tmp_path, train, test):
    paths = {}
    for split, df in (("train", train), ("test", test)):
        paths[split] = str(tmp_path / f"{split}.parquet")
        df.to_parquet(paths[split], index=False)
    return [f"{split}={path}" for split, path in paths.items()]


HUB_USERS = ["--n-users", "4", "--n-unseen", "3", "--train-frac", "1", "--pool-frac", "1"]


def test_prepare_hub_schema_with_the_tiny_model(tmp_path, tiny_model_dir):
    train, test = hub_frame(3, 0), hub_frame(2, 50)
    out = str(tmp_path / "data")
    prepare.main(prepare.parse_args(["--out", out, "--model", tiny_model_dir, "--device", "cpu", *HUB_USERS,
                                     "--data-files", *write_hub_files(tmp_path, train, test)]))
    loaded = load_data(out, "cpu")
    table, v_ref = loaded.table, loaded.v_ref
    assert table.shape[0] == 8 * 5 and v_ref.shape == (table.shape[1], 1)
    assert torch.equal(v_ref, read_reward_head(tiny_model_dir))
    assert not os.path.exists(os.path.join(out, "synthetic_truth.safetensors"))
    scores = load_tensors(os.path.join(out, "scores.safetensors"), ["train", "test"])
    s, r, m = np.meshgrid(np.arange(2), np.arange(8), np.arange(10), indexing="ij")
    assert torch.equal(scores["test"], torch.tensor(100.0 * s + 10 * r + m, dtype=torch.float32))
    assert scores["train"].shape == (3, 8, 10)
    info = read_json(os.path.join(out, "data.json"))
    assert info["prompts"] == {"train": 3, "test": 2} and info["offsets"] == {"train": 0, "test": 24}
    # row offset(split) + 8 s + r is [user: prompt s, assistant: response r] of that split
    conversations = [[{"role": "user", "content": df["prompt"][s]},
                      {"role": "assistant", "content": df[f"response_{r + 1}"][s]}]
                     for df in (train, test) for s in range(len(df)) for r in range(8)]
    stored = read_table(os.path.join(out, "conversations.parquet"))
    assert stored["row"].tolist() == list(range(40))
    assert [json.loads(m) for m in stored["messages"]] == conversations
    # every user prefers the response with the highest scores (r = 7) to the lowest (r = 0)
    pairs = read_table(os.path.join(out, "pairs.parquet"))
    base = pairs["split"].map(info["offsets"]) + 8 * pairs["prompt"]
    assert ((pairs["chosen"] - base) == 7).all() and ((pairs["rejected"] - base) == 0).all()
    assert pairs.groupby("set")["user"].nunique().to_dict() == {"seen_train": 4, "seen_test": 4,
                                                                "unseen_fewshot": 3, "unseen_test": 3}
    # embed the 40 conversations in reverse order, one call, and compare row by row
    reverse = embed_conversations(conversations[::-1], str(tmp_path / "reverse.safetensors"),
                                        tiny_model_dir, device="cpu")
    assert torch.allclose(table.float(), reverse.flip(0).float(), atol=1e-4)
    distance = torch.cdist(table.float(), table.float()) + torch.eye(40)
    assert distance.min() > 1e-3                     # 40 different rows: a wrong order cannot pass


def test_bad_scores_are_clear_errors(tmp_path, tiny_model_dir, capsys):
    train, test = hub_frame(3, 0), hub_frame(2, 50)
    files = write_hub_files(tmp_path, train.drop(columns="response_4_beaver_7b"), test)
    code, err = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--out", str(tmp_path / "a"), "--model", tiny_model_dir, "--device", "cpu", "--data-files", *files]))
    assert code == 2 and "train split" in err and "'response_4_beaver_7b'" in err
    train.loc[2, "response_7_gemma_7b"] = None
    files = write_hub_files(tmp_path, train, test)
    code, err = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--out", str(tmp_path / "b"), "--model", tiny_model_dir, "--device", "cpu", "--data-files", *files]))
    assert code == 2 and "train split, prompt 2" in err and "'response_7_gemma_7b'" in err


def test_bad_inputs_exit_with_2(data, tmp_path, capsys):
    real = tmp_path / "real"
    save_tensors(str(real / "embeddings.safetensors"), {"embeddings": torch.zeros(8, 4)},
                       {"model": "rm"})
    code, err = exit_code_and_message(capsys, prepare.main,
                                      prepare.parse_args(["--synthetic", "--out", str(real)]))
    assert code == 2 and "holds 'embeddings.safetensors'" in err and "no run of PersonalLLM/prepare.py" in err
    assert sorted(os.listdir(real)) == ["embeddings.safetensors"]     # nothing written over
    code, err = exit_code_and_message(capsys, train_basis.main, train_basis.parse_args(
        ["--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]))
    assert code == 2 and "nothing: no data.json" in err and "prepare.py" in err
    code, err = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--synthetic", "--out", str(tmp_path / "tiny_pool"), *TINY, *USERS, "--pool-frac", "0.001"]))
    assert code == 2 and "unseen_fewshot" in err and "--pool-frac" in err and "0 prompts per user" in err
    code, err = exit_code_and_message(capsys, vary_fewshot.main, vary_fewshot.parse_args(
        ["--data", data, "--out", str(tmp_path / "f"), "--shots", "1,50", *QUICK]))
    assert code == 2 and "--shots 50" in err and "(at most 20)" in err
    assert not os.path.exists(tmp_path / "f") and not os.path.exists(tmp_path / "r")
    proc = subprocess.run([sys.executable, TRAIN_BASIS, "--data", data, "--k-list", "0,-1,2"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--k-list" in proc.stderr and "ranks >= 0" in proc.stderr
    for script in (train_basis, vary_fewshot):
        with pytest.raises(SystemExit) as e:
            script.parse_args(["--data", data, "--method", "nope"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "--method" in err and "lore, lore_regularized" in err and "'nope'" in err


# ------------------------------------------------------------------------------------------------
# The output folder: never another script's, replaced as a whole
# ------------------------------------------------------------------------------------------------

def test_outputs_are_never_silently_overwritten(data, tmp_path, capsys):
    out = str(tmp_path / "results")
    run = lambda script, *flags: script.main(script.parse_args(["--data", data, "--out", out, *QUICK, *flags]))
    run(train_basis, "--k-list", "0,1,2")
    first = snapshot(out)
    assert "lore_K2_alpha0.safetensors" in first
    # another script into the same --out: refused, naming the script whose results are there
    code, err = exit_code_and_message(capsys, vary_fewshot.main, vary_fewshot.parse_args(
        ["--data", data, "--out", out, "--k-list", "2", "--shots", "1", "--trials", "1", *QUICK]))
    assert code == 2 and "PersonalLLM/train_basis.py" in err and "PersonalLLM/vary_fewshot.py" in err
    assert snapshot(out) == first
    # the same script again: its outputs replace the earlier run's, and nothing of that run stays
    run(train_basis, "--k-list", "0,1")
    second = snapshot(out)
    assert sorted(second) == sorted(set(first) - {"lore_K2_alpha0.safetensors", "lore_K2_alpha0.report.json",
                                                  "lore_K2_alpha0.fit.json"})
    assert read_json(os.path.join(out, "config.json"))["k_list"] == [0, 1]
    assert [r["K"] for r in read_json(os.path.join(out, "results.json"))] == [0, 1]
    # no staging folder is left beside --out, only the lock
    assert sorted(os.listdir(tmp_path)) == ["results"]
    # a file as --out, or a folder of files no run of this script wrote: refused, left as they are
    (tmp_path / "file").write_text("mine")
    code, err = exit_code_and_message(capsys, train_basis.main, train_basis.parse_args(
        ["--data", data, "--out", str(tmp_path / "file"), "--k-list", "0", *QUICK]))
    assert code == 2 and "file is a file, not a folder" in err and (tmp_path / "file").read_text() == "mine"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    code, err = exit_code_and_message(capsys, train_basis.main, train_basis.parse_args(
        ["--data", data, "--out", str(tmp_path / "mine"), "--k-list", "0", *QUICK]))
    assert code == 2 and "'notes.txt', a file or folder that no run of PersonalLLM/train_basis.py wrote" in err
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


# ------------------------------------------------------------------------------------------------
# data.json: the files of a data folder belong to one run of prepare
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pairs.parquet", "embeddings.safetensors", "users.safetensors"])
def test_a_file_of_another_run_is_refused(data, other_data, tmp_path, capsys, name):
    mixed = str(tmp_path / "mixed")
    shutil.copytree(data, mixed)
    load_data(mixed, "cpu")                                # a copy is fine
    shutil.copyfile(os.path.join(other_data, name), os.path.join(mixed, name))
    with pytest.raises(InputError, match="rerun prepare.py") as e:
        load_data(mixed, "cpu")
    assert os.path.join(mixed, name) in str(e.value)
    code, err = exit_code_and_message(capsys, train_basis.main, train_basis.parse_args(
        ["--data", mixed, "--out", str(tmp_path / "r"), "--k-list", "0", *QUICK]))
    assert code == 2 and os.path.join(mixed, name) in err
    assert not os.path.exists(tmp_path / "r")


def test_misspecified_population(tmp_path, data, capsys):
    """--population misspecified: arbitrary pairs of two responses, labels drawn from the users' Bradley-Terry
    probability (noisy, mostly right), ties (|r_a - r_b| < margin sd_i) apart from the pairs, no linear truth."""
    out = str(tmp_path / "mis")
    prepare.main(prepare.parse_args(["--synthetic", "--population", "misspecified", "--out", out, *TINY, *USERS]))
    info = read_json(os.path.join(out, "data.json"))
    assert info["population"]["name"] == "misspecified" and len(info["population"]["linear_r2_of_reward_models"]) == 10
    assert read_json(os.path.join(data, "data.json"))["population"]["name"] == "planted"
    assert not os.path.exists(os.path.join(out, "synthetic_truth.safetensors"))
    pairs, ties = read_table(os.path.join(out, "pairs.parquet")), read_table(os.path.join(out, "ties.parquet"))
    assert info["population"]["ties"] == {s: int((ties["set"] == s).sum()) for s in SETS}
    per_user = {"seen_train": 40, "seen_test": 100, "unseen_fewshot": 20, "unseen_test": 100}
    for s, m in per_user.items():   # every drawn (user, prompt) is a pair or a tie
        n = 60 if s.startswith("seen") else 40
        assert int((pairs["set"] == s).sum()) + info["population"]["ties"][s] == n * m
    scores = load_tensors(os.path.join(out, "scores.safetensors"), ["train", "test"])
    S = torch.cat([scores["train"], scores["test"]]).reshape(-1, 10).double()      # [E, 10] by table row
    W = load_tensors(os.path.join(out, "users.safetensors"), ["W_seen", "W_unseen"])
    idx = {u: i for g in ("seen", "unseen") for i, u in enumerate(info["users"][g])}
    w = torch.stack([W["W_seen" if u.startswith("seen") else "W_unseen"][idx[u]] for u in pairs["user"]]).double()
    c, r = torch.tensor(pairs["chosen"].to_numpy()), torch.tensor(pairs["rejected"].to_numpy())
    assert ((c // 8) == (r // 8)).all() and (c != r).all()                         # two responses of one prompt
    right = ((S[c] - S[r]) * w).sum(1) > 0
    assert 0.6 < right.float().mean() < 0.99                                       # BT draws: noisy labels
    best = torch.stack([S[c // 8 * 8 + k] for k in range(8)], 1)                   # [P, 8, 10]
    user_scores = (best * w[:, None]).sum(-1)                                      # [P, 8]
    best_vs_worst = (user_scores.argmax(1) == c % 8) & (user_scores.argmin(1) == r % 8)
    assert best_vs_worst.float().mean() < 0.2                                      # arbitrary pairs
    assert len(ties) and (ties["response_a"] // 8 == ties["response_b"] // 8).all()
    with pytest.raises(SystemExit) as e:
        prepare.parse_args(["--population", "misspecified"])
    assert e.value.code == 2 and "--population misspecified needs --synthetic" in capsys.readouterr().err
