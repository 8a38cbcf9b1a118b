"""Comparisons: loss curves and the convergence flag, the checked fit (diverged or unmoved fits are
errors for every method), validation users, searches with equal budgets that never read the test
sets, the random-effects CIs (mean_ci), principal angles, and tools/compare.py end to end."""
import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import utils  # noqa: E402
from lore import compare  # noqa: E402
from tests.conftest import load_script  # noqa: E402
from tests.test_baselines import planted_table  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.cli import method_hparams  # noqa: E402
from lore.recipes import load_recipe  # noqa: E402
from lore.io import read_json  # noqa: E402
from lore.methods import (checked_fit, checked_fit_users, converged, CONVERGED_FALL, last_tenth_fall,
                          LossCurve, METHODS)  # noqa: E402
from lore.pairs import pack, Pairs  # noqa: E402
from lore.steps import training_loop  # noqa: E402

compare_tool = load_script(os.path.join(REPO, "tools", "compare.py"), "tools_compare")


@pytest.fixture(scope="module")
def small():
    return planted_table(n_items=300, n_seen=12, n_unseen=6, n_train=20, n_fewshot=6, n_test=20)


def sets_of(d):
    return dict(seen_train=d["train"], seen_test=d["test"], unseen_fewshot=d["fewshot"], unseen_test=d["test_unseen"])


# ---- loss curves ----------------------------------------------------------------------------------

def test_loop_keeps_100_evenly_spaced_losses():
    i = iter(range(10 ** 6))
    curve = training_loop(1000, lambda: torch.tensor(float(next(i))), torch.device("cpu"))
    expected = np.linspace(0, 999, 100).round().astype(int).tolist()
    assert curve == {"step": expected, "loss": [float(s) for s in expected], "windowed": False,
                     "steps": 1000, "passes": 1000.0, "stopped": "fixed", "cap": None}
    i = iter(range(10 ** 6))
    assert training_loop(7, lambda: torch.tensor(float(next(i))), torch.device("cpu"))["step"] == list(range(7))


def test_windowed_curve_keeps_the_mean_since_the_previous_point():
    curve = LossCurve(10, windowed=True)
    for i in range(10):
        curve.add(i, torch.tensor(float(i)))
    points = curve.result()
    assert points["step"] == list(range(10)) and points["loss"] == [float(i) for i in range(10)]
    curve = LossCurve(1000, windowed=True)
    for i in range(1000):
        curve.add(i, torch.tensor(float(i)))
    steps, loss = curve.result()["step"], curve.result()["loss"]
    assert loss[0] == 0.0 and loss[1] == pytest.approx(np.mean(range(1, steps[1] + 1)))
    assert loss[-1] == pytest.approx(np.mean(range(steps[-2] + 1, 1000)))


def test_last_tenth_fall_known_answers():
    steps = list(range(0, 1000, 10))
    assert last_tenth_fall({"step": steps, "loss": [1.0] * 100}) == 0.0
    assert converged({"step": steps, "loss": [1.0] * 100}) is True
    # loss = 2 - t: the tenth before the last averages ~1.15, the last ~1.05: a fall of ~9%
    loss = [2 - s / 990 for s in steps]
    fall = last_tenth_fall({"step": steps, "loss": loss})
    before = np.mean([v for s, v in zip(steps, loss) if 0.8 < s / 990 <= 0.9])
    last = np.mean([v for s, v in zip(steps, loss) if s / 990 > 0.9])
    assert fall == pytest.approx((before - last) / before) and converged({"step": steps, "loss": loss}) is False
    assert converged(None) is None


def test_too_short_fit_is_flagged_not_converged_and_its_curve_saved(small, tmp_path):
    common = dict(K_list=[0, 2], v_ref=small["v_ref"], seed=0, device="cpu", out_dir=str(tmp_path), **sets_of(small))
    short, = [r for r in utils.sweep(hparams={"lore": {"iters": 15, "fewshot_iters": 20}}, **common) if r["K"] == 2]
    assert short["converged"] is False and short["loss_fall"] > CONVERGED_FALL
    report = read_json(str(tmp_path / "lore_K2_alpha0.fit.json"))
    assert report["converged"] is False and report["curve"]["step"] == list(range(15))
    assert len(report["fewshot_curve"]["step"]) == 20 and report["hparams"]["iters"] == 15
    assert read_json(str(tmp_path / "lore_K0_alpha0.fit.json"))["curve"] is None   # K = 0: no training loop


@pytest.mark.parametrize("name", ["pal", "vpl"])
def test_baselines_record_their_curves(small, name):
    m = METHODS[name](2, **({"dim": 16} if name == "pal" else {"hidden": 16}))
    torch.manual_seed(0)
    checked_fit(m, small["train"])
    # 240 pairs: PAL 1 epoch of batches of 4, VPL 2 epochs of 4 x 240 targets in batches of 32: 60 steps each
    assert m.curve["step"] == list(range(60)) and all(np.isfinite(m.curve["loss"]))
    if name == "pal":
        checked_fit_users(m, small["fewshot"])
        assert m.fewshot_curve["step"][-1] == 20 * 6 - 1   # 20 epochs of 6 slots


# ---- diverged or unmoved fits are errors -----------------------------------------------------------

@pytest.mark.parametrize("name, hp, alpha, message", [
    ("lore", {"iters": 50}, 1e30, "overflowed Adam's second moment"),
    ("lore", {"iters": 50}, 1e20, "overflowed Adam's second moment"),
    ("lore_regularized", {"iters": 50}, 1e30, "overflowed Adam's second moment"),
    ("pal", {"dim": 16, "lr": 1e6, "proto_lr": 1e6, "w_lr": 1e6, "scale_lr": 1e6}, None, "pal(K=2) with"),
    ("vpl", {"hidden": 16, "lr": 1e6}, None, "vpl(K=2) with"),
])
def test_diverged_or_unmoved_fit_is_an_error_naming_method_and_hyperparameters(small, name, hp, alpha, message):
    d = planted_table(n_items=100, n_seen=6, n_unseen=3, n_train=8, n_fewshot=4, n_test=4)
    with pytest.raises(InputError, match="with {") as e:
        utils.sweep(K_list=[2], methods=[name], alpha_list=[alpha or 0.0], hparams={name: hp}, v_ref=d["v_ref"],
                    seed=0, device="cpu", **sets_of(d))
    assert message in str(e.value) and name in str(e.value)


def test_a_loss_that_never_decreased_is_an_error(small):
    class Stuck(METHODS["lore"]):
        """LoRe whose training loop reports a loss that never goes below its first value."""
        def fit(self, pairs):
            training_loop(30, lambda: torch.tensor(5.0 + 0.0 * len(pairs)), self.device)
            self.V = torch.randn(pairs.n_features, self.K)
            return torch.full((pairs.n_users, self.K), 1.0 / self.K)
    with pytest.raises(InputError, match=r"lore\(K=2, alpha=0\) with .* did not move .* first value 5"):
        checked_fit(Stuck(2, 0.0), small["train"])


# ---- validation users ------------------------------------------------------------------------------

def test_validation_users_come_from_seen_train_only(small):
    sets = sets_of(small)
    split = compare.validation_split(sets, 0.25, seed=0)
    seen = sets["seen_train"]
    assert split["users"] == sorted(split["users"]) and len(split["users"]) == 3 and split["shots"] == 6
    assert split["train"].n_users == 9 and split["fewshot"].n_users == split["test"].n_users == 3
    # the validation users' pairs are exactly their seen_train pairs: 6 few-shot, 14 held out each
    for j, u in enumerate(split["users"]):
        mine = torch.nonzero(seen.user == u).flatten()
        few = split["fewshot"].select(split["fewshot"].user == j)
        test = split["test"].select(split["test"].user == j)
        assert (len(few), len(test)) == (6, 14)
        got = sorted(zip((few.chosen.tolist() + test.chosen.tolist()), few.rejected.tolist() + test.rejected.tolist()))
        assert got == sorted(zip(seen.chosen[mine].tolist(), seen.rejected[mine].tolist()))
    kept = [u for u in range(12) if u not in split["users"]]
    assert torch.equal(split["train"].chosen, seen.chosen[torch.isin(seen.user, torch.tensor(kept))])
    again = compare.validation_split(sets, 0.25, seed=0)
    assert again["users"] == split["users"] and torch.equal(again["fewshot"].chosen, split["fewshot"].chosen)
    assert compare.validation_split(sets, 0.25, seed=1)["users"] != split["users"]


def test_validation_split_by_groups():
    user = torch.tensor([0] * 6 + [1] * 6 + [2] * 2)
    group = torch.tensor([0, 0, 1, 1, 2, 2] * 2 + [0, 0])
    table = torch.randn(20, 4)
    seen = pack(Pairs(user, 3, table=table, chosen=torch.arange(14), rejected=torch.arange(14) + 1, group=group))
    few = pack(Pairs(torch.tensor([0, 0]), 1, table=table, chosen=torch.tensor([0, 1]),
                                 rejected=torch.tensor([2, 3]), group=torch.tensor([0, 0])))
    split = compare.validation_split({"seen_train": seen, "unseen_fewshot": few}, 0.5, seed=0)
    assert split["shots"] == 1 and len(split["users"]) == 2 and 2 not in split["users"]  # user 2 has one group
    assert split["fewshot"].counts().tolist() == [2, 2] and split["test"].counts().tolist() == [4, 4]


# ---- search -----------------------------------------------------------------------------------------

def test_draws_are_seeded_inside_the_declared_space():
    for name, cls in METHODS.items():
        a, b = compare.draw_configs(cls, 5, seed=3), compare.draw_configs(cls, 5, seed=3)
        assert a == b and len(a) == 5 and a != compare.draw_configs(cls, 5, seed=4)
        for config in a:
            assert set(config) == set(cls.search_space)
            for hp, spec in cls.search_space.items():
                ok = spec[1] * 0.99 <= config[hp] <= spec[2] * 1.01 if isinstance(spec, tuple) else config[hp] in spec
                assert ok, (name, hp, config[hp])
    grid = type("G", (METHODS["lore"],), {"search": "grid", "search_space": {"K": [2, 3], "alpha": [0.0]}})
    assert sorted(c["K"] for c in compare.draw_configs(grid, 2)) == [2, 3]
    with pytest.raises(InputError, match="fewer than --budget 3"):
        compare.draw_configs(grid, 3)


CHEAP = {"lore": {"iters": 100, "fewshot_iters": 50}, "pal": {"fewshot_epochs": 5}}


def run_compare(d, seeds=1):
    return compare.compare(sets_of(d), d["v_ref"], ["lore", "pal"], budget=3, seeds=seeds, seed=0, device="cpu",
                           fraction=0.25, base=CHEAP)


@pytest.fixture(scope="module")
def cheap_spaces():
    """Search spaces cut to what the test data needs (a few fast fits), restored afterwards."""
    saved = {n: METHODS[n].search_space for n in ("lore", "pal")}
    METHODS["lore"].search_space = {"K": [2, 3], "alpha": [0.0], "iters": [100, 200], "lr": ("log", 0.1, 1.0)}
    METHODS["pal"].search_space = {"K": [2, 3], "dim": [16], "epochs": [1, 2], "w_lr": ("log", 5e-3, 0.2)}
    yield
    for n, space in saved.items():
        METHODS[n].search_space = space


def flip(pairs):
    return replace(pairs, chosen=pairs.rejected, rejected=pairs.chosen)


def test_selection_is_blind_to_the_test_sets_and_budgets_are_equal(small, cheap_spaces, monkeypatch):
    fits = []
    real = compare.checked_fit
    monkeypatch.setattr(compare, "checked_fit", lambda m, p: (fits.append(m.name), real(m, p))[1])
    a = run_compare(small)
    per_run = len(fits)
    flipped = {**small, "test": flip(small["test"]), "test_unseen": flip(small["test_unseen"])}
    b = run_compare(flipped)
    for ra, rb in zip(a["methods"], b["methods"]):
        assert ra["selected"] == rb["selected"] and ra["validation"] == rb["validation"]
    assert a["search"] == b["search"]   # every configuration, its validation accuracy and curve
    # the test sets did change: every unseen_test accuracy becomes 1 minus itself
    for ra, rb in zip(a["methods"], b["methods"]):
        assert rb["unseen_test"] == pytest.approx(1 - ra["unseen_test"])
    # equal budgets: the search fitted each method exactly --budget times
    assert [len(a["search"][n]) for n in ("lore", "pal")] == [3, 3]
    # in order: lore's 3 and pal's 3 search fits, then reference and bt (a validation fit and a refit
    # each), then lore's and pal's refits; the second run fitted exactly the same
    assert fits[:per_run] == ["lore"] * 3 + ["pal"] * 3 + ["lore"] * 5 + ["pal"] and fits[per_run:] == fits[:per_run]


def test_comparison_schema_and_cis(small, cheap_spaces):
    result = run_compare(small, seeds=2)
    labels = [r["method"] for r in result["methods"]]
    assert labels == ["reference", "bt", "lore", "pal"]
    assert result["methods"][0]["selected"] == {"K": 0, "alpha": 0.0} and result["methods"][1]["selected"]["K"] == 1
    for r in result["methods"]:
        assert {"method", "selected", "validation", "seen_test", "unseen_test", "seen_test_ci", "unseen_test_ci"} <= set(r)
        for s in ("seen_test", "unseen_test"):
            assert r[f"{s}_ci"][0] <= r[s] <= r[f"{s}_ci"][1]
    assert len(result["paired"]) == 6 * 2
    gain = result["personalization_gain"]
    assert gain["vs"] == "bt" and gain["method"] in ("lore", "pal") and gain["verdict"]
    assert result["basis_stability"]["lore"]["pairs"][0]["seeds"] == [0, 1]
    assert result["basis_stability"]["pal"] is None
    # the reference model is deterministic: both seeds score the same, its CI is over users alone
    assert result["basis_stability"]["reference"]["min_overlap"] == pytest.approx(1.0)


# ---- statistics ---------------------------------------------------------------------------------------

def test_mean_ci_known_answers():
    assert compare.mean_ci(np.full((3, 50), 0.7)) == [pytest.approx(0.7), pytest.approx(0.7)]
    # Student's t quantiles (tables: df 1, 4, 30.5 and the normal limit)
    for df, q in ((1, 12.706204736), (4, 2.776445105), (30.5, 2.040869445), (1e9, 1.959963985)):
        assert compare.t_quantile(0.975, df) == pytest.approx(q, rel=1e-6)   # df is capped at 1e7
    # one seed: the plain t interval of the users' mean
    rng = np.random.default_rng(0)
    x = rng.normal(0.8, 0.1, 400)
    half = compare.t_quantile(0.975, 399) * x.std(ddof=1) / np.sqrt(len(x))
    assert compare.mean_ci(x) == [pytest.approx(x.mean() - half), pytest.approx(x.mean() + half)]
    # two seeds 0.1 apart on 1000 identical users: var(mean) = MS_seed / (S N) = 0.0025 with 1 df
    A = np.stack([np.full(1000, 0.5), np.full(1000, 0.6)])
    assert compare.mean_ci(A) == [pytest.approx(0.55 - 12.706204736 * 0.05), pytest.approx(0.55 + 12.706204736 * 0.05)]
    # the variance components against the ANOVA written as loops
    A = 0.9 + rng.normal(0, 0.01, (4, 1)) + rng.normal(0, 0.04, (1, 30)) + rng.normal(0, 0.02, (4, 30))
    S, N = A.shape
    m = sum(A[s, u] for s in range(S) for u in range(N)) / (S * N)
    sm = [sum(A[s]) / N for s in range(S)]
    um = [sum(A[:, u]) / S for u in range(N)]
    ms_seed = N * sum((v - m) ** 2 for v in sm) / (S - 1)
    ms_user = S * sum((v - m) ** 2 for v in um) / (N - 1)
    ms_resid = sum((A[s, u] - sm[s] - um[u] + m) ** 2 for s in range(S) for u in range(N)) / ((S - 1) * (N - 1))
    vc = compare.variance_components(A)
    assert vc["resid"] == pytest.approx(ms_resid) and vc["user"] == pytest.approx((ms_user - ms_resid) / S)
    assert vc["seed"] == pytest.approx(max(0, (ms_seed - ms_resid) / N))
    assert vc["mean_var"] == pytest.approx((ms_seed + ms_user - ms_resid) / (S * N))
    B = A - 0.01 + rng.normal(0, 0.01, A.shape)
    p = compare.paired("a", "b", {"unseen_test": A}, {"unseen_test": B}, "unseen_test", comparisons=20)
    assert p["mean"] == pytest.approx((A - B).mean()) and p["ci_simultaneous"][0] < p["ci"][0] <= p["ci"][1] < p["ci_simultaneous"][1]
    assert compare.gain_verdict([-0.01, 0.02]) == "no evidence that personalization helps on this data"
    assert compare.gain_verdict([0.01, 0.02]) == "personalization helps on this data"


def test_principal_angles():
    V = torch.randn(10, 3)
    R = torch.linalg.qr(torch.randn(3, 3))[0]
    assert compare.principal_angles(V, V @ R) == pytest.approx([0, 0, 0], abs=1e-3)
    E = torch.eye(4)
    assert compare.principal_angles(E[:, :2], E[:, 1:3]) == pytest.approx([0, 90], abs=1e-6)


def test_compare_tool_end_to_end(tmp_path):
    prepare = load_script(os.path.join(REPO, "PersonalLLM", "prepare.py"), "personalllm_prepare_cmp")
    data = str(tmp_path / "data")
    prepare.main(prepare.parse_args(["--synthetic", "--out", data, "--prompts-train", "300", "--prompts-test", "50",
                                     "--features", "16", "--n-users", "20", "--n-unseen", "10", "--train-frac", "0.1",
                                     "--pool-frac", "0.05"]))
    saved = METHODS["lore"].search_space
    METHODS["lore"].search_space = {"K": [2, 3], "iters": [100], "fewshot_iters": [50]}
    try:
        out = str(tmp_path / "cmp")
        compare_tool.main(compare_tool.parse_args(["--data", data, "--method", "lore", "--budget", "2", "--seeds", "2",
                                                   "--out", out, "--device", "cpu"]))
    finally:
        METHODS["lore"].search_space = saved
    assert {"comparison.json", "comparison.csv", "comparison.md", "comparison.png", "loss_curves.png",
            "config.json"} <= set(os.listdir(out))
    result = json.load(open(os.path.join(out, "comparison.json")))
    assert [r["method"] for r in result["methods"]] == ["reference", "bt", "lore"]
    assert result["data"]["fewshot_pairs"] == 9
    assert "| reference | K=0, alpha=0 |" in open(os.path.join(out, "comparison.md")).read()


def test_personalllm_recipe_defaults_are_the_tuned_ones_and_the_papers_stay_reachable():
    pllm = load_script(os.path.join(REPO, "PersonalLLM", "train_basis.py"), "pllm_train_basis_defaults")
    tldr = load_script(os.path.join(REPO, "RedditTLDR", "train_basis.py"), "tldr_train_basis_defaults")
    args = pllm.parse_args(["--method", "pal,vpl"])
    hp = method_hparams(args)
    for name in ("pal", "vpl"):
        tuned = load_recipe("PersonalLLM")["baselines"][name]
        assert tuned and {k: hp[name][k] for k in tuned} == tuned
    assert method_hparams(tldr.parse_args(["--method", "pal,vpl"])) == {
        n: dict(METHODS[n].defaults) for n in ("pal", "vpl")}
    papers = pllm.parse_args(["--method", "pal", "--pal-dim", "512", "--pal-stop", "fixed", "--pal-weight-decay", "0.01",
                              "--pal-epochs", "1", "--pal-batch-size", "4",
                              "--pal-lr", "1e-4", "--pal-proto-lr", "5e-3", "--pal-w-lr", "5e-3",
                              "--pal-fewshot-epochs", "20", "--pal-fewshot-lr", "5e-3"])
    assert method_hparams(papers)["pal"] == METHODS["pal"].defaults
    papers = pllm.parse_args(["--method", "vpl", "--vpl-hidden", "512", "--vpl-stop", "fixed", "--vpl-epochs", "2",
                              "--vpl-duplicates", "4", "--vpl-batch-size", "32", "--vpl-lr", "1e-4", "--vpl-z-gain", "1",
                              "--vpl-min-std", "0.6065306597126334", "--vpl-score-z", "mean"])
    assert method_hparams(papers)["vpl"] == METHODS["vpl"].defaults


@pytest.mark.parametrize("info", [[], None, 3, "x", {"dataset": ["PersonalLLM"]}, {"dataset": {"a": 1}}])
def test_compare_tool_refuses_a_data_json_that_is_not_an_object_in_one_line(tmp_path, capsys, info):
    """data.json is checked as load_data checks it before its dataset picks the recipe: one line, exit 2."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "data.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit) as e:
        compare_tool.main(compare_tool.parse_args(["--data", str(data), "--out", str(tmp_path / "cmp"),
                                                   "--device", "cpu"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {data / 'data.json'}: ") and "Traceback" not in err
    assert not os.path.exists(tmp_path / "cmp")


def test_compare_tool_seeds_span_2_to_the_32(capsys):
    """--seed takes what every other script takes: [0, 2**32) (lore.checks.MAX_SEED)."""
    assert compare_tool.parse_args(["--data", "d", "--seed", str(2**32 - 1)]).seed == 2**32 - 1
    with pytest.raises(SystemExit) as e:
        compare_tool.parse_args(["--data", "d", "--seed", str(2**32)])
    assert e.value.code == 2 and "2**32" in capsys.readouterr().err
