"""PRISM, step 4: accuracy of unseen users against the number of dialogs they give as shots.

    python PRISM/vary_fewshot.py                           # K=50, alpha=0, shots 1,2,3 dialogs, 1 trial
    python PRISM/vary_fewshot.py --method lore,pal,vpl --k-list 10,50 --shots 1,2,3 --trials 20

Each method is fitted on the seen users' train dialogs (lore, as the original script: 500 steps,
lr 0.5). For every shot count, --trials times, `shots` of each unseen user's train dialogs are drawn
(all of them when the user has fewer), each with all of its pairs (create_dataset_prism_shots), the
user's weights are fitted with the shared part fixed (500 steps, lr 0.1), and the user is tested on
its test dialogs. The users are prepare.py's 80/20 split (see the README for the original's 50/50).

Reads what generate-prism-embeddings.py wrote (--data). Writes to --out (default
PRISM/results/vary_fewshot/), as a whole when the run ends:
    results.json, results.csv   per (method, alpha, K, shots): accuracy on the shots (unseen_fewshot)
                                and on the test dialogs (unseen_test), with their std over trials
    accuracy_vs_shots.png       test-dialog accuracy of unseen users against shots, a curve per method
    config.json                 the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
import utils  # noqa: E402


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__)
    utils.add_sweep_args(p, FOLDER, "vary_fewshot", method="lore", k_list=[50], alpha_list=[0.0], iters=500,
                         lr=0.5, fewshot_iters=500, fewshot_lr=0.1)
    utils.add_shots_args(p, trials=1, shots=[1, 2, 3], unit="dialogs")
    return p.parse_args(argv)


@utils.command_line
def main(args):
    return utils.vary_fewshot_main(args, "PRISM/vary_fewshot.py", "PRISM: unseen users (shots = dialogs)")


if __name__ == "__main__":
    main(parse_args())
