"""PersonalLLM, step 4: best-of-N with a personalized reward. For every unseen user and held-out
(test) prompt, pick one of the 8 responses, by the user's reward fitted from a few of its pairs, and
judge the pick by the user's true reward.

    python PersonalLLM/best_of_n.py                        # lore K=5 of train_basis.py, shots 1,2,5,10,20,50
    python PersonalLLM/best_of_n.py --checkpoint PersonalLLM/results/train_basis/lore_K3_alpha0.safetensors \\
        --shots 1,5,20 --trials 3

The pick rules, each scoring the 8 responses of a prompt and taking the best (the first on ties):
    personal     the user's reward with the checkpoint's shared part fixed and the user's weights
                 fitted (the checkpoint's few-shot recipe) on `shots` pairs drawn from its few-shot
                 pool (unseen_fewshot), --trials draws per shot count
    active       as personal, but the `shots` pairs are asked actively (lore.active: in rounds, each
                 user's most informative next pair of its pool), --trials runs (--select)
    basis_mean   the seen users' mean weights on the basis (no personalization; shots 0)
    v_ref        the reference reward model (shots 0)
    random       a uniformly random response: expected values, computed exactly (shots 0)
    oracle       the user's true reward (shots 0): the best response
    true_linear  (synthetic data) the user's true linear reward phi^T U w_true, U the planted reward
                 models of synthetic_truth.safetensors: the true reward without its score noise, the
                 best any reward of the embeddings can do (shots 0)
A user's true reward of response r of prompt s is scores[s, r] . w_true (the 10 reward models'
scores mixed by the user's weights of users.safetensors). Per rule and shots:
    win_rate   the probability that the picked response's true reward beats a uniformly drawn other
               response of the same prompt, ties counting half; averaged over users and prompts
               (0.5 is the random pick, 1 the oracle's when the best response is unique)
    regret     the true reward of the oracle's pick minus the pick's, averaged over users and prompts
               (in the units of the reward models' scores; 0 for the oracle)
and their `_std` over the trials (personal and active only). Everything is vectorized over users
and prompts.

Reads what prepare.py wrote (--data: embeddings, pairs, scores.safetensors, users.safetensors) and a
checkpoint of train_basis.py fitted on it. Writes to --out (default PersonalLLM/results/best_of_n/),
as a whole when the run ends:
    best_of_n.json, best_of_n.csv   one record per (rule, shots): win_rate, regret and their std
    best_of_n.png                   win rate and regret against shots; the other rules as lines
    config.json                     the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore.results import pyplot, save_figure, save_results  # noqa: E402
from lore.active import active_shots, check_active  # noqa: E402
from lore.scoring import score_items  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.cli import (ArgumentParser, command_line, positive_int, run_folder, seed_int, select_list,
                      shot_list, start_run)  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import load_tensors  # noqa: E402
from lore.methods import featurize, load_method  # noqa: E402
import utils  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

SCRIPT = "PersonalLLM/best_of_n.py"


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--data", default=os.path.join(FOLDER, "data"), help="what prepare.py wrote (default: %(default)s)")
    p.add_argument("--checkpoint", default=os.path.join(FOLDER, "results", "train_basis", "lore_K5_alpha0.safetensors"),
                   help="a fit of train_basis.py on --data (default: %(default)s)")
    p.add_argument("--out", default=os.path.join(FOLDER, "results", "best_of_n"),
                   help="output folder, written as a whole when the run ends (default: %(default)s)")
    p.add_argument("--shots", type=shot_list, default=[1, 2, 5, 10, 20, 50],
                   help="pairs per unseen user to fit its weights on, e.g. 1,5,20")
    p.add_argument("--trials", type=positive_int, default=5, help="draws of the shots per shot count")
    p.add_argument("--select", type=select_list, default=["random", "active"],
                   help="the personal rules: random (rule personal) and/or active (rule active) shots")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--allow-other-data", action="store_true",
                   help="use a checkpoint fitted on another data folder than --data (with a warning)")
    return p.parse_args(argv)


@command_line
def main(args):
    device = start_run(args)
    # locked and checked before any work; neither the data nor the checkpoint may be inside --out
    with run_folder(args, SCRIPT, inputs=[args.data, args.checkpoint], device=str(device)) as out:
        data = load_data(args.data, device)
        method, tensors = load_method(args.checkpoint, device, data, args.allow_other_data)
        test_rows, scores, W_true = load_truth(args.data, data)                        # [S*R, F], [S, R, M], [N, M]
        S, R, _ = scores.shape
        pool = featurize(method, data.sets["unseen_fewshot"])
        largest = int(pool.counts().min())
        if max(args.shots) > largest:
            raise InputError(f"--shots {max(args.shots)} is more than the smallest unseen user's pool of "
                                   f"{largest} few-shot pairs; draw a larger pool with prepare.py --pool-frac")
        true = torch.einsum("srm,nm->nsr", scores.double(), W_true.double())           # [N, S, R]
        print(f"{len(W_true)} unseen users x {S} test prompts x {R} responses; {method} from {args.checkpoint}")

        def rewards(U):                                                                # U [n, Q] -> [n, S, R]
            return score_items(method, test_rows, U).reshape(len(U), S, R).double()

        setting = method.setting()                                                     # method, K, alpha
        records = []

        def add(rule, shots, results):
            """results: list of (win_rate [N, S], regret [N, S]), one per trial."""
            win = np.array([w.mean().item() for w, _ in results])
            regret = np.array([r.mean().item() for _, r in results])
            records.append({"rule": rule, "shots": shots, "win_rate": float(win.mean()), "win_rate_std": float(win.std()),
                            "regret": float(regret.mean()), "regret_std": float(regret.std()), "trials": len(results),
                            **setting})

        add("oracle", 0, [pick_quality(true, true)])
        truth_path = os.path.join(args.data, "synthetic_truth.safetensors")
        if os.path.exists(truth_path):   # the ceiling of any linear reward: the true scores without their noise
            U_true = load_tensors(truth_path, ["reward_models"])["reward_models"].to(test_rows.device)  # [F, M]
            linear = torch.cat([t.float() @ U_true for t in test_rows.split(1 << 15)]) @ W_true.T.to(U_true.device)
            add("true_linear", 0, [pick_quality(true, linear.T.reshape(-1, S, R).double().cpu())])   # [N, S, R]
        v_ref = (torch.cat([t.float() @ data.v_ref.to(t.device) for t in test_rows.split(1 << 15)])   # [S*R, 1]
                 .reshape(1, S, R).double().cpu())
        add("v_ref", 0, [pick_quality(true, v_ref)])
        if "W" in tensors:
            add("basis_mean", 0, [pick_quality(true, rewards(tensors["W"].float().mean(0, keepdim=True)))])
        records.append({"rule": "random", "shots": 0, "win_rate": 0.5, "win_rate_std": 0.0,
                        "regret": float((true.max(-1).values - true.mean(-1)).mean()), "regret_std": 0.0,
                        "trials": 1, **setting})
        if "active" in args.select:
            check_active(method)
        for shots in args.shots if "random" in args.select else []:
            results = []
            for _ in range(args.trials):
                U = method.fit_users(utils.sample_shots(pool, shots))                  # [N, Q]
                results.append(pick_quality(true, rewards(U)))
            add("personal", shots, results)
            print(f"  personal, {shots:>3} shots: win rate {records[-1]['win_rate']:.4f}  regret {records[-1]['regret']:.4f}")
        if "active" in args.select:   # one run of max(shots) rounds per trial gives every shot count
            results = {shots: [] for shots in args.shots}
            for _ in range(args.trials):
                for n, _, U in active_shots(method, pool, max(args.shots)):
                    if n in results:
                        results[n].append(pick_quality(true, rewards(U)))
            for shots in args.shots:
                add("active", shots, results[shots])
                print(f"  active,   {shots:>3} shots: win rate {records[-1]['win_rate']:.4f}  regret {records[-1]['regret']:.4f}")

        save_results(records, out, "best_of_n")
        plot(records, os.path.join(out, "best_of_n.png"), f"PersonalLLM best-of-{R}, {method}")
    return records


def load_truth(data_dir, data):
    """-> (the test responses' embeddings [S*R, F] (a view of the table), test scores [S, R, M],
    the unseen users' true weights [N, M] in the order of data.users["unseen"])."""
    path = os.path.join(data_dir, "scores.safetensors")
    scores = load_tensors(path, ["test"])["test"]                            # [S, R, M]
    W_true = load_tensors(os.path.join(data_dir, "users.safetensors"), ["W_unseen"])["W_unseen"]   # [N, M]
    offsets = data.info.get("offsets")
    if offsets is None or "test" not in offsets:
        raise InputError(f"{data_dir}/data.json has no offsets: not a PersonalLLM data folder (rerun prepare.py)")
    S, R, M = scores.shape
    start = offsets["test"]
    if start + S * R > len(data.table):
        raise InputError(f"{path}: {S} test prompts x {R} responses from row {start} do not fit the "
                               f"{len(data.table)} rows of the embeddings (rerun prepare.py)")
    if W_true.shape != (len(data.users["unseen"]), M):
        raise InputError(f"users.safetensors: W_unseen has shape {tuple(W_true.shape)}, expected "
                               f"[{len(data.users['unseen'])} unseen users, {M} reward models]")
    return data.table[start:start + S * R], scores, W_true


def pick_quality(true, pick_scores):
    """Best-of-R picks of a rule judged by the true rewards. true [N, S, R]; pick_scores [N, S, R]
    (or [1, S, R]: one reward for everyone). The pick is the argmax, the first on ties.
    -> (win_rate [N, S]: the share of the R - 1 other responses the pick's true reward beats, ties
    counting half; regret [N, S]: the best true reward minus the pick's)."""
    pick = pick_scores.argmax(-1, keepdim=True).expand(*true.shape[:2], 1)          # [N, S, 1]
    picked = true.gather(-1, pick)                                                 # [N, S, 1]
    beats = (picked > true).sum(-1).double()                                       # [N, S]
    ties = (picked == true).sum(-1).double() - 1                                   # the pick is no rival of itself
    return (beats + 0.5 * ties) / (true.shape[-1] - 1), true.max(-1).values - picked[..., 0]


def plot(records, path, title):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("win_rate", "regret")):
        for i, (rule, label) in enumerate((("personal", "personal (fitted w, random shots)"),
                                           ("active", "active (fitted w, active shots)"))):
            rows = sorted((r for r in records if r["rule"] == rule), key=lambda r: r["shots"])
            if rows:
                ax.errorbar([r["shots"] for r in rows], [r[key] for r in rows], yerr=[r[f"{key}_std"] for r in rows],
                            marker="o", capsize=3, color=f"C{7 + i}", label=label)
        for i, rule in enumerate(("oracle", "true_linear", "basis_mean", "v_ref", "random"), 1):
            for r in (r for r in records if r["rule"] == rule):
                ax.axhline(r[key], ls="--" if rule != "oracle" else ":", color=f"C{i}", label=rule)
        ax.set(xscale="log", xlabel="shots (pairs per unseen user)", ylabel=key.replace("_", " "), title=title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    main(parse_args())
