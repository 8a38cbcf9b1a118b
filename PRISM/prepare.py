"""PRISM, step 1: users, dialogs and preference examples of PRISM, and the seeded user / dialog split.

    python PRISM/prepare.py                       # survey.jsonl, conversations.jsonl from the hub
    python PRISM/prepare.py --data-dir ~/prism    # a folder holding those two files

Reads `survey.jsonl` (user_id, num_completed_conversations, ...) and `conversations.jsonl`
(conversation_id, user_id, conversation_history: [{turn, role 'user'|'model', content, if_chosen,
...}]) of HannahRoseKirk/prism-alignment. Roles map 'model' -> 'assistant'.
A dialog's turns are read in order until one lacks its user message or chosen reply (the turns
after it would have no history); a dialog is qualified when one of those turns has a rejected reply.
Users count when survey.jsonl gives them at least one completed conversation; as in the original
code, a user whose dialogs are all unqualified is dropped, while a user without any dialog stays in
the shuffle below (and then fails the > 5 dialogs rule): this keeps the original's random draws.

The split (seed 123, computed once): the users are shuffled, the first 80% are seen, the rest
unseen; of both groups only users with more than 5 dialogs are kept, and each one's dialogs are
shuffled and cut in half: train (the first half, rounded down) and test. The random draws are those
of the original research code (np.random.seed(123), then np.random.shuffle of the users and of each
kept user's dialogs, seen users first), so the split is the paper's.

One example per turn and rejected reply: the conversation so far (user messages, and the chosen
reply of every earlier turn) followed by the chosen reply, and the same history followed by one
rejected reply. Both end in a single assistant message; they differ only in that message.

Writes to --out (default PRISM/data/):
    split.json           seed, seen_users and unseen_users (in shuffled order), each kept user's
                         train and test dialog ids. Reused, not recomputed, when it exists.
    examples.parquet     one row per (turn, rejected reply): split ('train'/'test': the dialog's
                         side), user, user_group ('seen'/'unseen'), dialog, turn (PRISM's turn
                         index), rejected_index (its place among the turn's rejected replies),
                         chosen and rejected (JSON lists of {"role", "content"} messages)
    prepare_config.json  the resolved flags
Next: generate-prism-embeddings.py.
"""
import json
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore.checks import InputError  # noqa: E402
from lore.cli import ArgumentParser, command_line, config_of, run_folder, seed_int  # noqa: E402
from lore.io import hub_reachable, read_json, read_jsonl, write_json, write_table  # noqa: E402
import numpy as np  # noqa: E402

SCRIPT, EMBED_SCRIPT = "PRISM/prepare.py", "PRISM/generate-prism-embeddings.py"
HUB_ID = "HannahRoseKirk/prism-alignment"
FILES = ("survey.jsonl", "conversations.jsonl")
SEEN_FRACTION = 0.8      # of the shuffled users
MIN_DIALOGS = 6          # "more than 5 dialogs"
ROLES = ("user", "model")  # 'model' becomes 'assistant' in the examples


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--data-dir", default=None,
                   help="folder with survey.jsonl and conversations.jsonl (default: download them)")
    p.add_argument("--out", default=os.path.join(FOLDER, "data"), help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=seed_int, default=123, help="seed of the user and dialog split")
    return p.parse_args(argv)


@command_line
def main(args):
    # locked, recovered and checked before any work; written as a whole at the end, or not at all.
    # generate-prism-embeddings.py writes its data folder beside these files: its entries are kept
    with run_folder(args, SCRIPT, keep=(EMBED_SCRIPT,), keep_if=same_examples,
                    inputs=[args.data_dir] if args.data_dir else []) as out:
        paths = locate(args.data_dir)
        users = read_survey(paths["survey.jsonl"])
        dialogs = read_conversations(paths["conversations.jsonl"], users)
        dialogs_of = qualified_dialogs(users, dialogs)
        print(f"{len(dialogs_of)} users and {sum(map(len, dialogs_of.values()))} qualified dialogs")
        # the split of an earlier run into --out is kept (read from there, written here)
        split = load_or_make_split(os.path.join(args.out, "split.json"), dialogs_of, args.seed,
                                   os.path.join(out, "split.json"))
        rows = examples(split, dialogs)
        write_table(os.path.join(out, "examples.parquet"), rows)
        write_json(os.path.join(out, "prepare_config.json"), config_of(args))
    for side in ("train", "test"):
        for group in ("seen", "unseen"):
            n = sum(r["split"] == side and r["user_group"] == group for r in rows)
            print(f"{group} users, {side} dialogs: {n} examples")
    print(f"{args.out}: {len(rows)} examples of {len(split['seen_users'])} seen and "
          f"{len(split['unseen_users'])} unseen users")


def same_examples(staging, out):
    """Whether generate-prism-embeddings.py's files in --out (its data folder) still belong beside the
    new examples: only when they are the examples it was made from, byte for byte. Else they are
    dropped (the folder is written by one prepare as a whole) and the embeddings must be made again."""
    old, new = (os.path.join(folder, "examples.parquet") for folder in (out, staging))
    same = os.path.isfile(old) and open(old, "rb").read() == open(new, "rb").read()
    if not same and os.path.isfile(os.path.join(out, "data.json")):
        print(f"{out}: its data folder (pairs, embeddings, data.json) was made from other examples: dropped; "
              f"run generate-prism-embeddings.py again")
    return same


def locate(data_dir):
    """-> {file name: local path}: the files in --data-dir, or downloaded from the hub (cached)."""
    if data_dir is not None:
        paths = {name: os.path.join(data_dir, name) for name in FILES}
        for path in paths.values():
            if not os.path.isfile(path):
                raise InputError(f"{path}: no such file (--data-dir needs {' and '.join(FILES)})")
        return paths
    from huggingface_hub import hf_hub_download
    offline = not hub_reachable()
    try:
        return {name: hf_hub_download(repo_id=HUB_ID, repo_type="dataset", filename=name,
                                      local_files_only=offline) for name in FILES}
    except Exception as e:  # the hub client raises many types for "not reachable / not cached"
        raise InputError(f"could not download {HUB_ID} ({type(e).__name__}); offline? download "
                               f"{' and '.join(FILES)} and pass their folder with --data-dir DIR") from None


def field(obj, key, kind, where):
    if key not in obj:
        raise InputError(f"{where}: no field {key!r}")
    if not isinstance(obj[key], kind) or isinstance(obj[key], bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise InputError(f"{where}: {key!r} is {obj[key]!r}, expected {names}")
    return obj[key]


def read_survey(path):
    """-> ids of the users with at least one completed conversation, in file order."""
    users = []
    for n, d in read_jsonl(path):
        if field(d, "num_completed_conversations", int, f"{path}:{n}") >= 1:
            users.append(str(field(d, "user_id", (str, int), f"{path}:{n}")))
    print(f"{path}: {len(users)} users with at least one completed conversation")
    return users


def read_conversations(path, users):
    """-> {dialog id: {"user", "turns": [(user message, chosen reply, [rejected replies])]}} of the
    dialogs of `users`, in file order."""
    users, dialogs, others = set(users), {}, 0
    for n, d in read_jsonl(path):
        where = f"{path}:{n}"
        dialog, user = (str(field(d, k, (str, int), where)) for k in ("conversation_id", "user_id"))
        if dialog in dialogs:
            raise InputError(f"{where}: conversation_id {dialog!r} appears twice")
        turns = read_turns(field(d, "conversation_history", list, where), where)
        if user in users:
            dialogs[dialog] = {"user": user, "turns": turns}
        else:
            others += 1
    print(f"{path}: {len(dialogs)} dialogs; {others} dialogs of users without a completed "
          f"conversation in the survey dropped")
    return dialogs


def qualified_dialogs(users, dialogs):
    """-> {user: [qualified dialog ids in file order]}, users in survey order. A dialog qualifies when
    one of its turns has a rejected reply. As in the original, a user is dropped when all of its
    dialogs are dropped, while a survey user without any dialog stays in the shuffle of the split
    (and then fails the > 5 dialogs rule): that keeps the original's random draws."""
    dialogs_of, has_dialogs = {u: [] for u in users}, set()
    for d, dialog in dialogs.items():
        has_dialogs.add(dialog["user"])
        if any(rejected for _, _, rejected in dialog["turns"]):
            dialogs_of[dialog["user"]].append(d)
    unqualified = len(dialogs) - sum(map(len, dialogs_of.values()))
    kept = {u: ds for u, ds in dialogs_of.items() if ds or u not in has_dialogs}
    print(f"dropped {unqualified} unqualified dialogs (no turn with a rejected reply) and "
          f"{len(dialogs_of) - len(kept)} users left without dialogs")
    if not any(kept.values()):
        raise InputError("no qualified dialog of a survey user in conversations.jsonl")
    return kept


def read_turns(history, where):
    """conversation_history -> [(user message, chosen reply, [rejected replies])] for turns 0, 1, ...
    up to the first turn without its user message or chosen reply."""
    turns = {}
    for i, u in enumerate(history):
        at = f"{where}: conversation_history[{i}]"
        if not isinstance(u, dict):
            raise InputError(f"{at} is not an object")
        turn, role = field(u, "turn", int, at), field(u, "role", str, at)
        content = field(u, "content", str, at)
        if role not in ROLES:
            raise InputError(f"{at}: role {role!r}, expected 'user' or 'model'")
        t = turns.setdefault(turn, {"user": [], "chosen": [], "rejected": []})
        if role == "user":
            t["user"].append(content)
        else:
            t["chosen" if field(u, "if_chosen", bool, at) else "rejected"].append(content)
    out = []
    for turn in range(len(turns)):
        t = turns.get(turn)
        if t is None or not t["user"] or not t["chosen"]:
            break
        if len(t["user"]) > 1 or len(set(t["chosen"])) > 1:
            raise InputError(f"{where}: turn {turn} has {len(t['user'])} user messages and "
                                   f"{len(set(t['chosen']))} different chosen replies, expected one of each")
        out.append((t["user"][0], t["chosen"][0], t["rejected"]))
    return out


def load_or_make_split(path, dialogs_of, seed, save_as=None):
    """split.json at path if it exists (checked against the data), else the seeded split; saved as
    save_as (default: path)."""
    save_as = save_as or path
    if os.path.exists(path):
        split = read_json(path)
        print(f"{path} exists: reusing its split (seed {split.get('seed')}); delete it to recompute")
        check_split(path, split, dialogs_of, seed)
        if save_as != path:
            write_json(save_as, split)
        return split
    rng = np.random.RandomState(seed)   # the legacy generator of np.random.seed: the original's draws
    users = np.array(list(dialogs_of))
    rng.shuffle(users)
    cut = int(len(users) * SEEN_FRACTION)
    split = {"seed": seed, "seen_users": [], "unseen_users": [], "dialogs": {}}
    for group, members in (("seen", users[:cut]), ("unseen", users[cut:])):
        for user in members.tolist():
            ids = np.array(dialogs_of[user])
            if len(ids) < MIN_DIALOGS:
                continue
            rng.shuffle(ids)
            half = int(len(ids) * 0.5)
            split[f"{group}_users"].append(user)
            split["dialogs"][user] = {"train": ids[:half].tolist(), "test": ids[half:].tolist()}
    if not split["seen_users"] or not split["unseen_users"]:
        raise InputError(f"{len(split['seen_users'])} seen and {len(split['unseen_users'])} unseen "
                               f"users have more than {MIN_DIALOGS - 1} dialogs: need at least one of each")
    write_json(save_as, split)
    print(f"{path}: new split, seed {seed}")
    return split


def check_split(path, split, dialogs_of, seed):
    if not all(k in split for k in ("seed", "seen_users", "unseen_users", "dialogs")):
        raise InputError(f"{path}: not a split file (needs seed, seen_users, unseen_users, dialogs)")
    if split["seed"] != seed:
        raise InputError(f"{path} was made with seed {split['seed']}, not --seed {seed}; "
                               f"delete it to recompute the split")
    for user in split["seen_users"] + split["unseen_users"]:
        ids = split["dialogs"].get(user, {})
        unknown = set(ids.get("train", []) + ids.get("test", [])) - set(dialogs_of.get(user, []))
        if not ids.get("train") or not ids.get("test") or unknown:
            raise InputError(f"{path}: user {user!r} has no train or test dialogs, or dialogs that are "
                                   f"not its qualified dialogs in the data ({sorted(unknown)[:3]}); "
                                   f"delete it to recompute the split")


def examples(split, dialogs):
    """One record per (turn, rejected reply): train dialogs then test dialogs, seen users then
    unseen, users and dialogs in the split's order."""
    rows = []
    for side in ("train", "test"):
        for group in ("seen", "unseen"):
            for user in split[f"{group}_users"]:
                for dialog in split["dialogs"][user][side]:
                    history = []
                    for turn, (message, chosen, rejected) in enumerate(dialogs[dialog]["turns"]):
                        history.append({"role": "user", "content": message})
                        reply = lambda text: json.dumps(history + [{"role": "assistant", "content": text}],
                                                        ensure_ascii=False)
                        rows += [{"split": side, "user": user, "user_group": group, "dialog": dialog,
                                  "turn": turn, "rejected_index": j, "chosen": reply(chosen),
                                  "rejected": reply(r)} for j, r in enumerate(rejected)]
                        history.append({"role": "assistant", "content": chosen})
    return rows


if __name__ == "__main__":
    main(parse_args())
