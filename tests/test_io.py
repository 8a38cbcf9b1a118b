"""Files: the I/O helpers (safetensors, JSON, Parquet, the hub's splits), embedding extraction's cache
and the data-reading scripts, and their faults. Each fault test first builds
the fault itself (new weights at the same path, orphan or truncated shards, a held lock, a corrupt or
foreign file, a bad flag), then checks the correct result, or exit code 2 with one line naming the
culprit, and that files written before are unchanged."""
import json
import os
import random
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, load_script, tiny_reward_model
import lore.io  # noqa: E402  (monkeypatched)
from lore import extract
from benchmarks.bench_embed import tiny_chat_tokenizer
from lore.checks import InputError, resolve_device
from lore.distributed import is_main_process
from lore.io import load_splits, load_tensors, read_json, read_metadata, read_table, save_tensors, write_table

FOLDER = os.path.join(REPO, "PRISM")
prepare = load_script(os.path.join(FOLDER, "prepare.py"), "faults_prism_prepare")
embed_script = load_script(os.path.join(FOLDER, "generate-prism-embeddings.py"), "faults_prism_embed")
eval_rb2 = load_script(os.path.join(FOLDER, "eval_rb2.py"), "faults_prism_eval_rb2")

SETTINGS = dict(device="cpu", batch_tokens=200, shard_size=5)


def conversations(n=24, seed=0):
    """Prompts with 2-4 replies each, about n conversations."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(200)}" for _ in range(k))  # noqa: E731
    out = []
    while len(out) < n:
        prompt = {"role": "user", "content": words(rng.randint(5, 30))}
        out += [[prompt, {"role": "assistant", "content": words(rng.randint(1, 15))}] for _ in range(rng.randint(2, 4))]
    return out


def copy_model(tiny_model_dir, tmp_path, name="model"):
    return shutil.copytree(tiny_model_dir, tmp_path / name)


def save_new_weights(folder, seed):
    """Another random reward model saved over the one in folder (same path, same tokenizer)."""
    tiny_reward_model(tiny_chat_tokenizer(n_words=200), seed=seed).save_pretrained(folder)


def interrupted(monkeypatch, after):
    """Make embed_conversations stop (as if killed) after writing `after` shards."""
    save, writes = extract.save_tensors, []

    def save_then_die(path, tensors, metadata=None):
        if len(writes) == after:
            raise KeyboardInterrupt
        writes.append(path)
        save(path, tensors, metadata)

    monkeypatch.setattr(extract, "save_tensors", save_then_die)
    return save


def exit_code_and_message(capsys, main, args):
    """-> (exit code, stderr): a script's main run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr().err


def one_line(err):
    """The error line a script ends with: no traceback before it (progress bars may be)."""
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: "), err
    return last


def truncate(path, keep=64):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:-keep])


# ------------------------------------------------------------------------------------------------
# 1. The cache is keyed by the weights
# ------------------------------------------------------------------------------------------------

def test_new_weights_at_the_same_path_are_recomputed(tiny_model_dir, tmp_path):
    model_dir, texts = copy_model(tiny_model_dir, tmp_path), conversations()
    out = tmp_path / "emb.safetensors"
    old = extract.embed_conversations(texts, out, model_dir, **SETTINGS)
    save_new_weights(model_dir, seed=1)
    new = extract.embed_conversations(texts, out, model_dir, **SETTINGS)
    fresh = extract.embed_conversations(texts, tmp_path / "fresh.safetensors", copy_model(model_dir, tmp_path, "m2"),
                                      **SETTINGS)
    assert not torch.allclose(old, new)
    torch.testing.assert_close(new, fresh, atol=0, rtol=0)
    assert torch.equal(load_file(out)["embeddings"], fresh)


def test_resume_after_new_weights_does_not_mix_models(tiny_model_dir, tmp_path, monkeypatch):
    model_dir, texts = copy_model(tiny_model_dir, tmp_path), conversations(40)
    out = tmp_path / "emb.safetensors"
    save = interrupted(monkeypatch, after=2)
    with pytest.raises(KeyboardInterrupt):
        extract.embed_conversations(texts, out, model_dir, **SETTINGS)
    assert len([f for f in os.listdir(f"{out}.parts") if f.startswith("shard_")]) == 2
    monkeypatch.setattr(extract, "save_tensors", save)
    save_new_weights(model_dir, seed=1)
    resumed = extract.embed_conversations(texts, out, model_dir, **SETTINGS)
    fresh = extract.embed_conversations(texts, tmp_path / "fresh.safetensors", model_dir, **SETTINGS)
    assert torch.equal(resumed, fresh)


# ------------------------------------------------------------------------------------------------
# 2. Shard folders: no manifest or another run's is cleared; unreadable shards are recomputed; a lock
# ------------------------------------------------------------------------------------------------

def test_orphan_shards_without_manifest_are_not_mixed_in(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Shards of model A with their manifest lost (two runs into one path, or a run killed between
    the two writes) must not end up in model B's output."""
    model_a, model_b = copy_model(tiny_model_dir, tmp_path, "a"), copy_model(tiny_model_dir, tmp_path, "b")
    save_new_weights(model_b, seed=1)
    texts, out = conversations(40), tmp_path / "emb.safetensors"
    save = interrupted(monkeypatch, after=2)
    with pytest.raises(KeyboardInterrupt):
        extract.embed_conversations(texts, out, model_a, **SETTINGS)
    os.remove(f"{out}.parts/manifest.json")
    monkeypatch.setattr(extract, "save_tensors", save)
    capsys.readouterr()
    mixed = extract.embed_conversations(texts, out, model_b, **SETTINGS)
    assert "without a valid manifest" in capsys.readouterr().out
    assert torch.equal(mixed, extract.embed_conversations(texts, tmp_path / "fresh.safetensors", model_b, **SETTINGS))


def test_shards_of_other_settings_are_cleared_and_restarted(tiny_model_dir, tmp_path, monkeypatch, capsys):
    texts, out = conversations(40), tmp_path / "emb.safetensors"
    save = interrupted(monkeypatch, after=2)
    with pytest.raises(KeyboardInterrupt):
        extract.embed_conversations(texts, out, tiny_model_dir, **SETTINGS)
    monkeypatch.setattr(extract, "save_tensors", save)
    capsys.readouterr()
    other = {**SETTINGS, "batch_tokens": 300}
    result = extract.embed_conversations(texts, out, tiny_model_dir, **other)
    assert "shards of another run" in capsys.readouterr().out
    fresh = tmp_path / "fresh.safetensors"
    assert torch.equal(result, extract.embed_conversations(texts, fresh, tiny_model_dir, **other))
    assert out.read_bytes() == fresh.read_bytes()


def test_truncated_shard_is_recomputed(tiny_model_dir, tmp_path, monkeypatch, capsys):
    texts, out = conversations(40), tmp_path / "emb.safetensors"
    full = tmp_path / "full.safetensors"
    extract.embed_conversations(texts, full, tiny_model_dir, **SETTINGS)
    save = interrupted(monkeypatch, after=2)
    with pytest.raises(KeyboardInterrupt):
        extract.embed_conversations(texts, out, tiny_model_dir, **SETTINGS)
    shard = f"{out}.parts/shard_000001.safetensors"
    truncate(shard)                                            # a full disk, a copy cut short
    with pytest.raises(InputError, match="shard_000001"):
        load_tensors(shard)
    monkeypatch.setattr(extract, "save_tensors", save)
    capsys.readouterr()
    extract.embed_conversations(texts, out, tiny_model_dir, **SETTINGS)
    assert "shard_000001.safetensors: not a readable safetensors file" in capsys.readouterr().out
    assert out.read_bytes() == full.read_bytes()


HOLD_LOCK = """
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(600)
"""


def test_a_second_extraction_into_the_same_path_fails_at_once(tiny_model_dir, tmp_path):
    texts, out = conversations(), tmp_path / "emb.safetensors"
    other = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, f"{out}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "locked\n"           # another extraction is running into out
        with pytest.raises(InputError, match=f"{out}: another run is using it"):
            extract.embed_conversations(texts, out, tiny_model_dir, **SETTINGS)
        assert not os.path.exists(f"{out}.parts") and not out.exists()
    finally:
        other.kill()                                           # kill -9: the OS releases its lock
        other.wait()
    result = extract.embed_conversations(texts, out, tiny_model_dir, **SETTINGS)
    assert torch.equal(result, load_file(out)["embeddings"])
    assert sorted(os.listdir(tmp_path)) == ["emb.safetensors"]  # the lock file is gone too


SLOW_SCRIPT = """
import os, runpy, sys, time
sys.path.insert(0, {repo!r})
import lore.io  # noqa: E402  (monkeypatched)
from lore import extract
def stalled(path, tensors, metadata=None):  # stops before its first write, as long as the test wants
    print("writing", flush=True)
    while True:
        time.sleep(1)
extract.save_tensors = stalled
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_script_runs_at_once_then_kill_9(tiny_model_dir, tmp_path):
    """eval_rb2.py twice with one --embeddings file: while the first is extracting, the second exits 2
    at once; after the first is killed (kill -9, mid-extraction), a rerun gives the right file."""
    path = tmp_path / "rb2.jsonl"
    rows = [{"prompt": f"w{i} w{i + 1} w{i + 2}", "chosen": [f"w{i}"], "rejected": [f"w{i + 3}", f"w{i + 4}"],
             "subset": "Math", "id": str(i)} for i in range(20)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    shared, script = tmp_path / "shared.safetensors", tmp_path / "slow.py"
    script.write_text(SLOW_SCRIPT.format(repo=REPO))
    command = [os.path.join(FOLDER, "eval_rb2.py"), "--model", tiny_model_dir, "--data-files", f"test={path}",
               "--device", "cpu", "--embeddings", str(shared)]
    first = subprocess.Popen([sys.executable, str(script), *command, "--out", str(tmp_path / "first")],
                             stdout=subprocess.PIPE, text=True)
    try:
        while first.stdout.readline() not in ("writing\n", ""):  # it holds the lock and is writing shards
            pass
        second = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "second")],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert one_line(second.stderr) == (f"error: {shared}: another run is using it (it holds {shared}.lock); "
                                           f"wait for it to finish or choose another path")
        assert not (tmp_path / "second").exists()
    finally:
        first.kill()
        first.wait()
    rerun = subprocess.run([sys.executable, *command, "--out", str(tmp_path / "second")],
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    fresh = extract.embed_conversations([[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": r}]
                                       for row in rows for r in row["chosen"] + row["rejected"]],
                                      tmp_path / "fresh.safetensors", tiny_model_dir, device="cpu",
                                      contents=eval_rb2.CONTENTS)
    assert torch.equal(load_file(shared)["embeddings"], fresh)
    assert not os.path.exists(f"{shared}.lock") and not os.path.exists(f"{shared}.parts")


# ------------------------------------------------------------------------------------------------
# 3. Corrupt or truncated files name the file
# ------------------------------------------------------------------------------------------------

def test_corrupt_safetensors_parquet_and_json_name_the_file(tmp_path):
    good = tmp_path / "good.safetensors"
    save_tensors(good, {"x": torch.arange(100.0)}, {"k": "v"})
    cut, garbage = tmp_path / "cut.safetensors", tmp_path / "garbage.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    garbage.write_bytes(b"not safetensors at all")
    for bad in (cut, garbage):
        with pytest.raises(InputError, match=f"{bad}: not a readable safetensors file"):
            load_tensors(bad)
        with pytest.raises(InputError, match=f"{bad}: not a readable safetensors file"):
            read_metadata(bad)
    assert read_metadata(good) == {"k": "v"} and torch.equal(load_tensors(good)["x"], torch.arange(100.0))

    table = tmp_path / "t.parquet"
    write_table(str(table), [{"a": 1}, {"a": 2}])
    cut_table = tmp_path / "cut.parquet"
    cut_table.write_bytes(table.read_bytes()[:-20])
    with pytest.raises(InputError, match=f"{cut_table}: not a readable Parquet file"):
        read_table(str(cut_table))
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"a": pd.Series([], dtype="int64")}).to_parquet(empty)
    assert len(read_table(str(empty), ["a"])) == 0          # zero rows is read: callers decide

    bad_json, latin = tmp_path / "bad.json", tmp_path / "latin.json"
    bad_json.write_text('{\n  "a": 1,\n  "b": oops\n}\n')
    latin.write_bytes('{\n"a": "caf\u00e9"\n}\n'.encode("latin-1"))
    with pytest.raises(InputError, match=f"{bad_json}:3: not valid JSON"):
        read_json(bad_json)
    with pytest.raises(InputError, match=f"{latin}:2: not UTF-8"):
        read_json(latin)


def test_corrupt_final_cache_is_recomputed(tiny_model_dir, tmp_path, capsys):
    texts, out = conversations(), tmp_path / "emb.safetensors"
    extract.embed_conversations(texts, out, tiny_model_dir, **SETTINGS)
    good = out.read_bytes()
    out.write_bytes(good[:-100])                               # the header survives, the tensors do not
    capsys.readouterr()
    result = extract.embed_conversations(texts, out, tiny_model_dir, **SETTINGS)
    assert "not a readable safetensors file" in capsys.readouterr().out
    assert out.read_bytes() == good and torch.equal(result, load_file(out)["embeddings"])


def test_reward_head_and_weights_faults(tiny_model_dir, tiny_sharded_model_dir, tmp_path):
    single = copy_model(tiny_model_dir, tmp_path, "single")
    truncate(single / "model.safetensors", keep=1000)
    with pytest.raises(InputError, match=f"{single / 'model.safetensors'}: not a readable safetensors"):
        extract.read_reward_head(single)
    with pytest.raises(InputError, match=f"could not load reward model {single}:.*SafetensorError"):
        extract.load_reward_model(single, device="cpu")

    sharded = copy_model(tiny_sharded_model_dir, tmp_path, "sharded")
    index = sharded / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"]["score.weight"]
    truncate(sharded / shard)
    with pytest.raises(InputError, match=f"{sharded / shard}: not a readable safetensors"):
        extract.read_reward_head(sharded)
    index.write_text(index.read_text()[:50])
    with pytest.raises(InputError, match=f"{index}:.*not valid JSON"):
        extract.read_reward_head(sharded)

    nan = copy_model(tiny_model_dir, tmp_path, "nan")
    weights = load_file(nan / "model.safetensors")
    weights["score.weight"][0, 3] = float("nan")
    save_file(weights, nan / "model.safetensors", {"format": "pt"})
    with pytest.raises(InputError, match=f"score.weight of {nan} has 1 NaN or inf"):
        extract.read_reward_head(nan)


# ------------------------------------------------------------------------------------------------
# 4. Local JSON / JSONL data: path:line
# ------------------------------------------------------------------------------------------------

def test_load_splits_names_path_and_line(tmp_path):
    rows = [{"a": i, "b": f"t{i}"} for i in range(4)]
    cases = {
        "empty.jsonl": (b"\n  \n", "empty.jsonl: no rows"),
        "broken.jsonl": (("".join(json.dumps(r) + "\n" for r in rows[:2]) + '{"a": 2, "b": \n').encode(),
                         "broken.jsonl:3: not valid JSON"),
        "latin.jsonl": (b'{"a": 0}\n{"b": "caf\xe9"}\n', "latin.jsonl:2: not UTF-8"),
        "scalar.jsonl": (b'{"a": 0}\n7\n', "scalar.jsonl:2: int, expected a JSON object"),
        "empty_list.json": (b"[]", "empty_list.json: no rows"),
        "pretty.json": (b'[\n  {"a": 0},\n  {"a": 1,}\n]\n', "pretty.json:3: not valid JSON"),
        "jsonl_in.json": ((json.dumps(rows[0]) + "\n" + '{"a": 1,\n').encode(), "jsonl_in.json:2: not valid JSON"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=message):
            load_splits("nobody/none", ["train"], {"train": str(tmp_path / name)})
    # the good forms still load: a JSON list, JSON lines in a .json file, a zero-row Parquet file
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("list.json", "lines.json"):
        data = load_splits("nobody/none", ["train"], {"train": str(tmp_path / name)})["train"]
        assert data.to_list() == rows
    pd.DataFrame({"a": pd.Series([], dtype="int64")}).to_parquet(tmp_path / "zero.parquet")
    assert len(load_splits("nobody/none", ["train"], {"train": str(tmp_path / "zero.parquet")})["train"]) == 0


def test_scripts_report_bad_data_files_in_one_line(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "rb2.jsonl"
    empty.write_text("")
    out = tmp_path / "out"
    code, err = exit_code_and_message(capsys, eval_rb2.main, eval_rb2.parse_args(
        ["--model", tiny_model_dir, "--data-files", f"test={empty}", "--out", str(out), "--device", "cpu"]))
    assert code == 2 and one_line(err) == f"error: {empty}: no rows" and not out.exists()

    folder = tmp_path / "prism"
    folder.mkdir()
    (folder / "survey.jsonl").write_bytes(json.dumps({"user_id": "u1", "num_completed_conversations": 1}).encode()
                                          + b'\n{"user_id": "\xff", "num_completed_conversations": 1}\n')
    (folder / "conversations.jsonl").write_text("")
    code, err = exit_code_and_message(capsys, prepare.main, prepare.parse_args(
        ["--data-dir", str(folder), "--out", str(tmp_path / "prism_out")]))
    assert code == 2 and one_line(err) == f"error: {folder / 'survey.jsonl'}:2: not UTF-8"


# ------------------------------------------------------------------------------------------------
# 5. --device; 6. tokenizer, stray torchrun variables
# ------------------------------------------------------------------------------------------------

def test_resolve_device(monkeypatch):
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="--device foo: not a device"):
        resolve_device("foo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="--device cuda: CUDA is not available on this machine"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(InputError, match="--device cuda:7: this machine has 2 CUDA device"):
        resolve_device("cuda:7")


def test_bad_device_fails_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    for main, args in [(eval_rb2.main, eval_rb2.parse_args(["--model", tiny_model_dir, "--out", str(out),
                                                             "--device", "cuda:7"])),
                       (embed_script.main, embed_script.parse_args(["--data", str(tmp_path), "--out", str(out),
                                                                    "--model", tiny_model_dir, "--device", "foo"]))]:
        code, err = exit_code_and_message(capsys, main, args)
        assert code == 2 and "--device" in one_line(err) and not out.exists()


def test_model_folder_without_tokenizer(tiny_model_dir, tmp_path):
    bare = copy_model(tiny_model_dir, tmp_path, "bare")
    for file in os.listdir(bare):
        if file.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(bare / file)
    with pytest.raises(InputError, match=f"could not load the tokenizer of {bare}"):
        extract.load_reward_model(bare, device="cpu")
    with pytest.raises(InputError, match=f"could not load the tokenizer of {bare}"):
        extract.embed_conversations(conversations(), tmp_path / "emb.safetensors", bare, **SETTINGS)
    assert not (tmp_path / "emb.safetensors").exists()


def test_stray_rank_variables_are_not_torchrun(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")                     # no MASTER_ADDR: not torchrun either
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert is_main_process()
    out = tmp_path / "emb.safetensors"                         # runs alone, does not wait for a rank 0
    result = extract.embed_conversations(conversations(), out, tiny_model_dir, **SETTINGS)
    assert torch.equal(result, load_file(out)["embeddings"])


# ------------------------------------------------------------------------------------------------
# 7. Never overwrite what embed_conversations did not write; 8. heads are checked first
# ------------------------------------------------------------------------------------------------

def test_foreign_file_at_out_path_is_refused(tiny_model_dir, tmp_path):
    texts = conversations()
    synthetic = tmp_path / "synthetic.safetensors"              # PersonalLLM --synthetic's table
    save_tensors(synthetic, {"embeddings": torch.zeros(len(texts), 64)}, {"model": "synthetic"})
    garbage = tmp_path / "notes.safetensors"
    garbage.write_text("my notes")
    folder = tmp_path / "folder.safetensors"
    folder.mkdir()
    for path in (synthetic, garbage, folder):
        before = path.read_bytes() if path.is_file() else None
        with pytest.raises(InputError, match=f"{path} exists and is not an embeddings cache"):
            extract.embed_conversations(texts, path, tiny_model_dir, **SETTINGS)
        assert (path.read_bytes() if path.is_file() else None) == before
    assert sorted(os.listdir(tmp_path)) == ["folder.safetensors", "notes.safetensors", "synthetic.safetensors"]


def test_eval_rb2_never_overwrites_a_datasets_embeddings(tiny_model_dir, tmp_path, capsys):
    dataset = tmp_path / "data" / "embeddings.safetensors"      # what a prepare.py wrote with this very model
    extract.embed_conversations(conversations(), dataset, tiny_model_dir, **SETTINGS)
    before = dataset.read_bytes()
    rb2 = tmp_path / "rb2.jsonl"
    rb2.write_text(json.dumps({"prompt": "w1 w2", "chosen": ["w3"], "rejected": ["w4"], "subset": "Math",
                               "id": "0"}) + "\n")
    out = tmp_path / "out"
    code, err = exit_code_and_message(capsys, eval_rb2.main, eval_rb2.parse_args(
        ["--model", tiny_model_dir, "--data-files", f"test={rb2}", "--out", str(out), "--device", "cpu",
         "--embeddings", str(dataset)]))
    assert code == 2 and f"{dataset} holds the embeddings of other conversations" in one_line(err)
    assert dataset.read_bytes() == before and not out.exists()
    # and the other way round: a dataset script does not overwrite RewardBench 2's cache
    eval_rb2.main(eval_rb2.parse_args(["--model", tiny_model_dir, "--data-files", f"test={rb2}", "--out", str(out),
                                       "--device", "cpu"]))
    cache = out / "rb2_embeddings.safetensors"
    with pytest.raises(InputError, match=f"{cache} holds the embeddings of RewardBench 2 replies"):
        extract.embed_conversations(conversations(), cache, tiny_model_dir, **SETTINGS)


def test_non_finite_heads_fail_before_any_file_is_written(tiny_model_dir, tmp_path, capsys):
    v_ref = extract.read_reward_head(tiny_model_dir)
    V = torch.cat([v_ref, -v_ref], 1)
    W = torch.eye(2)
    out = tmp_path / "out"
    for name, tensors, extra, culprit in [
            ("nan_V", {"V": V.clone().index_fill_(0, torch.tensor([5]), float("nan")), "W": W}, [], "V has NaN"),
            ("inf_W", {"V": V, "W": W.clone().fill_diagonal_(float("inf"))}, ["--user-weights", "W"], "W has NaN")]:
        head = tmp_path / f"{name}.safetensors"
        save_tensors(head, tensors)
        code, err = exit_code_and_message(capsys, eval_rb2.main, eval_rb2.parse_args(
            ["--model", tiny_model_dir, "--rm-head", str(head), "--out", str(out), "--device", "cpu", *extra]))
        assert code == 2 and one_line(err) == f"error: {head}: {culprit} or inf values" and not out.exists()

    nan_model = copy_model(tiny_model_dir, tmp_path, "nan_model")
    weights = load_file(nan_model / "model.safetensors")
    weights["score.weight"][0, 0] = float("inf")
    save_file(weights, nan_model / "model.safetensors", {"format": "pt"})
    for main, args in [(eval_rb2.main, eval_rb2.parse_args(["--model", str(nan_model), "--out", str(out),
                                                             "--device", "cpu"])),
                       (embed_script.main, embed_script.parse_args(["--data", str(tmp_path), "--out", str(out),
                                                                    "--model", str(nan_model), "--device", "cpu"]))]:
        code, err = exit_code_and_message(capsys, main, args)
        assert code == 2 and f"score.weight of {nan_model} has 1 NaN or inf" in one_line(err) and not out.exists()


# ---- the I/O helpers ----------------------------------------------------------------------------

def test_tensor_files_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "sub" / "t.safetensors")
    save_tensors(path, {"V": torch.arange(6.0).reshape(3, 2)}, {"K": "2"})
    assert os.listdir(tmp_path / "sub") == ["t.safetensors"]
    assert torch.equal(load_tensors(path, ["V"])["V"], torch.arange(6.0).reshape(3, 2))
    with pytest.raises(InputError, match=r"t.safetensors: missing tensor\(s\) \['W'\]"):
        load_tensors(path, ["W"])
    with pytest.raises(InputError, match="nope.safetensors: no such file"):
        load_tensors(str(tmp_path / "nope.safetensors"))


def test_load_splits_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(lore.io, "hub_reachable", lambda: False)
    monkeypatch.setattr(lore.io.hf_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(InputError, match="unreachable.*--data-files train=PATH"):
        load_splits("some/dataset", ["train"])
    with pytest.raises(InputError, match=r"t.json: no such file \(the train split\)"):
        load_splits("some/dataset", ["train"], {"train": str(tmp_path / "t.json")})
    path = tmp_path / "t.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(InputError, match="no test=PATH"):
        load_splits("some/dataset", ["train", "test"], {"train": str(path)})
    assert load_splits("some/dataset", ["train"], {"train": str(path)})["train"]["a"] == [1, 2]


def test_a_truncated_embeddings_file_never_blocks_the_prepare_that_replaces_it(tmp_path, capsys):
    """A truncated embeddings.safetensors in a data folder (or its cache) is the prepare's own broken
    file: the next prepare into that folder replaces it (it once failed with "not a readable
    safetensors file" at every rerun). A real prepare's cache is not seeded from it."""
    import argparse
    from lore.cli import cache_path
    personalllm = load_script(os.path.join(REPO, "PersonalLLM", "prepare.py"), "faults_personalllm_prepare")
    flags = ["--synthetic", "--out", str(tmp_path / "D"), "--prompts-train", "60", "--prompts-test", "20",
             "--features", "4", "--n-users", "6", "--n-unseen", "4", "--train-frac", "0.3", "--pool-frac", "0.2"]
    personalllm.main(personalllm.parse_args(flags))
    table = tmp_path / "D" / "embeddings.safetensors"
    whole = table.read_bytes()
    table.write_bytes(whole[:100])
    personalllm.main(personalllm.parse_args(flags))
    assert table.read_bytes() == whole
    # a real prepare's cache: neither seeded from a truncated --out copy nor kept when truncated itself
    args = argparse.Namespace(out=str(tmp_path / "D"))
    table.write_bytes(whole[:100])
    path = cache_path(args, "embeddings.safetensors")
    assert path == str(tmp_path / ".D.cache" / "embeddings.safetensors") and not os.path.exists(path)
    with open(path, "wb") as f:
        f.write(whole[:100])
    assert not os.path.exists(cache_path(args, "embeddings.safetensors"))
    table.write_bytes(whole)
    assert open(cache_path(args, "embeddings.safetensors"), "rb").read() == whole   # a readable one seeds it
