"""Each dataset's recipe, in one place: {dataset}/recipe.json beside its scripts. Its scripts take
their flags' defaults from it (lore.cli.add_sweep_args, add_shots_args), tools/compare.py its
few-shot pairs, and the tests read it rather than repeat it; a flag still overrides any value.

A recipe holds, per script (train_basis, vary_fewshot): the methods, K list and alpha list, the
LoRe entries' steps and rates (iters, lr, fewshot_iters, fewshot_lr; optionally stop and
fewshot_stop, "fixed" when absent: with "early" the steps are the cap), and the few-shot protocol
(train_basis: fewshot_pairs, the first n pairs of each unseen user's pool, or null for a dataset
whose pools are whole dialogs; vary_fewshot: trials, shots and the shots' unit); and "baselines":
{method: {hyperparameter: value}}, the defaults of the baselines' flags on this dataset (chosen by
tools/compare.py's protocol on its validation users: docs/comparisons.md). "why" says where each
number comes from."""
import os

from lore.checks import InputError
from lore.io import read_json
from lore.stopping import STOPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the project: one folder per dataset
SWEEP_KEYS = ("method", "k_list", "alpha_list", "iters", "lr", "fewshot_iters", "fewshot_lr")
SCRIPT_KEYS = {"train_basis": SWEEP_KEYS + ("fewshot_pairs",),
               "vary_fewshot": SWEEP_KEYS + ("trials", "shots", "unit")}
OPTIONAL_KEYS = ("stop", "fewshot_stop")   # the LoRe entries' stopping (lore.stopping.STOPS), "fixed" if absent


def recipe_path(dataset):
    return os.path.join(ROOT, dataset, "recipe.json")


def load_recipe(dataset):
    """The recipe of `dataset` (a folder name of the project: PersonalLLM, RedditTLDR, PRISM, ...),
    its keys checked -> dict."""
    path = recipe_path(dataset)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no recipe for dataset {dataset!r}")
    recipe = read_json(path)
    if not isinstance(recipe, dict):
        raise InputError(f"{path}: a recipe is a JSON object")
    for script, keys in SCRIPT_KEYS.items():
        section = recipe.get(script)
        missing = [k for k in keys if not isinstance(section, dict) or k not in section]
        if missing:
            raise InputError(f"{path}: {script} lacks {', '.join(missing)}")
        extra = sorted(set(section) - set(keys) - set(OPTIONAL_KEYS))
        if extra:
            raise InputError(f"{path}: {script} has unknown key(s) {extra}; it takes "
                             f"{', '.join(keys + OPTIONAL_KEYS)}")
        for key in OPTIONAL_KEYS:
            if section.get(key, "fixed") not in STOPS:
                raise InputError(f"{path}: {script}.{key} must be one of {', '.join(STOPS)}, got {section[key]!r}")
    baselines = recipe.get("baselines", {})
    if not isinstance(baselines, dict) or not all(isinstance(v, dict) for v in baselines.values()):
        raise InputError(f"{path}: baselines is {{method: {{hyperparameter: value}}}}")
    return recipe
