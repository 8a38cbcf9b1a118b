"""The one stopping rule (lore.stopping, run by lore.steps.training_loop): the held-out slice of every
user's pairs, the patience and the restored best parameters counted on a loss whose minimum is known,
the cap flagged as not converged, every method's fit under stop="early" (LoRe, PAL, VPL), stop="fixed"
as the paper's step counts, the few-shot fits' form of the rule (fewshot_stop: a held-out slice of
the new users' own pairs, or with under 10 pairs a user the training loss's tolerance) against a
loop-form reference, and the records and the comparison table that state the steps."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402
from lore import results, steps, stopping  # noqa: E402
from lore.checks import InputError, set_seed  # noqa: E402
from lore.methods import METHODS, checked_fit, checked_fit_users, converged, recording  # noqa: E402
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


def run_quadratic(cap, best=7.0, every=1, patience=3, patience_passes=0):
    """A parameter that steps +1 per step; held-out loss (p - best)^2, lowest after `best` steps."""
    p = torch.zeros(())
    stop = stopping.EarlyStop(lambda: (p - best) ** 2, [p], every, patience, patience_passes=patience_passes)

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


def loop_stop(losses, every, patience, patience_passes, per_step):
    """The rule written out over a held-out curve (losses[k]: the check after (k + 1) * every steps)
    -> (the step it stops at, the best check's step): stop once `patience` checks in a row have not
    fallen by MIN_IMPROVEMENT below the best AND the passes since the last fall are >= patience_passes."""
    best, best_step, waited = float("inf"), 0, 0
    for k, value in enumerate(losses):
        i = (k + 1) * every
        if best == float("inf") or value < best - stopping.MIN_IMPROVEMENT * abs(best):
            best, best_step, waited = value, i, 0
            continue
        waited += 1
        if waited >= patience and (i - best_step) * per_step >= patience_passes:
            return i, best_step
    return len(losses) * every, best_step


# a held-out curve with a plateau: it falls, stays flat 4 checks (the shared part learnt, the
# per-user part not yet used), falls again, then rises
PLATEAU = [1.0, 0.8, 0.6, 0.6, 0.6, 0.6, 0.6, 0.4, 0.3] + [0.3 + 0.05 * k for k in range(1, 30)]


@pytest.mark.parametrize("patience_passes, stops_at, best_at", [(0, 30, 15), (2.5, 70, 45), (1.5, 30, 15)])
def test_patience_in_passes_carries_a_fit_over_a_plateau(patience_passes, stops_at, best_at):
    # a check every 5 steps, 10 steps a pass (per_step 0.1), patience 3 checks: 15 steps = 1.5 passes;
    # the plateau is 4 checks long: 3 checks alone, or 1.5 passes, stop on it (at 30, best 15);
    # 2.5 passes wait past it, and stop 25 steps after the best check beyond it (at 70, best 45)
    assert loop_stop(PLATEAU, 5, 3, patience_passes, 0.1) == (stops_at, best_at)
    p = torch.zeros(())
    stop = stopping.EarlyStop(lambda: torch.tensor(PLATEAU[int(p) // 5 - 1]), [p], 5, 3, patience_passes=patience_passes)

    def step():
        p.add_(1.0)
        return p.clone()
    curve = steps.training_loop(5 * len(PLATEAU), step, CPU, stop=stop, per_step=0.1)
    assert curve["steps"] == stops_at and curve["best_step"] == best_at and curve["stopped"] == "early"
    assert float(p) == best_at and curve["passes"] == pytest.approx(stops_at * 0.1)
    assert curve["patience"] == 3 and curve["patience_passes"] == patience_passes


def test_full_batch_fits_never_wait_on_the_passes():
    # LoRe's and the few-shot fits' step is a pass: PATIENCE checks of CHECK_EVERY steps are
    # >= PATIENCE_PASSES passes, so the patience in passes never binds (their records are unchanged)
    assert stopping.PATIENCE * stopping.CHECK_EVERY >= stopping.PATIENCE_PASSES
    curve, p = run_quadratic(cap=1000, best=100.0, every=None, patience=None, patience_passes=None)
    assert (curve["every"], curve["patience"], curve["patience_passes"]) == (25, 10, stopping.PATIENCE_PASSES)
    assert curve["best_step"] == 100 and curve["steps"] == 100 + 10 * 25 and float(p) == 100.0


def test_the_cap_of_a_minibatch_fit_grows_with_its_data():
    # the cap: `steps`, or CAP_PASSES passes where that is more (PAL, VPL under stop="early")
    assert stopping.CAP_PASSES == 20
    assert stopping.capped(20000, 875) == 20000                 # the size table's 1,000 users (VPL)
    assert stopping.capped(20000, 2688) == 53760                # the default 1,000 users x 47 pairs
    assert stopping.capped(10, 2.5) == 50 and stopping.capped(10, 0.1) == 10


@pytest.mark.parametrize("name", ["pal", "vpl"])
def test_a_minibatch_fit_runs_to_its_cap_in_passes(name, monkeypatch):
    # a patience no fit can outwait: the fit ends at its cap, CAP_PASSES passes beyond steps=3
    monkeypatch.setattr(stopping, "PATIENCE", 10 ** 6)
    monkeypatch.setattr(stopping, "CAP_PASSES", 2)
    pairs = planted()
    K, hp = FITS[name]
    set_seed(0)
    method = METHODS[name](K, stop="early", **{**hp, "steps": 3})
    checked_fit(method, pairs)
    c = method.curve
    per_pass = {"pal": -(-360 // 16), "vpl": -(-360 * 1 // 32)}[name]    # 360 train pairs (2 a user held out)
    assert c["stopped"] == "cap" and c["cap"] == c["steps"] == 2 * per_pass and converged(c) is False


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
    assert min(c["held_out"]["loss"]) == c["held_out"]["loss"][checks.index(c["best_step"])]
    assert method.fit_seconds > 0
    train_pairs = len(pairs) - 20 * 2                                     # 2 of every user's 20 held out
    per_step = 1 if name == "lore" else method.hparams["batch_size"] / (train_pairs * method.hparams.get("duplicates", 1))
    # then the patience: 3 checks, and PATIENCE_PASSES (5) passes: LoRe's 15 steps are 15 passes;
    # PAL's 16 of 360 pairs a step take 112.5 steps (the next check at 115), VPL's 32 take 56.25 (60)
    assert stopping.PATIENCE_PASSES == 5 and per_step == {"lore": 1, "pal": 16 / 360, "vpl": 32 / 360}[name]
    assert c["steps"] - c["best_step"] == {"lore": 15, "pal": 115, "vpl": 60}[name]
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
    assert "| steps | passes | fit s | few-shot steps |" in lines[0]
    assert lines[2].endswith("| 20000 | 12.5 | 3.2 | - | NOT CONVERGED (AT CAP) |")
    assert lines[3].endswith("| 20000 | 12.5 | 3.2 | - | yes |")
    few = results.comparison_table({"methods": [{**row, "at_cap": False, "converged": True, "fewshot_steps": 180.0,
                                                 "fewshot_at_cap": True}]}).splitlines()
    assert few[2].endswith("| 20000 | 12.5 | 3.2 | 180 | yes, FEW-SHOT AT CAP |")


# ---- the few-shot fits' rule (fewshot_stop="early"): new users' w with V fixed ------------------------------

def noisy_users(n_users, n_pairs, n_features=6, K=3, seed=0):
    """Difference rows of users mixing K planted directions, each label drawn by Bradley-Terry at
    margins of order 1 (rows of norm ~100, LoRe's temperature): a few pairs overfit, so the held-out
    loss turns up."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(n_features, K, generator=g)
    X = []
    for _ in range(n_users):
        x = 100 * torch.randn(n_pairs, n_features, generator=g) / n_features ** 0.5
        w = torch.softmax(torch.randn(K, generator=g), 0)
        flip = torch.rand(n_pairs, generator=g) > torch.sigmoid(x @ V @ w / 100)
        X.append(torch.where(flip[:, None], -x, x))
    return X, V


def loop_fewshot_stop(train, held, V, lr, cap, every, patience):
    """The few-shot rule written out, one user at a time: Adam on sum_i mean_{x in train_i}
    -log sigmoid(x V softmax(w_i) / 100) from w ~ N(0, 1) (drawn first, as PersonalizeBatch does);
    every `every` steps the loss of `held` (the held-out pairs: stop after `patience` checks
    without a relative fall of MIN_IMPROVEMENT below the best, the best kept; or held None: the
    training pairs themselves, stop after `patience` checks that each fell by less than that
    below the lowest check so far, the lowest kept). -> (steps, best step, softmax(w) at the best check)."""
    w = torch.nn.Parameter(torch.randn(len(train), V.shape[1]))
    opt = torch.optim.Adam([w], lr=lr)
    nll = lambda rows: sum(-torch.nn.functional.logsigmoid(x @ V @ torch.softmax(w[i], 0) / 100).mean()
                           for i, x in enumerate(rows) if len(x))
    best, best_step, best_w, waited = float("inf"), 0, None, 0
    for i in range(1, cap + 1):
        opt.zero_grad()
        nll(train).backward()
        opt.step()
        if i % every == 0:
            with torch.no_grad():
                value = float(nll(train if held is None else held))
            improved = best == float("inf") or value < best - stopping.MIN_IMPROVEMENT * abs(best)
            if (improved if held is not None else value < best):
                best, best_step, best_w = value, i, torch.softmax(w.detach(), 1)
            waited = 0 if improved else waited + 1
            if waited == patience:
                return i, best_step, best_w
    return cap, best_step, best_w


@pytest.mark.parametrize("n_pairs, rule", [(20, "held_out"), (9, "train_loss")])
def test_fewshot_rule_stops_where_the_loop_form_reference_stops(n_pairs, rule, monkeypatch):
    monkeypatch.setattr(stopping, "CHECK_EVERY", 5)
    monkeypatch.setattr(stopping, "PATIENCE", 3)
    X, V = noisy_users(5, n_pairs)
    pairs, cap = pack(X), 3000
    set_seed(0)
    model = utils.PersonalizeBatch(5, 6, 3, cap, 0.3, CPU, stop="early")
    with recording() as curves:
        W = torch.stack(model.train(pairs, V))
    curve = curves[0].result()
    # the reference: the same draws (w first, then the held-out slice), the rule in a loop
    set_seed(0)
    torch.randn(5, 3)
    train, held, got_rule = stopping.fewshot_holdout(pairs)
    assert got_rule == rule and curve["rule"] == rule
    if rule == "held_out":
        assert held.counts().tolist() == [2] * 5 and train.counts().tolist() == [18] * 5   # floor(0.1 * 20)
    else:
        assert held is None and train is pairs                                             # 9 < 10: nothing held out
    set_seed(0)
    ref_steps, ref_best, ref_W = loop_fewshot_stop(train.split(), None if held is None else held.split(), V, 0.3,
                                                   cap, 5, 3)
    assert 0 < ref_best < ref_steps < cap or rule == "train_loss" and ref_best == ref_steps < cap   # stops before its cap
    assert curve["stopped"] == "early" and curve["steps"] == ref_steps and curve["best_step"] == ref_best
    if rule == "held_out":
        assert curve["steps"] - curve["best_step"] == 3 * 5             # patience: 3 checks of 5 steps
    else:   # the falls below the lowest check of the last 4 checks are all under the tolerance, the one before is not
        loss = curve["held_out"]["loss"]
        falls = [(min(loss[:j]) - loss[j]) / min(loss[:j]) for j in range(1, len(loss))]
        assert all(f < stopping.MIN_IMPROVEMENT for f in falls[-3:]) and falls[-4] >= stopping.MIN_IMPROVEMENT
    torch.testing.assert_close(W, ref_W, rtol=1e-5, atol=1e-6)          # the best check's weights


def test_the_training_loss_rule_stops_a_noisy_loss_that_sets_no_new_low():
    """A loss that falls, then goes up and down between two values (PAL's few-shot fit: one pair a
    user a step at a high rate): every other check is below the one before it, so a tolerance on
    the change from the previous check never stops; from the lowest check so far, the fit stops
    `patience` checks after its last new low, and keeps that check's parameters."""
    w = torch.zeros(1)
    losses = iter([1.0, 0.5, 0.4] + [0.45, 0.41] * 10)
    stop = stopping.EarlyStop(lambda: torch.tensor(next(losses)), [w], every=1, patience=4, rule="train_loss",
                              patience_passes=0)
    ends = []
    for i in range(1, 24):
        w.fill_(i)
        if stop.check(i):
            ends.append(i)
            break
    assert ends == [3 + 4] and stop.best_step == 3 and stop.best == pytest.approx(0.4)
    stop.restore()
    assert w.item() == 3.0


def test_fewshot_rule_reaches_its_cap_and_fixed_is_the_default():
    X, V = noisy_users(4, 20)
    pairs = pack(X)
    for stop in ("fixed", "early"):
        set_seed(0)
        with recording() as curves:
            utils.PersonalizeBatch(4, 6, 3, 20, 0.3, CPU, stop=stop).train(pairs, V)
        c = curves[0].result()
        # 20 steps: fixed runs them; early checks at 25 at the earliest, so it runs to its cap
        assert c["steps"] == 20 and c["stopped"] == ("fixed" if stop == "fixed" else "cap")
        if stop == "early":
            assert converged(c) is False                                 # a cap is never converged
    set_seed(0)
    default = torch.stack(utils.PersonalizeBatch(4, 6, 3, 20, 0.3, CPU).train(pairs, V))
    set_seed(0)
    assert torch.equal(default, torch.stack(utils.PersonalizeBatch(4, 6, 3, 20, 0.3, CPU, stop="fixed").train(pairs, V)))
    with pytest.raises(InputError, match="stop must be one of fixed, early"):
        utils.PersonalizeBatch(4, 6, 3, 20, 0.3, CPU, stop="sometimes")


@pytest.mark.parametrize("name", ["lore", "pca", "pal", "vpl"])
def test_every_methods_fewshot_fit_states_its_rule(name, monkeypatch):
    monkeypatch.setattr(stopping, "CHECK_EVERY", 5)
    monkeypatch.setattr(stopping, "PATIENCE", 3)
    pairs = planted(n_users=8, n_pairs=20)
    hp = {"lore": {"iters": 30, "fewshot_iters": 2000, "fewshot_lr": 0.3}, "pca": {"fewshot_iters": 2000, "fewshot_lr": 0.3},
          "pal": {"dim": 8, "epochs": 1, "batch_size": 16, "fewshot_epochs": 100, "fewshot_lr": 0.1},
          "vpl": {"hidden": 8, "epochs": 1, "duplicates": 1}}[name]
    early = {} if name == "vpl" else {"fewshot_stop": "early"}
    set_seed(0)
    method = METHODS[name](2, **hp, **early)
    checked_fit(method, pairs)
    checked_fit_users(method, pairs)
    status = utils.fit_status(method)
    if name == "vpl":   # an encoder: no few-shot optimization to stop
        assert "fewshot_stop" not in method.hparams and method.fewshot_curve is None
        assert {k: status[k] for k in ("fewshot_stop", "fewshot_stopped", "fewshot_rule", "fewshot_steps")} == \
            {"fewshot_stop": None, "fewshot_stopped": None, "fewshot_rule": None, "fewshot_steps": None}
        return
    cap = hp.get("fewshot_iters") or hp["fewshot_epochs"] * 18              # PAL: epochs x the most pairs a user trains on
    assert status["fewshot_stop"] == "early" and status["fewshot_rule"] == "held_out"
    assert status["fewshot_stopped"] == "early" and 0 < status["fewshot_steps"] < cap
    assert method.fewshot_curve["held_out"]["step"] == list(range(5, status["fewshot_steps"] + 1, 5))
    if name == "pal":
        assert method.fewshot_curve["passes"] == pytest.approx(status["fewshot_steps"] / 18)
    short = {"fewshot_epochs": 2} if name == "pal" else {"fewshot_iters": 40}   # fixed: the step count it is given
    set_seed(0)
    fixed = METHODS[name](2, **{**hp, **short})
    checked_fit(fixed, pairs)
    checked_fit_users(fixed, pairs)
    s = utils.fit_status(fixed)
    steps_fixed = 40
    assert (s["fewshot_stop"], s["fewshot_stopped"], s["fewshot_rule"], s["fewshot_steps"]) == ("fixed", "fixed", None, steps_fixed)


def test_shot_records_state_the_fewshot_fits(monkeypatch):
    monkeypatch.setattr(stopping, "CHECK_EVERY", 5)
    monkeypatch.setattr(stopping, "PATIENCE", 3)
    X, V = noisy_users(6, 20)
    pairs = pack(X)
    records = utils.sweep_shots(K_list=[2], shots=[5, 12], trials=1, seen_train=pairs, unseen_fewshot=pairs,
                                unseen_test=pairs, hparams={"lore": {"iters": 20, "fewshot_iters": 3000,
                                                                      "fewshot_lr": 0.3, "fewshot_stop": "early"}},
                                seed=0, select=("random", "active"))
    by = {(r["select"], r["shots"]): r for r in records}
    for select in ("random", "active"):
        # 5 shots: nothing to hold out (the training loss's tolerance); 12: one pair a user held out
        assert by[select, 5]["fewshot_rule"] == ["train_loss"] and by[select, 12]["fewshot_rule"] == ["held_out"]
        for n in (5, 12):
            r = by[select, n]
            assert r["fewshot_stop"] == "early" and r["fewshot_at_cap"] == 0 and 0 < r["fewshot_steps"] < 3000
    fixed = utils.sweep_shots(K_list=[2], shots=[5], trials=1, seen_train=pairs, unseen_fewshot=pairs, unseen_test=pairs,
                              hparams={"lore": {"iters": 20, "fewshot_iters": 40}}, seed=0)[0]
    assert (fixed["fewshot_stop"], fixed["fewshot_rule"], fixed["fewshot_steps"], fixed["fewshot_at_cap"]) == ("fixed", None, 40.0, 0)
