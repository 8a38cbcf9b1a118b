"""Reddit TLDR, step 1: embed every (post, summary) of the comparisons of both splits; split the workers.

    python RedditTLDR/prepare.py                   # openai/summarize_from_feedback, config comparisons
    python RedditTLDR/prepare.py --data-files train=train.jsonl validation=validation.jsonl
    torchrun --nproc-per-node 8 RedditTLDR/prepare.py     # the extraction spread over 8 GPUs

A row of the hub's `comparisons` config is one worker's judgement of two summaries of a post:
`info` (`id`, `post`, `title`, `subreddit`, ...), `summaries` (2 x {`text`, `policy`, `note`}),
`choice` (the index of the preferred summary) and `worker` (the annotator: a user of LoRe). Rows
whose `info.post` is None are news articles (CNN/DM), not Reddit posts: they are skipped, with a
count in the log. Each summary is embedded as the conversation [user: post, assistant: summary]
rendered with the reward model's chat template; a (post, summary) shown in several comparisons (to
several workers) is one row of the table, embedded once. Both splits are done in one run.

The workers are split once, here (the paper's recipe):
  1. count each worker's train comparisons; drop the --drop-smallest (2) with the fewest (ties: the
     worker met first in the split goes first, the original's stable sort);
  2. the remaining workers that also have validation comparisons, sorted by id, are shuffled with
     random.Random(--split-seed) and cut in half: the first half (rounded down) is seen, the rest
     unseen (the original shuffled a set's order, which changes from one Python process to the next);
  3. with the same generator, visiting the workers by ascending train count (as the original), each
     seen worker draws up to --max-train-pairs (150) of its train comparisons (seen_train), each
     unseen worker a pool of up to --max-fewshot-pairs (100) in random order (unseen_fewshot:
     train_basis.py fits on the first 50 of them, vary_fewshot.py draws its shots from all);
  4. every worker is tested on all of its validation comparisons (seen_test, unseen_test).
Users are numbered in the order of step 3.

Writes to --out (default RedditTLDR/data/) the common data layout (lore.data.DATA_FILES):
    embeddings.safetensors   {"embeddings": [E, F] bf16}: one row per distinct (post, summary)
    conversations.parquet    row (of the table), messages, post_id
    pairs.parquet            set, user (the worker), chosen and rejected (rows of the table), draw,
                             split (its source split), row (index in that split), post_id
    v_ref.safetensors        {"v_ref": [F, 1]}: the reward model's head
    data.json                the users (seen and unseen in the order of the rows of W), the dropped
                             workers with their train counts, the resolved flags
"""
import json
import os
import random
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore.checks import InputError, is_int, resolve_device  # noqa: E402
from lore.cli import (add_prepare_args, ArgumentParser, cache_path, command_line, config_of, link_into,
                      nonnegative_int, positive_int, run_folder, seed_int)  # noqa: E402
from lore.data import write_data_folder  # noqa: E402
from lore.extract import embed_conversations, read_reward_head  # noqa: E402
from lore.io import load_splits  # noqa: E402
import pandas as pd  # noqa: E402

SCRIPT = "RedditTLDR/prepare.py"
HUB_ID = "openai/summarize_from_feedback"
CONFIG = "comparisons"
SPLITS = ("train", "validation")
COLUMNS = ("info", "summaries", "choice", "worker")


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add_prepare_args(p, FOLDER)
    s = p.add_argument_group("the worker split and the draws")
    s.add_argument("--drop-smallest", type=nonnegative_int, default=2,
                   help="how many workers with the fewest train comparisons are dropped")
    s.add_argument("--split-seed", type=seed_int, default=0,
                   help="seed of the worker shuffle and the pair draws")
    s.add_argument("--max-train-pairs", type=positive_int, default=150,
                   help="train comparisons drawn per seen worker")
    s.add_argument("--max-fewshot-pairs", type=positive_int, default=100,
                   help="train comparisons drawn per unseen worker, in random order (the few-shot pool)")
    return p.parse_args(argv)


@command_line
def main(args):
    device = resolve_device(args.device)
    files = [path for _, path in args.data_files or ()]
    # locked, recovered and checked before any work; written as a whole at the end, or not at all
    with run_folder(args, SCRIPT, inputs=files) as out:
        # the head first: a model without one fails before anything is computed
        v_ref = read_reward_head(args.model)                                 # [F, 1]
        data = load_splits(HUB_ID, SPLITS, dict(args.data_files) if args.data_files else None, CONFIG)
        index, pairs = {}, []   # index: (post, summary text) -> (row of the table, post id)
        for split in SPLITS:
            pairs += comparisons(data[split], split, index)
        pairs = pd.DataFrame(pairs)
        users, dropped, sets = draw(pairs, args)       # a bad split fails before the embedding
        conversations = [[{"role": "user", "content": post}, {"role": "assistant", "content": summary}]
                         for post, summary in index]
        print(f"{len(pairs)} comparisons, {len(index)} distinct (post, summary) conversations to embed")
        cache = cache_path(args, "embeddings.safetensors")   # outlives a failed run: extraction resumes
        table = embed_conversations(conversations, cache, args.model, device=device,
                                          batch_tokens=args.batch_tokens)
        if out is None:  # torchrun: the other processes only helped embed
            return
        if v_ref.shape != (table.shape[1], 1):
            raise InputError(f"{args.model}: the head has shape {tuple(v_ref.shape)}, the embeddings "
                                   f"F={table.shape[1]}")
        link_into(cache, out)
        write_data_folder(
            out, dataset="RedditTLDR", users=users, pairs=sets, v_ref=v_ref, config=config_of(args),
            conversations=pd.DataFrame({"row": [row for row, _ in index.values()],
                                        "messages": [json.dumps(c, ensure_ascii=False) for c in conversations],
                                        "post_id": [post_id for _, post_id in index.values()]}),
            dropped=dropped)


def draw(pairs, args):
    """The recipe's worker split and pair draws (one generator for both, seeded with --split-seed).
    -> (users {"seen", "unseen"}, dropped {worker: train count}, the four sets as one DataFrame)."""
    rng = random.Random(args.split_seed)
    train = pairs[pairs["split"] == "train"].sort_values("row", kind="stable")
    validation = pairs[pairs["split"] == "validation"]
    counts = train.groupby("user", sort=False).size()          # workers in order of first appearance
    seen, unseen, dropped = split_workers(counts, set(validation["user"]), args.drop_smallest, rng)
    caps = {**{w: ("seen_train", args.max_train_pairs) for w in seen},
            **{w: ("unseen_fewshot", args.max_fewshot_pairs) for w in unseen}}
    by_worker = dict(tuple(train.groupby("user", sort=False)))
    drawn = []
    for worker in [w for w in counts.sort_values(kind="stable").index if w in caps]:   # the original's order
        name, cap = caps[worker]
        rows = by_worker[worker]
        picked = rng.sample(range(len(rows)), min(len(rows), cap))
        drawn.append(rows.iloc[picked].assign(set=name, draw=range(len(picked))))
    held_out = [validation[validation["user"].isin(group)].assign(set=name, draw=-1)
                for name, group in (("seen_test", seen), ("unseen_test", unseen))]
    sets = pd.concat(drawn + held_out, ignore_index=True)
    columns = ["set", "user", "chosen", "rejected", "draw", "split", "row", "post_id"]
    n = sets.groupby("set").size()
    print(f"{len(counts)} workers with train comparisons; dropped {len(dropped)} with the fewest "
          f"({', '.join(f'{w}: {counts[w]}' for w in dropped) or 'none'}); {len(seen) + len(unseen)} in both "
          f"splits: {len(seen)} seen, {len(unseen)} unseen; drawn {n.get('seen_train', 0)} train pairs (seen), "
          f"{n.get('unseen_fewshot', 0)} few-shot pairs (unseen)")
    return {"seen": seen, "unseen": unseen}, {w: int(counts[w]) for w in dropped}, sets[columns]


def split_workers(counts, validation_workers, drop_smallest, rng):
    """The split rule. counts: train comparisons per worker (a Series, workers in order of first
    appearance); validation_workers: the workers with validation comparisons. Drops the drop_smallest
    smallest (stable sort: ties in order of appearance), keeps the workers in both splits, sorts them,
    shuffles them with rng and halves them. -> (seen, unseen, dropped); seen and unseen by ascending
    train count (ties in order of appearance)."""
    ranked = counts.sort_values(kind="stable").index.tolist()
    dropped, kept = ranked[:drop_smallest], ranked[drop_smallest:]
    common = sorted(w for w in kept if w in validation_workers)
    if len(common) < 2:
        raise InputError(f"{len(common)} workers left in both splits after dropping the {drop_smallest} "
                               f"with the fewest train comparisons (of {len(counts)} workers): need 2, one "
                               f"seen and one unseen (lower --drop-smallest?)")
    rng.shuffle(common)
    half = len(common) // 2
    seen, unseen = set(common[:half]), set(common[half:])
    return [w for w in kept if w in seen], [w for w in kept if w in unseen], dropped


def comparisons(dataset, split, index):
    """Rows of one split -> pair records; every new (post, summary) gets the next row of `index`.
    Rows without a post are skipped and counted; a malformed row is an error naming it."""
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise InputError(f"{split} split: no column {missing[0]!r} (it has {dataset.column_names})")
    df = dataset.select_columns(list(COLUMNS)).to_pandas()
    pairs, skipped, identical = [], 0, 0
    for i, (info, summaries, choice, worker) in enumerate(zip(*(df[c] for c in COLUMNS))):
        if info is not None and not isinstance(info, dict):
            raise InputError(f"{split} split, row {i}: 'info' must be an object with the post's id and text, "
                             f"got {info!r}"[:300])
        post = (info or {}).get("post")
        if post is None:
            skipped += 1
            continue
        post_id = info.get("id")   # a column of pairs.parquet: written only after the whole extraction
        if not isinstance(post, str) or not (post_id is None or isinstance(post_id, str) or is_int(post_id)):
            what, value = ("post", post) if not isinstance(post, str) else ("id", post_id)
            raise InputError(f"{split} split, row {i}: 'info.{what}' must be a "
                             f"{'string' if what == 'post' else 'string or integer'}, got {value!r}"[:300])
        texts = [s.get("text") if isinstance(s, dict) else None for s in
                 (summaries if summaries is not None else [])]
        if len(texts) != 2 or not all(isinstance(t, str) for t in texts):
            raise InputError(f"{split} split, row {i}: 'summaries' must be 2 summaries with a text, "
                                   f"got {summaries if summaries is None else list(summaries)!r}"[:300])
        if choice not in (0, 1):
            raise InputError(f"{split} split, row {i}: 'choice' must be 0 or 1, got {choice!r}")
        choice = int(choice)   # a column with nulls arrives as floats
        if not isinstance(worker, str) or not worker:
            raise InputError(f"{split} split, row {i}: 'worker' must be a non-empty string, "
                                   f"got {worker!r}")
        rows = [index.setdefault((post, t), (len(index), post_id))[0] for t in texts]
        identical += texts[0] == texts[1]
        pairs.append({"split": split, "user": worker, "chosen": rows[choice],
                      "rejected": rows[1 - choice], "post_id": post_id, "row": i})
    if not pairs:
        raise InputError(f"{split} split: none of its {len(df)} rows has a post")
    print(f"{split}: {len(pairs)} comparisons of {len({p['user'] for p in pairs})} workers; skipped {skipped} "
          f"rows without a post (CNN/DM)"
          + (f"; {identical} compare a summary with itself (kept: they count as wrong)" if identical else ""))
    return pairs


if __name__ == "__main__":
    main(parse_args())
