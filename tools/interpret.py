"""What does each column of a saved basis reward? Its highest- and lowest-scored conversations of
the dataset, and the pairs on which it most disagrees with the reference reward model.

    python tools/interpret.py PersonalLLM/results/train_basis/lore_K5_alpha0.safetensors --data PersonalLLM/data
    python tools/interpret.py PRISM/results/train_basis/lore_K10_alpha10000.safetensors --data PRISM/data --top 10 --set seen_test

Reads the checkpoint (a train_basis.py fit of a LoRe method: its basis V [F, K]) and the data folder it
was fitted on (embeddings, conversations.parquet, pairs.parquet, v_ref). For each column j, with
s_j = phi^T V_j the column's score of a conversation (its sign is meaningful: users mix columns
with non-negative weights):
    highest / lowest      the --top conversations of the table with the largest / smallest s_j
    disagrees_with_ref    the --top distinct pairs of pairs.parquet (--set: of one set only) whose
                          margins s_j(chosen) - s_j(rejected) and v_ref's have opposite signs,
                          ranked by the smaller of the two margins in units of its own std over pairs
Texts are cut to --chars characters per message.

Writes to --out (default: interpret/<checkpoint name>/ beside the checkpoint's folder, e.g.
PersonalLLM/results/interpret/lore_K5_alpha0/), as a whole when the run ends:
    interpretation.csv    one row per (column, kind, rank): rows, scores or margins, texts
    interpretation.txt    the printed tables
    config.json           the resolved flags
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lore.basis import format_interpretation, interpret_basis, TEXT_CHARS  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.cli import ArgumentParser, command_line, positive_int, run_folder, seed_int, start_run  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import read_table, write_table  # noqa: E402
from lore.methods import load_method, method_basis  # noqa: E402
from lore.pairs import SETS  # noqa: E402

SCRIPT = "tools/interpret.py"


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="{method}_K{K}[_alpha{a}].safetensors")
    p.add_argument("--data", required=True, help="the data folder the checkpoint was fitted on")
    p.add_argument("--top", type=positive_int, default=5, help="conversations and pairs per column and kind")
    p.add_argument("--set", choices=SETS, default=None, help="disagreements among this set's pairs only")
    p.add_argument("--chars", type=positive_int, default=TEXT_CHARS, help="characters kept per message")
    p.add_argument("--out", default=None, help="output folder (default: interpret/<name>/ beside the checkpoint's folder)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--seed", type=seed_int, default=0, help="(nothing is random; kept for the contract)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="use a checkpoint fitted on another data folder than --data (with a warning)")
    args = p.parse_args(argv)
    if args.out is None:
        results = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint)))
        name = os.path.basename(args.checkpoint).removesuffix(".safetensors")
        args.out = os.path.join(results, "interpret", name)
    return args


@command_line
def main(args):
    device = start_run(args)
    # locked and checked before any work; neither the data nor the checkpoint may be inside --out
    with run_folder(args, SCRIPT, inputs=[args.data, args.checkpoint], device=str(device)) as out:
        data = load_data(args.data, device)   # checks that the folder's files belong together
        method, _ = load_method(args.checkpoint, device, data, args.allow_other_data)
        V = method_basis(method)                                             # [F, K]
        if V.shape[0] != data.table.shape[1]:
            raise InputError(f"{args.checkpoint}: V has F={V.shape[0]}, the embeddings of {args.data} "
                                   f"F={data.table.shape[1]}: another data folder?")
        conversations = read_table(os.path.join(args.data, "conversations.parquet"), ["row", "messages"])
        pairs = read_table(os.path.join(args.data, "pairs.parquet"), ["set", "chosen", "rejected"])
        if args.set:
            pairs = pairs[pairs["set"] == args.set]
        records = interpret_basis(V, data.table, conversations, data.v_ref, pairs, args.top, args.chars)
        text = f"{args.checkpoint}: {method}, V [{V.shape[0]} x {V.shape[1]}]\n" + format_interpretation(records)
        print(text)
        write_table(os.path.join(out, "interpretation.csv"), records)
        with open(os.path.join(out, "interpretation.txt"), "w") as f:
            f.write(text + "\n")
    return records


if __name__ == "__main__":
    main(parse_args())
