"""MultiPref, step 1: every evaluator's judgements as pairs, the evaluator split by prompt, the embeddings.

    python MultiPref/prepare.py                          # allenai/multipref, config default, split train
    python MultiPref/prepare.py --data-files train=multipref.jsonl --workers expert --aspect helpful
    torchrun --nproc-per-node 8 MultiPref/prepare.py     # the extraction spread over 8 GPUs

A row of the hub's dataset is one comparison of two completions of a prompt: comparison_id, prompt_id,
text (the prompt), model_a, completion_a, model_b, completion_b, ..., and normal_worker_annotations /
expert_worker_annotations: lists of {evaluator (a stable pseudonym: a user of LoRe), overall_pref,
helpful_pref, truthful_pref, harmless_pref, ...}, each pref one of A-is-clearly-better,
A-is-slightly-better, Tie, B-is-slightly-better, B-is-clearly-better. (In a CSV file, each list is a
JSON text.) --workers (default normal,expert) picks the lists read; --aspect (default overall) the
judgement: helpful, truthful or harmless instead.

A judgement is a pair: the preferred completion against the other, each embedded as [user: text,
assistant: completion], each distinct (prompt, completion) once. Ties are dropped, counted; the
strength (clearly or slightly) is kept as a column, and --min-strength clearly keeps only the clear
preferences. (The strength is not a pair weight: every method here weighs a user's pairs alike, and a
weight would have to enter LoRe's, PAL's and VPL's losses and the few-shot fits together; see
docs/datasets.md#multipref.) An annotation without a judgement for the aspect (null) is skipped,
counted; a second annotation of one comparison by the same evaluator is dropped, counted. A malformed row (no prompt_id, a completion that is not text,
an annotation without an evaluator, a judgement that is not one of the five) is an error naming it.

The split, made once here with random.Random(--seed), BY PROMPT: the sorted prompt_ids are shuffled and
the first --test-fraction (0.5) become test prompts, for every evaluator, so that no prompt is both
fitted on and tested on (nor its sibling comparisons). Then:
  1. evaluators with fewer than --min-pairs (10) pairs on either side are dropped, counted: each kept
     one can give train_basis.py's 10 few-shot prompts and is tested on at least 10 pairs;
  2. the others, sorted, are shuffled and cut: the first --seen-fraction (0.8) are seen, the rest unseen;
  3. each evaluator's train prompts are shuffled (`draw`: the rank of a prompt, so the first n are a
     uniform sample of n prompts): seen_train, or the unseen evaluators' few-shot pool unseen_fewshot;
     its test pairs are seen_test or unseen_test.

Writes to --out (default MultiPref/data/) the common data layout (lore.data.write_data_folder):
    embeddings.safetensors   {"embeddings": [E, F]}: one row per distinct (prompt, completion)
    conversations.parquet    row (of the table), messages, prompt_id
    pairs.parquet            set, user (the evaluator), chosen and rejected (rows of the table), group
                             and prompt_id (shots are drawn by prompt), draw (-1 in the test sets),
                             strength (clearly / slightly), worker (normal / expert), comparison_id,
                             row (in the source split)
    v_ref.safetensors        {"v_ref": [F, 1]}: the reward model's head
    data.json                the users, the dropped evaluators with their (train, test) pair counts, the
                             counts of ties and skipped annotations, the resolved flags
Next: train_basis.py, vary_fewshot.py.
"""
import argparse
import json
import math
import os
import random
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore import cli  # noqa: E402
from lore.checks import InputError, resolve_device  # noqa: E402
from lore.data import write_data_folder  # noqa: E402
from lore.extract import embed_conversations, read_reward_head  # noqa: E402
from lore.io import load_splits  # noqa: E402
from lore.pairs import SETS  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SCRIPT = "MultiPref/prepare.py"
HUB_ID, CONFIG = "allenai/multipref", "default"
SPLITS = ("train",)
WORKERS = ("normal", "expert")
ASPECTS = ("overall", "helpful", "truthful", "harmless")
# judgement -> (the preferred completion, strength); Tie -> None
PREFS = {"A-is-clearly-better": ("a", "clearly"), "A-is-slightly-better": ("a", "slightly"), "Tie": None,
         "B-is-slightly-better": ("b", "slightly"), "B-is-clearly-better": ("b", "clearly")}
PAIR_COLUMNS = ["set", "user", "chosen", "rejected", "group", "draw", "prompt_id", "strength", "worker",
                "comparison_id", "row"]


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_prepare_args(p, FOLDER)
    p.add_argument("--workers", type=worker_list, default=list(WORKERS),
                   help="annotation lists read, comma-separated (default: normal,expert)")
    p.add_argument("--aspect", choices=ASPECTS, default="overall", help="which judgement makes the pairs")
    p.add_argument("--min-strength", choices=("slightly", "clearly"), default="slightly",
                   help="clearly: keep only the clear preferences (default: both strengths)")
    s = p.add_argument_group("the evaluator split (by prompt)")
    s.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the prompt, evaluator and draw shuffles")
    s.add_argument("--test-fraction", type=fraction_below_one, default=0.5, help="of the prompts, test prompts")
    s.add_argument("--min-pairs", type=cli.positive_int, default=10,
                   help="evaluators with fewer train or fewer test pairs are dropped")
    s.add_argument("--seen-fraction", type=fraction_below_one, default=0.8, help="of the kept evaluators, seen")
    return p.parse_args(argv)


def worker_list(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or len(set(names)) != len(names) or any(n not in WORKERS for n in names):
        raise argparse.ArgumentTypeError(f"expected distinct worker kinds of {', '.join(WORKERS)}, got {text!r}")
    return names


def fraction_below_one(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


@cli.command_line
def main(args):
    device = resolve_device(args.device)
    files = [path for _, path in args.data_files or ()]
    # locked, recovered and checked before any work; written as a whole at the end, or not at all
    with cli.run_folder(args, SCRIPT, inputs=files) as out:
        # the head first: a model without one fails before anything is computed
        v_ref = read_reward_head(args.model)                                       # [F, 1]
        data = load_splits(HUB_ID, SPLITS, dict(args.data_files) if args.data_files else None, CONFIG)
        index = {}   # (prompt, completion) -> (row of the table, prompt_id)
        pairs, counts = judgement_pairs(data["train"], args, index)
        users, dropped, sets = split(pairs, args)       # a bad split fails before the embedding
        conversations = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
                         for prompt, completion in index]
        print(f"{len(pairs)} pairs, {len(index)} distinct (prompt, completion) conversations to embed")
        cache = cli.cache_path(args, "embeddings.safetensors")   # outlives a failed run: extraction resumes
        table = embed_conversations(conversations, cache, args.model, device=device, batch_tokens=args.batch_tokens)
        if out is None:  # torchrun: the other processes only helped embed
            return
        if v_ref.shape != (table.shape[1], 1):
            raise InputError(f"{args.model}: the head has shape {tuple(v_ref.shape)}, the embeddings F={table.shape[1]}")
        cli.link_into(cache, out)
        write_data_folder(
            out, dataset="MultiPref", users=users, pairs=sets, v_ref=v_ref, config=cli.config_of(args),
            conversations=pd.DataFrame({"row": [row for row, _ in index.values()],
                                        "messages": [json.dumps(c, ensure_ascii=False) for c in conversations],
                                        "prompt_id": [p for _, p in index.values()]}),
            dropped=dropped, counts=counts)


def annotations_of(value, where):
    """A cell of an annotation list -> a list of dicts (None: none; a JSON text: CSV's form)."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f"{where} is text that is not a JSON list of annotations: {value[:80]!r}") from None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(a, dict) for a in value):
        raise InputError(f"{where} must be a list of annotation objects, got {value!r}"[:300])
    return value


def judgement_pairs(dataset, args, index):
    """Rows -> (pair records, counts); every new (prompt, completion) gets the next row of `index`."""
    columns = ["comparison_id", "prompt_id", "text", "completion_a", "completion_b",
               *(f"{w}_worker_annotations" for w in args.workers)]
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise InputError(f"train split: no column {missing[0]!r} (the hub's schema; it has {dataset.column_names})"[:400])
    df = dataset.select_columns(columns).to_pandas()
    key = f"{args.aspect}_pref"
    counts = dict.fromkeys(("rows", "annotations", "ties", "no_judgement", "repeated", "slight_dropped",
                            "identical_completions", "pairs"), 0)
    counts["rows"] = len(df)
    pairs = []
    for i, row in enumerate(df.itertuples(index=False)):
        row, where = row._asdict(), f"train split, row {i}"
        ids = {}
        for column in ("comparison_id", "prompt_id"):
            value = row[column]
            if isinstance(value, float) and value.is_integer():   # a CSV column of numbers
                value = int(value)
            if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
                raise InputError(f"{where}: {column!r} must be a non-empty id, got {value!r}")
            ids[column] = str(value)
        for column in ("text", "completion_a", "completion_b"):
            value = row[column]
            if not isinstance(value, str):
                got = "a null cell" if value is None or isinstance(value, float) and math.isnan(value) else repr(value)
                raise InputError(f"{where}: {column!r} must be text, got {got}"[:300])
        if row["completion_a"] == row["completion_b"]:
            counts["identical_completions"] += 1    # kept: such pairs count as wrong, whatever the model
        judged = set()
        for worker in args.workers:
            column = f"{worker}_worker_annotations"
            for k, a in enumerate(annotations_of(row[column], f"{where}: {column!r}")):
                at = f"{where}: {column}[{k}]"
                evaluator = a.get("evaluator")
                if not isinstance(evaluator, str) or not evaluator.strip():
                    raise InputError(f"{at}: 'evaluator' must be a non-empty pseudonym, got {evaluator!r}")
                counts["annotations"] += 1
                pref = a.get(key)
                if pref is None:
                    counts["no_judgement"] += 1
                    continue
                if pref not in PREFS:
                    raise InputError(f"{at}: {key!r} is {pref!r}, expected one of {', '.join(PREFS)}"[:300])
                if evaluator in judged:
                    counts["repeated"] += 1
                    continue
                judged.add(evaluator)
                if PREFS[pref] is None:
                    counts["ties"] += 1
                    continue
                winner, strength = PREFS[pref]
                if strength == "slightly" and args.min_strength == "clearly":
                    counts["slight_dropped"] += 1
                    continue
                rows = {side: index.setdefault((row["text"], row[f"completion_{side}"]),
                                               (len(index), ids["prompt_id"]))[0] for side in "ab"}
                pairs.append({"user": evaluator, "chosen": rows[winner], "rejected": rows["b" if winner == "a" else "a"],
                              "prompt_id": ids["prompt_id"], "strength": strength, "worker": worker,
                              "comparison_id": ids["comparison_id"], "row": i})
    counts["pairs"] = len(pairs)
    slight = f", {counts['slight_dropped']} slight preferences" if args.min_strength == "clearly" else ""
    identical = (f" ({counts['identical_completions']} comparisons of a completion with itself: kept, they count "
                 f"as wrong)" if counts["identical_completions"] else "")
    print(f"train: {counts['rows']} comparisons, {counts['annotations']} {'+'.join(args.workers)} annotations; "
          f"dropped {counts['ties']} ties, {counts['no_judgement']} without a judgement ({key}), "
          f"{counts['repeated']} repeated by their evaluator{slight}; {len(pairs)} pairs{identical}")
    if not pairs:
        raise InputError(f"train split: no {args.aspect} preference (other than ties) among its {counts['rows']} rows")
    return pairs, counts


def split(pairs, args):
    """The evaluator split by prompt (the module's docstring), one generator seeded with --seed.
    -> (users {"seen", "unseen"}, dropped {evaluator: [train, test] pairs}, the four sets as one DataFrame)."""
    rng = random.Random(args.seed)
    pairs = pd.DataFrame(pairs)
    prompts = sorted(pairs["prompt_id"].unique())
    rng.shuffle(prompts)
    test_prompts = set(prompts[:round(len(prompts) * args.test_fraction)])
    pairs = pairs.assign(test=pairs["prompt_id"].isin(test_prompts))
    sizes = pairs.groupby(["user", "test"]).size().unstack(fill_value=0).reindex(columns=[False, True], fill_value=0)
    small = (sizes < args.min_pairs).any(axis=1)
    dropped = {u: [int(sizes.at[u, False]), int(sizes.at[u, True])] for u in sizes.index[small]}
    kept = sorted(sizes.index[~small])
    rng.shuffle(kept)
    cut = int(len(kept) * args.seen_fraction)
    seen, unseen = kept[:cut], kept[cut:]
    if not seen or not unseen:
        raise InputError(f"{len(seen)} seen and {len(unseen)} unseen evaluators: {len(kept)} of {len(sizes)} evaluators "
                         f"have at least --min-pairs {args.min_pairs} train and test pairs (prompts split "
                         f"{len(prompts) - len(test_prompts)} train / {len(test_prompts)} test), and --seen-fraction "
                         f"{args.seen_fraction} must leave at least one on each side")
    draw = {}   # (user, train prompt) -> its rank in the user's shuffled train prompts
    for user in seen + unseen:
        mine = list(dict.fromkeys(pairs.loc[(pairs["user"] == user) & ~pairs["test"], "prompt_id"]))
        rng.shuffle(mine)
        draw.update({(user, p): d for d, p in enumerate(mine)})
    group = {**{u: "seen" for u in seen}, **{u: "unseen" for u in unseen}}
    pairs = pairs[pairs["user"].isin(group)]
    names = {("seen", False): "seen_train", ("seen", True): "seen_test", ("unseen", False): "unseen_fewshot",
             ("unseen", True): "unseen_test"}
    pairs = pairs.assign(set=[names[group[u], t] for u, t in zip(pairs["user"], pairs["test"])],
                         draw=[-1 if t else draw[u, p] for u, p, t in zip(pairs["user"], pairs["prompt_id"], pairs["test"])],
                         group=pairs["prompt_id"])
    # the sets in SETS' order, each user's pairs together (users in the order of W), train by draw
    order = {u: i for i, u in enumerate(seen + unseen)}
    pairs = pairs.assign(_set=pairs["set"].map(SETS.index), _user=pairs["user"].map(order)).sort_values(
        ["_set", "_user", "draw"], kind="stable").reset_index(drop=True)
    n = pairs.groupby("set").size()
    print(f"{len(prompts)} prompts: {len(prompts) - len(test_prompts)} train, {len(test_prompts)} test; "
          f"{len(sizes)} evaluators; dropped {len(dropped)} with fewer than {args.min_pairs} train or test pairs; "
          f"{len(seen)} seen, {len(unseen)} unseen; " + ", ".join(f"{s} {n.get(s, 0)} pairs" for s in SETS))
    return {"seen": seen, "unseen": unseen}, dropped, pairs[PAIR_COLUMNS]


if __name__ == "__main__":
    main(parse_args())
