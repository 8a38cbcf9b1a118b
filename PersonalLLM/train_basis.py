"""PersonalLLM, step 2: fit each method for K = 0..5 on the seen users; accuracy of seen and unseen users.

    python PersonalLLM/train_basis.py                      # the recipe on PersonalLLM/data
    python PersonalLLM/train_basis.py --stop fixed --iters 1000          # the paper's fixed 1,000 steps
    python PersonalLLM/train_basis.py --method lore,pal,vpl --k-list 0,1,3 --device cuda

The users and their pairs were drawn by prepare.py (see its --help): seen users fit the basis on
their 47 train pairs (0.5% of the train prompts) and are tested on every test prompt; unseen users
fit their weights with the basis fixed on the first 9 pairs of their few-shot pool (0.1%) and are
tested on every test prompt. lore: run()'s rates (lr 0.5, few-shot 500 steps at lr 0.1), the basis
fit stopped by the stopping rule (lore/stopping.py: a held-out tenth of each seen user's train pairs,
--iters 5000 the cap), not the paper's 1,000 fixed steps, after which its loss still falls
(PersonalLLM/recipe.json says why); PAL and VPL stop by the same rule.

Reads what prepare.py wrote (--data). Writes to --out (default PersonalLLM/results/train_basis/), as
a whole when the run ends:
    results.json, results.csv       per (method, alpha, K): each set's mean accuracy over users and
                                    its std across users (x 0.25)
    accuracy_vs_rank.png            the four sets' accuracies against K, a curve per method
    {method}_K{K}[_alpha{a}].safetensors   every fit: the shared part, W (seen), W_unseen
    oracle.json                     (synthetic data) the accuracies of each user's true linear
                                    reward, dotted in the figure
    loss_curves.png                 every fit's training loss; {checkpoint}.fit.json: its curve,
                                    hyperparameters and the convergence flag
    config.json                     the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "PersonalLLM/train_basis.py", "PersonalLLM"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "train_basis")   # defaults: the recipe, PersonalLLM/recipe.json
    return p.parse_args(argv)


@cli.command_line
def main(args):
    device = cli.start_run(args)
    # locked and checked before any work; under torchrun, rank 0 writes it
    with cli.rank_run_folder(args, SCRIPT, device=str(device)) as out:
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
