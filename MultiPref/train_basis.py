"""MultiPref, step 2: fit each method for K = 0..6 on the seen evaluators; accuracy of seen and unseen
evaluators on the test prompts.

    python MultiPref/train_basis.py                        # the recipe on MultiPref/data
    python MultiPref/train_basis.py --method lore,pal,vpl --k-list 0,1,3 --iters 300 --device cuda

The evaluators are split by prepare.py, by prompt (see its --help): seen evaluators fit the basis on
their pairs of the train prompts and are tested on their pairs of the test prompts; unseen evaluators
fit their weights with the basis fixed on the first --fewshot-pairs (10) prompts of their shuffled
pool (with every pair of those prompts) and are tested on the test prompts. No prompt is on both sides.

The recipe's defaults, and why: MultiPref is Reddit TLDR's kind of data (single-turn comparisons of
two completions, each judged by several workers), so the recipe is TLDR's: lore (run()), K = 0..6,
1000 steps at lr 0.5, few-shot 500 steps at lr 0.1. The few-shot size is 10 prompts rather than TLDR's
50 because a MultiPref evaluator judges far fewer comparisons than a TLDR worker, and prepare.py's
--min-pairs 10 guarantees every unseen evaluator those 10.

Reads what prepare.py wrote (--data). Writes to --out (default MultiPref/results/train_basis/), as a
whole when the run ends:
    results.json, results.csv     per (method, alpha, K): each set's mean accuracy over evaluators and
                                  its std across evaluators (x 0.25)
    accuracy_vs_rank.png          the four sets' accuracies against K, a curve per method
    {method}_K{K}[_alpha{a}].safetensors   every fit: the shared part, W (seen), W_unseen
    loss_curves.png               every fit's training loss; {checkpoint}.fit.json: its curve,
                                  hyperparameters and the convergence flag
    basis_reports.csv, basis_health.png, {checkpoint}.report.json: every linear fit's health report
    config.json                   the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "MultiPref/train_basis.py", "MultiPref"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "train_basis")   # defaults: the recipe, MultiPref/recipe.json
    return p.parse_args(argv)


@cli.command_line
def main(args):
    device = cli.start_run(args)
    # locked and checked before any work; under torchrun, rank 0 writes it
    with cli.rank_run_folder(args, SCRIPT, device=str(device)) as out:
        # draw ranks prompts, so draw < n keeps the first n prompts, whole
        data = load_data(args.data, device, fewshot_pairs=args.fewshot_pairs)
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
