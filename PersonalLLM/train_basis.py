"""PersonalLLM, step 2: fit each method for K = 0..5 on the seen users; accuracy of seen and unseen users.

    python PersonalLLM/train_basis.py                      # the paper's recipe on PersonalLLM/data
    python PersonalLLM/train_basis.py --method lore,pal,vpl --k-list 0,1,3 --iters 200 --device cuda

The users and their pairs were drawn by prepare.py (see its --help): seen users fit the basis on
their 47 train pairs (0.5% of the train prompts) and are tested on every test prompt; unseen users
fit their weights with the basis fixed on the first 9 pairs of their few-shot pool (0.1%) and are
tested on every test prompt. lore: run()'s recipe, 1000 steps at lr 0.5, few-shot 500 at lr 0.1.

Reads what prepare.py wrote (--data). Writes to --out (default PersonalLLM/results/train_basis/), as
a whole when the run ends:
    results.json, results.csv       per (method, alpha, K): each set's mean accuracy over users and
                                    its std across users (x 0.25)
    accuracy_vs_rank.png            the four sets' accuracies against K, a curve per method
    {method}_K{K}[_alpha{a}].safetensors   every fit: the shared part, W (seen), W_unseen
    oracle.json                     (synthetic data) the accuracies of each user's true linear
                                    reward, dotted in the figure
    config.json                     the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
import utils  # noqa: E402


def parse_args(argv=None):
    p = utils.ArgumentParser(__doc__)
    utils.add_sweep_args(p, FOLDER, "train_basis", method="lore", k_list=[0, 1, 2, 3, 4, 5], alpha_list=[0.0],
                         iters=1000, lr=0.5, fewshot_iters=500, fewshot_lr=0.1)
    p.add_argument("--fewshot-pairs", type=utils.positive_int, default=9,
                   help="the first n pairs of each unseen user's few-shot pool it fits on (0.1%% of 9402 prompts)")
    return p.parse_args(argv)


@utils.command_line
def main(args):
    return utils.train_basis_main(args, "PersonalLLM/train_basis.py", "PersonalLLM")


if __name__ == "__main__":
    main(parse_args())
