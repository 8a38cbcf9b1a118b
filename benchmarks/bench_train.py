"""Time one training step of LoRe, LoRe_regularized and PersonalizeBatch at PersonalLLM scale, and
one step of the baselines PAL and VPL on the same data.

    python benchmarks/bench_train.py                    # CPU
    python benchmarks/bench_train.py --device cuda      # GPU (add --deterministic: as the scripts run)

Random data of the paper's PersonalLLM shape: 1000 seen users x 47 pairs and 500 unseen users x 9
pairs, F = 4096, K = 5. Each step is compared with
  - the per-user loop form of the same step (one small matmul per user, as the reference code did);
  - the memory floor of a step: one matrix-vector product each way over the pair matrix
    (X @ v and u @ X), timed in the same run.
Steps run through utils' own training loop (on CUDA: a captured CUDA graph, replayed).

PAL and VPL train by minibatch as their papers do (PAL: batches of 4 pairs, 1 epoch; VPL: batches of
32 targets with 2-8 context pairs each, every pair 4 times per epoch, 2 epochs), so their step is
compared with a LoRe step (one full pass over all pairs) and their recipe's whole fit with LoRe's
(1000 steps); their pairs are rows of an embedding table (bf16, as prepare.py stores it), at the
papers' sizes (PAL: K = 2 prototypes, dim 512; VPL: latent K = 512, hidden 512). New users: PAL's
fit_users (W alone, 20 epochs) and VPL's (encoding, no step), against PersonalizeBatch's 500 steps.
Prints ms/step and both ratios; writes the table as JSON to --out (default: stdout only).
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402
from lore.baselines import PAL, VPL  # noqa: E402
from lore.checks import set_seed  # noqa: E402
from lore.io import write_json  # noqa: E402
from lore.methods import simplex  # noqa: E402
from lore.pairs import pack, Pairs  # noqa: E402
from lore.steps import GRAPH_WARMUP, training_loop  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--pairs", type=int, default=47, help="pairs per seen user")
    p.add_argument("--unseen-users", type=int, default=500)
    p.add_argument("--unseen-pairs", type=int, default=9)
    p.add_argument("--features", type=int, default=4096)
    p.add_argument("--rank", type=int, default=5)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps timed through the real training loop (default: 10 on CPU, "
                        "200 on CUDA, where the loop replays a captured CUDA graph)")
    p.add_argument("--repeats", type=int, default=10, help="repeats of the floor's products")
    p.add_argument("--loop-repeats", type=int, default=3, help="repeats of the (slow) loop forms")
    p.add_argument("--pal-k", type=int, default=2, help="PAL's prototypes (the paper's K)")
    p.add_argument("--vpl-k", type=int, default=512, help="VPL's latent dimension (the paper's)")
    p.add_argument("--baseline-steps", type=int, default=None,
                   help="PAL and VPL steps timed (default: 50 on CPU, 200 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true",
                   help="as the scripts run (lore.checks.set_seed): deterministic CUDA kernels")
    p.add_argument("--out", default=None, help="JSON file for the results")
    return p.parse_args()


def timed(fn, repeats, device):
    """Median wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t))
    return sorted(times)[len(times) // 2]


def timed_loop(step, steps, device):
    """Per-step wall time of the training loop (lore.steps) in ms: (T(base + steps) - T(base)) / steps, so that
    the fixed cost of a loop (on CUDA: eager warm-up steps and the graph capture) is left out."""
    def loop(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        training_loop(n, step, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    base = 2 * GRAPH_WARMUP
    loop(base)                                   # first use: kernels load, allocator warms up
    return 1e3 * (loop(base + steps) - loop(base)) / steps


def loop_lore_step(model, X_list):
    """The reference's LoRe step: a Python loop over users inside the loss."""
    model.optimizer.zero_grad()
    Vw = model.V @ simplex(model.W).T                                        # [F, N]
    nll = sum(-F.logsigmoid(x @ Vw[:, i] / 100).mean() for i, x in enumerate(X_list))
    (nll + model.regularizer()).backward()
    model.optimizer.step()


def loop_regularized_step(model, X_list, weight):
    """The reference's LoRe_regularized step, with the per-user loop instead of [P x N] logits."""
    def nll():
        Vw = model.V @ simplex(model.W).T                                    # [F, N]
        return sum(-F.logsigmoid(x @ Vw[:, i] / 100).sum() * weight for i, x in enumerate(X_list))
    model.optimizer_W.zero_grad()
    nll().backward()
    model.optimizer_W.step()
    model.optimizer_V.zero_grad()
    (nll() + model.regularizer()).backward()
    model.optimizer_V.step()


def loop_personalize_step(model, X_list, V):
    model.optimizer.zero_grad()
    nll = sum(-F.logsigmoid(x @ (V @ simplex(model.w[i])) / 100).mean() for i, x in enumerate(X_list))
    nll.backward()
    model.optimizer.step()


def load():
    """uptime's load averages (1, 5, 15 min) and OMP_NUM_THREADS: the machine a number was measured on."""
    one, five, fifteen = os.getloadavg()
    return {"load_1min": one, "load_5min": five, "load_15min": fifteen,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset")}


def bench_steps(args, device):
    """-> the rows of LoRe's, LoRe_regularized's and PersonalizeBatch's steps (ms, their loop forms',
    their floors'), LoRe's ms/step and PersonalizeBatch's ms a fit (500 steps). The data lives in
    this function only, so that it is freed before the baselines build theirs."""
    steps = args.steps or (200 if device.type == "cuda" else 10)
    Fdim, K = args.features, args.rank
    seen = pack(list(torch.randn(args.users, args.pairs, Fdim)), device=device)
    unseen = pack(list(torch.randn(args.unseen_users, args.unseen_pairs, Fdim)), device=device)
    X, user = seen.rows(), seen.user                                               # [P, F], [P]
    v_ref = torch.randn(Fdim, 1)
    rows = []

    def record(name, step, loop, floor):
        rows.append({"step": name, "ms": step, "loop_ms": loop, "floor_ms": floor,
                     "vs_floor": step / floor, "loop_speedup": loop / step})

    # the memory floor: one read of the pair matrix each way
    v, u = torch.randn(Fdim, device=device), torch.randn(len(X), device=device)
    floor = timed(lambda: X @ v, args.repeats, device) + timed(lambda: u @ X, args.repeats, device)
    floor_unseen = timed(lambda: unseen.X @ v, args.repeats, device) + \
        timed(lambda: torch.randn(len(unseen), device=device) @ unseen.X, args.repeats, device)

    lore = utils.LoRe(v_ref, 0.0, args.users, Fdim, K, 1, 0.5, device)
    weight = utils.user_mean_weights(seen)
    step = timed_loop(lambda: lore.step(X, user, weight), steps, device)
    X_list = seen.split()
    loop = timed(lambda: loop_lore_step(lore, X_list), args.loop_repeats, device)
    record("LoRe", step, loop, floor)

    regularized = utils.LoRe_regularized(v_ref, 1e4, args.users, Fdim, K, 1, 0.5, device)
    pair_weight = utils.pair_mean_weights(seen)
    alpha_t = torch.tensor(1e4, device=device)
    step = timed_loop(lambda: regularized.step(X, user, pair_weight, alpha_t), steps, device)
    loop = timed(lambda: loop_regularized_step(regularized, X_list, pair_weight[0]), args.loop_repeats, device)
    record("LoRe_regularized", step, loop, floor)

    # PersonalizeBatch projects once (V is fixed), so its step is measured together with that
    # projection, amortized over the 500 steps of a fit
    V = torch.randn(Fdim, K, device=device)
    fewshot = utils.PersonalizeBatch(args.unseen_users, Fdim, K, 1, 0.1, device)
    unseen_weight = utils.user_mean_weights(unseen)
    Z = unseen.project(V)
    projection = timed(lambda: unseen.project(V), args.repeats, device)
    step = timed_loop(lambda: fewshot.step(Z, unseen.user, unseen_weight), max(steps, 500), device) + projection / 500
    U_list = unseen.split()
    loop = timed(lambda: loop_personalize_step(fewshot, U_list, V), args.loop_repeats, device)
    record("PersonalizeBatch", step, loop, floor_unseen)
    return rows, rows[0]["ms"], step * 500


def main(args):
    if args.deterministic:
        set_seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    load_start = load()
    rows, lore_ms, fewshot_ms = bench_steps(args, device)
    baselines = bench_baselines(args, device, lore_ms, fewshot_ms)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}, torch {torch.__version__}, deterministic algorithms "
          f"{torch.are_deterministic_algorithms_enabled()}: {args.users} users x {args.pairs} pairs (unseen {args.unseen_users} x "
          f"{args.unseen_pairs}), F={args.features}, K={args.rank}, float32")
    print(f"{'step':<18}{'ms/step':>10}{'loop ms':>10}{'floor ms':>10}{'step/floor':>12}{'loop/step':>11}")
    for r in rows:
        print(f"{r['step']:<18}{r['ms']:>10.3f}{r['loop_ms']:>10.1f}{r['floor_ms']:>10.3f}"
              f"{r['vs_floor']:>12.2f}{r['loop_speedup']:>11.1f}")
    print(f"\nbaselines: ms/step against a LoRe step ({lore_ms:.3f} ms), and the recipe's whole fit against LoRe's "
          f"1000 steps ({1e-3 * 1000 * lore_ms:.1f} s); new users against PersonalizeBatch's 500 steps ({1e-3 * fewshot_ms:.2f} s)")
    print(f"{'step':<18}{'ms/step':>10}{'x LoRe':>8}{'steps/fit':>11}{'fit s':>9}{'x LoRe fit':>12}")
    for r in baselines:
        print(f"{r['step']:<18}{r['ms']:>10.3f}{r['vs_lore_step']:>8.2f}{r['steps_per_fit']:>11}{r['fit_s']:>9.2f}"
              f"{r['vs_lore_fit']:>12.2f}")
    if args.out:
        write_json(args.out, {"device": name, "torch": torch.__version__, "config": vars(args),
                              "load_start": load_start, "load_end": load(), "results": rows,
                              "baselines": baselines})


def timed_steps(step, n, device):
    """Mean wall time in ms of step(i) for i in range(n), after 3 warm-up steps."""
    for i in range(3):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(n):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t) / n


def bench_baselines(args, device, lore_ms, fewshot_ms):
    """PAL and VPL steps on table-form pairs of the same shape: every pair its own two table rows."""
    n = args.baseline_steps or (200 if device.type == "cuda" else 50)
    P, Fdim = args.users * args.pairs, args.features
    table = torch.randn(2 * P, Fdim, dtype=torch.bfloat16, device=device)             # [2P, F]
    user = torch.arange(args.users, device=device).repeat_interleave(args.pairs)        # [P]
    rows_ = torch.arange(P, device=device)
    seen = pack(Pairs(user, args.users, table=table, chosen=2 * rows_, rejected=2 * rows_ + 1))
    Pu = args.unseen_users * args.unseen_pairs
    unseen = pack(Pairs(torch.arange(args.unseen_users, device=device).repeat_interleave(args.unseen_pairs),
                                    args.unseen_users, table=table, chosen=2 * rows_[:Pu], rejected=2 * rows_[:Pu] + 1))
    out = []

    def add(name, setting, ms, steps, fit_s, lore_fit_s, lore_fit):
        out.append({"step": name, "setting": setting, "ms": ms, "vs_lore_step": ms / lore_ms, "steps_per_fit": steps,
                    "fit_s": fit_s, "vs_lore_fit": fit_s / lore_fit_s, "lore_fit": lore_fit})

    pal = PAL(args.pal_k, device=device)
    pal.start(seen)
    batches = torch.randperm(P).to(device).split(pal.hparams["batch_size"])
    ms = timed_steps(lambda i: pal.step(seen, batches[i]), n, device)
    steps = pal.hparams["epochs"] * len(batches)
    add("PAL", f"K = {args.pal_k}, dim {pal.hparams['dim']}, batch {pal.hparams['batch_size']}, "
        f"{pal.hparams['epochs']} epoch", ms, steps, 1e-3 * ms * steps, 1e-3 * 1000 * lore_ms, "LoRe, 1000 steps")
    t = time.perf_counter()
    pal.fit_users(unseen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t
    steps = pal.hparams["fewshot_epochs"] * args.unseen_pairs
    add("PAL fit_users", f"W alone, {pal.hparams['fewshot_epochs']} epochs", 1e3 * fit_s / steps, steps, fit_s,
        1e-3 * fewshot_ms, "PersonalizeBatch, 500 steps")

    vpl = VPL(args.vpl_k, device=device)
    per_epoch = vpl.start(seen)
    target, context = vpl.draw_epoch(seen)
    B = vpl.hparams["batch_size"]
    eps = torch.randn(B, vpl.K).to(device)
    ms = timed_steps(lambda i: vpl.step(seen, target[i * B:(i + 1) * B], context[i * B:(i + 1) * B], eps, i), n, device)
    steps = vpl.hparams["epochs"] * per_epoch
    add("VPL", f"latent {vpl.K}, hidden {vpl.hparams['hidden']}, batch {B}, {vpl.hparams['epochs']} epochs",
        ms, steps, 1e-3 * ms * steps, 1e-3 * 1000 * lore_ms, "LoRe, 1000 steps")
    t = time.perf_counter()
    vpl.fit_users(unseen)
    if device.type == "cuda":
        torch.cuda.synchronize()
    fit_s = time.perf_counter() - t
    add("VPL fit_users", "encoding, no step", 1e3 * fit_s, 1, fit_s, 1e-3 * fewshot_ms, "PersonalizeBatch, 500 steps")
    return out


if __name__ == "__main__":
    main(parse_args())
