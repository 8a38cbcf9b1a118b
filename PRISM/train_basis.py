"""PRISM, step 3: fit each method for K in {0, 1, 5, 10, 15, 20, 25, 50} on the seen users; accuracy of
seen and unseen users on held-out dialogs.

    python PRISM/train_basis.py                            # the paper's recipe on PRISM/data
    python PRISM/train_basis.py --method lore_regularized,pal,vpl --k-list 0,1,5 --iters 2000 --device cuda

Seen users fit the basis on the pairs of their train dialogs and are tested on their test dialogs;
unseen users fit their weights with the basis fixed on the pairs of their train dialogs and are
tested on their test dialogs. lore_regularized (run_regularized's recipe): cosine pull towards v_ref
with alpha = 1e4, 20000 steps at lr 0.5; few-shot 500 steps at lr 0.5. K = 0 is the reward model
itself (v_ref).

Reads what generate-prism-embeddings.py wrote (--data). Writes to --out (default
PRISM/results/train_basis/), as a whole when the run ends:
    results.json, results.csv          per (method, alpha, K): each set's mean accuracy over users and
                                       its std across users (x 0.25)
    accuracy_vs_rank.png               the four sets' accuracies against K, a curve per method
    {method}_K{K}[_alpha{a}].safetensors   every fit: the shared part (V [F, K'] for the LoRe
                                       entries, K' <= K: directions no user weighs are pruned),
                                       W (seen users, in data.json's order), W_unseen
    loss_curves.png                 every fit's training loss; {checkpoint}.fit.json: its curve,
                                    hyperparameters and the convergence flag
    config.json                        the resolved flags
Next: eval_rb2.py --rm-head results/train_basis/lore_regularized_K{K}_alpha10000.safetensors.
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli, results  # noqa: E402
from lore.data import load_data  # noqa: E402
import utils  # noqa: E402

SCRIPT, TITLE = "PRISM/train_basis.py", "PRISM"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_sweep_args(p, FOLDER, "train_basis")   # defaults: the recipe, PRISM/recipe.json
    return p.parse_args(argv)


@cli.command_line
def main(args):
    device = cli.start_run(args)
    # locked and checked before any work; under torchrun, rank 0 writes it
    with cli.rank_run_folder(args, SCRIPT, device=str(device)) as out:
        data = load_data(args.data, device)
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
