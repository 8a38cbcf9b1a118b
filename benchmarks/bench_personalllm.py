"""Peak memory, wall time and where the time goes in PersonalLLM/train_basis.py at the paper's full scale.

    python benchmarks/bench_personalllm.py                       # the full recipe (1000 steps per K)
    python benchmarks/bench_personalllm.py --iters 20            # flags it does not know go to train_basis.py
    python benchmarks/bench_personalllm.py --device cuda

Writes synthetic data of PersonalLLM's real size with `prepare.py --synthetic` (9402 train + 1000
test prompts x 8 responses, F = 4096, bf16: 680 MB, with 1000 seen + 500 unseen users: 47 000
training pairs, 1.5 M held-out pairs; reused when --data already holds it), then runs train_basis.py
on it in a child process and reports that process's peak resident memory and wall time, the seconds
spent in training loops (lore.steps.training_loop), in input checks (the check functions of utils and lore/, outermost
calls only) and elsewhere, the size of the embeddings file, and what the dense [users, prompts, F]
tensors of the reference code would take.
Prints a table; writes it as JSON to --json (default: bench_personalllm.json beside --out): the
command and "runs", a row of the run (with the machine's load and OMP_NUM_THREADS before and after).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARE = os.path.join(ROOT, "PersonalLLM", "prepare.py")
TRAIN = os.path.join(ROOT, "PersonalLLM", "train_basis.py")
GB = 1e9
# the functions that check inputs: their time, outermost calls only, is "checks"
CHECKS = ("_check_pairs", "first_nonfinite_row", "_check_pairs_table", "_file_digest", "_embeddings_identity",
          "check_v_ref", "check_matrix", "_check_sets")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="/tmp/lore_bench_personalllm/data", help="synthetic data folder")
    p.add_argument("--out", default="/tmp/lore_bench_personalllm/results", help="train_basis.py --out")
    p.add_argument("--json", default=None, help="results file (default: OUT/bench_personalllm.json)")
    p.add_argument("--prompts-train", type=int, default=9402)
    p.add_argument("--prompts-test", type=int, default=1000)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--n-users", type=int, default=1000)
    p.add_argument("--n-unseen", type=int, default=500)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)   # the timed train_basis.py run
    args, train_flags = p.parse_known_args()
    return args, train_flags


def child(timings_path, train_flags):
    """Run train_basis.py's main in this process with the check functions and the training loop
    timed, and write {total, training_loops, checks} seconds to timings_path."""
    sys.path.insert(0, ROOT)
    import importlib.util
    import utils  # noqa: F401  (loads utils and lore's modules, whose functions are timed below)
    spent = {"training_loops": 0.0, "checks": 0.0}
    depth = {"checks": 0}

    def timed(fn, key):
        def wrapper(*a, **k):
            outer = key != "checks" or depth["checks"] == 0
            depth["checks"] += key == "checks"
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth["checks"] -= key == "checks"
                if outer:
                    spent[key] += time.perf_counter() - start
        return wrapper
    # a function is patched in every module that holds it (lore's modules import it by name)
    modules = [m for n, m in sys.modules.items() if n == "utils" or n.startswith("lore.")]
    for name, key in [("training_loop", "training_loops")] + [(name, "checks") for name in CHECKS]:
        original = next(getattr(m, name) for m in modules if hasattr(m, name))
        for m in modules:
            if getattr(m, name, None) is original:
                setattr(m, name, timed(original, key))
    spec = importlib.util.spec_from_file_location("bench_train_basis", TRAIN)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    start = time.perf_counter()
    script.main(script.parse_args(train_flags))
    with open(timings_path, "w") as f:
        json.dump({"total": time.perf_counter() - start, **spent}, f)


def measured(cmd):
    """Run cmd; -> (exit code, wall seconds, peak RSS in bytes) of that very process (wait4 reports
    its own rusage, so earlier children such as prepare.py do not count)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss * 1024  # Linux: KiB


def load():
    """uptime's load averages (1, 5, 15 min) and OMP_NUM_THREADS: the machine a number was measured on."""
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}


def main(args, train_flags):
    if args.child:
        return child(args.child, ["--data", args.data, "--out", args.out, *train_flags])
    size = {"prompts_train": args.prompts_train, "prompts_test": args.prompts_test, "features": args.features,
            "n_users": args.n_users, "n_unseen": args.n_unseen}
    info = os.path.join(args.data, "data.json")
    existing = json.load(open(info)).get("config", {}) if os.path.isfile(info) else {}
    if not existing.get("synthetic") or any(existing.get(k) != v for k, v in size.items()):
        subprocess.run([sys.executable, PREPARE, "--synthetic", "--out", args.data,
                        *[f"--{k.replace('_', '-')}={v}" for k, v in size.items()]], check=True)
    timings_path = os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench_timings.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", timings_path, "--data", args.data,
           "--out", args.out, *train_flags]
    print(" ".join(cmd))
    load_start = load()
    code, wall, peak = measured(cmd)
    if code != 0:
        raise SystemExit(f"train_basis.py exited with {code}")
    with open(timings_path) as f:
        timings = json.load(f)

    embeddings = os.path.getsize(os.path.join(args.data, "embeddings.safetensors"))
    F, S, T = args.features, args.prompts_train, args.prompts_test
    # the reference simulated every user on every prompt: [N, S, F] for seen and unseen users on both splits
    dense = args.n_users * S * F
    dense_all = (args.n_users + args.n_unseen) * (S + T) * F
    run = {
        "train_basis_flags": " ".join(train_flags) or "(defaults)",
        "peak_rss_gb": peak / GB,
        "peak_rss_beyond_embeddings_gb": (peak - embeddings) / GB,
        "wall_s": wall,
        "train_basis_main_s": timings["total"],
        "training_loops_s": timings["training_loops"],
        "outside_training_loops_s": timings["total"] - timings["training_loops"],
        "input_checks_s": timings["checks"],
        "input_checks_pct": 100 * timings["checks"] / timings["total"],
        "embeddings_file_gb": embeddings / GB,
        "dense_shape": [args.n_users, S, F],
        "dense_bf16_gb": 2 * dense / GB,
        "dense_fp32_gb": 4 * dense / GB,
        "reference_four_dense_bf16_gb": 2 * dense_all / GB,
        "load_start": load_start, "load_end": load(),
    }
    for name, value in run.items():
        print(f"{name:<32} {value:.2f}" if isinstance(value, float) else f"{name:<32} {value}")
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(args.out)), "bench_personalllm.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"command": cmd, "cpus": os.cpu_count(), "runs": [run]}, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(*parse_args())
