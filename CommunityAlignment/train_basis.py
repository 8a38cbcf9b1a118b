"""Community Alignment, step 2: fit each method for K in {0, 1, 5, 10, 15, 20, 25, 50} on the seen
annotators; accuracy of seen and unseen annotators on their held-out conversations.

    python CommunityAlignment/train_basis.py               # the recipe on CommunityAlignment/data
    python CommunityAlignment/train_basis.py --method lore,pal,vpl --k-list 0,1,5 --iters 2000 --device cuda

The annotators are split by prepare.py, by conversation (see its --help): seen annotators fit the
basis on the pairs of their train conversations and are tested on those of their test conversations;
unseen annotators fit their weights with the basis fixed on their train conversations (all of them, or
the first --fewshot-conversations of their shuffled pool) and are tested on their test conversations.
No conversation, and so no sibling pair of a turn, is on both sides.

The recipe's defaults, and why: Community Alignment is PRISM's kind of data (multi-turn conversations
of real annotators, one preferred reply among several per turn), so the recipe is PRISM's, and the two
datasets' tables read alike: lore_regularized (run_regularized()), the cosine pull towards v_ref with
alpha = 1e4, 20000 steps at lr 0.5, few-shot 500 steps at lr 0.5, and PRISM's K list. The pull matters
here more than anywhere: split by turn, an outside study found LoRe 0.019 below the reward model
itself, and the pull is what keeps every direction near v_ref when the personal signal is weak. K = 0
is the reward model itself (v_ref); K = 1 one shared reward.

Reads what prepare.py wrote (--data). Writes to --out (default CommunityAlignment/results/train_basis/),
as a whole when the run ends:
    results.json, results.csv          per (method, alpha, K): each set's mean accuracy over annotators
                                       and its std across annotators (x 0.25)
    accuracy_vs_rank.png               the four sets' accuracies against K, a curve per method
    {method}_K{K}[_alpha{a}].safetensors   every fit: the shared part, W (seen annotators, in
                                       data.json's order), W_unseen
    loss_curves.png                    every fit's training loss; {checkpoint}.fit.json: its curve,
                                       hyperparameters and the convergence flag
    basis_reports.csv, basis_health.png, {checkpoint}.report.json: every linear fit's health report
    config.json                        the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "CommunityAlignment/train_basis.py", "Community Alignment"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "train_basis")   # defaults: the recipe, CommunityAlignment/recipe.json
    p.add_argument("--fewshot-conversations", type=cli.positive_int, default=None,
                   help="fit each unseen annotator on the first n conversations of its pool (default: all)")
    return p.parse_args(argv)


@cli.command_line
def main(args):
    device = cli.start_run(args)
    # locked and checked before any work; under torchrun, rank 0 writes it
    with cli.rank_run_folder(args, SCRIPT, device=str(device)) as out:
        # draw ranks conversations, so draw < n keeps the first n conversations, whole
        data = load_data(args.data, device, fewshot_pairs=args.fewshot_conversations)
        records = utils.sweep(methods=args.method, K_list=args.k_list, alpha_list=args.alpha_list,
                              v_ref=data.v_ref, hparams=cli.method_hparams(args), out_dir=out, seed=args.seed,
                              **data.sets)
        results.save_results(records, out)
        oracle = results.save_oracle(data, out)
        results.plot_accuracy_vs_rank(records, os.path.join(out, "accuracy_vs_rank.png"), TITLE, hlines=oracle)
        results.save_basis_reports(records, out, TITLE)
        results.save_loss_curves(records, out, TITLE)
    return records


if __name__ == "__main__":
    main(parse_args())
