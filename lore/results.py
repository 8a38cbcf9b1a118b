"""What a run shows and keeps: records as JSON, CSV and a printed table, and the figures."""
import math
import os

import numpy as np

from lore.basis import COLLAPSE_COS, COLLAPSE_RANK, basis_report_records, format_basis_report
from lore.checks import InputError
from lore.data import oracle_accuracies
from lore.io import read_json, write_json, write_table
from lore.methods import checkpoint_name
from lore.pairs import SETS

def plot_basis_reports(reports, path, title=""):
    """One figure across K, a line per (method, alpha): effective rank of V and of the users'
    rewards and the users' rank_95 (with y = K dotted), columns in use, max |cos| between columns;
    collapsed bases marked with a red x."""
    plt = pyplot()
    records = basis_report_records(reports)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = sorted({(str(r["method"]), str(r["alpha"])) for r in records})
    for n, (method, alpha) in enumerate(series):
        rows = sorted((r for r in records if (str(r["method"]), str(r["alpha"])) == (method, alpha)),
                      key=lambda r: r["K"])
        label = ", ".join(([method] if method != "None" else []) + ([f"alpha={alpha}"] if alpha != "None" else []))
        K = [r["K"] for r in rows]
        color = f"C{n}"
        panels = ((axes[0], "effective_rank", "-", "V"), (axes[0], "user_effective_rank", "--", "users V w"),
                  (axes[0], "user_rank_95", ":", "users: directions of 95% energy"),
                  (axes[1], "columns_in_use", "-", ""), (axes[2], "max_abs_cos", "-", ""))
        for ax, key, ls, what in panels:
            pts = [(k, r[key]) for k, r in zip(K, rows) if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", color=color,
                        label=": ".join(x for x in (label, what) if x) or None)
            bad = [(k, r[key]) for k, r in zip(K, rows) if r[key] is not None and r["collapsed"]]
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="x", ms=10, color="red")
    Ks = sorted({r["K"] for r in records})
    for ax in axes[:2]:
        ax.plot(Ks, Ks, ls=":", color="gray", label="y = K")
    axes[2].axhline(COLLAPSE_COS, ls=":", color="red", label=f"collapse: |cos| > {COLLAPSE_COS}")
    axes[0].axhline(COLLAPSE_RANK, ls=":", color="red", label=f"collapse: rank < {COLLAPSE_RANK}")
    axes[0].set(xlabel="K", ylabel="effective rank", title=f"{title} effective rank".strip())
    axes[1].set(xlabel="K", ylabel="columns", title="columns in use (largest weight of >= 1% of users)")
    axes[2].set(xlabel="K", ylabel="max |cos|", title="max |cos| between two columns (x: collapsed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def save_basis_reports(records, out, title):
    """The health reports sweep wrote beside the checkpoints, across K: basis_reports.csv, a figure,
    and each printed (with its loud warning when a basis has collapsed)."""
    paths = [os.path.join(out, checkpoint_name(r, ".report.json")) for r in records]
    reports = [read_json(p) for p in paths if os.path.exists(p)]
    if not reports:
        return
    import pandas as pd
    table = basis_report_records(reports)
    print("basis health (each fit's full report: its .report.json; lore.basis.format_basis_report prints one):")
    print(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for report in reports:
        if report["collapsed"]:
            print(format_basis_report(report))   # the whole report, with its WARNING line
    write_table(os.path.join(out, "basis_reports.csv"), table)
    plot_basis_reports(reports, os.path.join(out, "basis_health.png"), title)


def save_oracle(data, out):
    oracle = oracle_accuracies(data)
    if oracle:
        write_json(os.path.join(out, "oracle.json"), oracle)
        print("oracle (each user's true linear reward): " + ", ".join(f"{k} {v:.4f}" for k, v in oracle.items()))
    return oracle


def save_results(records, out_dir, name="results"):
    """{name}.json and {name}.csv in out_dir, and a readable table on stdout."""
    import pandas as pd
    for record in records:
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise InputError(f"{_curve_label(record)}, K={record.get('K')}: {bad} is not a finite number")
    write_json(os.path.join(out_dir, f"{name}.json"), records)
    write_table(os.path.join(out_dir, f"{name}.csv"), records)
    print(pd.DataFrame(records).to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))


_SET_LABELS = {"seen_train": "seen users, train pairs", "seen_test": "seen users, held-out pairs",
               "unseen_fewshot": "unseen users, few-shot pairs", "unseen_test": "unseen users, held-out pairs"}


def _curve_label(record):
    alpha = "" if record.get("alpha") is None else f", alpha={record['alpha']:g}"
    return f"{record['method']}{alpha}"


def plot_accuracy_vs_rank(records, path, title="", hlines=None):
    """One panel per pair set: accuracy against K, a curve per (method, alpha) with the reported
    std as error bars. hlines: {set: accuracy} drawn dotted (e.g. an oracle's)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SETS), figsize=(4.2 * len(SETS), 3.8), squeeze=False)
    curves = list(dict.fromkeys(_curve_label(r) for r in records))
    for ax, name in zip(axes[0], SETS):
        for i, label in enumerate(curves):
            rows = sorted((r for r in records if _curve_label(r) == label), key=lambda r: r["K"])
            ax.errorbar([r["K"] for r in rows], [r[name] for r in rows], yerr=[r[f"{name}_std"] for r in rows],
                        color=f"C{i}", marker="o", capsize=3, label=label)
        if name in (hlines or {}):
            ax.axhline(hlines[name], color="k", ls=":", label="oracle")
        ax.set(xlabel="K (lore K=0: the reference reward model)", ylabel="accuracy", title=_SET_LABELS[name])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)


def plot_accuracy_vs_shots(records, path, title="", hline=None):
    """Unseen users' held-out accuracy against shots, a curve per (method, alpha, K) with a band of
    +- one std over trials; the accuracy on the shots themselves dashed; `hline` (e.g. an oracle's
    held-out accuracy) dotted. Records of several selections (sweep_shots' select: random,
    active) get one panel per (method, alpha, K), its selections side by side in it."""
    plt = pyplot()
    selects = list(dict.fromkeys(r.get("select", "random") for r in records))
    settings = list(dict.fromkeys(f"{_curve_label(r)}, K={r['K']}" for r in records))
    panels = settings if len(selects) > 1 else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(7, 4.5) if len(panels) == 1 else (5 * len(panels), 4.5),
                             squeeze=False, sharey=True)
    for ax, panel in zip(axes[0], panels):
        for label in settings if panel is None else [panel]:
            for i, how in enumerate(selects):
                rows = sorted((r for r in records if f"{_curve_label(r)}, K={r['K']}" == label
                               and r.get("select", "random") == how), key=lambda r: r["shots"])
                name = label if panel is None else how   # one selection: a curve per setting
                x = np.array([r["shots"] for r in rows])
                y = np.array([r["unseen_test"] for r in rows])
                s = np.array([r["unseen_test_std"] for r in rows])
                color = {} if panel is None else {"color": f"C{i}"}   # one colour per selection in a panel
                line, = ax.plot(x, y, marker="o", label=f"{name}: held-out", **color)
                ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2)
                ax.plot(x, [r["unseen_fewshot"] for r in rows], ls="--", color=line.get_color(),
                        label=f"{name}: the shots")
        if hline is not None:
            ax.axhline(hline, color="k", ls=":", label="oracle: held-out")
        ax.set(xlabel="shots per unseen user", ylabel="accuracy",
               title=title if panel is None else f"{title}\n{panel}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    import matplotlib.pyplot as plt
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Loss curves and comparisons
# ----------------------------------------------------------------------------------------------

def plot_loss_curves(curves, path, title=""):
    """The loss of every fit against its step ({label: {"step", "loss"}}; a fit without a training
    loop is left out), one panel per method (the label's first word: their losses are on different
    scales), log scale where a panel's losses span more than a decade; a fit flagged "not
    converged" is marked in its label."""
    from lore.methods import converged
    plt = pyplot()
    drawn = {k: c for k, c in curves.items() if c and len(c["step"]) >= 2}
    groups = list(dict.fromkeys(k.split(",")[0].split(" ")[0] for k in drawn)) or [""]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        mine = {k: c for k, c in drawn.items() if k.split(",")[0].split(" ")[0] == group}
        for label, c in mine.items():
            flag = "" if converged(c) is not False else " (not converged)"
            ax.plot(c["step"], c["loss"], label=f"{label}{flag}", lw=1.2)
        losses = [v for c in mine.values() for v in c["loss"] if v > 0]
        if losses and max(losses) > 10 * min(losses):
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel="training loss", title=f"{title}: {group}" if group else title)
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=6)
    save_figure(fig, path)


def save_loss_curves(records, out, title):
    """The loss curves of a sweep's fits, read from the {checkpoint}.fit.json files beside the
    checkpoints, drawn as loss_curves.png; the fits flagged "not converged" are listed."""
    curves = {}
    for r in records:
        path = os.path.join(out, checkpoint_name(r, ".fit.json"))
        if os.path.exists(path):
            report = read_json(path)
            curves[_curve_label(report) + f", K={report['K']}"] = report["curve"]
            if report["converged"] is False:
                why = (f"it ran to its cap of {report['steps']} steps ({report['passes']:.1f} passes) before the "
                       f"held-out rule stopped it" if report.get("stopped") == "cap" else
                       f"its loss still fell {report['loss_fall']:.1%} over the last tenth of its steps")
                print(f"NOT CONVERGED: {_curve_label(report)}, K={report['K']}: {why} (rule: {report['converged_rule']})")
    plot_loss_curves(curves, os.path.join(out, "loss_curves.png"), f"{title} training loss".strip())


def comparison_table(result):
    """comparison.json's rows as Markdown: each trusted set's mean with its CI, the selected
    configuration and the validation accuracy it was chosen on, how long its refits ran (mean
    optimizer steps, passes over the training pairs, seconds, the new users' fit's steps) and
    whether they converged (AT CAP: a refit ran to its step cap; FEW-SHOT AT CAP: a new users'
    fit under the early rule did); the gain and its verdict below."""
    lines = ["| method | selected | validation | seen_test [95% CI] | unseen_test [95% CI] | steps | passes | fit s "
             "| few-shot steps | converged |", "|---|---|---|---|---|---|---|---|---|---|"]
    number = lambda v, f: "-" if v is None else format(v, f)
    for r in result["methods"]:
        cells = [f"{r[s]:.3f} [{r[s + '_ci'][0]:.3f}, {r[s + '_ci'][1]:.3f}]" for s in ("seen_test", "unseen_test")]
        selected = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["selected"].items())
        validation = "-" if r["validation"] is None else f"{r['validation']:.3f}"
        verdict = "NOT CONVERGED (AT CAP)" if r.get("at_cap") else "yes" if r["converged"] else "NOT CONVERGED"
        verdict += ", FEW-SHOT AT CAP" if r.get("fewshot_at_cap") else ""
        lines.append(f"| {r['method']} | {selected} | {validation} | {cells[0]} | {cells[1]} | "
                     f"{number(r.get('steps'), '.0f')} | {number(r.get('passes'), '.1f')} | "
                     f"{number(r.get('fit_seconds'), '.1f')} | {number(r.get('fewshot_steps'), '.0f')} | {verdict} |")
    gain = result.get("personalization_gain")
    if gain:
        g = gain["unseen_test"]
        lines += ["", f"Personalization gain ({gain['method']} minus bt, unseen_test, per user): "
                      f"{g['mean']:+.3f} [{g['ci'][0]:+.3f}, {g['ci'][1]:+.3f}]: {g['verdict']}."]
    return "\n".join(lines) + "\n"


def save_comparison(result, out, title=""):
    """comparison.csv, comparison.md, comparison.png and loss_curves.png of tools/compare.py's result."""
    import json
    flat = [{**{k: v for k, v in r.items() if not isinstance(v, (dict, list))}, "selected": json.dumps(r["selected"]),
             **{f"{s}_ci_{e}": r[f"{s}_ci"][i] for s in ("seen_test", "unseen_test") for i, e in enumerate(("lo", "hi"))}}
            for r in result["methods"]]
    write_table(os.path.join(out, "comparison.csv"), flat)
    table = comparison_table(result)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(f"# {title}\n\n{table}")
    print(table)
    for label, stab in result["basis_stability"].items():
        if stab is not None:
            print(f"basis stability of {label} across seeds: min overlap {stab['min_overlap']:.3f}"
                  + ("" if stab["stable"] else " -- WARNING: the basis changes between seeds"))
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    labels = [r["method"] for r in result["methods"]]
    for ax, s in zip(axes, ("seen_test", "unseen_test")):
        y = np.array([r[s] for r in result["methods"]])
        ci = np.array([r[f"{s}_ci"] for r in result["methods"]])
        ax.errorbar(range(len(y)), y, yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="o", capsize=4)
        ax.set_xticks(range(len(y)), labels, rotation=30)
        ax.set(title=f"{_SET_LABELS[s]} (95% CI)", ylabel="accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, os.path.join(out, "comparison.png"))
    curves = {f"{label} seed {f['seed']}": f["curve"] for label, fits in result["fits"].items() for f in fits}
    plot_loss_curves(curves, os.path.join(out, "loss_curves.png"), f"{title}: refits' training loss")
