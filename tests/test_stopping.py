"""The one stopping rule (lore.stopping, run by lore.steps.training_loop): the held-out slice of every
user's pairs, the patience and the restored best parameters counted on a loss whose minimum is known,
the cap flagged as not converged, every method's fit under stop="early" (LoRe, PAL, VPL), stop="fixed"
as the paper's step counts, and the records and the comparison table that state the steps."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402
from lore import results, steps, stopping  # noqa: E402
from lore.checks import InputError, set_seed  # noqa: E402
from lore.methods import METHODS, checked_fit, converged  # noqa: E402
from lore.pairs import Pairs, pack  # noqa: E402

CPU = torch.device("cpu")


def table_pairs(counts, n_items=40, n_features=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    user = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    a, b = torch.randint(n_items, (2, len(user)), generator=g)
    return pack(Pairs(user, len(counts), table=torch.randn(n_items, n_features, generator=g), chosen=a,
                      rejected=(a + 1 + b % (n_items - 1)) % n_items))


def test_holdout_takes_a_tenth_of_every_users_pairs_and_keeps_the_users():
    pairs = table_pairs([10, 25, 9, 40])
    set_seed(0)
    train, held = stopping.holdout(pairs)
    assert held.counts().tolist() == [1, 2, 0, 4]                       # floor(0.1 * pairs) per user
    assert train.counts().tolist() == [9, 23, 9, 36]
    assert train.n_users == held.n_users == 4
    key = lambda p: sorted(zip(p.user.tolist(), p.chosen.tolist(), p.rejected.tolist()))
    assert sorted(key(train) + key(held)) == key(pairs)                  # a partition of the pairs
    set_seed(0)
    assert key(stopping.holdout(pairs)[1]) == key(held)                  # same seed, same slice
    with pytest.raises(InputError, match="stop='fixed'"):
        stopping.holdout(table_pairs([5, 9]))


def run_quadratic(cap, best=7.0, every=1, patience=3):
    """A parameter that steps +1 per step; held-out loss (p - best)^2, lowest after `best` steps."""
    p = torch.zeros(())
    stop = stopping.EarlyStop(lambda: (p - best) ** 2, [p], every, patience)

    def step():
        p.add_(1.0)
        return p.clone()
    return steps.training_loop(cap, step, CPU, stop=stop), p


def test_early_stop_waits_its_patience_then_restores_the_best_check():
    curve, p = run_quadratic(cap=100)
    # checks after 1, 2, ... steps; best after 7; 3 worse checks (8, 9, 10) end the fit at 10
    assert curve["steps"] == 10 and curve["stopped"] == "early" and curve["best_step"] == 7
    assert float(p) == 7.0                                               # the best check's parameters
    assert curve["held_out"]["step"] == list(range(1, 11))
    assert curve["step"][-1] == 9 and converged(curve) is True          # the last step is on the curve
    curve, p = run_quadratic(cap=100, every=4, patience=2)
    assert curve["held_out"]["step"] == [4, 8, 12, 16] and curve["steps"] == 16 and float(p) == 8.0


def test_a_fit_that_reaches_its_cap_is_not_converged():
    curve, p = run_quadratic(cap=5)
    assert curve["steps"] == 5 and curve["stopped"] == "cap" and converged(curve) is False
    assert float(p) == 5.0
    fixed = steps.training_loop(5, lambda: torch.ones(()), CPU)
    assert fixed["stopped"] == "fixed" and fixed["steps"] == 5 and fixed["passes"] == 5


def planted(n_users=20, n_pairs=20, n_features=6, seed=0):
    """Users mixing 2 planted directions, table-form pairs, labels drawn by Bradley-Terry (noisy:
    with 20 pairs a user, every method overfits, so the held-out loss turns up)."""
    g = torch.Generator().manual_seed(seed)
    table, V = torch.randn(100, n_features, generator=g), torch.randn(n_features, 2, generator=g)
    w = torch.rand(n_users, 2, generator=g)
    user = torch.arange(n_users).repeat_interleave(n_pairs)
    a, b = torch.randint(100, (2, len(user)), generator=g)
    first = torch.rand(len(user), generator=g) < torch.sigmoid(((table[a] - table[b]) @ V * w[user]).sum(-1))
    return pack(Pairs(user, n_users, table=table, chosen=torch.where(first, a, b), rejected=torch.where(first, b, a)))


# K = 2 at rates that overfit 20 pairs a user within a few hundred steps; caps well above
FITS = {"lore": (2, {"iters": 2000, "lr": 0.5}), "pal": (2, {"dim": 8, "w_lr": 0.1, "lr": 3e-3, "batch_size": 16, "steps": 2000}),
        "vpl": (2, {"hidden": 8, "lr": 1e-2, "steps": 2000, "duplicates": 1})}


@pytest.mark.parametrize("name", list(FITS))
def test_every_method_stops_early_before_its_cap(name, monkeypatch):
    # the rule's constants made small for a fast test: a check every 5 steps, patience 3
    monkeypatch.setattr(stopping, "CHECK_EVERY", 5)
    monkeypatch.setattr(stopping, "PATIENCE", 3)
    pairs = planted()
    K, hp = FITS[name]
    set_seed(0)
    method = METHODS[name](K, stop="early", **hp)
    checked_fit(method, pairs)
    c = method.curve
    assert c["stopped"] == "early" and c["steps"] < hp.get("steps", hp.get("iters")) and converged(c)
    checks = c["held_out"]["step"]
    assert c["every"] == 5 and checks == list(range(5, c["steps"] + 1, 5))     # a check every 5 steps
    assert c["steps"] - c["best_step"] == 3 * 5                               # then 3 checks of patience
    assert min(c["held_out"]["loss"]) == c["held_out"]["loss"][checks.index(c["best_step"])]
    assert method.fit_seconds > 0
    train_pairs = len(pairs) - 20 * 2                                     # 2 of every user's 20 held out
    per_step = 1 if name == "lore" else method.hparams["batch_size"] / (train_pairs * method.hparams.get("duplicates", 1))
    assert c["passes"] == pytest.approx(c["steps"] * per_step)


def test_fixed_is_the_papers_step_count_and_the_default():
    pairs = planted(n_users=10)
    set_seed(0)
    pal = METHODS["pal"](2, dim=8, epochs=3, batch_size=16)
    checked_fit(pal, pairs)
    assert pal.hparams["stop"] == "fixed" and pal.curve["steps"] == 3 * 13   # 3 epochs of ceil(200 / 16)
    set_seed(0)
    vpl = METHODS["vpl"](2, hidden=8, epochs=2, duplicates=2, batch_size=32)
    checked_fit(vpl, pairs)
    assert vpl.curve["steps"] == 2 * 13 and vpl.curve["stopped"] == "fixed"  # ceil(400 / 32) per epoch
    fits = []
    for stop in ({}, {"stop": "fixed"}):
        set_seed(0)
        lore = METHODS["lore"](2, iters=40, **stop)
        fits.append(checked_fit(lore, pairs))
        assert lore.curve["steps"] == 40 and lore.curve["stopped"] == "fixed"
    assert torch.equal(fits[0], fits[1])


def test_records_and_the_comparison_table_state_the_steps():
    pairs = planted(n_users=10)
    records = utils.sweep(K_list=[2], seen_train=pairs, seen_test=pairs, unseen_fewshot=pairs, unseen_test=pairs,
                          hparams={"lore": {"iters": 30, "stop": "early"}}, seed=0)
    r = records[0]
    assert r["stop"] == "early" and r["stopped"] == "cap" and r["steps"] == 30 and r["passes"] == 30.0
    assert r["converged"] is False and "fit_seconds" not in r   # seconds: in the fit report, not the record
    row = {"method": "pal", "selected": {"K": 3}, "validation": 0.8, "seen_test": 0.9, "seen_test_ci": [0.8, 1.0],
           "unseen_test": 0.85, "unseen_test_ci": [0.8, 0.9], "converged": False, "at_cap": True,
           "steps": 20000.0, "passes": 12.5, "fit_seconds": 3.25}
    table = results.comparison_table({"methods": [row, {**row, "method": "vpl", "at_cap": False, "converged": True}]})
    lines = table.splitlines()
    assert "| steps | passes | fit s |" in lines[0]
    assert lines[2].endswith("| 20000 | 12.5 | 3.2 | NOT CONVERGED (AT CAP) |")
    assert lines[3].endswith("| 20000 | 12.5 | 3.2 | yes |")
