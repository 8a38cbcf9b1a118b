"""How LoRe scales with the number of seen users: PersonalLLM's shape (8 responses to each of 9402
train + 1000 test prompts, an embedding table of 83,216 rows; 47 pairs per seen user) with 10^3 ..
10^7 seen users, against the memory-read floor measured in the same process.

    OMP_NUM_THREADS=2 python benchmarks/bench_scale.py --users 100000,1000000,10000000 --whole 100000:4096 \
        --steps 5 --repeats 3 --out benchmarks/results/bench_scale_fused_cpu.json   # docs/scale.md's measurement
    python benchmarks/bench_scale.py --users 1000,10000 --whole 1000:4096 --steps 2   # a quick look
    python benchmarks/bench_scale.py --users 100000 --whole "" --torch-ops             # the unfused step
    OMP_NUM_THREADS=2 python benchmarks/bench_scale.py --users "" --whole 1000000:4096 --whole-steps 20 \
        --out benchmarks/results/bench_scale_whole_1e6_cpu.json   # a whole run alone (--users "": no step sizes)
    python tools/tables.py --write      # docs/scale.md's tables, from benchmarks/results/bench_scale_*.json

Two measurements, each size in a child process of its own (so that its peak RSS is its own):
  - step: a random bf16 table [83216, F] and, per user, 47 random train prompts (drawn with
    replacement) with two distinct random responses each, as table-form Pairs. One LoRe model (K = 5)
    as LoRe.train builds it: seconds to set up its rows (training_rows: the table form when the pairs
    use fewer rows than there are pairs; on the fused path, their pairs in bands of rows: banded;
    the record's bands), seconds per Adam step (median of --steps after one warm-up),
    seconds to score every pair (per_user_accuracy with the fitted weights softmax(W), as LoRe.fit
    returns them, taken before the timing and timed apart: simplex_s; timed as the step, the median
    of --steps calls after one, which is recorded as score_first_s), the child's peak RSS (without
    the bandwidth measurement's tensor).
  - floor: what a step must read over the read bandwidth, the best of 10 sums of a 0.8 GB float32
    tensor in the same child, measured right before the steps and again right after the scoring
    (both recorded; the floors use the higher bandwidth, the record says so): the table rows the
    pairs use as float32 forward (X V) and backward (X^T G), 2 * E' * F * 4 bytes, and each pair's
    two int32 row indices each way, 2 * P * 2 * 4;
    scoring's floor is one read of both (half). The ratios are the measured time over its floor.
    --repeats R runs every size's child R times (all sizes, then again): "spread" holds each size's
    median, least and greatest ratio over its children.
  - whole (--whole USERS:F,...): prepare.py --synthetic with that many seen users (500 unseen,
    --seen-test-prompts 20) and then train_basis.py --k-list 5 --stop fixed --iters --whole-steps
    --fewshot-iters --whole-steps, each timed as a whole with its peak RSS, its RSS sampled every 30 s
    (where the peak is: loading, the fit or the evaluation) and the least memory the machine had
    available.
Every record states the machine's load (`uptime`'s load averages at its start and end) and
OMP_NUM_THREADS: on a shared machine the bandwidth, and so every ratio, is the load's as much as the code's.
The growth exponent is the least-squares slope of log(step seconds) against log(users), from 10^4 up
(1 = linear). Writes the table as JSON to --out (default: stdout only).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
import utils  # noqa: E402
from lore import steps  # noqa: E402
from lore.fused import vector_floats  # noqa: E402
from lore.methods import per_user_accuracy, simplex  # noqa: E402
from lore.pairs import Pairs  # noqa: E402

PROMPTS_TRAIN, PROMPTS_TEST, RESPONSES, PAIRS = 9402, 1000, 8, 47


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", default="1000,10000,100000,1000000", help="seen users of the step measurement")
    p.add_argument("--features", type=int, default=4096, help="F of the step measurement")
    p.add_argument("--rank", type=int, default=5, help="K")
    p.add_argument("--steps", type=int, default=3, help="timed LoRe steps per size (after one warm-up)")
    p.add_argument("--repeats", type=int, default=1,
                   help="children per size (every size once, then again): the spread of the ratios on a shared machine")
    p.add_argument("--whole", default="1000:4096,10000:4096,100000:2048",
                   help="USERS:F of the whole prepare + train_basis runs ('' for none)")
    p.add_argument("--whole-steps", type=int, default=20, help="--iters and --fewshot-iters of train_basis")
    p.add_argument("--torch-ops", action="store_true", help="the step as torch ops (user_scores), not fused")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)   # users: one step measurement
    return p.parse_args(argv)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9   # Linux: KB


def reset_peak_rss():
    """Peak RSS from now on only (Linux: clear_refs 5 resets the high-water mark to the current RSS),
    so that the bandwidth measurement's 0.8 GB tensor, freed, is not counted in a step's peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


SUMS = 10   # sums of the bandwidth tensor, each time it is measured


def read_bandwidth(sums=SUMS):
    """Bytes per second: the best of `sums` sums of a 0.8 GB float32 tensor (the issue's measure,
    with more tries: on a shared machine one try in five may not get the memory to itself)."""
    x, best = torch.ones(200_000_000), float("inf")
    for _ in range(sums):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


BANDWIDTH_METHOD = (f"the best of {SUMS} sums of a 0.8 GB float32 tensor (torch.sum, the process's threads), "
                    "measured in the step's child right before the first step and again right after the "
                    "scoring; the floors use the higher of the two")


def load():
    """uptime's load averages (1, 5, 15 min) and OMP_NUM_THREADS: the machine a number was measured on."""
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}


def step_child(args):
    """One size of the step measurement, in this (child) process: prints a JSON record."""
    torch.manual_seed(args.seed)
    load_start = load()
    N, F = args.child, args.features
    t = time.perf_counter()
    table = torch.randn(RESPONSES * (PROMPTS_TRAIN + PROMPTS_TEST), F, dtype=torch.bfloat16)  # [E, F]
    chosen = torch.randint(RESPONSES, (N * PAIRS,), dtype=torch.int32)            # [P] int32, as load_data's
    rejected = (chosen + torch.randint(1, RESPONSES, (N * PAIRS,), dtype=torch.int32)) % RESPONSES  # never the chosen
    prompt = torch.randint(PROMPTS_TRAIN, (N * PAIRS,), dtype=torch.int32) * RESPONSES   # [P] the prompt's first row
    chosen += prompt                                                               # rows of the table
    rejected += prompt
    del prompt
    user = torch.arange(N).repeat_interleave(PAIRS)                                # [P]
    pairs = Pairs(user, N, table=table, chosen=chosen, rejected=rejected, checked=True)
    del chosen, rejected
    data_s = time.perf_counter() - t
    model = utils.LoRe(None, 0.0, N, F, args.rank, 1, 0.5, "cpu")
    t = time.perf_counter()
    rows = steps.training_rows(pairs, model.form)
    if args.torch_ops:
        rows.offsets = None   # without its users' offsets, a step is user_scores' torch ops
    fused = steps.fuses(rows, model.V)
    if fused:             # the step as LoRe.fit takes it: its pairs in bands of rows, the fused Adam
        rows = steps.banded(rows, args.rank)
        model.fuse_adam()
    weight = utils.user_mean_weights(pairs, by_user=fused)                         # [N] fused, else [P]
    setup_s = time.perf_counter() - t
    setup_peak = peak_rss_gb()            # the data and the training rows
    bandwidth_before = read_bandwidth()   # right before the steps: the same child, the same minute
    reset_peak_rss()
    times = []
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        model.step(rows, pairs.user, weight)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    with torch.no_grad():   # the fitted weights, as LoRe.fit returns them: no autograd graph
        W = simplex(model.W)                                                       # [N, K]
    simplex_s = time.perf_counter() - t
    scores = []   # as an evaluation scores the fitted weights; timed as the step: the median after one
    for _ in range(args.steps + 1):
        t = time.perf_counter()
        acc = per_user_accuracy(pairs, model.V.detach(), W)
        scores.append(time.perf_counter() - t)
    score_s = float(np.median(scores[1:]))
    peak = max(setup_peak, peak_rss_gb())   # the data, the rows, the model, the steps and the scoring
    bandwidth_after = read_bandwidth()
    bandwidth = max(bandwidth_before, bandwidth_after)
    step_s = float(np.median(times[1:]))
    rows_read = len(rows.X)
    step_floor_s = (2 * rows_read * F * 4 + 2 * len(pairs) * 2 * 4) / bandwidth
    print(json.dumps({"users": N, "pairs": len(pairs), "features": F, "K": args.rank,
                      "form": "table" if rows.chosen is not None else "pairs", "rows_read": rows_read,
                      "fused": fused, "bands": len(rows.offsets) if fused and rows.banded else 1,
                      "data_s": data_s, "setup_s": setup_s, "step_s": step_s,
                      "read_gb_per_s": bandwidth / 1e9, "read_gb_per_s_before": bandwidth_before / 1e9,
                      "read_gb_per_s_after": bandwidth_after / 1e9, "bandwidth_method": BANDWIDTH_METHOD,
                      "step_floor_s": step_floor_s, "step_times_s": times[1:],
                      "step_ratio": step_s / step_floor_s, "score_all_pairs_s": score_s,
                      "score_first_s": scores[0], "score_times_s": scores[1:],
                      "score_floor_s": step_floor_s / 2, "score_ratio": score_s / (step_floor_s / 2),
                      "simplex_s": simplex_s,
                      "mean_accuracy": float(acc.mean()), "peak_rss_gb": peak,
                      "load_start": load_start, "load_end": load()}))


def timed_child(cmd, every=30):
    """Run cmd; -> (wall seconds, its peak RSS in GB, return code, its RSS [[s, GB], ...] sampled every
    `every` seconds, the least memory the machine had available meanwhile in GB, checked each second).
    The output goes to stderr."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    samples, least = [], float("inf")
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now, least = time.perf_counter() - t, min(least, proc_gb("/proc/meminfo", "MemAvailable"))
        if not samples or now - samples[-1][0] >= every:
            samples.append([round(now), proc_gb(f"/proc/{proc.pid}/status", "VmRSS")])
        time.sleep(1)
    return (time.perf_counter() - t, usage.ru_maxrss * 1024 / 1e9, os.waitstatus_to_exitcode(status), samples,
            None if least == float("inf") else least)


def proc_gb(path, key):
    """A kB field of a /proc file (VmRSS of /proc/PID/status, MemAvailable of /proc/meminfo) in GB; None if gone."""
    try:
        with open(path) as f:
            return next(int(line.split()[1]) * 1024 / 1e9 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def step_sizes(args):
    out = []
    for repeat, n in ((r, int(u)) for r in range(args.repeats) for u in args.users.split(",") if u):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", str(n), "--features", str(args.features),
               "--rank", str(args.rank), "--steps", str(args.steps), "--seed", str(args.seed),
               *(["--torch-ops"] if args.torch_ops else [])]
        t = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            out.append({"users": n, "repeat": repeat, "error": f"exit code {proc.returncode}",
                        "wall_s": time.perf_counter() - t})
            print(f"step: {n} users failed ({proc.returncode})", flush=True)
            continue
        out.append({**json.loads(proc.stdout.strip().splitlines()[-1]), "repeat": repeat})
        print("step: " + json.dumps(out[-1]), flush=True)
    return out


def whole_runs(args):
    out = []
    for spec in [s for s in args.whole.split(",") if s]:
        n, F = (int(v) for v in spec.split(":"))
        with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
            data, res = os.path.join(tmp, "data"), os.path.join(tmp, "results")
            record = {"users": n, "features": F, "steps": args.whole_steps, "load_start": load()}
            prep = [sys.executable, os.path.join(REPO, "PersonalLLM", "prepare.py"), "--synthetic", "--out", data,
                    "--features", str(F), "--n-users", str(n), "--seen-test-prompts", "20", "--seed", str(args.seed)]
            train = [sys.executable, os.path.join(REPO, "PersonalLLM", "train_basis.py"), "--data", data, "--out", res,
                     "--k-list", "5", "--stop", "fixed", "--iters", str(args.whole_steps),
                     "--fewshot-iters", str(args.whole_steps), "--device", "cpu", "--seed", str(args.seed)]
            for name, cmd in (("prepare", prep), ("train_basis", train)):
                wall, rss, code, samples, least = timed_child(cmd)
                record.update({f"{name}_s": wall, f"{name}_peak_rss_gb": rss, f"{name}_exit": code,
                               f"{name}_rss_gb_samples": samples, f"{name}_least_available_gb": least})
                if code != 0:
                    break
            record["load_end"] = load()
            if record.get("train_basis_exit") == 0:
                record["records"] = json.load(open(os.path.join(res, "results.json")))
        out.append(record)
        print("whole: " + json.dumps(record), flush=True)
    return out


def growth_exponent(sizes, least=10_000):
    """Slope of log(step_s) against log(users) over the sizes >= least (None with fewer than 2)."""
    pts = [(r["users"], r["step_s"]) for r in sizes if "step_s" in r and r["users"] >= least]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def spread(sizes):
    """Per size, the median, least and greatest step and scoring ratios over its children (--repeats)."""
    out = []
    for n in sorted({r["users"] for r in sizes if "step_s" in r}):
        runs = [r for r in sizes if r["users"] == n and "step_s" in r]
        row = {"users": n, "children": len(runs)}
        for key in ("step_s", "step_ratio", "score_all_pairs_s", "score_ratio", "read_gb_per_s"):
            values = [r[key] for r in runs]
            row.update({f"{key}_median": float(np.median(values)), f"{key}_min": min(values), f"{key}_max": max(values)})
        out.append(row)
    return out


def table(sizes):
    """The step measurement as a printed table."""
    lines = ["| seen users | run | pairs | s / step | floor s | ratio | s to score | floor s | ratio | peak RSS GB | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sizes:
        if "step_s" in r:
            lines.append(f"| {r['users']:,} | {r['repeat']} | {r['pairs']:,} | {r['step_s']:.3f} | {r['step_floor_s']:.3f} | "
                         f"{r['step_ratio']:.1f} | {r['score_all_pairs_s']:.3f} | {r['score_floor_s']:.3f} | "
                         f"{r['score_ratio']:.1f} | {r['peak_rss_gb']:.2f} | {r['load_start']['load_1min']:.1f} |")
    return "\n".join(lines)


def machine():
    """The machine in words: CPU model, the fused kernel's vector width, CPUs, memory, torch."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    width = vector_floats()
    kernel = f"lore.fused's X V in {width}-float vectors" if width else "no fused kernel"
    return f"{model}, {kernel}, {os.cpu_count()} CPUs, {mem:.0f} GiB, torch {torch.__version__}"


def main(args):
    if args.child is not None:
        return step_child(args)
    sizes = step_sizes(args)
    result = {"machine": machine(), "torch_threads": torch.get_num_threads(), "load": load(), "config": vars(args),
              "step": sizes, "spread": spread(sizes), "step_growth_exponent_from_1e4": growth_exponent(sizes),
              "step_growth_exponent_all": growth_exponent(sizes, 0), "whole": whole_runs(args)}
    print(json.dumps({k: v for k, v in result.items() if k != "whole"}, indent=1))
    print(table(sizes))
    for row in result["spread"]:
        print(f"{row['users']:,} users, {row['children']} children: step {row['step_ratio_median']:.2f}x its floor "
              f"({row['step_ratio_min']:.2f}-{row['step_ratio_max']:.2f}), scoring {row['score_ratio_median']:.2f}x "
              f"({row['score_ratio_min']:.2f}-{row['score_ratio_max']:.2f})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main(parse_args())
