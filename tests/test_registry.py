"""A new method is one class plus one entry of lore.methods.METHODS: this test registers one (a fixed
random basis, new users fitted as LoRe fits them) and runs it through the sweeps, both scripts'
outputs, the checkpoints and the command-line flags."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, load_script

import utils
from lore.checks import set_seed
from lore.data import load_data
from lore.io import read_json
from lore.methods import accuracy, load_method, METHODS


class RandomBasis(utils.LoReMethod):
    """K fixed random unit directions; seen and new users fit only their weights."""
    name, min_K, uses_alpha = "random_basis", 1, False
    defaults = {"scale": 1.0, "fewshot_iters": 200, "fewshot_lr": 0.1}
    recipe_hparams = ()

    def fit(self, pairs):
        self.V = self.hparams["scale"] * torch.nn.functional.normalize(
            torch.randn(pairs.n_features, self.K, device=self.device), dim=0)     # [F, K]
        return self.fit_users(pairs)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(METHODS, "random_basis", RandomBasis)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pllm") / "data")
    prepare = load_script(os.path.join(REPO, "PersonalLLM", "prepare.py"), "registry_prepare")
    prepare.main(prepare.parse_args(["--synthetic", "--out", out, "--prompts-train", "300", "--prompts-test", "60",
                                     "--features", "16", "--n-users", "20", "--n-unseen", "10",
                                     "--train-frac", "0.1", "--pool-frac", "0.1"]))
    return out


def test_sweep_runs_a_registered_method(registered, data, tmp_path):
    d = load_data(data, "cpu", fewshot_pairs=10)
    set_seed(0)
    records = utils.sweep(methods=["lore", "random_basis"], K_list=[0, 2], alpha_list=[0.0], v_ref=d.v_ref,
                          hparams={"lore": {"iters": 30}, "random_basis": {"scale": 2.0}},
                          out_dir=str(tmp_path), **d.sets)
    # lore runs K = 0 and 2; random_basis skips K = 0 (below its min_K) and has no alpha
    assert [(r["method"], r["K"], r["alpha"]) for r in records] == [
        ("lore", 0, 0.0), ("lore", 2, 0.0), ("random_basis", 2, None)]
    assert sorted(os.listdir(tmp_path)) == ["lore_K0_alpha0.fit.json", "lore_K0_alpha0.report.json",
                                             "lore_K0_alpha0.safetensors", "lore_K2_alpha0.fit.json",
                                             "lore_K2_alpha0.report.json", "lore_K2_alpha0.safetensors",
                                             "random_basis_K2.fit.json", "random_basis_K2.report.json",
                                             "random_basis_K2.safetensors"]
    method, tensors = load_method(str(tmp_path / "random_basis_K2.safetensors"))
    assert isinstance(method, RandomBasis) and method.hparams["scale"] == 2.0
    assert torch.allclose(method.V.norm(dim=0), torch.full((2,), 2.0))
    # the record's accuracy is the loaded method's, recomputed from its checkpoint
    acc = accuracy(method, d.sets["unseen_test"], tensors["W_unseen"])
    assert records[2]["unseen_test"] == pytest.approx(acc.mean())
    shots = utils.sweep_shots(methods=["random_basis"], K_list=[2], shots=[1, 5], trials=2, v_ref=d.v_ref,
                              seen_train=d.sets["seen_train"], unseen_fewshot=d.sets["unseen_fewshot"],
                              unseen_test=d.sets["unseen_test"])
    assert [(r["method"], r["K"], r["shots"]) for r in shots] == [("random_basis", 2, 1), ("random_basis", 2, 5)]


def test_both_scripts_run_a_registered_method(registered, data, tmp_path):
    train_basis = load_script(os.path.join(REPO, "PersonalLLM", "train_basis.py"), "registry_train_basis")
    vary_fewshot = load_script(os.path.join(REPO, "PersonalLLM", "vary_fewshot.py"), "registry_vary_fewshot")
    out = str(tmp_path / "tb")
    train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--method", "lore,random_basis",
                                             "--k-list", "0,3", "--iters", "20", "--random-basis-scale", "3"]))
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["K"]) for r in records] == [("lore", 0), ("lore", 3), ("random_basis", 3)]
    assert json.load(open(os.path.join(out, "config.json")))["random_basis__scale"] == 3.0
    assert "random_basis_K3.safetensors" in os.listdir(out) and "accuracy_vs_rank.png" in os.listdir(out)
    out = str(tmp_path / "vf")
    vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--method", "random_basis,lore",
                                               "--k-list", "2", "--iters", "20", "--shots", "1,3", "--trials", "2"]))
    records = read_json(os.path.join(out, "results.json"))
    assert [(r["method"], r["shots"]) for r in records] == [("random_basis", 1), ("random_basis", 3),
                                                            ("lore", 1), ("lore", 3)]
    assert "accuracy_vs_shots.png" in os.listdir(out)


def test_unknown_method_exits_2_listing_the_registered_names(data, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "PersonalLLM", "train_basis.py"), "--data", data,
                           "--out", str(tmp_path / "r"), "--method", "lore,nope"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "registered methods (lore, lore_regularized" in proc.stderr
    assert not os.path.exists(tmp_path / "r")
