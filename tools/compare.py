"""Compare methods as a reviewer would trust: validation users carved out of the seen side, the same
search budget for every method, selection by validation accuracy alone, refits with several seeds,
CIs over users and seeds (a two-way random-effects t interval), paired differences and the
personalization gain.

    python tools/compare.py --data PersonalLLM/data --method lore,pal,vpl --budget 4 --seeds 5 --out PersonalLLM/results/compare
    python tools/compare.py --data RedditTLDR/data --method lore,pal,vpl --budget 8 --seeds 3 --device cuda

The protocol (lore/compare.py; docs/comparisons.md): a --validation fraction of the seen users,
drawn with --seed, play the unseen role (the shared part is fitted without them; they are fitted
from a few-shot-like draw of their own train pairs and scored on the rest). Each method in --method
draws --budget configurations of its declared search_space, each fitted once, and the best on
validation accuracy is selected; nothing in the search reads seen_test or unseen_test. The selected
configuration, lore's K = 0 (row `reference`, the reward model itself) and lore's K = 1 (row `bt`,
one shared Bradley-Terry reward) are then fitted on all seen users with --seeds seeds and scored on
seen_test and unseen_test.

Reads a prepared data folder (--data; --fewshot-pairs as the dataset's train_basis.py: PersonalLLM 9,
RedditTLDR 50, PRISM and CommunityAlignment all, MultiPref 10 prompts). Writes to --out (default:
results/compare beside --data), as a whole when the run ends:
    comparison.json   {"methods": [rows: method, selected, validation, seen_test, seen_test_ci,
                      unseen_test, unseen_test_ci, converged], "paired": [a - b per set: mean, ci],
                      "personalization_gain": {method, vs "bt", per set mean, ci, verdict},
                      "basis_stability": {row: principal angles between seeds' bases}, "search":
                      {method: every configuration tried, its validation accuracy and loss curve},
                      "fits": {row: every refit's loss curve}, ...}
    comparison.csv    the rows, flat
    comparison.md     the rows as a Markdown table, the gain and its verdict
    comparison.png    seen_test and unseen_test per row with their 95% CIs as error bars
    loss_curves.png   the loss curve of every refit
    config.json       the resolved flags
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lore import cli, compare, results  # noqa: E402
from lore.data import load_data, read_data_info  # noqa: E402
from lore.io import write_json  # noqa: E402
from lore.recipes import load_recipe, recipe_path  # noqa: E402

SCRIPT = "tools/compare.py"


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    p.add_argument("--data", required=True, help="a prepared data folder")
    p.add_argument("--method", type=cli.method_list, default=["lore", "pal", "vpl"],
                   help="methods to search and compare (default: %(default)s)")
    p.add_argument("--budget", type=cli.positive_int, default=4, help="configurations tried per method")
    p.add_argument("--seeds", type=cli.positive_int, default=5,
                   help="refits of each selected configuration (default: %(default)s; the CIs' seed term has "
                        "seeds - 1 degrees of freedom, so fewer seeds give wide, honest intervals)")
    p.add_argument("--validation", type=cli.fraction, default=compare.VALIDATION_FRACTION,
                   help="fraction of the seen users held out for validation (default: %(default)s)")
    p.add_argument("--fewshot-pairs", type=cli.positive_int, default=None,
                   help="unseen users' few-shot pairs (default: the dataset's train_basis.py recipe)")
    p.add_argument("--out", default=None, help="output folder (default: results/compare beside --data)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the validation users, the draws and the fits")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(args.data)), "results", "compare")
    return args


@cli.command_line
def main(args):
    device = cli.start_run(args)
    with cli.run_folder(args, SCRIPT, device=str(device)) as out:   # locked and checked before any work
        info = read_data_info(args.data)   # checked as load_data checks it: the dataset's name picks the recipe
        fewshot = args.fewshot_pairs if args.fewshot_pairs is not None else recipe_fewshot_pairs(info["dataset"])
        data = load_data(args.data, device, fewshot_pairs=fewshot)
        result = compare.compare(data.sets, data.v_ref, args.method, args.budget, args.seeds, args.seed, device,
                                 args.validation)
        result["data"] = {"folder": os.path.abspath(args.data), "dataset": data.info["dataset"], "fewshot_pairs": fewshot}
        write_json(os.path.join(out, "comparison.json"), result)
        results.save_comparison(result, out, f"{data.info['dataset']}: budget {args.budget}, {args.seeds} seeds")
    return result


def recipe_fewshot_pairs(dataset):
    """The dataset's train_basis recipe's few-shot pairs (None: whole pools, or a dataset without a recipe)."""
    if not isinstance(dataset, str) or not os.path.isfile(recipe_path(dataset)):
        return None
    return load_recipe(dataset)["train_basis"]["fewshot_pairs"]


if __name__ == "__main__":
    main(parse_args())
