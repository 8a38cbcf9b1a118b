"""lore.fused's kernels against those of another git revision, interleaved in one process: on a
shared machine the load moves from minute to minute, so two versions are compared only within one
run, taking turns, on the same data. bench_scale.py's 10^6-user shape: 75,216 used bf16 rows of F
features, 47 pairs per user of two distinct responses of a random train prompt, K = 5.

    OMP_NUM_THREADS=2 python benchmarks/bench_fused.py --users 1000000 --against 316a350 \
        --repeats 5 --out /tmp/bench_fused.json    # docs/scale.md's before/after of the pair pass

For each version (--against's lore/fused.py, compiled with its own flags, and this checkout's) and
each kernel: X V (project), the pair pass (pair_loss; for a version whose pass takes the users'
weights rather than their logits, with the torch softmax and its backward the step took around it),
X^T G (table_grad), scoring's pass (pair_hits), the median and the best of --repeats wall-clock seconds after one warm-up, and the
step's kernels (X V + pair pass + X^T G, per repeat). It checks that both versions give the same
loss, gradients and hits to float32 round-off. Reads nothing but git; writes the JSON to --out
(default: stdout only). States the machine's load and OMP_NUM_THREADS.
"""
import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
from lore import fused  # noqa: E402

ROWS, RESPONSES, PAIRS = 75216, 8, 47


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--rank", type=int, default=5)
    p.add_argument("--against", default="HEAD", help="the git revision whose lore/fused.py is the baseline")
    p.add_argument("--repeats", type=int, default=5, help="timed turns per version (after one warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p.parse_args(argv)


def baseline(revision):
    """lore/fused.py at a git revision, as a namespace, and its kernel library built with that
    revision's flags."""
    text = subprocess.run(["git", "-C", REPO, "show", f"{revision}:lore/fused.py"], check=True,
                          capture_output=True, text=True).stdout
    namespace = {}
    exec(compile(text, f"{revision}:lore/fused.py", "exec"), namespace)
    return namespace, fused.build(namespace["SOURCE"], namespace["FLAGS"])


def pair_loss_step(module, lib, T, L, chosen, rejected, offsets, user_weight, weight):
    """The step's pair work with a version's pair_loss -> (nll, G, dL/dlogits). A version whose
    pass takes the logits (and [N] weights) does it all; before it, the pass took softmax(L) and
    [P] weights, and the step took the softmax and its backward in torch: timed with it."""
    if "logits" in inspect.signature(module["pair_loss"]).parameters:
        return module["pair_loss"](T, L, chosen, rejected, offsets, user_weight, 1.0, lib=lib)
    W = torch.softmax(L, -1)                                                       # [N, K]
    nll, G, dW = module["pair_loss"](T, W, chosen, rejected, offsets, weight, 1.0, lib=lib)
    return nll, G, torch._softmax_backward_data(dW, W, -1, W.dtype)


def data(args):
    g = torch.Generator().manual_seed(args.seed)
    P = args.users * PAIRS
    X = torch.randn(ROWS, args.features, generator=g).bfloat16()                   # [E', F]
    chosen = torch.randint(RESPONSES, (P,), dtype=torch.int32, generator=g)        # [P]
    rejected = (chosen + torch.randint(1, RESPONSES, (P,), dtype=torch.int32, generator=g)) % RESPONSES
    prompt = torch.randint(ROWS // RESPONSES, (P,), dtype=torch.int32, generator=g) * RESPONSES
    chosen += prompt
    rejected += prompt
    offsets = torch.arange(0, P + 1, PAIRS)                                        # [N + 1]
    V = torch.randn(args.features, args.rank, generator=g) / args.features ** 0.5  # [F, K]
    L = torch.randn(args.users, args.rank, generator=g)                            # [N, K] logits
    user_weight = torch.full((args.users,), 1.0 / P)                               # [N]
    return X, chosen, rejected, offsets, user_weight, user_weight.repeat_interleave(PAIRS), V, L


def load():
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}


def main(args):
    libs = {"before": baseline(args.against), "after": (vars(fused), fused.kernel())}   # (module, library)
    X, chosen, rejected, offsets, user_weight, weight, V, L = data(args)
    T, W = fused.project(X, V), torch.softmax(L, -1)                               # [E', K], [N, K]
    G = torch.randn(ROWS, args.rank)                                               # [E', K]
    kernels = {"project": lambda m, lib: m["project"](X, V, lib=lib),
               "pair_loss": lambda m, lib: pair_loss_step(m, lib, T, L, chosen, rejected, offsets, user_weight, weight),
               "table_grad": lambda m, lib: m["table_grad"](X, G, lib=lib),
               "pair_hits": lambda m, lib: m["pair_hits"](T, W, chosen, rejected, offsets, lib=lib)}
    start, times, outputs = load(), {v: {k: [] for k in kernels} for v in libs}, {}
    for turn in range(args.repeats + 1):
        for version, lib in libs.items():
            for name, run in kernels.items():
                t = time.perf_counter()
                outputs[version, name] = run(*lib)
                if turn:                                                           # turn 0: the warm-up
                    times[version][name].append(time.perf_counter() - t)
    for name in kernels:   # the same numbers: float32 round-off between the versions
        for a, b in zip(*(o if isinstance(o, tuple) else (o,) for o in (outputs["before", name], outputs["after", name]))):
            if a.is_floating_point():
                torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4 * float(a.abs().max()))
            else:
                assert (a - b).abs().max() <= 1, name   # a margin at 0 may round to either side
    result = {"users": args.users, "pairs": len(chosen), "features": args.features, "K": args.rank,
              "against": args.against, "threads": torch.get_num_threads(), "load_start": start, "load_end": load()}
    for version in libs:
        step = [sum(ts) for ts in zip(*(times[version][k] for k in ("project", "pair_loss", "table_grad")))]
        result[version] = {name: {"median_s": statistics.median(ts), "best_s": min(ts)}
                           for name, ts in {**times[version], "step_kernels": step}.items()}
    print("| kernel | before median s | after median s | after / before | before best s | after best s |")
    print("|---|---|---|---|---|---|")
    for name in result["after"]:
        b, a = result["before"][name], result["after"][name]
        print(f"| {name} | {b['median_s']:.3f} | {a['median_s']:.3f} | {a['median_s'] / b['median_s']:.2f} | "
              f"{b['best_s']:.3f} | {a['best_s']:.3f} |")
    print(json.dumps({k: result[k] for k in ("load_start", "load_end", "threads")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(parse_args())
