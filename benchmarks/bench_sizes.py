"""Fair at any size: every personal method at the recipe's defaults (PersonalLLM/recipe.json, the
flags' defaults of PersonalLLM/train_basis.py) against the reference model (lore K=0), on the
synthetic population at several sizes of seen users:

    OMP_NUM_THREADS=1 python benchmarks/bench_sizes.py --sizes 200,500,1000 --seeds 5 \\
        --work PersonalLLM/results/sizes --out benchmarks/results/sizes.json
    python benchmarks/bench_sizes.py --table benchmarks/results/sizes.json   # the docs' table, from the JSON
    python benchmarks/bench_sizes.py --merge a.json,b.json --out benchmarks/results/sizes.json   # runs side by side

For each size N it prepares (once, cached in --work/n{N}) `PersonalLLM/prepare.py --synthetic
--n-users N --n-unseen N/2 --prompts-train 3000 --prompts-test 400`, then fits, with --seeds seeds
each (seeded as utils.sweep seeds a setting), lore K=0 (the reference), lore K=3 as the recipe
fits it (stop fixed), lore K=3 --stop early --iters 5000 (a cap, not a count), pal K=3 and vpl K=3, fits the unseen users from their
few-shot pairs and scores unseen_test. Per row: the mean accuracy, the paired gain over the
reference (per user, mean over seeds) with its 95% CI over users and seeds (lore.compare.mean_ci,
the two-way random-effects t interval), whether the CI excludes 0, the fits' steps, passes, seconds, how they
stopped and whether they converged. Writes --out (JSON, with the machine's load and threads) and
prints the Markdown table that docs/comparisons.md shows. Sizes already in --out and not in --sizes
are kept (each size states its own seeds and load).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from lore import cli  # noqa: E402
from lore.checks import seed_fit  # noqa: E402
from lore.compare import mean_ci  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import read_json, write_json  # noqa: E402
from lore.methods import accuracy, checked_fit, checked_fit_users, converged, get_method  # noqa: E402

# (row label, method, K, hyperparameters over the recipe's)
# lore early's cap: 5,000 steps, not the recipe's 1,000 (which is its fixed count; with stop early a
# 500-user seed reached it)
ROWS = (("reference", "lore", 0, {}), ("lore", "lore", 3, {}), ("lore early", "lore", 3, {"stop": "early", "iters": 5000}),
        ("pal", "pal", 3, {}), ("vpl", "vpl", 3, {}))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[200, 500, 1000])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--work", default=os.path.join(ROOT, "PersonalLLM", "results", "sizes"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "sizes.json"))
    p.add_argument("--table", default=None, help="print the Markdown table of this JSON and exit")
    p.add_argument("--merge", default=None, type=lambda t: t.split(","),
                   help="JSONs of runs side by side (comma-separated): write their sizes into --out and exit")
    return p.parse_args()


def recipe_hparams():
    """{method: hps} at the recipe's defaults, as PersonalLLM/train_basis.py resolves its flags."""
    p = cli.ArgumentParser("bench_sizes")
    cli.add_sweep_args(p, os.path.join(ROOT, "PersonalLLM"), "train_basis")
    return cli.method_hparams(p.parse_args(["--method", "lore,pal,vpl"]))


def prepare(n, work):
    folder = os.path.join(work, f"n{n}")
    if not os.path.isfile(os.path.join(folder, "data.json")):
        subprocess.run([sys.executable, os.path.join(ROOT, "PersonalLLM", "prepare.py"), "--synthetic",
                        "--n-users", str(n), "--n-unseen", str(n // 2), "--prompts-train", "3000",
                        "--prompts-test", "400", "--out", folder], check=True)
    return folder


def measure(n, seeds, work, hparams):
    data = load_data(prepare(n, work), "cpu", fewshot_pairs=9)
    sets, acc, rows = data.sets, {}, []
    for label, name, K, extra in ROWS:
        per_seed, fits = [], []
        for s in range(seeds):
            method = get_method(name)(K, 0.0 if get_method(name).uses_alpha else None, data.v_ref, "cpu",
                                      **{**hparams[name], **extra})
            seed_fit(s, method.name, method.K, method.alpha)
            checked_fit(method, sets["seen_train"])
            U = checked_fit_users(method, sets["unseen_fewshot"])
            per_seed.append(accuracy(method, sets["unseen_test"], U))
            c = method.curve or {}
            fits.append({"steps": c.get("steps"), "passes": c.get("passes"), "stopped": c.get("stopped"),
                         "converged": converged(method.curve), "fit_seconds": method.fit_seconds})
        acc[label] = np.stack(per_seed)                                                 # [S, N]
        gain = acc[label] - acc["reference"]
        ci = mean_ci(gain)
        rows.append({"method": label, "fit_of": name, "K": K, "hparams": {**hparams[name], **extra},
                     "unseen_test": float(acc[label].mean()), "gain": float(gain.mean()), "gain_ci": ci,
                     "beats_reference": bool(ci[0] > 0), "fits": fits,
                     "converged": all(f["converged"] is not False for f in fits)})
        print(f"n={n} {label}: unseen_test {rows[-1]['unseen_test']:.4f}, gain {rows[-1]['gain']:+.4f} "
              f"[{ci[0]:+.4f}, {ci[1]:+.4f}], steps {[f['steps'] for f in fits]}", flush=True)
    return {"seen_users": n, "unseen_users": n // 2, "seen_pairs": len(sets["seen_train"]), "rows": rows}


def table_rows(sizes):
    """The docs' table as records of strings (sizes.json's "table"; tools/tables.py renders it)."""
    out = []
    for size in sizes:
        for r in size["rows"]:
            mean = lambda k: None if any(f[k] is None for f in r["fits"]) else np.mean([f[k] for f in r["fits"]])
            fmt = lambda v, f: "-" if v is None else format(v, f)
            gain = "-" if r["method"] == "reference" else f"{r['gain']:+.3f} [{r['gain_ci'][0]:+.3f}, {r['gain_ci'][1]:+.3f}]"
            cap = any(f["stopped"] == "cap" for f in r["fits"])
            out.append({"seen_users": size["seen_users"], "method": r["method"], "unseen_test": f"{r['unseen_test']:.3f}",
                        "gain": gain, "steps": fmt(mean("steps"), ".0f"), "passes": fmt(mean("passes"), ".1f"),
                        "fit_seconds": fmt(mean("fit_seconds"), ".1f"), "seeds": size["seeds"],
                        "converged": "NOT CONVERGED (AT CAP)" if cap else "yes" if r["converged"] else "NOT CONVERGED"})
    return out


COLUMNS = (("seen users", "seen_users"), ("method", "method"), ("unseen_test", "unseen_test"),
           ("gain over reference [95% CI]", "gain"), ("steps", "steps"), ("passes", "passes"),
           ("fit s", "fit_seconds"), ("seeds", "seeds"), ("converged", "converged"))


def table(result):
    """The Markdown table of sizes.json (what tools/tables.py renders from its "table")."""
    lines = ["| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[k]) for _, k in COLUMNS) + " |" for r in table_rows(result["sizes"])]
    return "\n".join(lines) + "\n"


def main(args):
    if args.table:
        print(table(read_json(args.table)), end="")
        return
    if args.merge:   # runs side by side, each its own --out: one JSON, each run's command and load kept
        runs = [read_json(path) for path in args.merge]
        sizes = sorted((s for r in runs for s in r["sizes"]), key=lambda s: s["seen_users"])
        write_json(args.out, {"sizes": sizes, "table": table_rows(sizes), "seeds": sorted({r["seeds"] for r in runs}),
                              "command": " ".join(sys.argv),
                              "runs": [{"command": r["command"], "machine": r["machine"]} for r in runs]})
        print(table(read_json(args.out)), end="")
        return
    hparams, start = recipe_hparams(), time.time()
    # sizes measured before (another --sizes run into the same --out) are kept, unless measured again
    kept = read_json(args.out)["sizes"] if os.path.isfile(args.out) else []
    sizes = [s for s in kept if s["seen_users"] not in args.sizes]
    load = os.getloadavg()
    for n in args.sizes:
        sizes.append({**measure(n, args.seeds, args.work, hparams), "seeds": args.seeds,
                      "load_average_at_start": load, "load_average_at_end": os.getloadavg()})
        sizes.sort(key=lambda s: s["seen_users"])
        result = {"sizes": sizes, "table": table_rows(sizes), "seeds": args.seeds, "command": " ".join(sys.argv),
                  "machine": {"cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                              "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
                              "seconds": time.time() - start}}
        write_json(args.out, result)   # after every size: a partial run keeps what it measured
    print(table(result), end="")


if __name__ == "__main__":
    main(parse_args())
