"""PRISM, step 2: embed the chosen and rejected conversations of every example with the reward model.

    python PRISM/generate-prism-embeddings.py                         # Skywork-Reward-Llama-3.1-8B-v0.2
    python PRISM/generate-prism-embeddings.py --model ~/ckpt --device cuda:1
    torchrun --nproc-per-node 8 PRISM/generate-prism-embeddings.py    # shards spread over 8 GPUs

Reads examples.parquet from --data (what prepare.py wrote). Each distinct conversation is embedded
once: the chosen conversation of a turn is shared by the examples of its rejected replies, and the
conversations of one turn share their history, which the extraction encodes once (utils.
embed_conversations: the final hidden state at the last token of the chat-templated conversation).
An interrupted run resumes where it stopped.

Writes to --out (default: the --data folder) the common data layout (lore.data.DATA_FILES):
    embeddings.safetensors    {"embeddings": [E, F]} one row per distinct conversation
    conversations.parquet     row (of the table), messages
    pairs.parquet             one row per example: set (seen_train, seen_test: the seen users' train
                              and test dialogs; unseen_fewshot, unseen_test: the unseen users'),
                              user, chosen and rejected (rows of the table), group (the dialog:
                              shots are drawn by dialog), dialog, turn, rejected_index
    v_ref.safetensors         {"v_ref": [F, 1]}: the reward model's head (score.weight)
    data.json                 the users in split.json's order, the resolved flags
    split.json                a copy of prepare.py's split, when --out is not --data
Next: train_basis.py, vary_fewshot.py.
"""
import json
import os
import shutil
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore.checks import InputError, resolve_device  # noqa: E402
from lore.cli import (ArgumentParser, cache_path, command_line, config_of, link_into, positive_int,
                      run_folder)  # noqa: E402
from lore.data import write_data_folder  # noqa: E402
from lore.extract import DEFAULT_MODEL, embed_conversations, read_reward_head  # noqa: E402
from lore.io import read_table  # noqa: E402
import pandas as pd  # noqa: E402

SCRIPT, PREPARE_SCRIPT = "PRISM/generate-prism-embeddings.py", "PRISM/prepare.py"
IDS = ["split", "user", "user_group", "dialog", "turn", "rejected_index"]


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--data", default=os.path.join(FOLDER, "data"),
                   help="what prepare.py wrote (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: --data)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="reward model: hub id or local folder")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batch-tokens", type=positive_int, default=16384, help="padded tokens per forward pass")
    return p.parse_args(argv)


def check_same_prepare(args, in_place):
    """Into another --out, a folder already holding a prepare.py's files must hold the same examples as
    --data: else its split and config would sit beside another prepare's pairs and embeddings."""
    theirs = os.path.join(args.out, "examples.parquet")
    ours = os.path.join(args.data, "examples.parquet")
    if not in_place and os.path.isfile(theirs) and os.path.isfile(ours) \
            and open(theirs, "rb").read() != open(ours, "rb").read():
        raise InputError(f"--out {args.out} holds the files of another prepare.py (its examples.parquet is not "
                         f"{ours}): pick another --out, or --out {args.data}")


@command_line
def main(args):
    args.out = args.out or args.data
    in_place = os.path.realpath(args.out) == os.path.realpath(args.data)
    # locked, recovered and checked before any work; written as a whole at the end, or not at all.
    # Into --data itself (the default), prepare.py's files there are kept beside the new ones
    with run_folder(args, SCRIPT, keep=(PREPARE_SCRIPT,), inputs=[] if in_place else [args.data]) as out:
        resolve_device(args.device)                 # a bad --device fails before any work
        check_same_prepare(args, in_place)
        v_ref = read_reward_head(args.model)        # [F, 1]; a model without a valid reward head fails here
        examples = read_table(os.path.join(args.data, "examples.parquet"), IDS + ["chosen", "rejected"])
        if len(examples) == 0:
            raise InputError(f"{os.path.join(args.data, 'examples.parquet')}: no examples")
        # distinct conversations, a turn's chosen conversation next to its rejected ones
        row = {}
        for chosen, rejected in zip(examples["chosen"], examples["rejected"]):
            row.setdefault(chosen, len(row))
            row.setdefault(rejected, len(row))
        conversations = [json.loads(text) for text in row]
        print(f"{len(examples)} examples, {len(conversations)} distinct conversations")
        cache = cache_path(args, "embeddings.safetensors")   # outlives a failed run: extraction resumes
        table = embed_conversations(conversations, cache, args.model, device=args.device,
                                          batch_tokens=args.batch_tokens)   # [E, F]
        if out is None:   # torchrun: the other processes only helped embed
            return
        if v_ref.shape != (table.shape[1], 1):  # checked before any other file is written
            raise InputError(f"{args.model}: the head has shape {tuple(v_ref.shape)}, the embeddings "
                                   f"F={table.shape[1]}")
        link_into(cache, out)
        sets = {("seen", "train"): "seen_train", ("seen", "test"): "seen_test",
                ("unseen", "train"): "unseen_fewshot", ("unseen", "test"): "unseen_test"}
        pairs = examples[IDS].assign(
            set=[sets[key] for key in zip(examples["user_group"], examples["split"])],
            chosen=examples["chosen"].map(row), rejected=examples["rejected"].map(row), group=examples["dialog"])
        users = {g: examples.loc[examples["user_group"] == g, "user"].unique().tolist() for g in ("seen", "unseen")}
        for g, ids in users.items():
            if not ids:
                raise InputError(f"{os.path.join(args.data, 'examples.parquet')}: no {g} users")
        split = os.path.join(args.data, "split.json")
        if not in_place and os.path.exists(split):
            shutil.copyfile(split, os.path.join(out, "split.json"))
        write_data_folder(
            out, dataset="PRISM", users=users, v_ref=v_ref, config=config_of(args),
            pairs=pairs[["set", "user", "chosen", "rejected", "group", "dialog", "turn", "rejected_index"]],
            conversations=pd.DataFrame({"row": range(len(row)), "messages": list(row)}))
    print(f"{args.out}: {len(pairs)} pairs over {table.shape[0]} embeddings of F={table.shape[1]}")


if __name__ == "__main__":
    main(parse_args())
