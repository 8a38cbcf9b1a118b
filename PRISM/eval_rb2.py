"""PRISM, step 5: RewardBench 2 accuracy of the reward model's own head and of LoRe's learned directions.

    python PRISM/eval_rb2.py                                   # v_ref, the reward model itself
    python PRISM/eval_rb2.py --rm-head PRISM/results/train_basis/lore_regularized_K10_alpha10000.safetensors
    python PRISM/eval_rb2.py --rm-head ... --user-weights W    # + each seen user's V w_i and V mean(w)
    python PRISM/eval_rb2.py --data-files test=rb2.parquet     # a local copy of the test split

allenai/reward-bench-2 (split test) has a row per prompt: prompt, chosen (a list of replies),
rejected (a list), subset, id. Every reply is embedded once as [user: prompt, assistant: reply]
(lore.extract.embed_conversations; the replies of a prompt share its encoding), then scored as phi . h by
every head h: v_ref (always), each column of the V saved by train_basis.py (--rm-head), and with
--user-weights KEY the personalized rewards V w_i of the rows of that weight tensor of the same file
(W: seen users, W_unseen: unseen users; row order in the data folder's data.json) and of their mean weights.

A prompt is correct when every chosen reply scores above every rejected one (strictly). The table
has the accuracy of each subset, `overall` = the mean over the subsets (each subset counts the same;
the original script weighed Ties as half of the total), and RewardBench 2's own numbers: `Ties_rb2`,
the official Ties score (0.3 accuracy on 'ref:' prompts + 0.3 on 'tied:' prompts + 0.2 + 0.2 for the
margin between correct and incorrect replies beating the spread of the correct ones, + 0.01 a tanh
margin term; the ids must read ref:N / tied:N), and `overall_rb2` = the mean of the other subsets'
accuracies and Ties_rb2, the leaderboard's score.

Writes to --out (default PRISM/results/rb2/):
    rb2_embeddings.safetensors   {"embeddings": [replies, F]} (reused when the inputs and model match;
                                 --embeddings PATH keeps it elsewhere; a file there that is not such
                                 a cache, e.g. a dataset's embeddings, is refused, never overwritten)
    rb2_results.json, .csv       one row per head: head, each subset's accuracy, overall, Ties_rb2,
                                 overall_rb2
    config.json                  the resolved flags
"""
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore.checks import InputError, resolve_device  # noqa: E402
from lore.cli import (ArgumentParser, cache_path, command_line, data_files_arg, link_into, positive_int,
                      run_folder, SplitFiles)  # noqa: E402
from lore.extract import DEFAULT_MODEL, embed_conversations, read_reward_head  # noqa: E402
from lore.io import check_not_owned, load_splits, load_tensors  # noqa: E402
from lore.results import save_results  # noqa: E402
import torch  # noqa: E402

SCRIPT = "PRISM/eval_rb2.py"
HUB_ID = "allenai/reward-bench-2"
SUBSETS = ("Factuality", "Precise IF", "Math", "Safety", "Focus", "Ties")
COLUMNS = ("prompt", "chosen", "rejected", "subset", "id")
CONTENTS = "RewardBench 2 replies"   # what the embeddings file holds, in its metadata


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("--model", default=DEFAULT_MODEL, help="reward model: hub id or local folder")
    p.add_argument("--data-files", type=data_files_arg, nargs="+", default=None, metavar="test=PATH", action=SplitFiles,
                   help="a local .json/.jsonl/.parquet file of the test split instead of the hub")
    p.add_argument("--rm-head", default=None,
                   help="a {method}_K*.safetensors fit of train_basis.py with a basis V (lore, lore_regularized): score with each column of V")
    p.add_argument("--user-weights", default=None, choices=["W", "W_unseen"],
                   help="also score with V w for each row of this weight tensor of --rm-head, and V mean(w)")
    p.add_argument("--out", default=os.path.join(FOLDER, "results", "rb2"),
                   help="output folder (default: %(default)s)")
    p.add_argument("--embeddings", default=None,
                   help="where the replies' embeddings are kept (default: OUT/rb2_embeddings.safetensors); "
                        "share one file between evaluations of several heads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--batch-tokens", type=positive_int, default=16384, help="padded tokens per forward pass")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="the reward model's dtype (default: bfloat16 on CUDA, float32 on CPU; the original "
                        "scored in float32)")
    return p.parse_args(argv)


@command_line
def main(args):
    if args.user_weights and not args.rm_head:
        raise InputError("--user-weights needs --rm-head (the basis file holding the weights)")
    if args.embeddings:   # the ownership rule of --out: never a file in another run's (or a data) folder
        check_not_owned(args.embeddings, "--embeddings")
    # locked, recovered and checked before any work; written as a whole at the end, or not at all
    with run_folder(args, SCRIPT, inputs=[p for p in (args.rm_head, args.embeddings) if p]) as out:
        resolve_device(args.device)                              # a bad --device fails before any work
        names, H = heads(args)                                         # [F, B]; bad heads fail before embedding
        data = load_splits(HUB_ID, ["test"], dict(args.data_files or {}))["test"]
        source = dict(args.data_files)["test"] if args.data_files else HUB_ID
        rows = read_prompts(data, source)
        conversations, prompt, chosen = [], [], []
        for i, row in enumerate(rows):
            for is_chosen, reply in [(True, r) for r in row["chosen"]] + [(False, r) for r in row["rejected"]]:
                conversations.append([{"role": "user", "content": row["prompt"]},
                                      {"role": "assistant", "content": reply}])
                prompt.append(i)
                chosen.append(is_chosen)
        print(f"{source}: {len(rows)} prompts, {len(conversations)} replies")
        # outlives a failed run (the extraction resumes); linked into --out when the run succeeds
        cache = args.embeddings or cache_path(args, "rb2_embeddings.safetensors")
        # contents: a file of other embeddings at --embeddings (a dataset's table) is refused, not overwritten
        phi = embed_conversations(conversations, cache, args.model, device=args.device, dtype=args.dtype,
                                        batch_tokens=args.batch_tokens, contents=CONTENTS)  # [replies, F]
        if out is None:   # torchrun: the other processes only helped embed
            return
        if phi.shape[1] != H.shape[0]:
            raise InputError(f"{args.model}: its head has F={H.shape[0]}, the embeddings in {cache} "
                                   f"F={phi.shape[1]}")
        scores = phi.float() @ H                                                    # [replies, B]
        stats = prompt_stats(scores, torch.tensor(prompt), torch.tensor(chosen), len(rows))
        if not args.embeddings:
            link_into(cache, out)
        save_results(summarize(names, rows, stats), out, name="rb2_results")


def read_prompts(data, source):
    """The dataset -> list of dicts with COLUMNS; errors name the source, row and id."""
    missing = [c for c in COLUMNS if c not in data.column_names]
    if missing:
        raise InputError(f"{source}: no column(s) {missing} (RewardBench 2 has {list(COLUMNS)})")
    rows = data.select_columns(list(COLUMNS)).to_list()
    for i, row in enumerate(rows):
        for key in ("chosen", "rejected"):
            replies = row[key]
            if not isinstance(replies, list) or not replies or not all(isinstance(r, str) for r in replies):
                raise InputError(f"{source}: row {i} (id {row['id']!r}): {key!r} must be a non-empty "
                                       f"list of strings, got {replies!r}"[:300])
        if not isinstance(row["prompt"], str) or not isinstance(row["subset"], str):
            raise InputError(f"{source}: row {i} (id {row['id']!r}): prompt and subset must be strings")
    return rows


def heads(args):
    """-> (names, H [F, B]): v_ref, then the columns of V, then V w of each weight row and V mean(w)."""
    v_ref = read_reward_head(args.model)                                      # [F, 1]
    names, columns = ["v_ref"], [v_ref]
    if args.rm_head:
        basis = load_tensors(args.rm_head, ["V"] + ([args.user_weights] if args.user_weights else []))
        V = basis["V"].float()                                                      # [F, K]
        if V.dim() != 2 or V.shape[0] != len(v_ref):
            raise InputError(f"{args.rm_head}: V has shape {tuple(V.shape)}, the model's F={len(v_ref)}")
        if not torch.isfinite(V).all():
            raise InputError(f"{args.rm_head}: V has NaN or inf values")
        names += [f"V[:, {j}]" for j in range(V.shape[1])]
        columns.append(V)
        if args.user_weights:
            W = basis[args.user_weights].float()                                    # [N, K]
            if W.dim() != 2 or W.shape[1] != V.shape[1]:
                raise InputError(f"{args.rm_head}: {args.user_weights} has shape {tuple(W.shape)}, "
                                       f"V has {V.shape[1]} columns")
            if not torch.isfinite(W).all():
                raise InputError(f"{args.rm_head}: {args.user_weights} has NaN or inf values")
            names += [f"V {args.user_weights}[{i}]" for i in range(len(W))] + [f"V mean({args.user_weights})"]
            columns += [V @ W.T, V @ W.mean(0, keepdim=True).T]                     # [F, N], [F, 1]
    return names, torch.cat(columns, dim=1)


def prompt_stats(scores, prompt, chosen, n_prompts):
    """Per prompt and head [n, B]: lowest and highest chosen score, highest rejected score, and [n] the
    number of chosen replies. scores [replies, B], prompt [replies] its prompt, chosen [replies] bool."""
    B = scores.shape[1]
    reduce = lambda mask, how, fill: torch.full((n_prompts, B), fill).scatter_reduce(
        0, prompt[mask, None].expand(-1, B), scores[mask], how)
    inf = float("inf")
    return {"min_chosen": reduce(chosen, "amin", inf), "max_chosen": reduce(chosen, "amax", -inf),
            "max_rejected": reduce(~chosen, "amax", -inf),
            "n_chosen": torch.bincount(prompt[chosen], minlength=n_prompts)}


def summarize(names, rows, stats):
    """One record per head: accuracy per subset, overall, Ties_rb2, overall_rb2."""
    correct = stats["min_chosen"] > stats["max_rejected"]                           # [n, B]
    subsets = [s for s in SUBSETS if any(r["subset"] == s for r in rows)]
    subsets += sorted({r["subset"] for r in rows} - set(SUBSETS))
    member = {s: torch.tensor([r["subset"] == s for r in rows]) for s in subsets}
    print("prompts per subset: " + ", ".join(f"{s} {int(member[s].sum())}" for s in subsets))
    accuracy = {s: correct[member[s]].float().mean(0) for s in subsets}             # [B] each
    ties, note = ties_score(rows, stats, member["Ties"]) if "Ties" in member else (None, None)
    if note:
        print(f"{note}: no Ties_rb2 score (null in the results)")
    records = []
    for b, name in enumerate(names):
        record = {"head": name, **{s: float(accuracy[s][b]) for s in subsets}}
        record["overall"] = sum(record[s] for s in subsets) / len(subsets)
        if ties is not None:
            others = [record[s] for s in subsets if s != "Ties"]
            record["Ties_rb2"] = float(ties[b])
            record["overall_rb2"] = (sum(others) + record["Ties_rb2"]) / (len(others) + 1)
        elif note:
            record.update(Ties_rb2=None, overall_rb2=None, Ties_rb2_note=note)
        records.append(record)
    return records


def ties_score(rows, stats, member):
    """RewardBench 2's Ties score [B]: ids 'ref:N' (one correct reply) and 'tied:N' (several) of the
    same N are one prompt. -> (scores [B], None), or (None, note) when the Ties prompts do not allow
    it (an id not of that form or given twice, no ref:N for a tied:N or the other way round): the
    results then hold null and the note, never a number made of part of the rule."""
    kinds = {"ref": {}, "tied": {}}
    for i in torch.nonzero(member).flatten().tolist():
        kind, _, number = str(rows[i]["id"]).partition(":")
        if kind not in kinds or not number:
            return None, f"Ties id {rows[i]['id']!r} is not ref:N or tied:N"
        if number in kinds[kind]:
            return None, f"Ties id {rows[i]['id']!r} appears twice"
        kinds[kind][number] = i
    unmatched = sorted(set(kinds["ref"]) ^ set(kinds["tied"]))
    if unmatched:
        return None, f"Ties prompt {unmatched[0]} has no {'tied' if unmatched[0] in kinds['ref'] else 'ref'}:N pair"
    margin = stats["min_chosen"] - stats["max_rejected"]                            # [n, B]
    spread = stats["max_chosen"] - stats["min_chosen"]
    spread[stats["n_chosen"] < 2] = float("nan")
    accuracy = lambda idx: (margin[idx] > 0).float().mean(0)                        # [B]
    both = sorted(kinds["ref"])
    ref = torch.tensor([kinds["ref"][k] for k in both], dtype=torch.long)
    tied = torch.tensor([kinds["tied"][k] for k in both], dtype=torch.long)
    if (stats["n_chosen"][tied] < 2).any():
        return None, "a tied:N prompt has fewer than 2 correct replies, so no spread"
    hard = torch.minimum(margin[ref], margin[tied])                                 # [prompts, B]
    return (0.3 * accuracy(tied) + 0.3 * accuracy(ref)
            + 0.2 * (margin[tied] > spread[tied]).float().mean(0)
            + 0.2 * (hard > spread[tied]).float().mean(0)
            + 0.01 * torch.nan_to_num(torch.tanh(hard / spread[tied] - 1), nan=0.0).mean(0)), None


if __name__ == "__main__":
    main(parse_args())
