"""Reddit TLDR, step 3: accuracy of unseen workers against the number of comparisons they give.

    python RedditTLDR/vary_fewshot.py                      # K=5, 20 trials, shots 5,10,...,50
    python RedditTLDR/vary_fewshot.py --method lore,pal,vpl --k-list 3,5 --shots 5,20,50 --trials 5

The workers are those prepare.py split. Each method is fitted on the seen workers (lore: 500 steps,
lr 0.5); then for every shot count, --trials times, `shots` comparisons of each unseen worker are
drawn from its pool of up to 100 (all of them when the pool is smaller), its weights fitted with the
shared part fixed (500 steps, lr 0.1), and the worker tested on all its validation comparisons.

Reads what prepare.py wrote (--data). Writes to --out (default RedditTLDR/results/vary_fewshot/), as
a whole when the run ends:
    results.json, results.csv   per (method, alpha, K, select, shots): accuracy on the shots
                                (unseen_fewshot) and held-out (unseen_test), with their std over trials
    accuracy_vs_shots.png       held-out accuracy against shots, a curve per method; with --select
                                random,active a panel per method and K, both selections in it
    config.json                 the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "RedditTLDR/vary_fewshot.py", "Reddit TLDR: unseen workers"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "vary_fewshot")   # defaults: the recipe, RedditTLDR/recipe.json
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
