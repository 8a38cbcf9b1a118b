"""How much of pca's gap to LoRe its signs explain (docs/active.md), on a prepared data folder (the
planted synthetic PersonalLLM of docs/active.md):

    python PersonalLLM/prepare.py --synthetic --out PersonalLLM/results/planted400 --n-users 400 \\
        --n-unseen 200 --prompts-train 4000 --prompts-test 300 --train-frac 0.0125 --pool-frac 0.0125
    OMP_NUM_THREADS=1 python benchmarks/bench_pca_signs.py --data PersonalLLM/results/planted400 \\
        --out docs/figures/pca_signs_planted_personalllm.json

pca's basis V [F, K] (exact, oriented, scaled: lore.pca) is fitted on the seen users; the unseen
users are then fitted on their first --fewshot-pairs pool pairs (train_basis' few-shot size) in two
ways, both Adam at the recipe's few-shot steps and rate:
    simplex   pca's own fit: w on the simplex (softmax of logits ~ N(0, 1); LinearBasis.fit_users)
    both      the same fit on the 2K directions [V, -V]: each direction may be liked or disliked,
              the simplex's prior kept (a mixture of +-v_k)
    signed    w in R^K, from w = 0, no constraint: every direction may be liked or disliked
and scored on their held-out pairs (unseen_test). LoRe's unseen_test at the same K is read from
--lore (train_basis.py's results.json of `--method lore,pca`, docs/figures/pca_planted_personalllm.json):
share_of_gap_both (and _signed) = (both - simplex) / (lore - simplex), the part of pca's gap that
signs close.
Reads --data and --lore; writes --out (JSON: rows, the machine's load, OMP_NUM_THREADS) and prints the table.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402
from lore.checks import set_seed  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import write_json  # noqa: E402
from lore.methods import METHODS, accuracy, checked_fit, checked_fit_users, user_margins  # noqa: E402
from lore.recipes import load_recipe  # noqa: E402

RECIPE = load_recipe("PersonalLLM")["train_basis"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a prepared PersonalLLM data folder")
    p.add_argument("--lore", default="docs/figures/pca_planted_personalllm.json",
                   help="train_basis.py's results.json with lore at the same K on the same data")
    p.add_argument("--k-list", default="3,5")
    p.add_argument("--fewshot-pairs", type=int, default=RECIPE["fewshot_pairs"])
    p.add_argument("--fewshot-iters", type=int, default=RECIPE["fewshot_iters"])
    p.add_argument("--fewshot-lr", type=float, default=RECIPE["fewshot_lr"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p.parse_args(argv)


def signed_weights(method, pairs, iters, lr):
    """Unseen users' w [N, K] in R^K on the basis V, fitted by Adam from 0 on LoRe's loss."""
    Z = pairs.project(method.V)                                                    # [P, K]
    weight = utils.user_mean_weights(pairs)                                        # [P]
    w = torch.zeros(pairs.n_users, method.V.shape[1], requires_grad=True)          # [N, K]
    opt = torch.optim.Adam([w], lr=lr)
    for _ in range(iters):
        opt.zero_grad()
        utils.bt_nll(user_margins(Z, w, pairs.user), weight).backward()
        opt.step()
    return w.detach()


def main(args):
    data = load_data(args.data, "cpu", fewshot_pairs=args.fewshot_pairs)
    lore = {r["K"]: r["unseen_test"] for r in json.load(open(args.lore)) if r["method"] == "lore"}
    rows = []
    for K in [int(k) for k in args.k_list.split(",")]:
        set_seed(args.seed)
        method = METHODS["pca"](K, device="cpu", fewshot_iters=args.fewshot_iters, fewshot_lr=args.fewshot_lr)
        checked_fit(method, data.sets["seen_train"])
        start = time.perf_counter()
        simplex = accuracy(method, data.sets["unseen_test"], checked_fit_users(method, data.sets["unseen_fewshot"])).mean()
        signed = accuracy(method, data.sets["unseen_test"],
                          signed_weights(method, data.sets["unseen_fewshot"], args.fewshot_iters, args.fewshot_lr)).mean()
        mirrored = METHODS["pca"](2 * K, device="cpu", fewshot_iters=args.fewshot_iters, fewshot_lr=args.fewshot_lr)
        mirrored.V = torch.cat([method.V, -method.V], 1)                          # [F, 2K]
        set_seed(args.seed)
        both = accuracy(mirrored, data.sets["unseen_test"], checked_fit_users(mirrored, data.sets["unseen_fewshot"])).mean()
        row = {"K": K, "simplex": float(simplex), "both": float(both), "signed": float(signed), "lore": lore.get(K),
               "seconds": time.perf_counter() - start}
        for name in ("both", "signed"):
            row[f"share_of_gap_{name}"] = None if row["lore"] is None else \
                (row[name] - row["simplex"]) / (row["lore"] - row["simplex"])
        rows.append(row)
        print(f"pca K={K}: unseen_test simplex {row['simplex']:.4f}, both signs {row['both']:.4f}, signed "
              f"{row['signed']:.4f}, lore {row['lore']}; share of the gap closed: both signs "
              f"{row['share_of_gap_both']}, signed {row['share_of_gap_signed']}")
    result = {"rows": rows, "data": os.path.abspath(args.data), "fewshot_pairs": args.fewshot_pairs,
              "fewshot_iters": args.fewshot_iters, "fewshot_lr": args.fewshot_lr, "lore_from": args.lore,
              "machine": {"load_1min": os.getloadavg()[0], "cores": os.cpu_count(),
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main(parse_args())
