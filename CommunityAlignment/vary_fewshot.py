"""Community Alignment, step 3: accuracy of unseen annotators against the number of conversations
they give as shots.

    python CommunityAlignment/vary_fewshot.py              # lore_regularized K=10, shots 1,2,3 conversations, 5 trials
    python CommunityAlignment/vary_fewshot.py --method lore,pal,vpl --k-list 5,10 --shots 1,2 --trials 20

Each method is fitted on the seen annotators' train conversations (train_basis.py's recipe:
lore_regularized, alpha = 1e4, 20000 steps at lr 0.5). For every shot count, --trials times, `shots`
of each unseen annotator's train conversations are drawn (all of them when it has fewer), each with
every pair of every turn: a shot is a whole conversation, never some of its sibling pairs. The
annotator's weights are fitted with the shared part fixed (500 steps, lr 0.5) and it is tested on its
test conversations.

The defaults, and why: K = 10, a middle rank of train_basis.py's list (50 is PRISM's paper-scale rank,
too many directions for 1-3 conversations' weights); shots 1, 2, 3 as PRISM's, since prepare.py's
--min-conversations 4 gives every unseen annotator a pool of at least 2 conversations; 5 trials, each a
refit of every unseen annotator from new draws.

Reads what prepare.py wrote (--data). Writes to --out (default
CommunityAlignment/results/vary_fewshot/), as a whole when the run ends:
    results.json, results.csv   per (method, alpha, K, select, shots): accuracy on the shots
                                (unseen_fewshot) and on the test conversations (unseen_test), with
                                their std over trials
    accuracy_vs_shots.png       test accuracy of unseen annotators against shots, a curve per method;
                                with --select random,active a panel per method and K
    config.json                 the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "CommunityAlignment/vary_fewshot.py", "Community Alignment: unseen annotators (shots = conversations)"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "vary_fewshot")   # defaults: the recipe, CommunityAlignment/recipe.json
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
