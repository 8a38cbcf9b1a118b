"""Health report of saved bases: is a "K = 10" basis really 10 rewards, or one in disguise?

    python tools/basis_report.py PersonalLLM/results/train_basis/lore_K5_alpha0.safetensors --data PersonalLLM/data
    python tools/basis_report.py PersonalLLM/results/train_basis/*.safetensors --v-ref-from PersonalLLM/data

For every checkpoint written by a train_basis.py ({method}_K{K}[_alpha{a}].safetensors: the basis V,
the seen users' weights W, W_unseen) it prints lore.basis.format_basis_report: the effective rank of V
and of the users' rewards V w_i, the columns' cosines with each other and with v_ref, how many
users each column leads, the spread of the users' rewards, and a loud WARNING line when the basis
has collapsed (one direction, two identical columns, or one column leading 95% of the users).

--data DIR (alias --v-ref-from): the data folder the checkpoints were fitted on. It adds v_ref (the
cosines with the reference model) and every user's held-out accuracy against the reference model's
(seen users on seen_test; with --users unseen, unseen users on unseen_test).

Writes to --out (default: basis_report/ beside the checkpoints' folder, e.g.
PersonalLLM/results/basis_report/), as a whole when the run ends:
    basis_report.json   one lore.basis.basis_report per checkpoint, in the order given
    basis_report.csv    one flat row per checkpoint (lore.basis.basis_report_records)
    basis_report.txt    the printed report
    basis_report.png    effective ranks, columns in use and max |cos| against K
    config.json         the resolved flags
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lore.basis import basis_report, basis_report_records, format_basis_report  # noqa: E402
from lore.checks import InputError  # noqa: E402
from lore.cli import ArgumentParser, command_line, run_folder, seed_int, start_run  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.io import write_json, write_table  # noqa: E402
from lore.methods import accuracy, load_method, method_basis, per_user_accuracy  # noqa: E402
from lore.results import plot_basis_reports  # noqa: E402
import torch  # noqa: E402

SCRIPT = "tools/basis_report.py"


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="{method}_K{K}[_alpha{a}].safetensors files")
    p.add_argument("--data", "--v-ref-from", dest="data", default=None,
                   help="the data folder the checkpoints were fitted on: v_ref and per-user accuracies")
    p.add_argument("--users", choices=("seen", "unseen"), default="seen",
                   help="whose weights to read: W (seen users, default) or W_unseen")
    p.add_argument("--out", default=None, help="output folder (default: basis_report/ beside the checkpoints' folder)")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available)")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the sampled user pairs (large N)")
    p.add_argument("--allow-other-data", action="store_true",
                   help="use checkpoints fitted on another data folder than --data (with a warning)")
    args = p.parse_args(argv)
    if args.out is None:
        results = os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoints[0])))
        args.out = os.path.join(results, "basis_report")
    return args


@command_line
def main(args):
    device = start_run(args)
    # locked and checked before any work; neither the data nor a checkpoint may be inside --out
    with run_folder(args, SCRIPT, inputs=[p for p in (args.data, *args.checkpoints) if p],
                          device=str(device)) as out:
        data = load_data(args.data, device) if args.data else None
        reports = [report(path, data, args.users, device, args.seed, args.allow_other_data)
                   for path in args.checkpoints]
        text = "\n\n".join(format_basis_report(r) for r in reports)
        print(text)
        write_json(os.path.join(out, "basis_report.json"), reports)
        write_table(os.path.join(out, "basis_report.csv"), basis_report_records(reports))
        with open(os.path.join(out, "basis_report.txt"), "w") as f:
            f.write(text + "\n")
        plot_basis_reports(reports, os.path.join(out, "basis_report.png"))
    return reports


def report(path, data, users, device, seed, allow_other_data=False):
    """lore.basis.basis_report of one checkpoint; with data, v_ref and the users' held-out accuracy
    against the reference model (V = v_ref, w = [1])."""
    method, tensors = load_method(path, device, data, allow_other_data)
    V = method_basis(method)                                                 # [F, K]
    key = "W" if users == "seen" else "W_unseen"
    if key not in tensors:
        raise InputError(f"{path}: no {key} (the {users} users' weights) in the checkpoint")
    W = tensors[key]                                                               # [N, K]
    setting = {**method.setting(), "users": users, "checkpoint": os.path.basename(path)}
    if data is None:
        return basis_report(V, W, setting=setting, seed=seed)
    pairs = data.sets[f"{users}_test"]
    if V.shape[0] != data.table.shape[1] or len(W) != pairs.n_users:
        raise InputError(f"{path}: V {tuple(V.shape)} and {key} {tuple(W.shape)} do not fit {data.folder} "
                               f"(F={data.table.shape[1]}, {pairs.n_users} {users} users): another data folder?")
    acc = accuracy(method, pairs, W)                                         # [N]
    acc_ref = per_user_accuracy(pairs, data.v_ref, torch.ones(pairs.n_users, 1))   # [N]
    return basis_report(V, W, data.v_ref, acc, acc_ref, setting=setting, seed=seed)


if __name__ == "__main__":
    main(parse_args())
