"""Community Alignment, step 1: every turn's pairs, the annotator split by conversation, the embeddings.

    python CommunityAlignment/prepare.py                 # facebook/community-alignment-dataset, split train
    python CommunityAlignment/prepare.py --data-files train=ca.parquet --lang en,fr   # a local copy (or .csv, .jsonl)
    torchrun --nproc-per-node 8 CommunityAlignment/prepare.py     # the extraction spread over 8 GPUs

A row of the hub's dataset is one conversation of one annotator (a user of LoRe): conversation_id,
annotator_id, assigned_lang and, for t in first, second, third, fourth: {t}_turn_prompt,
{t}_turn_response_{a,b,c,d} and {t}_turn_preferred_response (`response_a` ... `response_d`). A later
turn continues the conversation from the preferred response. Rows whose assigned_lang is not in
--lang (default en; `all` keeps every language) are skipped, with a count.

The pairs of a turn: the conversation so far (each earlier turn's prompt and preferred response) and
the turn's prompt, followed by the preferred response, against the same followed by each other
response: one winner of four gives three pairs and no order among the losers. A turn is read when it
has a prompt and a preferred response with text; the first turn without them ends the conversation
(the turns after it would have no history), counted. Candidates that are empty, hold the literal
`EMPTY STRING`, or repeat the preferred text or an earlier candidate of the turn are dropped, each kind
counted (a duplicate of the winner would be a pair of one text with itself). A conversation left
without a pair is dropped. A malformed row (no conversation_id or annotator_id, a preferred response
that is not one of the four, a conversation_id seen twice, a cell that is not text) is an error naming
it.

The split, made once here with random.Random(--seed), BY CONVERSATION: every turn of a conversation,
and so every sibling pair of a turn, lands on one side. (Split by pair, a turn's other pairs leak into
training: an outside study of LoRe on this dataset measured 0.815 held-out accuracy split by pair and
0.019 below the reward model itself split by turn.)
  1. annotators with fewer than --min-conversations (4) conversations with pairs are dropped, counted:
     each kept one has at least 2 conversations to fit on and 2 to be tested on;
  2. the others, sorted, are shuffled and cut: the first --seen-fraction (0.8, PRISM's) are seen, the
     rest unseen;
  3. each annotator's conversations are shuffled and halved: the first half (rounded down) is train
     (seen_train; for unseen annotators the few-shot pool unseen_fewshot, whole conversations, `draw`
     their order: the first n are a uniform sample of n), the rest test (seen_test, unseen_test).
Each distinct conversation is embedded once; a turn's replies share their history, encoded once.

Writes to --out (default CommunityAlignment/data/) the common data layout (lore.data.write_data_folder):
    embeddings.safetensors   {"embeddings": [E, F]}: one row per distinct conversation
    conversations.parquet    row (of the table), messages, conversation_id (where it first appears)
    pairs.parquet            set, user (the annotator), chosen and rejected (rows of the table), group
                             and conversation_id (shots are drawn by conversation), draw (the
                             conversation's rank in its annotator's train half; -1 in the test sets),
                             turn (0 = first), rejected_response (response_a ... response_d), lang,
                             row (in the source split)
    v_ref.safetensors        {"v_ref": [F, 1]}: the reward model's head
    data.json                the users, the dropped annotators with their conversation counts, the
                             counts of skipped rows, turns and candidates, the resolved flags
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
import pandas as pd  # noqa: E402

SCRIPT = "CommunityAlignment/prepare.py"
HUB_ID = "facebook/community-alignment-dataset"
SPLITS = ("train",)
TURNS = ("first", "second", "third", "fourth")
RESPONSES = ("response_a", "response_b", "response_c", "response_d")
EMPTY_STRING = "EMPTY STRING"   # the literal text some cells of the hub's dataset hold
IDS = ("conversation_id", "annotator_id", "assigned_lang")
COLUMNS = IDS + tuple(f"{t}_turn_{c}" for t in TURNS for c in ("prompt", *RESPONSES, "preferred_response"))
PAIR_COLUMNS = ["set", "user", "chosen", "rejected", "group", "draw", "conversation_id", "turn",
                "rejected_response", "lang", "row"]


def parse_args(argv=None):
    p = cli.ArgumentParser(__doc__)
    cli.add_prepare_args(p, FOLDER)
    p.add_argument("--lang", type=lang_list, default=["en"],
                   help="assigned_lang values to keep, comma-separated, or 'all' (default: en)")
    s = p.add_argument_group("the annotator split (by conversation)")
    s.add_argument("--seed", type=cli.seed_int, default=0, help="seed of the annotator and conversation shuffles")
    s.add_argument("--min-conversations", type=cli.positive_int, default=4,
                   help="annotators with fewer conversations with pairs are dropped (2: one to fit, one to test)")
    s.add_argument("--seen-fraction", type=cli.fraction, default=0.8, help="of the kept annotators, seen")
    args = p.parse_args(argv)
    if args.min_conversations < 2:
        p.error("--min-conversations must be at least 2: a train and a test conversation")
    return args


def lang_list(text):
    langs = [t.strip() for t in text.split(",") if t.strip()]
    if not langs or len(set(langs)) != len(langs) or ("all" in langs and len(langs) > 1):
        raise argparse.ArgumentTypeError(f"expected distinct languages (e.g. en,fr) or 'all', got {text!r}")
    return langs


@cli.command_line
def main(args):
    device = resolve_device(args.device)
    files = [path for _, path in args.data_files or ()]
    # locked, recovered and checked before any work; written as a whole at the end, or not at all
    with cli.run_folder(args, SCRIPT, inputs=files) as out:
        # the head first: a model without one fails before anything is computed
        v_ref = read_reward_head(args.model)                                       # [F, 1]
        data = load_splits(HUB_ID, SPLITS, dict(args.data_files) if args.data_files else None)
        index = {}   # conversation (JSON) -> (row of the table, conversation id)
        pairs, counts = conversation_pairs(data["train"], args.lang, index)
        users, dropped, sets = split(pairs, args)       # a bad split fails before the embedding
        conversations = [json.loads(text) for text in index]
        print(f"{len(pairs)} pairs, {len(index)} distinct conversations to embed")
        cache = cli.cache_path(args, "embeddings.safetensors")   # outlives a failed run: extraction resumes
        table = embed_conversations(conversations, cache, args.model, device=device, batch_tokens=args.batch_tokens)
        if out is None:  # torchrun: the other processes only helped embed
            return
        if v_ref.shape != (table.shape[1], 1):
            raise InputError(f"{args.model}: the head has shape {tuple(v_ref.shape)}, the embeddings F={table.shape[1]}")
        cli.link_into(cache, out)
        write_data_folder(
            out, dataset="CommunityAlignment", users=users, pairs=sets, v_ref=v_ref, config=cli.config_of(args),
            conversations=pd.DataFrame({"row": [row for row, _ in index.values()], "messages": list(index),
                                        "conversation_id": [c for _, c in index.values()]}),
            dropped=dropped, counts=counts)


def text_of(value, where):
    """A cell's text: None for a missing cell (None, NaN: CSV's empty cells), the string otherwise."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return None
    if not isinstance(value, str):
        raise InputError(f"{where} must be text, got {value!r}"[:300])
    return value


def usable(text):
    return text is not None and text.strip() not in ("", EMPTY_STRING)


def conversation_pairs(dataset, langs, index):
    """Rows -> (pair records, counts). Every new conversation (JSON of its messages) gets the next
    row of `index`. The rules are the module's docstring's; errors name the row and the column."""
    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise InputError(f"train split: no column {missing[0]!r} (the hub's schema; it has {dataset.column_names})"[:400])
    df = dataset.select_columns(list(COLUMNS)).to_pandas()
    counts = dict.fromkeys(("rows", "other_language", "conversations", "conversations_without_pairs",
                            "turns", "turns_cut", "empty", "empty_string", "duplicate", "pairs"), 0)
    counts["rows"] = len(df)
    pairs, first_row = [], {}
    for i, row in enumerate(df.itertuples(index=False)):
        row = row._asdict()
        where = f"train split, row {i}"
        ids = {}
        for column in ("conversation_id", "annotator_id"):
            value = row[column]
            if isinstance(value, float) and value.is_integer():   # a CSV column of numbers
                value = int(value)
            if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
                raise InputError(f"{where}: {column!r} must be a non-empty id, got {value!r}")
            ids[column] = str(value)
        lang = text_of(row["assigned_lang"], f"{where}: 'assigned_lang'")
        if langs != ["all"] and lang not in langs:
            counts["other_language"] += 1
            continue
        conversation, annotator = ids["conversation_id"], ids["annotator_id"]
        if conversation in first_row:
            raise InputError(f"{where}: conversation_id {conversation!r} appears twice (rows {first_row[conversation]} "
                             f"and {i}): a row is one whole conversation")
        first_row[conversation] = i
        counts["conversations"] += 1
        found = turn_pairs(row, where, counts)
        if not found:
            counts["conversations_without_pairs"] += 1
        for turn, chosen, rejected, response in found:
            rows = [index.setdefault(json.dumps(c, ensure_ascii=False), (len(index), conversation))[0]
                    for c in (chosen, rejected)]
            pairs.append({"user": annotator, "chosen": rows[0], "rejected": rows[1], "conversation_id": conversation,
                          "turn": turn, "rejected_response": response, "lang": lang, "row": i})
    counts["pairs"] = len(pairs)
    print(f"train: {counts['rows']} rows; {counts['other_language']} of another language than "
          f"{','.join(langs)} skipped; {counts['conversations']} conversations ({counts['conversations_without_pairs']} "
          f"without a pair, dropped), {counts['turns']} turns read, {counts['turns_cut']} not read (from the first "
          f"turn without a prompt or a preferred response with text on); candidates dropped: "
          f"{counts['empty_string']} '{EMPTY_STRING}', "
          f"{counts['empty']} empty, {counts['duplicate']} duplicates; {len(pairs)} pairs")
    if not pairs:
        raise InputError(f"train split: no pairs among its {counts['rows']} rows (language {','.join(langs)})")
    return pairs, counts


def turn_pairs(row, where, counts):
    """-> [(turn, chosen messages, rejected messages, rejected response's name)] of one conversation."""
    history, found = [], []
    for t, name in enumerate(TURNS):
        prompt = text_of(row[f"{name}_turn_prompt"], f"{where}: '{name}_turn_prompt'")
        texts = {r: text_of(row[f"{name}_turn_{r}"], f"{where}: '{name}_turn_{r}'") for r in RESPONSES}
        preferred = text_of(row[f"{name}_turn_preferred_response"], f"{where}: '{name}_turn_preferred_response'")
        if preferred is not None and preferred.strip() and preferred not in RESPONSES:
            raise InputError(f"{where}: '{name}_turn_preferred_response' is {preferred!r}, expected one of "
                             f"{', '.join(RESPONSES)}")
        if not usable(prompt) or not preferred or not usable(texts[preferred]):
            # the turns after this one have no history: counted when they hold anything
            later = [row[f"{n}_turn_prompt"] for n in TURNS[t:]]
            counts["turns_cut"] += sum(usable(text_of(p, where)) for p in later)
            break
        counts["turns"] += 1
        history = history + [{"role": "user", "content": prompt}]
        winner, seen = texts[preferred], {texts[preferred]}
        for r in RESPONSES:
            if r == preferred:
                continue
            text = texts[r]
            if text is None or not text.strip():
                counts["empty"] += 1
            elif text.strip() == EMPTY_STRING:
                counts["empty_string"] += 1
            elif text in seen:
                counts["duplicate"] += 1
            else:
                seen.add(text)
                found.append((t, history + [{"role": "assistant", "content": winner}],
                              history + [{"role": "assistant", "content": text}], r))
        history = history + [{"role": "assistant", "content": winner}]
    return found


def split(pairs, args):
    """The annotator split by conversation (the module's docstring), one generator seeded with --seed.
    -> (users {"seen", "unseen"}, dropped {annotator: conversations}, the four sets as one DataFrame)."""
    rng = random.Random(args.seed)
    pairs = pd.DataFrame(pairs)
    conversations = pairs.groupby("user", sort=False)["conversation_id"].unique()   # in source order
    n = conversations.map(len)
    dropped = {u: int(c) for u, c in n.items() if c < args.min_conversations}
    kept = sorted(u for u, c in n.items() if c >= args.min_conversations)
    rng.shuffle(kept)
    cut = int(len(kept) * args.seen_fraction)
    seen, unseen = kept[:cut], kept[cut:]
    if not seen or not unseen:
        raise InputError(f"{len(seen)} seen and {len(unseen)} unseen annotators: {len(kept)} of {len(n)} annotators have "
                         f"at least --min-conversations {args.min_conversations} conversations with pairs, and "
                         f"--seen-fraction {args.seen_fraction} must leave at least one on each side")
    side = {}   # conversation -> (set, draw)
    for group, names in ((seen, ("seen_train", "seen_test")), (unseen, ("unseen_fewshot", "unseen_test"))):
        for user in group:
            ids = list(conversations[user])
            rng.shuffle(ids)
            half = len(ids) // 2
            side.update({c: (names[0], d) for d, c in enumerate(ids[:half])})
            side.update({c: (names[1], -1) for c in ids[half:]})
    pairs = pairs[pairs["conversation_id"].isin(side)]
    pairs = pairs.assign(set=pairs["conversation_id"].map(lambda c: side[c][0]),
                         draw=pairs["conversation_id"].map(lambda c: side[c][1]), group=pairs["conversation_id"])
    # the sets in SETS' order, each user's pairs together (users in the order of W), train by draw
    order = {u: i for i, u in enumerate(seen + unseen)}
    pairs = pairs.assign(_set=pairs["set"].map(SETS.index), _user=pairs["user"].map(order)).sort_values(
        ["_set", "_user", "draw"], kind="stable").reset_index(drop=True)
    sizes = pairs.groupby("set").size()
    print(f"{len(n)} annotators; dropped {len(dropped)} with fewer than {args.min_conversations} conversations; "
          f"{len(seen)} seen, {len(unseen)} unseen; " + ", ".join(f"{s} {sizes.get(s, 0)} pairs" for s in SETS))
    return {"seen": seen, "unseen": unseen}, dropped, pairs[PAIR_COLUMNS]


if __name__ == "__main__":
    main(parse_args())
