"""PRISM, step 4: accuracy of unseen users against the number of dialogs they give as shots.

    python PRISM/vary_fewshot.py                           # K=50, alpha=0, shots 1,2,3 dialogs, 1 trial
    python PRISM/vary_fewshot.py --method lore,pal,vpl --k-list 10,50 --shots 1,2,3 --trials 20

Each method is fitted on the seen users' train dialogs (lore, as the original script: 500 steps,
lr 0.5). For every shot count, --trials times, `shots` of each unseen user's train dialogs are drawn
(all of them when the user has fewer), each with all of its pairs (create_dataset_prism_shots), the
user's weights are fitted with the shared part fixed (500 steps, lr 0.1), and the user is tested on
its test dialogs. The users are prepare.py's 80/20 split (docs/datasets.md explains the original's 50/50).

Reads what generate-prism-embeddings.py wrote (--data). Writes to --out (default
PRISM/results/vary_fewshot/), as a whole when the run ends:
    results.json, results.csv   per (method, alpha, K, select, shots): accuracy on the shots
                                (unseen_fewshot) and on the test dialogs (unseen_test), with their
                                std over trials
    accuracy_vs_shots.png       test-dialog accuracy of unseen users against shots, a curve per
                                method; with --select random,active a panel per method and K, both
                                selections in it
    config.json                 the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "PRISM/vary_fewshot.py", "PRISM: unseen users (shots = dialogs)"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "vary_fewshot")   # defaults: the recipe, PRISM/recipe.json
    cli.add_shots_args(p, FOLDER)
    return p.parse_args(argv)


@cli.command_line
def main(args):
    device = cli.start_run(args)
    # locked and checked before any work; under torchrun, rank 0 writes it
    with cli.rank_run_folder(args, SCRIPT, device=str(device)) as out:
        data = load_data(args.data, device)
        cli.check_shots(args.shots, data.sets["unseen_fewshot"])
        records = utils.sweep_shots(methods=args.method, K_list=args.k_list, alpha_list=args.alpha_list,
                                    shots=args.shots, trials=args.trials, v_ref=data.v_ref,
                                    hparams=cli.method_hparams(args), seed=args.seed, select=args.select,
                                    seen_train=data.sets["seen_train"], unseen_fewshot=data.sets["unseen_fewshot"],
                                    unseen_test=data.sets["unseen_test"])
        results.save_results(records, out)
        oracle = results.save_oracle(data, out)
        results.plot_accuracy_vs_shots(records, os.path.join(out, "accuracy_vs_shots.png"), TITLE,
                                       hline=oracle and oracle["unseen_test"])
    return records


if __name__ == "__main__":
    main(parse_args())
