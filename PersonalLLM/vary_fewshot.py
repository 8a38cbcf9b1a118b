"""PersonalLLM, step 3: accuracy of unseen users against the number of preference pairs they give.

    python PersonalLLM/vary_fewshot.py                     # K=5, 20 trials, shots 1,2,5,10,20,50
    python PersonalLLM/vary_fewshot.py --method lore,pal,vpl --k-list 3,5 --shots 1,5,20 --trials 5
    python PersonalLLM/vary_fewshot.py --method lore,pca --select random,active --candidates all

Each method is fitted on the seen users (lore: lr 0.5, stopped by the stopping rule, 5000 steps the
cap; --stop fixed --iters 500 is the original script's 500 steps); each unseen user has the pool of
few-shot pairs prepare.py drew (1% of the train prompts: 94 of 9402), and for every shot count,
--trials times, `shots` pairs are drawn from the pool, the user's weights fitted with the shared part
fixed, and the user tested on every test prompt. --select active asks the shots actively instead
(lore.active: each round, each user's most informative next pair). --candidates all offers every
pair of the 8 responses of the user's pool prompts (28 per prompt), answered by the user's true
mixture of the 10 reward models (users.safetensors, scores.safetensors), to either selection,
instead of the pool's drawn best-vs-worst pairs.

Reads what prepare.py wrote (--data). Writes to --out (default PersonalLLM/results/vary_fewshot/), as
a whole when the run ends:
    results.json, results.csv   per (method, alpha, K, select, shots): accuracy on the shots
                                (unseen_fewshot) and held-out (unseen_test), with their std over trials
    accuracy_vs_shots.png       held-out accuracy against shots, a curve per method, the oracle
                                dotted (synthetic data); with --select random,active a panel per
                                method and K, both selections in it
    oracle.json                 (synthetic data) the accuracies of the true rewards
    config.json                 the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.io import load_tensors  # noqa: E402
import torch  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "PersonalLLM/vary_fewshot.py", "PersonalLLM: unseen users"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "vary_fewshot")   # defaults: the recipe, PersonalLLM/recipe.json
    cli.add_shots_args(p, FOLDER)
    p.add_argument("--candidates", choices=("pool", "all"), default="pool",
                   help="the pairs a user can be asked: its pool (the paper's) or every pair of its pool prompts")
    return p.parse_args(argv)


@cli.command_line
def main(args):
    device = cli.start_run(args)
    # locked and checked before any work; under torchrun, rank 0 writes it
    with cli.rank_run_folder(args, SCRIPT, device=str(device)) as out:
        data = load_data(args.data, device)
        pool = data.sets["unseen_fewshot"] if args.candidates == "pool" else every_pair_of_pool_prompts(data)
        cli.check_shots(args.shots, pool)
        records = utils.sweep_shots(methods=args.method, K_list=args.k_list, alpha_list=args.alpha_list,
                                    shots=args.shots, trials=args.trials, v_ref=data.v_ref,
                                    hparams=cli.method_hparams(args), seed=args.seed, select=args.select,
                                    seen_train=data.sets["seen_train"], unseen_fewshot=pool,
                                    unseen_test=data.sets["unseen_test"])
        results.save_results(records, out)
        oracle = results.save_oracle(data, out)
        results.plot_accuracy_vs_shots(records, os.path.join(out, "accuracy_vs_shots.png"), TITLE,
                                       hline=oracle and oracle["unseen_test"])
    return records


def every_pair_of_pool_prompts(data):
    """--candidates all: every pair of responses of the unseen users' pool prompts, answered by
    their true mixtures of the reward models' scores (utils.every_pair)."""
    scores = load_tensors(os.path.join(data.folder, "scores.safetensors"), ["train", "test"])   # [S, R, M]
    W = load_tensors(os.path.join(data.folder, "users.safetensors"), ["W_unseen"])["W_unseen"]  # [N, M]
    R = scores["train"].shape[1]
    if data.info.get("offsets") != {"train": 0, "test": R * len(scores["train"])} or \
            R * (len(scores["train"]) + len(scores["test"])) != len(data.table):
        raise InputError(f"{data.folder}: scores.safetensors does not match the embeddings' rows (offsets "
                               f"{data.info.get('offsets')}): not a PersonalLLM data folder, rerun prepare.py")
    if W.shape[0] != len(data.users["unseen"]):
        raise InputError(f"{data.folder}/users.safetensors: W_unseen has {W.shape[0]} users, the data "
                               f"{len(data.users['unseen'])}: rerun prepare.py")
    row_scores = torch.cat([scores["train"], scores["test"]]).reshape(len(data.table), -1)  # [E, M]
    pool = utils.every_pair(data.sets["unseen_fewshot"], R, row_scores, W)
    print(f"--candidates all: {len(pool)} pairs, {len(pool) // pool.n_users} per unseen user on average")
    return pool


if __name__ == "__main__":
    main(parse_args())
