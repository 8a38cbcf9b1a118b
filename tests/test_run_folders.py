"""Run folders and what the scripts write: outputs that land whole or not at all, folders and
checkpoints that belong to their run, and the faults around them. Each fault test builds a fault
that once passed silently or ended in a traceback, and checks exit code 2 with one line naming the
culprit (or the correct result), and that nothing of the user's or of another script changed."""
import argparse
import errno
import fcntl
import json
import os
import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

import utils
from conftest import REPO, load_script
from lore.cli import command_line, hparam_type, run_folder
from lore.checks import InputError
from lore.scoring import fit_new_users, score_items
from lore.data import load_data
from lore.extract import embed_conversations
from lore.io import MANIFEST, load_tensors, save_tensors
from lore.methods import get_method, load_method, Method
from lore.pairs import pack, Pairs
from lore.results import save_results

PERSONALLLM = os.path.join(REPO, "PersonalLLM")
prepare = load_script(os.path.join(PERSONALLLM, "prepare.py"), "round2_prepare")
train_basis = load_script(os.path.join(PERSONALLLM, "train_basis.py"), "round2_train_basis")
vary_fewshot = load_script(os.path.join(PERSONALLLM, "vary_fewshot.py"), "round2_vary_fewshot")
best_of_n = load_script(os.path.join(PERSONALLLM, "best_of_n.py"), "round2_best_of_n")
basis_report = load_script(os.path.join(REPO, "tools", "basis_report.py"), "round2_basis_report")
interpret = load_script(os.path.join(REPO, "tools", "interpret.py"), "round2_interpret")
eval_rb2 = load_script(os.path.join(REPO, "PRISM", "eval_rb2.py"), "round2_eval_rb2")

TINY = ["--prompts-train", "120", "--prompts-test", "40", "--features", "8", "--n-users", "12",
        "--n-unseen", "8", "--train-frac", "0.2", "--pool-frac", "0.1"]
QUICK = ["--k-list", "0,2", "--iters", "20", "--fewshot-iters", "20", "--device", "cpu"]


def make_data(folder, seed=0):
    prepare.main(prepare.parse_args(["--synthetic", "--out", str(folder), *TINY, "--seed", str(seed)]))
    return str(folder)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("round2") / "data")


@pytest.fixture(scope="module")
def other_data(tmp_path_factory):
    """The same sizes, another seed: a checkpoint of `data` fits its shapes but not its users."""
    return make_data(tmp_path_factory.mktemp("round2_other") / "data", seed=1)


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("round2_results") / "R")
    train_basis.main(train_basis.parse_args(["--data", data, "--out", out, *QUICK]))
    return out


def fails(capsys, main, args, late=False):
    """-> the one line a script ends with (exit code 2, no traceback); nothing else on stderr, unless
    the error comes `late`, after work that shows progress bars."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert e.value.code == 2 and (late or len(lines) == 1) and lines[-1].startswith("error: "), err
    assert "Traceback" not in err
    return lines[-1]


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, folder)] = open(path, "rb").read()
    return out


def namespace(out, **kw):
    return argparse.Namespace(out=str(out), seed=0, **kw)


# 1. A re-run replaces only what it wrote; nothing else in --out, and never its own input

def test_rerun_refuses_entries_it_did_not_write(data, results, tmp_path, capsys):
    R = tmp_path / "R"
    shutil.copytree(results, R)
    (R / "NOTES.md").write_text("my notes")
    before = tree(R)
    line = fails(capsys, train_basis.main, train_basis.parse_args(["--data", data, "--out", str(R), *QUICK]))
    assert "'NOTES.md'" in line and "no run of PersonalLLM/train_basis.py wrote" in line
    assert tree(R) == before
    os.remove(R / "NOTES.md")
    # another script's folder inside R: refused when it is made, not deleted later
    line = fails(capsys, vary_fewshot.main, vary_fewshot.parse_args(
        ["--data", data, "--out", str(R / "fs"), "--shots", "1", "--trials", "1", *QUICK]))
    assert f"--out {R / 'fs'} is inside {R}, the output folder of another run" in line
    # a data folder inside --out, used as --data: the run would delete its own input
    plain = tmp_path / "plain"
    make_data(plain / "data")
    line = fails(capsys, train_basis.main, train_basis.parse_args(["--data", str(plain / "data"), "--out", str(plain),
                                                                   *QUICK]))
    assert f"--out {plain} contains the input" in line and os.path.isfile(plain / "data" / "data.json")
    # a re-run into its own folder replaces its own files, whole
    train_basis.main(train_basis.parse_args(["--data", data, "--out", str(R), *QUICK[:1], "0", *QUICK[2:]]))
    assert not os.path.exists(R / "lore_K2_alpha0.safetensors") and os.path.exists(R / "lore_K0_alpha0.safetensors")


def test_something_appearing_in_out_during_a_run_is_kept(tmp_path):
    out = tmp_path / "R"
    with run_folder(namespace(out), "a.py") as staging:
        open(os.path.join(staging, "a.txt"), "w").write("1")
    with pytest.raises(InputError, match="holds 'late'"):
        with run_folder(namespace(out), "a.py") as staging:
            open(os.path.join(staging, "a.txt"), "w").write("2")
            os.makedirs(out / "late")                        # another run's output, made meanwhile
            (out / "late" / "x").write_text("theirs")
    assert (out / "late" / "x").read_text() == "theirs" and (out / "a.txt").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["R"]


# 2. Every script that writes a folder goes through the same check: prepares, eval_rb2

def test_prepare_refuses_a_results_folder_and_a_users_file(results, tmp_path, capsys):
    before = tree(results)
    line = fails(capsys, prepare.main, prepare.parse_args(["--synthetic", "--out", results, *TINY]))
    assert "the output of PersonalLLM/train_basis.py" in line and tree(results) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "pairs.parquet").write_text("the user's own file")
    line = fails(capsys, prepare.main, prepare.parse_args(["--synthetic", "--out", str(mine), *TINY]))
    assert "'pairs.parquet'" in line and (mine / "pairs.parquet").read_text() == "the user's own file"


def test_eval_rb2_is_staged_and_owned(tiny_model_dir, results, tmp_path, capsys, monkeypatch):
    rb2 = tmp_path / "rb2.jsonl"
    rb2.write_text("".join(json.dumps({"prompt": f"w{i} w2", "chosen": ["w3"], "rejected": ["w4", "w5"],
                                       "subset": "Math", "id": str(i)}) + "\n" for i in range(6)))
    flags = ["--model", tiny_model_dir, "--data-files", f"test={rb2}", "--device", "cpu"]
    before = tree(results)
    line = fails(capsys, eval_rb2.main, eval_rb2.parse_args([*flags, "--out", results]))
    assert "PersonalLLM/train_basis.py" in line and tree(results) == before
    out = tmp_path / "rb2"
    eval_rb2.main(eval_rb2.parse_args([*flags, "--out", str(out)]))
    first = tree(out)
    assert {"rb2_embeddings.safetensors", "rb2_results.json", "config.json"} <= set(first)
    # more prompts, then a failure after the embedding: nothing of the new run beside the old results
    rb2.write_text(rb2.read_text() + json.dumps({"prompt": "w9", "chosen": ["w1"], "rejected": ["w2"],
                                                 "subset": "Math", "id": "9"}) + "\n")
    monkeypatch.setattr(eval_rb2, "summarize", lambda *a: (_ for _ in ()).throw(InputError("failed late")))
    assert fails(capsys, eval_rb2.main, eval_rb2.parse_args([*flags, "--out", str(out)]), late=True) == "error: failed late"
    assert tree(out) == first


# 5. and 14. Checkpoints: tied to their data folder, shapes over metadata

def edit_checkpoint(path, new_path, **meta):
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**f.metadata(), **meta}
    save_file(tensors, new_path, metadata)
    return str(new_path)


def test_checkpoint_of_other_data_is_refused(data, other_data, results, tmp_path, capsys):
    ckpt = os.path.join(results, "lore_K2_alpha0.safetensors")
    line = fails(capsys, basis_report.main, basis_report.parse_args(
        [ckpt, "--data", other_data, "--out", str(tmp_path / "b"), "--device", "cpu"]))
    assert f"{ckpt} was fitted on another data folder" in line and "--allow-other-data" in line
    line = fails(capsys, interpret.main, interpret.parse_args(
        [ckpt, "--data", other_data, "--out", str(tmp_path / "i"), "--device", "cpu"]))
    assert "fitted on another data folder" in line
    line = fails(capsys, best_of_n.main, best_of_n.parse_args(
        ["--data", other_data, "--checkpoint", ckpt, "--out", str(tmp_path / "n"), "--shots", "1", "--trials", "1",
         "--device", "cpu"]))
    assert "fitted on another data folder" in line
    assert not any(os.path.exists(tmp_path / n) for n in "bin")
    # the flag overrides, with a warning; its own data passes
    capsys.readouterr()
    basis_report.main(basis_report.parse_args([ckpt, "--data", other_data, "--out", str(tmp_path / "b"),
                                               "--device", "cpu", "--allow-other-data"]))
    assert "warning:" in capsys.readouterr().err
    basis_report.main(basis_report.parse_args([ckpt, "--data", data, "--out", str(tmp_path / "b2"), "--device", "cpu"]))


def test_pal_and_vpl_checkpoints_of_another_F_are_refused_before_any_work(data, tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """A PAL or VPL checkpoint's F (its network's input width) against the data and the reward model:
    one line, exit 2, before anything is embedded or scored (once a RuntimeError after all the work)."""
    R = str(tmp_path / "R")
    train_basis.main(train_basis.parse_args(
        ["--data", data, "--out", R, "--method", "pal,vpl", "--k-list", "2", "--device", "cpu", "--pal-dim", "4",
         "--pal-epochs", "1", "--pal-fewshot-epochs", "1", "--vpl-hidden", "4", "--vpl-epochs", "1",
         "--vpl-duplicates", "1", "--pal-stop", "fixed", "--vpl-stop", "fixed", "--pal-batch-size", "64",
         "--vpl-batch-size", "64"]))
    wide = str(tmp_path / "wide")   # the same users and sizes, F = 12 instead of 8
    prepare.main(prepare.parse_args(["--synthetic", "--out", wide, *TINY[:4], "--features", "12", *TINY[6:]]))
    prefs = tmp_path / "prefs.jsonl"
    conv = [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]
    prefs.write_text(json.dumps({"user": "u", "chosen": conv, "rejected": conv[:1] + [{**conv[1], "content": "w3"}]}))
    personalize = load_script(os.path.join(REPO, "tools", "personalize.py"), "round3_personalize")
    monkeypatch.setattr(personalize, "embed_conversations", lambda *a, **k: pytest.fail("embedded before the F check"))
    for name in ("pal_K2", "vpl_K2"):
        ckpt = os.path.join(R, f"{name}.safetensors")
        line = fails(capsys, personalize.main, personalize.parse_args(
            ["--checkpoint", ckpt, "--model", tiny_model_dir, "--prefs", str(prefs), "--out", str(tmp_path / "p"),
             "--device", "cpu"]))
        assert "gives F=64" in line and "fitted on F=8" in line, line
        line = fails(capsys, best_of_n.main, best_of_n.parse_args(
            ["--data", wide, "--checkpoint", ckpt, "--out", str(tmp_path / "n"), "--shots", "1", "--trials", "1",
             "--device", "cpu", "--allow-other-data"]))
        assert "fitted on F=8 features" in line and "F=12" in line, line
        method, _ = load_method(ckpt, "cpu")
        for call in (lambda: score_items(method, torch.randn(3, 12), torch.full((1, 2), 0.5)),
                     lambda: fit_new_users(method, torch.randn(3, 12), torch.randn(3, 12))):
            with pytest.raises(InputError, match="has 12 features, expected F=8"):
                call()
        assert score_items(method, torch.randn(3, 8), torch.full((1, 2), 0.5)).shape == (1, 3)
    assert not any(os.path.exists(tmp_path / n) for n in "pn")


def test_checkpoint_metadata_and_shapes_must_agree(data, results, tmp_path, capsys):
    ckpt = os.path.join(results, "lore_K2_alpha0.safetensors")
    method, _ = load_method(ckpt, "cpu")
    assert method.K == 2 and method.V.shape == (8, 2)
    cases = [(dict(K="5"), "V has shape (8, 2), but its metadata says K=5"),
             (dict(hparams=json.dumps({**method.hparams, "fewshot_iters": 0})), "fewshot_iters must be an integer"),
             (dict(shapes=json.dumps({"V": [8, 2], "W": [12, 3], "W_unseen": [8, 2]})), "tensor W has shape [12, 2]"),
             (dict(hparams="[1, 2]"), "unreadable checkpoint metadata")]
    for meta, message in cases:
        bad = edit_checkpoint(ckpt, tmp_path / "bad.safetensors", **meta)
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            load_method(bad, "cpu")
    # 14: no V; V and W columns that disagree (the shapes record removed, as in a hand-made file)
    with safe_open(ckpt, "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "shapes"}
    tensors = load_tensors(ckpt)
    save_file({k: v for k, v in tensors.items() if k != "V"}, tmp_path / "no_v.safetensors", meta)
    save_file({**tensors, "W": torch.rand(12, 3)}, tmp_path / "cols.safetensors", meta)
    for path, message in [(str(tmp_path / "no_v.safetensors"), "no tensor V"),
                          (str(tmp_path / "cols.safetensors"), "their columns disagree")]:
        for main, args in [(basis_report.main, [path, "--out", str(tmp_path / "b"), "--device", "cpu"]),
                           (interpret.main, [path, "--data", data, "--out", str(tmp_path / "i"), "--device", "cpu"]),
                           (best_of_n.main, ["--data", data, "--checkpoint", path, "--out", str(tmp_path / "n"),
                                             "--device", "cpu"])]:
            parse = {basis_report.main: basis_report.parse_args, interpret.main: interpret.parse_args,
                     best_of_n.main: best_of_n.parse_args}[main]
            assert message in fails(capsys, main, parse(args))
    # 18: a folder given as a checkpoint
    with pytest.raises(InputError, match="is a folder, not a checkpoint file"):
        load_method(results, "cpu")


# 6., 13. and 17. Hand edits of a data folder

def copy_data(data, tmp_path, name="d"):
    return shutil.copytree(data, tmp_path / name, ignore=shutil.ignore_patterns(".lore-run.json"))


def test_hand_edits_of_data_json_and_the_table(data, tmp_path):
    d = copy_data(data, tmp_path)
    info = json.loads((d / "data.json").read_text())
    seen = info["users"]["seen"]
    for edit, message in [
            (lambda i: i["users"].__setitem__("seen", seen[1:]), f"of user '{seen[0]}', which .* does not list"),
            (lambda i: i["users"].__setitem__("seen", seen + [seen[3]]), f"seen user '{seen[3]}' is listed twice"),
            (lambda i: i["users"].pop("unseen"), r"users\['unseen'\] must be a non-empty list"),
            (lambda i: i.__setitem__("users", "seen_0"), "'users' is a str, expected a JSON object"),
            (lambda i: i.__setitem__("files", list(i["files"])), "'files' is a list, expected a JSON object")]:
        changed = json.loads(json.dumps(info))
        edit(changed)
        (d / "data.json").write_text(json.dumps(changed))
        with pytest.raises(InputError, match=message):
            load_data(str(d), "cpu")
    (d / "data.json").write_text("[1, 2]")
    with pytest.raises(InputError, match="a JSON list, not an object"):
        load_data(str(d), "cpu")
    # the table's sign flipped in place: the same size and header, other content
    (d / "data.json").write_text(json.dumps(info))
    path = str(d / "embeddings.safetensors")
    with safe_open(path, "pt") as f:
        table, meta = f.get_tensor("embeddings"), f.metadata()
    save_tensors(path, {"embeddings": -table}, meta)
    assert os.path.getsize(path) == info["embeddings"]["bytes"]
    with pytest.raises(InputError, match="is not the content data.json was written with"):
        load_data(str(d), "cpu")


# 7. kill -9 at any instant of the final swap

@pytest.mark.parametrize("renames", ["probe", 1, 2, 3])
def test_kill_9_during_the_swap_keeps_old_or_new(tmp_path, renames):
    """A child process dies (os._exit, as under kill -9: no cleanup) after `renames` renames of the
    swap; the next run finds --out holding the old results or the new ones, whole, and no leftovers."""
    out = tmp_path / "R"
    with run_folder(namespace(out), "a.py") as staging:
        open(os.path.join(staging, "v.txt"), "w").write("old")
    pid = os.fork()
    if pid == 0:   # the child: a run that is killed in its swap
        try:
            calls, rename = [], os.rename

            def dying_rename(src, dst):   # counts the swap's renames (from the staging folder's on)
                rename(src, dst)
                if calls or ".partial-" in str(src) or renames == "probe":
                    calls.append(dst)
                if len(calls) == (1 if renames == "probe" else renames):
                    os._exit(9)
            os.rename = dying_rename
            with run_folder(namespace(out), "a.py") as staging:
                open(os.path.join(staging, "v.txt"), "w").write("new")
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9
    with run_folder(namespace(out), "a.py") as staging:   # the next run recovers first
        recovered = open(out / "v.txt").read() if (out / "v.txt").exists() else None
        open(os.path.join(staging, "v.txt"), "w").write("next")
    assert recovered == ("new" if renames != "probe" and renames >= 2 else "old")   # probe: killed between
    # the renames of the check that --out can be renamed (_check_renamable): --out is put back
    assert sorted(os.listdir(tmp_path)) == ["R"] and (out / "v.txt").read_text() == "next"


def test_out_created_during_an_unfinished_swap_deletes_nothing(tmp_path):
    out = tmp_path / "R"
    for kind, text in (("old", "previous"), ("ready", "new")):
        os.makedirs(tmp_path / f".R.{kind}-4242")
        (tmp_path / f".R.{kind}-4242" / "v.txt").write_text(text)
        record = {"folder": str(out), "pid": 4242 if kind == "ready" else 1, "complete": True, "entries": {}}
        (tmp_path / f".R.{kind}-4242" / MANIFEST).write_text(json.dumps(record))
    out.mkdir()                                             # something created R meanwhile
    with pytest.raises(InputError, match="was created while the swap of a killed run was unfinished"):
        with run_folder(namespace(out), "a.py"):
            pass
    assert (tmp_path / ".R.old-4242" / "v.txt").read_text() == "previous"
    assert (tmp_path / ".R.ready-4242" / "v.txt").read_text() == "new"


# 8. --out a symlink

def test_out_symlink_replaces_its_target(tmp_path):
    target = tmp_path / "target"
    with run_folder(namespace(target), "a.py") as staging:
        open(os.path.join(staging, "v.txt"), "w").write("1")
    link = tmp_path / "links" / "RL"
    link.parent.mkdir()
    os.symlink(target, link)
    with run_folder(namespace(link), "a.py") as staging:
        open(os.path.join(staging, "v.txt"), "w").write("2")
    assert os.path.islink(link) and (link / "v.txt").read_text() == "2" and (target / "v.txt").read_text() == "2"
    assert os.listdir(tmp_path / "links") == ["RL"]
    assert sorted(os.listdir(tmp_path)) == ["links", "target"]


# 9. and 15. The API checks what the command line checks

def test_api_checks_what_the_command_line_checks(data, tmp_path):
    X = [torch.randn(6, 4) for _ in range(3)]
    sets = dict(seen_train=X, seen_test=X, unseen_fewshot=X, unseen_test=X)
    for hp, message in [({"iters": 0}, "iters must be an integer"), ({"iters": True}, "iters must be an integer"),
                        ({"iters": 2.5}, "iters must be an integer"), ({"lr": float("nan")}, "lr must be a finite"),
                        ({"lr": -1.0}, "lr must be a finite"), ({"lr": 1e39}, "lr must be a finite"),
                        ({"fewshot_iters": -5}, "fewshot_iters must be an integer")]:
        with pytest.raises(InputError, match=f"method lore: {message}"):
            utils.sweep(K_list=[1], hparams={"lore": hp}, **sets)
    v = torch.randn(4)
    for kw in (dict(learning_rate=0.0), dict(fewshot_iterations=-5), dict(num_iterations=True)):
        with pytest.raises(InputError, match="method lore"):
            utils.run([1], [0.0], v, X, X, X, X, 3, 3, **kw)
    with pytest.raises(InputError, match="K=10 is more than the F=4 features"):
        utils.sweep(K_list=[0, 10], v_ref=v, **sets)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="out_dir .* is a file"):
        utils.run([1], [0.0], v, X, X, X, X, 3, 3, out_dir=str(tmp_path / "file"))
    with pytest.raises(InputError, match="meta device"):
        utils.sweep(K_list=[1], **{**sets, "seen_train": [torch.randn(6, 4, device="meta")] * 3})
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(InputError, match="X must be float32"):
            utils.sweep(K_list=[1], **{**sets, "seen_train": Pairs(torch.arange(3), 3, X=torch.randn(3, 4, dtype=dtype))})
    with pytest.raises(InputError, match="group must be"):
        utils.sweep(K_list=[1], **{**sets, "seen_train": Pairs(torch.arange(3), 3, X=torch.randn(3, 4),
                                                                     group=torch.arange(2))})
    with pytest.raises(InputError, match="fewshot_pairs must be an integer"):
        load_data(data, "cpu", fewshot_pairs="3")
    torch.manual_seed(0)
    method = get_method("lore")(2, 0.0, None, "cpu", iters=5, fewshot_iters=5)
    method.fit(pack(X))
    W = torch.full((1, 2), 0.5)
    assert score_items(method, torch.randn(3, 4), W).shape == (1, 3)
    for embeddings, U, message in [(torch.randn(4), W, "must have 2 dimensions"),
                                   (torch.full((2, 4), float("nan")), W, "has NaN or inf"),
                                   (torch.randn(2, 5), W, "has 5 features, expected F=4"),
                                   (torch.randn(0, 4), W, "is empty"),
                                   (torch.randn(2, 4, device="meta"), W, "meta device"),
                                   (torch.randn(2, 4), torch.ones(1, 3), "U has 3 columns")]:
        with pytest.raises(InputError, match=message):
            score_items(method, embeddings, U)
    with pytest.raises(InputError, match="chosen has 5 features"):
        fit_new_users(method, torch.randn(2, 5), torch.randn(2, 5))


# 10. I/O errors: one line, exit 2, nothing half-written

def test_disk_full_is_one_line_and_leaves_nothing(data, results, tmp_path, capsys, monkeypatch):
    R = tmp_path / "R"
    shutil.copytree(results, R)
    before = tree(R)
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and str(path).endswith(f".tmp{os.getpid()}") and "results.json" in str(path):
            f.write("{" if "b" not in mode else b"{")
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return f
    monkeypatch.setattr("lore.io.open", full_disk, raising=False)
    line = fails(capsys, train_basis.main, train_basis.parse_args(["--data", data, "--out", str(R), *QUICK]))
    assert line.startswith("error: ") and "No space left on device (ENOSPC)" in line and "results.json" in line
    assert tree(R) == before and sorted(os.listdir(tmp_path)) == ["R"]


def test_busy_mount_point_and_long_name_are_refused_before_work(data, tmp_path, capsys, monkeypatch):
    long_out = tmp_path / ("x" * 245)
    line = fails(capsys, train_basis.main, train_basis.parse_args(["--data", data, "--out", str(long_out), *QUICK]))
    assert "is too long" in line
    mount = tmp_path / "mnt"
    mount.mkdir()
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(mount))
    line = fails(capsys, train_basis.main, train_basis.parse_args(["--data", data, "--out", str(mount), *QUICK]))
    assert "is a mount point" in line and os.listdir(mount) == []


# 11. and 18. Flags bounded where the code needs it

@pytest.mark.parametrize("flags", [["--seed", "4294967296"], ["--lr", "1e39"], ["--pal-lr", "1e39"],
                                   ["--vpl-hidden", "100000000"], ["--vpl-warmup", "5"], ["--iters", "0"]])
def test_flags_out_of_range_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as e:
        train_basis.parse_args(flags)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and flags[0] in err


def test_rank_above_F_fails_before_any_fit(data, tmp_path, capsys):
    line = fails(capsys, train_basis.main, train_basis.parse_args(
        ["--data", data, "--out", str(tmp_path / "r"), "--k-list", "1,1000000", "--iters", "20", "--device", "cpu"]))
    assert "K=1000000 is more than the F=8 features" in line
    assert "lore(K=1" not in capsys.readouterr().out and not os.path.exists(tmp_path / "r")


# 12. eval_rb2's Ties subset: a valid file scores, an unusable one gives null and a note

def ties_rows(ids, chosen_counts):
    return [{"id": i, "subset": "Ties", "prompt": "p", "chosen": ["a"] * c, "rejected": ["b"]}
            for i, c in zip(ids, chosen_counts)] + [{"id": "m", "subset": "Math", "prompt": "p", "chosen": ["a"],
                                                     "rejected": ["b"]}]


def stats_of(rows, margin=1.0):
    n = len(rows)
    return {"min_chosen": torch.full((n, 1), margin), "max_chosen": torch.full((n, 1), margin + 0.5),
            "max_rejected": torch.zeros(n, 1), "n_chosen": torch.tensor([len(r["chosen"]) for r in rows])}


def test_eval_rb2_ties_never_crash(tmp_path, capsys):
    rows = ties_rows(["ref:1", "tied:1"], [1, 3])
    record = eval_rb2.summarize(["h"], rows, stats_of(rows))[0]
    # margin 1 > spread 0.5: every term counts; tanh(1 / 0.5 - 1) = tanh(1)
    assert record["Ties_rb2"] == pytest.approx(0.3 + 0.3 + 0.2 + 0.2 + 0.01 * float(torch.tanh(torch.tensor(1.0))))
    for ids, counts, note in [(["x1", "tied:1"], [1, 3], "is not ref:N or tied:N"),
                              (["ref:1", "ref:2"], [1, 1], "has no tied:N pair"),
                              (["ref:1", "tied:2"], [1, 3], "has no"),
                              (["ref:1", "ref:1", "tied:1"], [1, 1, 3], "appears twice"),
                              (["tied:1"], [3], "has no ref:N pair"),
                              (["ref:1", "tied:1"], [1, 1], "fewer than 2 correct replies")]:
        rows = ties_rows(ids, counts)
        records = eval_rb2.summarize(["h"], rows, stats_of(rows))
        assert records[0]["Ties_rb2"] is None and note in records[0]["Ties_rb2_note"]
        save_results(records, str(tmp_path))                # no KeyError, valid JSON with null
        assert json.loads((tmp_path / "results.json").read_text())[0]["overall_rb2"] is None


# 16. Ctrl-C during a prepare into an existing folder: the message is true

def test_ctrl_c_during_prepare_leaves_the_old_folder_whole(data, tmp_path, capsys, monkeypatch):
    d = tmp_path / "d"
    make_data(d)
    before = tree(d)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:          # after a few files of the new folder are written
            raise KeyboardInterrupt
        return save(*args, **kwargs)
    save = save_tensors
    monkeypatch.setattr(prepare, "save_tensors", interrupted)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        prepare.main(prepare.parse_args(["--synthetic", "--out", str(d), *TINY, "--seed", "3"]))
    assert e.value.code == 130 and "nothing of this run was written" in capsys.readouterr().err
    assert tree(d) == before
    load_data(str(d), "cpu")           # and it is still a valid data folder, not refused


# 19. A busy --out is refused before any data is read

def test_busy_out_is_refused_at_once(tmp_path, capsys):
    out = tmp_path / "R"
    with open(tmp_path / ".R.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for main, args in [
                (train_basis.main, train_basis.parse_args(["--data", str(tmp_path / "none"), "--out", str(out)])),
                (prepare.main, prepare.parse_args(["--synthetic", "--out", str(out), *TINY])),
                (best_of_n.main, best_of_n.parse_args(["--data", str(tmp_path / "none"), "--out", str(out),
                                                       "--checkpoint", str(tmp_path / "none.safetensors")]))]:
            assert "is in use by another run" in fails(capsys, main, args)
    assert not out.exists()


# 18. Messages whole and on one line

def test_tokenizer_error_is_whole_and_one_line(tiny_model_dir, tmp_path):
    bare = shutil.copytree(tiny_model_dir, tmp_path / "bare")
    for name in os.listdir(bare):
        if name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.remove(bare / name)
    with pytest.raises(InputError) as e:
        embed_conversations([[{"role": "user", "content": "a"}]], tmp_path / "e.safetensors", str(bare),
                                  device="cpu")
    message = str(e.value)
    assert "\n" not in message and "(1) a `tokenizers` library serialization file" in message


def test_string_hyperparameters_with_declared_choices():
    """A method may declare a string-valued hyperparameter (e.g. init in {random, svd}): its values
    are checked by the same validator for the API and the flags."""
    cls = type("WithInit", (Method,), {"name": "with_init", "defaults": {"init": "random", "iters": 5},
                                             "choices": {"init": ("random", "svd")}})
    assert cls(1, device="cpu").hparams == {"init": "random", "iters": 5}
    assert cls(1, device="cpu", init="svd").hparams["init"] == "svd"
    with pytest.raises(InputError, match="method with_init: init must be one of random, svd, got 'pca'"):
        cls(1, device="cpu", init="pca")
    assert hparam_type(cls, "init")("svd") == "svd"
    with pytest.raises(argparse.ArgumentTypeError, match="init must be one of random, svd"):
        hparam_type(cls, "init")("pca")
    with pytest.raises(InputError, match="its class must list its values in choices"):   # refused, not guessed
        type("NoChoices", (Method,), {"name": "no_choices", "defaults": {"init": "random"}})(1, device="cpu")


def test_run_folder_is_all_or_nothing_and_locked(tmp_path, capsys):
    import argparse
    out = tmp_path / "results"
    args = argparse.Namespace(out=str(out), seed=0)
    with run_folder(args, "a.py") as staging:
        open(os.path.join(staging, "first.txt"), "w").write("1")
    assert sorted(os.listdir(out)) == [".lore-run.json", "config.json", "first.txt"]

    @command_line
    def interrupted(args):
        with run_folder(args, "a.py") as staging:
            open(os.path.join(staging, "second.txt"), "w").write("2")
            raise KeyboardInterrupt  # Ctrl-C in the middle of a run
    with pytest.raises(SystemExit) as e:
        interrupted(args)
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == [".lore-run.json", "config.json", "first.txt"]   # the earlier run, untouched
    assert sorted(os.listdir(tmp_path)) == ["results"]       # no staging folder left
    # a run killed with -9 leaves its staging folder, with its record: the next run removes it
    os.makedirs(tmp_path / ".results.partial-99999")
    (tmp_path / ".results.partial-99999" / MANIFEST).write_text(
        json.dumps({"folder": str(out), "pid": 99999, "script": "a.py", "entries": {}}))
    with run_folder(args, "a.py") as staging:
        # while a run holds the folder, a second one is refused at once
        with pytest.raises(InputError, match="is in use by another run"):
            with run_folder(args, "a.py"):
                pass
    assert sorted(os.listdir(tmp_path)) == ["results"]
    assert sorted(os.listdir(out)) == [".lore-run.json", "config.json"]       # nothing of the older run


# Leftovers are recognised by their exact name and the record inside them, never by a prefix

def test_a_sibling_whose_name_starts_like_a_leftover_is_never_touched(tmp_path):
    """`r.old-1` is a folder of its own: its staging folder, lock and cache are not `r`'s leftovers;
    neither is a folder named exactly like one of `r`'s but without its record."""
    X, r = tmp_path, tmp_path / "r"
    (X / ".r.old-1.cache").mkdir()
    (X / ".r.old-1.cache" / "embeddings.safetensors").write_text("cache of r.old-1")
    (X / ".r.partial-7").mkdir()                                # a user's folder, no record
    (X / ".r.partial-7" / "mine.txt").write_text("mine")
    with run_folder(namespace(X / "r.old-1"), "a.py") as first:
        open(os.path.join(first, "lore_K0.txt"), "w").write("first")
        with run_folder(namespace(r), "a.py") as second:   # runs to its end meanwhile
            open(os.path.join(second, "v.txt"), "w").write("second")
        assert os.path.isfile(os.path.join(first, "lore_K0.txt"))
    assert (X / "r.old-1" / "lore_K0.txt").read_text() == "first" and (r / "v.txt").read_text() == "second"
    assert (X / ".r.old-1.cache" / "embeddings.safetensors").read_text() == "cache of r.old-1"
    assert (X / ".r.partial-7" / "mine.txt").read_text() == "mine"
    assert sorted(os.listdir(X)) == [".r.old-1.cache", ".r.partial-7", "r", "r.old-1"]


def test_a_leftover_of_another_folder_is_not_recovered(tmp_path):
    """A ready folder named like r's whose record names another folder is not put in place as r."""
    other = tmp_path / ".r.ready-55"
    other.mkdir()
    (other / MANIFEST).write_text(json.dumps({"folder": str(tmp_path / "s"), "pid": 55, "complete": True,
                                                  "entries": {}}))
    with run_folder(namespace(tmp_path / "r"), "a.py") as staging:
        assert not (tmp_path / "r").exists()
        open(os.path.join(staging, "v.txt"), "w").write("mine")
    assert other.is_dir() and (tmp_path / "r" / "v.txt").read_text() == "mine"


# --out a symlink written `link/`, or a loop

def test_out_link_with_a_trailing_slash_is_the_link(tmp_path):
    target = tmp_path / "target"
    with run_folder(namespace(target), "a.py") as staging:
        open(os.path.join(staging, "v.txt"), "w").write("1")
    link = tmp_path / "links" / "RL"
    link.parent.mkdir()
    os.symlink(target, link)
    with run_folder(namespace(str(link) + "/"), "a.py") as staging:
        open(os.path.join(staging, "v.txt"), "w").write("2")
    assert os.path.islink(link) and (target / "v.txt").read_text() == "2"
    assert os.listdir(tmp_path / "links") == ["RL"]
    assert sorted(os.listdir(tmp_path)) == ["links", "target"]


def test_out_symlink_loop_is_refused(tmp_path):
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    for out in (tmp_path / "a", str(tmp_path / "a") + "/"):
        with pytest.raises(InputError, match="symlink"):
            with run_folder(namespace(out), "a.py"):
                pass
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# Every output path of the API and of --embeddings follows the ownership rule of --out

def test_sweep_out_dir_in_another_run_or_data_folder_is_refused(data, results, tmp_path):
    d = load_data(data, "cpu")
    sets = {name: d.sets[name] for name in ("seen_train", "seen_test", "unseen_fewshot", "unseen_test")}
    before_results, before_data = tree(results), tree(data)
    for out_dir in (results, data, os.path.join(results, "sub")):
        with pytest.raises(InputError, match="the output folder of another run"):
            utils.sweep(**sets, K_list=[1], hparams={"lore": {"iters": 5, "fewshot_iters": 5}}, device="cpu", out_dir=out_dir)
    assert tree(results) == before_results and tree(data) == before_data
    mine = tmp_path / "mine"
    utils.sweep(**sets, K_list=[1], hparams={"lore": {"iters": 5, "fewshot_iters": 5}}, device="cpu", out_dir=str(mine))
    assert any(name.endswith(".safetensors") for name in os.listdir(mine))


def test_eval_rb2_embeddings_in_another_run_or_data_folder_is_refused(tiny_model_dir, data, results, tmp_path,
                                                                     capsys):
    rb2 = tmp_path / "rb2.jsonl"
    rb2.write_text("".join(json.dumps({"prompt": f"w{i} w2", "chosen": ["w3"], "rejected": ["w4"],
                                       "subset": "Math", "id": str(i)}) + "\n" for i in range(3)))
    flags = ["--model", tiny_model_dir, "--data-files", f"test={rb2}", "--device", "cpu", "--out", str(tmp_path / "B")]
    before_results, before_data = tree(results), tree(data)
    for where in (os.path.join(results, "rb2_embeddings.safetensors"), os.path.join(data, "x.safetensors")):
        line = fails(capsys, eval_rb2.main, eval_rb2.parse_args([*flags, "--embeddings", where]))
        assert "--embeddings" in line and "another run" in line
    assert tree(results) == before_results and tree(data) == before_data and not (tmp_path / "B").exists()


# The protocol as a property: random runs, kills and leftovers over sibling folders

FOLDERS = ("r", "r.old-1", "s")
TRAPS = {".r.partial-999": "a user's folder named like a leftover", ".r.old-1.cache": "another folder's cache"}


def run_in_child(out, token, kill):
    """A run into `out` writing v.txt = token, in a child process killed (os._exit: no cleanup) inside
    its block (kill 'block') or after `kill` renames of its swap; -> (pid, whether it was killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            calls, rename = [], os.rename

            def dying_rename(src, dst):
                rename(src, dst)
                calls.append(dst)
                if len(calls) == kill:
                    os._exit(9)
            os.rename = dying_rename
            with run_folder(namespace(out), "a.py") as staging:
                open(os.path.join(staging, "v.txt"), "w").write(token)
                if kill == "block":
                    os._exit(9)
            os._exit(0)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) in (0, 9)
    return pid, os.WEXITSTATUS(status) == 9


def snapshot(parent, names):
    return {name: tree(os.path.join(parent, name)) if os.path.isdir(os.path.join(parent, name)) else None
            for name in names}


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(st.lists(st.tuples(st.sampled_from(FOLDERS), st.sampled_from([None, "block", 1, 2, 3])),
                min_size=1, max_size=6))
def test_run_folder_protocol_never_loses_a_result_nor_touches_another_folder(ops):
    import tempfile
    with tempfile.TemporaryDirectory() as parent:
        for name, what in TRAPS.items():
            os.makedirs(os.path.join(parent, name))
            open(os.path.join(parent, name, "f.txt"), "w").write(what)
        allowed = {f: {None} for f in FOLDERS}   # what --out may hold once recovered
        pids = {f: set() for f in FOLDERS}
        for i, (f, kill) in enumerate(ops):
            mine = {f, f".{f}.lock"}
            others = [n for n in os.listdir(parent) if n not in mine
                      and not any(n == f".{f}.{k}-{p}" for k in ("partial", "ready", "old") for p in pids[f])]
            before = snapshot(parent, others)
            pid, killed = run_in_child(os.path.join(parent, f), f"{f}:{i}", kill)
            pids[f].add(pid)
            # a run touches nothing but its folder, its lock and its own leftovers
            ours = {n for n in os.listdir(parent) if n.startswith(f".{f}.") and n.endswith(f"-{pid}")}
            assert snapshot(parent, [n for n in others]) == before, (f, kill)
            assert not ours - {f".{f}.{k}-{pid}" for k in ("partial", "ready", "old")}
            if not killed:
                allowed[f] = {f"{f}:{i}"}                # a completed result: nothing less from now on
            elif kill != "block":
                allowed[f] = allowed[f] | {f"{f}:{i}"}   # a swap under way may finish at recovery
        for f in FOLDERS:
            with run_folder(namespace(os.path.join(parent, f)), "a.py") as staging:   # recovers first
                path = os.path.join(parent, f, "v.txt")
                found = open(path).read() if os.path.exists(path) else None
                open(os.path.join(staging, "v.txt"), "w").write("final")
            assert found in allowed[f], (f, found, allowed[f], ops)
        for name, what in TRAPS.items():
            assert open(os.path.join(parent, name, "f.txt")).read() == what
        left = sorted(n for n in os.listdir(parent) if n not in TRAPS)
        assert left == sorted(FOLDERS), left   # no lock file left behind either


def test_an_out_that_cannot_be_renamed_is_refused_before_any_work(tmp_path, capsys):
    """--out that the final swap could not rename (an immutable folder: chattr +i; or, without root,
    a read-only parent): one line, exit 2, before the block runs; nothing changed, nothing left."""
    import subprocess
    out = tmp_path / "p" / "R"
    with run_folder(namespace(out), "a.py") as staging:
        open(os.path.join(staging, "v.txt"), "w").write("old")
    before = tree(tmp_path)
    immutable = subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode == 0 \
        if shutil.which("chattr") else False
    if not immutable:
        if os.geteuid() == 0:
            pytest.skip("no chattr +i here, and chmod does not restrict root")
        os.chmod(tmp_path / "p", 0o555)
    try:
        @command_line
        def main(args):
            with run_folder(args, "a.py"):
                pytest.fail("the run's work started")
        line = fails(capsys, main, namespace(out))
        assert line.startswith(f"error: --out {out} cannot be renamed") if immutable else str(tmp_path / "p") in line
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        else:
            os.chmod(tmp_path / "p", 0o755)
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path / "p")) == ["R"]


def test_a_refused_run_leaves_no_lock_file_and_no_new_parent_folder(data, tmp_path, capsys):
    """A run refused (or failed) leaves neither `.{out}.lock` nor the parent folders it created for
    --out; a finished run leaves its folder only."""
    @command_line
    def main(args):
        with run_folder(args, "a.py") as staging:
            if args.refuse:
                raise InputError("refused")
            open(os.path.join(staging, "v.txt"), "w").write("new")
    fails(capsys, main, namespace(tmp_path / "a" / "b" / "R", refuse=True))
    assert os.listdir(tmp_path) == []
    main(namespace(tmp_path / "a" / "b" / "R", refuse=False))
    assert os.listdir(tmp_path / "a" / "b") == ["R"]
    fails(capsys, main, namespace(tmp_path / "a" / "b" / "R", refuse=True))
    assert os.listdir(tmp_path / "a" / "b") == ["R"] and (tmp_path / "a" / "b" / "R" / "v.txt").read_text() == "new"
    # a script refused after the lock: compare's data.json check
    compare_tool = load_script(os.path.join(REPO, "tools", "compare.py"), "round3_compare")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "data.json").write_text("[]")
    fails(capsys, compare_tool.main, compare_tool.parse_args(["--data", str(tmp_path / "d"), "--out",
                                                              str(tmp_path / "new" / "cmp"), "--device", "cpu"]))
    assert sorted(os.listdir(tmp_path)) == ["a", "d"]


def test_ctrl_c_after_the_swap_says_the_results_are_in_place(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the previous results are deleted after the swap: the swap completes (the signal
    is held back until it has), and the message says the new results are in --out, not that nothing
    was written."""
    import signal
    from lore import cli
    out = tmp_path / "R"
    with run_folder(namespace(out), "a.py") as staging:
        open(os.path.join(staging, "v.txt"), "w").write("old")
    rmtree = shutil.rmtree

    def interrupted_rmtree(path, *args, **kwargs):
        if ".R.old-" in str(path):
            os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C while the old folder is being deleted
        return rmtree(path, *args, **kwargs)
    monkeypatch.setattr(cli.shutil, "rmtree", interrupted_rmtree)

    @command_line
    def main(args):
        with run_folder(args, "a.py") as staging:
            open(os.path.join(staging, "v.txt"), "w").write("new")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(namespace(out))
    err = capsys.readouterr().err
    assert e.value.code == 130 and err == f"interrupted: the run had finished, {out} holds its results\n", err
    assert (out / "v.txt").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["R"]
