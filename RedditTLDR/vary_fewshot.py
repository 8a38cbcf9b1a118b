"""Reddit TLDR, step 3: accuracy of unseen workers against the number of comparisons they give.

    python RedditTLDR/vary_fewshot.py                      # K=5, 20 trials, shots 5,10,...,50
    python RedditTLDR/vary_fewshot.py --method lore,pal,vpl --k-list 3,5 --shots 5,20,50 --trials 5

The workers are those prepare.py split. Each method is fitted on the seen workers (lore: 500 steps,
lr 0.5); then for every shot count, --trials times, `shots` comparisons of each unseen worker are
drawn from its pool of up to 100 (all of them when the pool is smaller), its weights fitted with the
shared part fixed (500 steps, lr 0.1), and the worker tested on all its validation comparisons.

Reads what prepare.py wrote (--data). Writes to --out (default RedditTLDR/results/vary_fewshot/), as
a whole when the run ends:
    results.json, results.csv   per (method, alpha, K, shots): accuracy on the shots (unseen_fewshot)
                                and held-out (unseen_test), with their std over trials
    accuracy_vs_shots.png       held-out accuracy against shots, a curve per method
    config.json                 the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
import utils  # noqa: E402


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__)
    utils.add_sweep_args(p, FOLDER, "vary_fewshot", method="lore", k_list=[5], alpha_list=[0.0], iters=500,
                         lr=0.5, fewshot_iters=500, fewshot_lr=0.1)
    utils.add_shots_args(p, trials=20, shots=list(range(5, 51, 5)))
    return p.parse_args(argv)


@utils.command_line
def main(args):
    return utils.vary_fewshot_main(args, "RedditTLDR/vary_fewshot.py", "Reddit TLDR: unseen workers")


if __name__ == "__main__":
    main(parse_args())
