"""What active selection and init="svd" cost and give, on a prepared data folder (the planted
synthetic PersonalLLM of docs/active.md):

    python PersonalLLM/prepare.py --synthetic --out PersonalLLM/results/planted400 --n-users 400 \\
        --n-unseen 200 --prompts-train 4000 --prompts-test 300 --train-frac 0.0125 --pool-frac 0.0125
    OMP_NUM_THREADS=1 python benchmarks/bench_active.py --data PersonalLLM/results/planted400 \\
        --out benchmarks/results/bench_active_cpu.json

1. The cost of choosing the shots, per round, for all unseen users at once (lore K, fitted on the
   seen users): a random draw (utils.sample_shots) against an active round's selection (margins and
   their gradients by torch.func, the Laplace precisions, the information of every candidate, the
   pick; lore.active), each without the refit, and the refit itself (fit_users, the same for both),
   on the pool and on --candidates all (every pair of the pool prompts).
2. init random against svd, for both LoRe entries at K, --seeds seeds each, full batch as the
   scripts run them: the steps after which the loss stays within 1% of the final one (of --iters),
   the steps to come within 1% of the random start's final loss (mean over seeds), the final
   loss, the seen users' held-out accuracy, and the cross-seed overlap of the bases (the mean
   squared cosine of the principal angles between two seeds' V, averaged over pairs of seeds: 1 is
   the same subspace).
Prints the tables; writes them as JSON to --out (default: stdout only): "selection" a row per
candidate set, "init" a row per (entry, init), with the machine's load and OMP_NUM_THREADS.
"""
import argparse
import itertools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402
from lore.checks import set_seed  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import write_json  # noqa: E402
from lore.methods import featurize, METHODS, pair_features, per_user_accuracy  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared PersonalLLM data folder")
    p.add_argument("--K", type=int, default=3)
    p.add_argument("--iters", type=int, default=1000, help="basis training steps (PersonalLLM's train_basis recipe)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="repeats of each timed selection")
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p.parse_args()


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def load():
    """uptime's load averages (1, 5, 15 min) and OMP_NUM_THREADS: the machine a number was measured on."""
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}


def selection_cost(method, name, pool, repeats):
    """The row of candidate set `name`: seconds of a random draw of one more shot, an active round's
    selection (no refit), a refit."""
    from lore import active
    pool = featurize(method, pool)
    Zc, Zr = pair_features(method, pool)
    revealed = utils.sample_groups(pool, 2)                                       # [P]: 2 shots
    U = method.fit_users(pool.select(revealed))                                    # the state after them

    def select_round():
        theta = method.free_parameters(U)
        m, g = active.margin_gradients(method, theta[pool.user], Zc, Zr)
        lam = active.fisher_weight(method, m)
        H = active.posterior_precision(lam, g, pool.user, pool.n_users, method.free_prior()[1], revealed)
        score = active.information(lam, g, pool.user, H).masked_fill(revealed, float("-inf"))
        return active.pick_per_user(score, pool.user, pool.n_users)

    return {"candidates": name, "pairs": len(pool), "users": pool.n_users,
            "random_draw_s": best_time(lambda: utils.sample_shots(pool, 3), repeats),
            "active_round_s": best_time(select_round, repeats),
            "refit_s": best_time(lambda: method.fit_users(pool.select(revealed)), max(1, repeats // 2))}


def init_comparison(data, K, iters, seeds):
    rows = []
    for name, init in itertools.product(("lore", "lore_regularized"), ("random", "svd")):
        Vs, results = [], []
        for seed in range(seeds):
            pairs = data.sets["seen_train"]
            set_seed(seed)
            method = METHODS[name](K, 0.0, data.v_ref, "cpu", iters=iters, init=init)
            model = method.model(data.v_ref, 0.0, pairs.n_users, pairs.n_features, K, iters, method.hparams["lr"],
                                 "cpu", init)
            start = time.perf_counter()
            model.start(pairs)
            init_s = time.perf_counter() - start
            X, user = pairs.rows(), pairs.user
            if name == "lore":
                weight = utils.user_mean_weights(pairs)
                losses = [float(model.step(X, user, weight)) for _ in range(iters)]
            else:   # LoRe_regularized with alpha 0: the W half-step, then the V half-step's loss
                weight, alpha_t = utils.pair_mean_weights(pairs), torch.zeros(())
                losses = [float(model.step(X, user, weight, alpha_t)) for _ in range(iters)]
            final = losses[-1]
            # the steps after which the loss stays within 1% of the final one
            within = 1 + max((i + 1 for i, loss in enumerate(losses) if abs(loss - final) > 0.01 * abs(final)),
                             default=0)
            W, V = torch.softmax(model.W.detach(), -1), model.V.detach()
            acc = per_user_accuracy(data.sets["seen_test"], V, W).mean()
            Vs.append(torch.linalg.qr(V)[0])
            results.append({"seed": seed, "steps_within_1pct": within, "final_loss": final,
                            "seen_test": float(acc), "init_s": init_s, "losses": losses})
        overlap = [float((torch.linalg.svdvals(a.T @ b) ** 2).mean()) for a, b in itertools.combinations(Vs, 2)]
        # the steps to come within 1% of the loss the random start ends at (its mean over seeds)
        final_mean = sum(r["final_loss"] for r in results) / seeds
        target = 1.01 * (final_mean if init == "random" else rows[-1]["final_loss_mean"])   # rows[-1]: its random start
        for r in results:
            r["steps_to_random_final"] = next((i + 1 for i, loss in enumerate(r.pop("losses")) if loss <= target), None)
        reached = [r["steps_to_random_final"] for r in results]
        row = {"method": name, "init": init, "K": K, "iters": iters,
               "steps_within_1pct_mean": sum(r["steps_within_1pct"] for r in results) / seeds,
               "final_loss_mean": final_mean, "steps_to_random_final": reached,
               "steps_to_random_final_text": ", ".join("never" if s is None else str(s) for s in reached),
               "seen_test_mean": sum(r["seen_test"] for r in results) / seeds,
               "cross_seed_overlap": sum(overlap) / len(overlap), "seeds": results}
        rows.append(row)
        print(f"{name:>16} init {init:>6}: steps to stay within 1% of the final loss "
              f"{row['steps_within_1pct_mean']:.0f}, "
              f"to 1% of random's final loss {row['steps_to_random_final']}, "
              f"final loss {row['final_loss_mean']:.4f}, seen_test {row['seen_test_mean']:.4f}, "
              f"cross-seed overlap {row['cross_seed_overlap']:.4f}")
    return rows


def main(args):
    data = load_data(args.data, "cpu")
    set_seed(0)
    load_start = load()
    method = METHODS["lore"](args.K, 0.0, data.v_ref, "cpu", iters=args.iters)
    method.fit(data.sets["seen_train"])
    every = load_script("every")
    cost = [selection_cost(method, "pool", data.sets["unseen_fewshot"], args.repeats),
            selection_cost(method, "all", every.every_pair_of_pool_prompts(data), args.repeats)]
    for c in cost:
        print(f"candidates {c['candidates']}: {c['pairs']} pairs of {c['users']} users; "
              f"random draw {c['random_draw_s'] * 1e3:.1f} ms, "
              f"active round {c['active_round_s'] * 1e3:.1f} ms, refit {c['refit_s'] * 1e3:.0f} ms")
    init = init_comparison(data, args.K, args.iters, args.seeds)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "config": vars(args),
              "load_start": load_start, "load_end": load(), "selection": cost, "init": init}
    if args.out:
        write_json(args.out, result)
    return result


def load_script(name):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "PersonalLLM", "vary_fewshot.py")
    spec = importlib.util.spec_from_file_location(f"bench_active_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main(parse_args())
