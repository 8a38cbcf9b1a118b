"""The stopping rule's PATIENCE_PASSES (lore/stopping.py), chosen on validation users only: PAL and
VPL at the recipe's defaults (K = 3, stop early) on the synthetic population at several sizes, each
fitted on lore.compare.validation_split's train users and scored on its validation users (fitted
from their few-shot draw, scored on the rest of their seen_train pairs); no test pair is read.

    OMP_NUM_THREADS=1 python benchmarks/bench_patience.py --sizes 200,1000 --seeds 0,1 \\
        --work PersonalLLM/results/sizes --out benchmarks/results/patience.json

Every candidate of --passes shares one trajectory: a fit under the largest candidate is the fit
under a smaller one up to the check where that one would stop (the checks read the parameters
and draw nothing), so each fit runs once and every candidate's stopping point and best parameters
are snapshotted along the way; the few-shot fit of the validation users is then run from each
snapshot with the same seed. Seeds as benchmarks/bench_sizes.py seeds a fit (seed_fit(s, method,
K, alpha)). Reads the prepared folders of --work/n{N} (bench_sizes.py prepares them); writes --out
(JSON: per size, method, seed and candidate the validation accuracy, steps, passes, stopped;
"table": the mean validation accuracy per candidate, which docs/comparisons.md shows) and prints
it. Records of sizes, methods or seeds already in --out and not measured again are kept; "runs"
states every run's command and load.
"""
import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_sizes import prepare, recipe_hparams  # noqa: E402
from lore import stopping  # noqa: E402
from lore.checks import seed_fit  # noqa: E402
from lore.compare import validation_split  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import read_json, write_json  # noqa: E402
from lore.methods import accuracy, checked_fit, checked_fit_users, get_method  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[200, 1000])
    p.add_argument("--methods", type=lambda t: t.split(","), default=["pal", "vpl"])
    p.add_argument("--seeds", type=lambda t: [int(x) for x in t.split(",")], default=[0, 1])
    p.add_argument("--passes", type=lambda t: [float(x) for x in t.split(",")], default=[0, 2, 5, 10])
    p.add_argument("--work", default=os.path.join(ROOT, "PersonalLLM", "results", "sizes"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "patience.json"))
    return p.parse_args()


class Snapshots(stopping.EarlyStop):
    """EarlyStop under the largest candidate, noting where every smaller one would have stopped."""

    def __init__(self, *a, candidates=(), **k):
        super().__init__(*a, **k)
        self.candidates, self.snaps = sorted(candidates), {}

    def check(self, i, per_step=1.0):
        ending = super().check(i, per_step)
        for c in self.candidates:
            if c not in self.snaps and self.waited >= self.patience and i * per_step - self.improved_at >= c:
                self.snaps[c] = {"steps": i, "passes": i * per_step, "stopped": "early",
                                 "kept": [k.clone() for k in self.kept]}
        return ending


def fit_all(name, hparams, split, v_ref, seed, candidates):
    """-> {candidate: record}: one fit under max(candidates), every candidate scored from its snapshot."""
    made = []

    def early_stop(*a, **k):   # the method's one EarlyStop of its fit (the first made)
        made.append(Snapshots(*a, candidates=candidates, patience_passes=max(candidates), **k))
        return made[-1]
    module = sys.modules[get_method(name).__module__]
    module.EarlyStop, original = early_stop, module.EarlyStop
    try:
        method = get_method(name)(3, None, v_ref, "cpu", **hparams)
        seed_fit(seed, method.name, method.K, method.alpha)
        checked_fit(method, split["train"])
    finally:
        module.EarlyStop = original
    stop, out = made[0], {}
    for c in candidates:
        snap = stop.snaps.get(c) or {"steps": method.curve["steps"], "passes": method.curve["passes"],
                                     "stopped": method.curve["stopped"], "kept": stop.kept}
        with torch.no_grad():
            for p, k in zip(stop.params, snap["kept"]):
                p.copy_(k)
        seed_fit(seed, "fewshot", method.name)
        U = checked_fit_users(method, split["fewshot"])
        out[c] = {"validation": float(accuracy(method, split["test"], U).mean()),
                  **{k: snap[k] for k in ("steps", "passes", "stopped")}}
        print(f"  passes {c:g}: validation {out[c]['validation']:.4f}, steps {out[c]['steps']}, "
              f"passes {out[c]['passes']:.1f}, {out[c]['stopped']}", flush=True)
    out["fit_seconds"] = method.fit_seconds
    return out


def table_rows(records):
    """Per size and method: the seeds and the mean validation accuracy at every candidate (p{c})."""
    out = []
    for n, name in sorted({(r["seen_users"], r["method"]) for r in records}):
        rs = [r for r in records if r["seen_users"] == n and r["method"] == name]
        row = {"seen_users": n, "method": name, "seeds": ",".join(str(r["seed"]) for r in rs)}
        for j, c in enumerate(rs[0]["candidates"]):
            row[f"p{c['patience_passes']:g}"] = f"{np.mean([r['candidates'][j]['validation'] for r in rs]):.4f}"
            row[f"passes{c['patience_passes']:g}"] = f"{np.mean([r['candidates'][j]['passes'] for r in rs]):.1f}"
        out.append(row)
    return out


def main(args):
    hparams, load = recipe_hparams(), os.getloadavg()
    # records of other sizes, methods or seeds already in --out are kept (each run states its command)
    old = read_json(args.out) if os.path.isfile(args.out) else {"records": [], "runs": []}
    measured = {(n, name, s) for n in args.sizes for name in args.methods for s in args.seeds}
    records = [r for r in old["records"] if (r["seen_users"], r["method"], r["seed"]) not in measured]
    run = {"command": " ".join(sys.argv), "machine": {"cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                                                       "load_average_at_start": load}}
    for n in args.sizes:
        data = load_data(prepare(n, args.work), "cpu", fewshot_pairs=9)
        split = validation_split(data.sets)
        for name in args.methods:
            for s in args.seeds:
                print(f"n={n} {name} seed {s}", flush=True)
                fits = fit_all(name, hparams[name], split, data.v_ref, s, args.passes)
                records.append({"seen_users": n, "method": name, "seed": s, "fit_seconds": fits.pop("fit_seconds"),
                                "candidates": [{"patience_passes": c, **r} for c, r in fits.items()]})
                records.sort(key=lambda r: (r["seen_users"], r["method"], r["seed"]))
                run["machine"]["load_average_at_end"] = os.getloadavg()
                write_json(args.out, {"records": records, "table": table_rows(records), "runs": old["runs"] + [run]})
    rows = table_rows(records)
    print("| seen users | method | seeds | " + " | ".join(f"passes {c:g}" for c in args.passes) + " |")
    print("|---|---|---|" + "---|" * len(args.passes))
    for r in rows:
        print(f"| {r['seen_users']} | {r['method']} | {r['seeds']} | " + " | ".join(r.get(f"p{c:g}", "-") for c in args.passes) + " |")


if __name__ == "__main__":
    main(parse_args())
