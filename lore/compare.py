"""Comparisons a reviewer can trust: validation users carved out of the seen side, a search with
the same budget for every method, selection by validation accuracy alone, refits with several
seeds, confidence intervals over users and seeds (a two-way random-effects t interval), paired differences, the
personalization gain over one shared reward, and the stability of a basis across seeds.

The protocol (tools/compare.py runs it; docs/comparisons.md states it):
  1. Validation (validation_split, one seeded rule for every dataset, at load time): a fraction of
     the seen users, drawn with the seed, become validation users. They play the unseen role: the
     shared part is fitted without them; each is fitted from a few-shot-like draw of its own
     seen_train pairs (as many pairs, or groups such as PRISM's dialogs, as the median unseen user
     has few-shot) and scored on the rest of its seen_train pairs. Neither the unseen users nor any
     test pair is read.
  2. Search (search): every method draws `budget` configurations from its declared search_space
     (random, or grid as the method declares), each fitted once; the one with the best validation
     accuracy is selected. A configuration that diverges counts towards the budget and scores
     nothing.
  3. Refit (refit): the selected configuration is fitted on all seen users with `seeds` seeds and
     scored on seen_test and unseen_test, per user and seed.
  4. Report (comparison): means, CIs over users and seeds (mean_ci: the seed, user and user x seed
     variance components, a t interval with Satterthwaite's df), paired differences between every
     two rows on the same users (with Bonferroni's simultaneous CIs beside them), the personalization gain (best personal method minus one
     shared Bradley-Terry reward) with a plain verdict, and principal angles between the seeds' bases.
"""
import itertools
import math
from dataclasses import replace

import numpy as np
import torch

from lore.checks import InputError, is_int, seed_fit, seed_from_key
from lore.methods import accuracy, checked_fit, checked_fit_users, converged, get_method, last_tenth_fall

VALIDATION_FRACTION = 0.2   # of the seen users, drawn with the run's seed
CI_LEVEL = 0.95
STABLE_OVERLAP = 0.9        # a basis whose seeds' subspaces overlap less than this "changes between seeds"
TRUSTED_SETS = ("seen_test", "unseen_test")


# ----------------------------------------------------------------------------------------------
# 1. Validation users, carved out of seen_train
# ----------------------------------------------------------------------------------------------

def subset_users(pairs, users):
    """The pairs of `users` (sorted indices of pairs' users), renumbered 0..len(users)-1 in that order."""
    users = torch.as_tensor(users, dtype=torch.long, device=pairs.device)
    index = torch.full((pairs.n_users,), -1, dtype=torch.long, device=pairs.device)
    index[users] = torch.arange(len(users), device=pairs.device)
    kept = pairs.select(index[pairs.user] >= 0)
    return replace(kept, user=index[kept.user], n_users=len(users))


def validation_split(sets, fraction=VALIDATION_FRACTION, seed=0):
    """The one rule for every dataset. From sets["seen_train"] only: round(fraction * N) seen users
    (at least 1, never all), drawn with `seed` among those with more units (pairs, or groups) than
    the median unseen user's few-shot units m; each keeps a random m units as its few-shot pairs and
    the rest as its held-out pairs. -> {"train": the other seen users' seen_train pairs, "fewshot",
    "test": the validation users' pairs, "users": their indices among the seen users, "shots": m}."""
    if not 0 < fraction < 1:
        raise InputError(f"the validation fraction must lie in (0, 1), got {fraction!r}")
    seen = sets["seen_train"]
    owner_few = sets["unseen_fewshot"].groups()[1].cpu().numpy()
    m = max(1, int(np.median(np.bincount(owner_few, minlength=sets["unseen_fewshot"].n_users))))
    uid, owner = (t.cpu().numpy() for t in seen.groups())
    units = np.bincount(owner, minlength=seen.n_users)                            # [N]
    eligible = np.flatnonzero(units > m)
    n_val = min(len(eligible), max(1, round(fraction * seen.n_users)), seen.n_users - 1)
    if n_val < 1:
        raise InputError(f"no seen user can be a validation user: none has more than {m} "
                         f"{'groups' if seen.group is not None else 'pairs'} (the unseen users' few-shot size)")
    rng = np.random.default_rng(seed_from_key(seed, "validation"))
    users = np.sort(rng.choice(eligible, n_val, replace=False))
    # a random rank of every unit within its user: sort by (owner, random key)
    order = np.lexsort((rng.random(len(owner)), owner))                           # [G]
    start = np.cumsum(units) - units
    rank = np.empty(len(owner), dtype=np.int64)
    rank[order] = np.arange(len(owner)) - start[owner[order]]
    is_val = np.zeros(seen.n_users, dtype=bool)
    is_val[users] = True
    shot = torch.as_tensor(rank[uid] < m, device=seen.device)                     # [P] pair in a few-shot unit
    val = subset_users(seen, users)
    val_shot = shot[torch.as_tensor(is_val[seen.user.cpu().numpy()], device=seen.device)]
    return {"train": subset_users(seen, np.flatnonzero(~is_val)), "fewshot": val.select(val_shot),
            "test": val.select(~val_shot), "users": users.tolist(), "shots": m}


# ----------------------------------------------------------------------------------------------
# 2. Search: each method's declared space, the same budget for all, validation accuracy alone
# ----------------------------------------------------------------------------------------------

def draw_configs(cls, budget, seed=0):
    """`budget` configurations of cls.search_space ({hp: [choices] or ("log", lo, hi)}; K and
    alpha among the hps), drawn as cls.search says: "random" (each hp independently; a log range
    log-uniform) or "grid" (the grid's points in a seeded order; a grid smaller than the budget is
    an error, so that every method gets the same number of fits)."""
    if not is_int(budget) or budget < 1:
        raise InputError(f"--budget must be an integer >= 1, got {budget!r}")
    space = getattr(cls, "search_space", None)
    if not space:
        raise InputError(f"method {cls.name} declares no search_space")
    rng = np.random.default_rng(seed_from_key(seed, "search", cls.name))
    if cls.search == "grid":
        grid = list(itertools.product(*space.values()))
        if len(grid) < budget:
            raise InputError(f"method {cls.name}: its grid has {len(grid)} points, fewer than --budget {budget}")
        return [dict(zip(space, grid[i])) for i in rng.permutation(len(grid))[:budget]]
    configs = []
    for _ in range(budget):
        config = {}
        for hp, spec in space.items():
            if isinstance(spec, tuple) and spec[0] == "log":
                config[hp] = float(f"{math.exp(rng.uniform(math.log(spec[1]), math.log(spec[2]))):.3g}")
            else:
                config[hp] = spec[int(rng.integers(len(spec)))]
        configs.append(config)
    return configs


def build(name, config, v_ref, device, base=None):
    """The Method of a configuration {K, [alpha,] hp...}; hps it does not name come from base, then the defaults."""
    cls = get_method(name)
    hp = {**(base or {}), **{k: v for k, v in config.items() if k not in ("K", "alpha")}}
    return cls(config["K"], config.get("alpha"), v_ref, device, **hp)


def validate(name, config, split, v_ref, device, seed, base=None):
    """Fit on the split's train users, fit the validation users from their few-shot pairs, score their
    held-out pairs -> a search record (validation: the mean over validation users; None and the
    error when the fit diverged or did not move)."""
    record = {"method": name, "config": config}
    try:
        method = build(name, config, v_ref, device, base)
        seed_fit(seed, "search", name, config)
        checked_fit(method, split["train"])
        U = checked_fit_users(method, split["fewshot"])
        record.update(validation=float(accuracy(method, split["test"], U).mean()), error=None)
        # a search record is the same for the same seed: its seconds are left out (the refits state theirs)
        record.update(converged=converged(method.curve), loss_fall=last_tenth_fall(method.curve),
                      **{k: v for k, v in fit_length(method).items() if k != "fit_seconds"}, curve=method.curve)
    except InputError as e:
        record.update(validation=None, error=str(e), converged=None, loss_fall=None, curve=None)
    print(f"search {name} {config}: validation " + (f"{record['validation']:.4f}" if record["error"] is None
                                                   else f"failed ({record['error']})"))
    return record


def search(name, split, v_ref, device, budget, seed=0, base=None):
    """`budget` configurations of method `name`, each fitted once on the validation split -> (the
    selected configuration, its validation accuracy, the search records). Selection reads the
    validation accuracy and nothing else."""
    records = [validate(name, c, split, v_ref, device, seed, base) for c in draw_configs(get_method(name), budget, seed)]
    scored = [r for r in records if r["validation"] is not None]
    if not scored:
        raise InputError(f"method {name}: every one of its {budget} configurations failed; the first: {records[0]['error']}")
    best = max(scored, key=lambda r: r["validation"])   # the first of equals: the draw order
    return best["config"], best["validation"], records


# ----------------------------------------------------------------------------------------------
# 3. Refit with seeds; 4. the statistics
# ----------------------------------------------------------------------------------------------

def refit(name, config, sets, v_ref, device, seeds, seed=0, base=None):
    """The configuration fitted on all seen users with `seeds` seeds -> ({set: per-user accuracies
    [S, N]} for seen_test and unseen_test, [the fitted methods], [their fit records])."""
    acc, methods, fits = {s: [] for s in TRUSTED_SETS}, [], []
    for s in range(seeds):
        method = build(name, config, v_ref, device, base)
        seed_fit(seed, "refit", s, name, config)
        U = checked_fit(method, sets["seen_train"])
        U_new = checked_fit_users(method, sets["unseen_fewshot"])
        for set_name in TRUSTED_SETS:
            acc[set_name].append(accuracy(method, sets[set_name], U if set_name.startswith("seen") else U_new))
        methods.append(method)
        fits.append({"seed": s, "converged": converged(method.curve), "loss_fall": last_tenth_fall(method.curve),
                     **fit_length(method), "curve": method.curve})
    return {k: np.stack(v) for k, v in acc.items()}, methods, fits


def fit_length(method):
    """How long a checked fit ran: optimizer steps, passes over its training pairs, seconds, and
    how it ended (stopped: fixed, early or cap; None without a training loop); and the new users'
    fit's (Method.fewshot_status)."""
    curve = method.curve or {}
    return {"steps": curve.get("steps"), "passes": curve.get("passes"), "fit_seconds": method.fit_seconds,
            "stopped": curve.get("stopped"), **method.fewshot_status()}


def t_quantile(q, df):
    """The q-quantile (q in (0.5, 1)) of Student's t with df >= 1 degrees of freedom (df may be
    fractional: Satterthwaite's; capped at 1e7, where t is the normal to 1e-7). No scipy: with
    t = sqrt(df) tan(theta), P(0 < T < t) = c int_0^theta cos(u)^(df - 1) du, c = Gamma((df + 1) / 2)
    / (Gamma(df / 2) sqrt(pi)), a bounded integrand (Simpson's rule, 1001 points), and theta is
    found by Newton's method kept inside a shrinking bracket (bisection where Newton would leave it)."""
    df = min(max(df, 1.0), 1e7)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    def mass(theta):   # P(0 < T < sqrt(df) tan(theta))
        f = np.cos(np.linspace(0.0, theta, 1001)) ** (df - 1)
        return c * theta / 3000 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, math.atan((40.0 if df >= 10 else 1e7) / math.sqrt(df))   # t < 40 for df >= 10, q < 1 - 1e-8
    theta = math.atan(2.0 / math.sqrt(df))
    for _ in range(100):
        g = mass(theta) - (q - 0.5)
        lo, hi = (theta, hi) if g < 0 else (lo, theta)
        step = g / (c * math.cos(theta) ** (df - 1))
        if abs(step) < 1e-13 or hi - lo < 1e-15:
            break
        theta = theta - step if lo < theta - step < hi else (lo + hi) / 2
    return math.sqrt(df) * math.tan(theta)


def variance_components(A):
    """The two-way random-effects model of A [S, N] (seeds x users, one value per cell):
    A_su = mu + a_s + b_u + e_su, with a the seed effect (var sigma_seed^2), b the user effect
    (sigma_user^2) and e the user x seed interaction (sigma_resid^2). The ANOVA mean squares have
    E[MS_seed] = sigma_resid^2 + N sigma_seed^2, E[MS_user] = sigma_resid^2 + S sigma_user^2,
    E[MS_resid] = sigma_resid^2, so the variance of the grand mean,
        sigma_seed^2 / S + sigma_user^2 / N + sigma_resid^2 / (S N),
    is estimated by MS_seed / (S N) + max(0, MS_user - MS_resid) / (S N): the seed term is never
    clamped (with few seeds it is the one that matters, and clamping it would under-cover), and its
    S - 1 degrees of freedom enter Satterthwaite's df. One seed: the seed term cannot be estimated
    and the variance is MS_user / (S N) with N - 1 df (the CI is then over users alone).
    -> {"seed", "user", "resid": the components (clamped at 0), "mean_var", "df"}."""
    A = np.asarray(A, dtype=float)
    if A.ndim == 1:
        A = A[None]
    S, N = A.shape
    mean = A.mean()
    seed_means, user_means = A.mean(1), A.mean(0)                                 # [S], [N]
    ms_seed = N * ((seed_means - mean) ** 2).sum() / (S - 1) if S > 1 else 0.0
    ms_user = S * ((user_means - mean) ** 2).sum() / (N - 1) if N > 1 else 0.0
    df_resid = (S - 1) * (N - 1)
    ms_resid = ((A - seed_means[:, None] - user_means[None] + mean) ** 2).sum() / df_resid if df_resid else 0.0
    terms = [(ms_seed / (S * N), S - 1),                                          # (term of var(mean), its df)
             (max(0.0, ms_user - ms_resid) / (S * N), N - 1)]
    if ms_user > ms_resid and df_resid:   # Satterthwaite's share of MS_resid in the user term
        user_df = (ms_user - ms_resid) ** 2 / (ms_user ** 2 / (N - 1) + ms_resid ** 2 / df_resid)
        terms[1] = (terms[1][0], user_df)
    var = sum(t for t, _ in terms)
    denom = sum(t ** 2 / df for t, df in terms if df > 0 and t > 0)
    return {"seed": float(max(0.0, (ms_seed - ms_resid) / N)) if S > 1 else None,
            "user": float(max(0.0, (ms_user - ms_resid) / S)), "resid": float(ms_resid),
            "mean_var": float(var), "df": float(var ** 2 / denom) if denom > 0 else math.inf}


def mean_ci(A, level=CI_LEVEL):
    """CI of the expected mean of A [S, N] (seeds x users) over new users of the same population and
    new seeds, under the two-way random-effects model of variance_components: mean +- t_{df, (1 +
    level) / 2} sqrt(var(mean)), df Satterthwaite's (with few seeds the seed term's S - 1 degrees of
    freedom dominate it, and the interval widens as it should). -> [lo, hi]."""
    A = np.asarray(A, dtype=float)
    vc = variance_components(A)
    if vc["mean_var"] == 0:
        return [float(A.mean()), float(A.mean())]
    half = t_quantile((1 + level) / 2, vc["df"]) * math.sqrt(vc["mean_var"])
    return [float(A.mean() - half), float(A.mean() + half)]


def principal_angles(V1, V2):
    """Principal angles (degrees, ascending) between the column spaces of V1 [F, K1] and V2 [F, K2]."""
    Q1, _ = torch.linalg.qr(V1.double())
    Q2, _ = torch.linalg.qr(V2.double())
    cos = torch.linalg.svdvals(Q1.T @ Q2).clamp(-1, 1)                            # [min(K1, K2)]
    return sorted(torch.rad2deg(torch.arccos(cos)).tolist())


def basis_stability(methods):
    """The bases V of one configuration's seeds, compared two by two: principal angles and the
    overlap mean cos^2; `stable` False when some pair overlaps less than STABLE_OVERLAP. None for a
    method without a linear basis or with one seed."""
    bases = [getattr(m, "V", None) for m in methods]
    if len(bases) < 2 or any(V is None for V in bases):
        return None
    pairs = []
    for (i, A), (j, B) in itertools.combinations(enumerate(bases), 2):
        angles = sorted(principal_angles(A, B))
        overlap = float(np.mean(np.cos(np.deg2rad(angles)) ** 2))
        pairs.append({"seeds": [i, j], "angles_deg": angles, "overlap": overlap})
    worst = min(p["overlap"] for p in pairs)
    return {"pairs": pairs, "min_overlap": worst, "stable": bool(worst >= STABLE_OVERLAP)}


def row(name, selected, validation, acc):
    """One row of comparison.json: the method, the selected configuration, the validation accuracy it
    was chosen on, and for seen_test and unseen_test the mean over seeds of the mean over users and its CI."""
    out = {"method": name, "selected": selected, "validation": validation}
    for set_name in TRUSTED_SETS:
        out[set_name] = float(acc[set_name].mean())
        out[f"{set_name}_ci"] = mean_ci(acc[set_name])
    return out


def mean_length(fits):
    """The refits' mean steps, passes, fit seconds and new users' fit steps (None for fits without
    a training loop)."""
    mean = lambda k: None if any(f[k] is None for f in fits) else float(np.mean([f[k] for f in fits]))
    return {k: mean(k) for k in ("steps", "passes", "fit_seconds", "fewshot_steps")}


def paired(a, b, acc_a, acc_b, set_name, comparisons=1):
    """a minus b on the same users and seeds (per-user accuracies [S, N] each): the mean, its CI, and
    the Bonferroni CI at level 1 - (1 - CI_LEVEL) / comparisons (all `comparisons` paired CIs hold
    together with probability >= CI_LEVEL)."""
    D = acc_a[set_name] - acc_b[set_name]
    return {"a": a, "b": b, "set": set_name, "mean": float(D.mean()), "ci": mean_ci(D),
            "ci_simultaneous": mean_ci(D, 1 - (1 - CI_LEVEL) / comparisons)}


def gain_verdict(ci):
    lo, hi = ci
    if lo <= 0 <= hi:
        return "no evidence that personalization helps on this data"
    return "personalization helps on this data" if lo > 0 else "personalization hurts on this data"


# ----------------------------------------------------------------------------------------------
# The whole protocol
# ----------------------------------------------------------------------------------------------

FIXED_ROWS = (("reference", "lore", {"K": 0, "alpha": 0.0}),   # the reward model itself (v_ref)
              ("bt", "lore", {"K": 1, "alpha": 0.0}))          # one shared Bradley-Terry reward


def compare(sets, v_ref, methods, budget, seeds, seed=0, device=None, fraction=VALIDATION_FRACTION, base=None):
    """The protocol on the four pair sets (see the module's docstring). base: {method: hps} that the
    searches start from (a configuration's hps replace them). -> comparison.json's dict."""
    if not is_int(seeds) or seeds < 1:
        raise InputError(f"--seeds must be an integer >= 1, got {seeds!r}")
    if isinstance(methods, str) or not isinstance(methods, (list, tuple)) or not methods:
        raise InputError(f"methods must be a non-empty list of method names, got {methods!r}")
    base = base or {}
    split = validation_split(sets, fraction, seed)
    print(f"validation: {len(split['users'])} of {sets['seen_train'].n_users} seen users, fitted from "
          f"{split['shots']} {'groups' if split['train'].group is not None else 'pairs'} each, scored on the rest")
    plan = [(label, name, config, None) for label, name, config in FIXED_ROWS]
    searches = {}
    for name in methods:
        selected, _, records = search(name, split, v_ref, device, budget, seed, base.get(name))
        searches[name] = records
        plan.append((name, name, selected, records))
    rows, acc, fits, stability = [], {}, {}, {}
    for label, name, config, records in plan:
        if records is None:   # the fixed rows: their validation accuracy, for the record
            validation = validate(name, config, split, v_ref, device, seed, base.get(name))["validation"]
        else:
            validation = max(r["validation"] for r in records if r["validation"] is not None)
        acc[label], methods_fitted, fits[label] = refit(name, config, sets, v_ref, device, seeds, seed, base.get(name))
        stability[label] = basis_stability(methods_fitted)
        rows.append({**row(name, config, validation, acc[label]), "method": label, "fit_of": name,
                     "converged": all(f["converged"] is not False for f in fits[label]),
                     "at_cap": any(f["stopped"] == "cap" for f in fits[label]),
                     "fewshot_at_cap": any(f["fewshot_stopped"] == "cap" for f in fits[label]), **mean_length(fits[label])})
        print(f"{label}: selected {config}, validation {validation:.4f}, "
              + ", ".join(f"{s} {rows[-1][s]:.4f} [{rows[-1][s + '_ci'][0]:.4f}, {rows[-1][s + '_ci'][1]:.4f}]"
                          for s in TRUSTED_SETS))
    labels = [r["method"] for r in rows]
    combos = [(a, b, s) for a, b in itertools.combinations(labels, 2) for s in TRUSTED_SETS]
    pairs = [paired(a, b, acc[a], acc[b], s, len(combos)) for a, b, s in combos]
    personal = [r for r in rows if r["method"] not in ("reference", "bt")]
    gain = None
    if personal:
        best = max(personal, key=lambda r: r["validation"])["method"]   # chosen on validation, never the test
        gain = {"method": best, "vs": "bt", "per_user": "unseen_test"}
        for s in TRUSTED_SETS:
            p = paired(best, "bt", acc[best], acc["bt"], s)
            gain[s] = {"mean": p["mean"], "ci": p["ci"], "verdict": gain_verdict(p["ci"])}
        gain["verdict"] = gain["unseen_test"]["verdict"]
    return {"methods": rows, "paired": pairs, "personalization_gain": gain, "basis_stability": stability,
            "validation": {"users": len(split["users"]), "of": sets["seen_train"].n_users, "shots": split["shots"],
                           "fraction": fraction, "seed": seed},
            "budget": budget, "seeds": seeds,
            "ci": {"level": CI_LEVEL, "method": "t interval of a two-way random-effects model (seed, user, "
                   "user x seed; ANOVA variance components, Satterthwaite df): over new users and new seeds, "
                   "given the selected configuration and the drawn test pairs",
                   "multiplicity": f"{len(combos)} paired CIs at {CI_LEVEL:.0%} each: about "
                   f"{len(combos) * (1 - CI_LEVEL):.1f} would miss by chance; ci_simultaneous is Bonferroni's, "
                   f"all {len(combos)} together at {CI_LEVEL:.0%}"},
            "search": searches, "fits": fits}
