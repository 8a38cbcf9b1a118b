"""Personalized scoring with a saved basis: fit new users' weights from a few of their preferences,
then score candidate responses for each of them.

    python tools/personalize.py --checkpoint PersonalLLM/results/train_basis/lore_K5_alpha0.safetensors \\
        --model Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --prefs prefs.jsonl --candidates cands.jsonl --out personal/

Input files (JSON Lines, one object per line; messages = [{"role": "user"|"assistant", "content": "..."}, ...]):
    --prefs       {"user": "alice", "chosen": messages, "rejected": messages}: one preference of a user
                  (a user's lines need not be adjacent; every user needs at least one)
    --candidates  {"id": "c1", "messages": messages}: a conversation to score for every user
                  (optional: without it only the weights are fitted)

Every conversation is embedded with --model, which must be the reward model the checkpoint's data
was embedded with (lore.extract.embed_conversations: the final hidden state at the last token of the
chat-templated conversation). The users' weights are fitted all at once with the checkpoint's
shared part fixed (lore.scoring.fit_new_users: for LoRe, PersonalizeBatch with the checkpoint's few-shot
steps and rate), and user u's score of candidate c is its reward phi(c)^T V w_u
(lore.scoring.score_items).

Writes to --out, as a whole when the run ends:
    scores.csv               one row per (user, candidate): user, candidate, score, rank (1 = the
                             user's best candidate)
    weights.safetensors      {"W": [N, K]} the users' weights, rows in the order of
                             metadata "users" (JSON list: the users in order of first appearance)
    weights.csv              the same, readable: user, w_0 ... w_{K-1}
    embeddings.safetensors   {"embeddings": [2P + C, F]}: the P chosen, the P rejected, then the C
                             candidate conversations, in file order
    config.json              the resolved flags
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lore.scoring import fit_new_users, score_items  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.cli import ArgumentParser, command_line, positive_int, run_folder, seed_int, start_run  # noqa: E402
from lore.extract import DEFAULT_MODEL, embed_conversations, model_features  # noqa: E402
from lore.io import read_jsonl, save_tensors, write_table  # noqa: E402
from lore.methods import load_method, method_features  # noqa: E402
import torch  # noqa: E402

SCRIPT = "tools/personalize.py"


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--checkpoint", required=True, help="{method}_K{K}[_alpha{a}].safetensors of a train_basis.py")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the reward model: hub id or local folder")
    p.add_argument("--prefs", required=True, help="JSONL: {user, chosen, rejected} per line")
    p.add_argument("--candidates", default=None, help="JSONL: {id, messages} per line")
    p.add_argument("--out", required=True, help="output folder, written as a whole when the run ends")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--batch-tokens", type=positive_int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the weights' random start")
    return p.parse_args(argv)


@command_line
def main(args):
    device = start_run(args)
    # locked and checked before any work; no input may be inside --out (it would be replaced)
    inputs = [p for p in (args.checkpoint, args.prefs, args.candidates, args.model) if p and os.path.exists(p)]
    with run_folder(args, SCRIPT, inputs=inputs, device=str(device)) as out:
        method, _ = load_method(args.checkpoint, device)
        prefs = read_records(args.prefs, {"user": str, "chosen": list, "rejected": list})
        candidates = read_records(args.candidates, {"id": str, "messages": list}) if args.candidates else []
        users = list(dict.fromkeys(p["user"] for p in prefs))                      # first appearance order
        index = {u: i for i, u in enumerate(users)}
        ids = [c["id"] for c in candidates]
        if len(set(ids)) != len(ids):
            raise InputError(f"{args.candidates}: candidate id {next(i for i in ids if ids.count(i) > 1)!r} "
                                   f"appears twice")
        ties = [u for u in users if all(p["chosen"] == p["rejected"] for p in prefs if p["user"] == u)]
        if ties:   # no pair to learn from: the fit would return its random start as the user's weights
            raise InputError(f"{args.prefs}: every preference of user {ties[0]!r} has the same chosen and rejected "
                             f"conversation (a tie, nothing to fit){f' ({len(ties)} such users)' if len(ties) > 1 else ''}")
        F, F_model = method_features(method), model_features(args.model)   # before anything is embedded
        if F_model != F:
            raise InputError(f"--model {args.model} gives F={F_model}, {args.checkpoint} was fitted on F={F}: "
                             f"use the reward model its data was embedded with")
        conversations = ([p["chosen"] for p in prefs] + [p["rejected"] for p in prefs]
                         + [c["messages"] for c in candidates])
        P = len(prefs)
        embeddings = embed_conversations(conversations, os.path.join(out, "embeddings.safetensors"),
                                               args.model, device=args.device, batch_tokens=args.batch_tokens)
        user = torch.tensor([index[p["user"]] for p in prefs])                     # [P]
        W = fit_new_users(method, embeddings[:P], embeddings[P:2 * P], user, len(users))   # [N, K]
        save_tensors(os.path.join(out, "weights.safetensors"), {"W": W},
                           {"users": json.dumps(users), "checkpoint": os.path.abspath(args.checkpoint)})
        write_table(os.path.join(out, "weights.csv"),
                          [{"user": u, **{f"w_{k}": float(W[i, k]) for k in range(W.shape[1])}}
                           for i, u in enumerate(users)])
        print(f"{len(users)} users fitted from {P} preferences on {method}")
        if candidates:
            scores = score_items(method, embeddings[2 * P:], W)              # [N, C]
            rank = scores.argsort(1, descending=True).argsort(1) + 1               # [N, C], 1 = best
            records = [{"user": u, "candidate": c, "score": float(scores[i, j]), "rank": int(rank[i, j])}
                       for i, u in enumerate(users) for j, c in enumerate(ids)]
            write_table(os.path.join(out, "scores.csv"), records)
            for i, u in enumerate(users):
                best = int(scores[i].argmax())
                print(f"  {u}: best candidate {ids[best]!r} (score {float(scores[i, best]):+.4g}) of {len(ids)}")
    return W


def read_records(path, fields):
    """A JSONL file whose every line is an object with these fields (name -> type); messages fields
    must be non-empty lists of {"role", "content"} with string values. Errors name the file and line."""
    rows = []
    for n, row in read_jsonl(path):
        for name, kind in fields.items():
            if not isinstance(row.get(name), kind):
                raise InputError(f"{path}:{n}: {name!r} must be a {kind.__name__}, got {row.get(name)!r}"[:200])
            if kind is list:
                check_messages(row[name], f"{path}:{n}: {name}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no lines")
    return rows


def check_messages(messages, where):
    if not messages:
        raise InputError(f"{where}: no messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: every message needs string 'role' and 'content', got {m!r}"[:200])


if __name__ == "__main__":
    main(parse_args())
