"""Understanding a learned basis: its health report and its interpretation in words."""
import json

import numpy as np
import torch

from lore.checks import InputError, check_count

# A basis can look fine by its accuracy and still be one reward in disguise: the original LoRe code
# on PRISM ended with singular values [4490, 14, 0.9, ...], every column pointing the same way and
# 1025 of 1029 users on one column. basis_report measures exactly those symptoms from V, the users'
# weights and (optionally) v_ref and per-user accuracies, with no data needed.

COLLAPSE_RANK = 1.5          # effective rank below this: one direction in all but name
COLLAPSE_COS = 0.99          # two columns with |cos| above this are the same direction
COLLAPSE_SHARE = 0.95        # one column the largest for this share of users: one reward for all
IN_USE_SHARE = 0.01          # a column is in use when it is the largest for at least 1% of users
DIVERSITY_MAX_PAIRS = 200_000  # pairwise user cosines: all pairs up to this many, else a seeded sample


def energy_rank(s, share=0.95):
    """The fewest singular directions holding `share` of the energy sum_j s_j^2 (0 for all zeros):
    an integer companion of effective_rank that ignores a long tail of small singular values."""
    e = np.asarray(s, dtype=np.float64) ** 2
    if e.sum() <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(e) / e.sum(), share - 1e-12) + 1)


def effective_rank(M):
    """exp(entropy of p), p_j = s_j / sum_k s_k, s the singular values of M with its columns scaled
    to unit norm (columns of zero norm stay zero). 1 for any number of copies of one direction, K
    for K orthogonal columns, in between otherwise (Roy & Vetterli, 2007).
    M [F, K] -> (effective rank, singular values [min(F, K)]), numpy float64."""
    M = np.asarray(M, dtype=np.float64)
    norms = np.linalg.norm(M, axis=0)                                              # [K]
    unit = M / np.where(norms > 0, norms, 1.0)                                     # [F, K]
    s = np.linalg.svd(unit, compute_uv=False)                                      # [min(F, K)]
    if s.sum() <= 0:
        return 0.0, s
    p = s / s.sum()
    p = p[p > 0]                                                                   # 0 log 0 = 0
    return float(np.exp(-(p * np.log(p)).sum())), s


def basis_report(V, W=None, v_ref=None, acc=None, acc_ref=None, setting=None, seed=0):
    """The health of a learned basis, as a JSON-serializable dict (floats, ints, bools, lists, None).

    V [F, K] the basis; W [N, K] the users' simplex weights (softmax(W_i), what the trainers return);
    v_ref [F, 1] the reward model's own head; acc, acc_ref [N] each user's held-out accuracy with its
    personal reward and with v_ref; setting: a dict (method, K, alpha, ...) copied into the result.
    Tensors or arrays. Every part that needs a missing input is None. seed: the pair sample of
    `diversity` when N is large (the same seed gives the same report).

    Definitions (every number below is computed in float64):
      effective_rank       exp(-sum_j p_j log p_j), p_j = s_j / sum_k s_k, s the singular values of V
                           with its columns scaled to unit norm (so a column's length cannot hide a
                           copy): 1 = all columns one direction, K = orthogonal columns.
      user_effective_rank  the same for the users' reward vectors V w_i ([F, N], each scaled to unit
                           norm): how many directions the users' rewards really span, which shows a
                           planted rank when K is larger than it.
      rank_95, user_rank_95  the fewest singular directions (of the same unit-column matrices)
                           holding 95% of the energy sum_j s_j^2: integers, blind to a small tail.
      cos_ref              [K] cosine of each column with v_ref.  cos_columns [K, K] the columns'
                           cosines; max_abs_cos the largest |off-diagonal| one (0 when K = 1).
      usage                per column: weight_max and weight_mean over users, top_users = users for
                           whom it is the largest weight (a user tied between t columns counts 1/t
                           to each; ties within 1e-9), top_share = top_users / N.
      columns_in_use       columns with top_share >= IN_USE_SHARE (1%): the largest weight of at
                           least 1% of the users. A column that is nobody's largest is unused even
                           if it is mixed in.
      diversity            quantiles 5/25/50/75/95 and mean of the cosines between two users' reward
                           vectors V w_i, V w_j (i < j): all pairs when there are at most
                           DIVERSITY_MAX_PAIRS, else that many pairs drawn with `seed`.
      accuracy             with acc and acc_ref: their means, mean_change = mean(acc - acc_ref), and
                           the users who gained (change > 1e-9), lost (< -1e-9) or are unchanged.
      collapsed            K > 1 and (effective_rank < 1.5 or max_abs_cos > 0.99 or one column is
                           the largest for >= 95% of the users); `collapse_reasons` says which, in
                           words, and `warnings` holds them and softer notes (unused columns, users
                           losing to the reference).
    """
    V = _as_matrix(V, "V")                                                         # [F, K]
    n_features, K = V.shape
    if K < 1:
        raise InputError(f"V has shape {tuple(V.shape)}: a basis needs at least one column")
    report = {"setting": dict(setting) if setting else {}, "K": K, "F": n_features}
    warnings, reasons = [], []

    # Directions: the columns' lengths, the raw spectrum, and the spectrum of the unit columns.
    norms = np.linalg.norm(V, axis=0)                                              # [K]
    report["column_norms"] = norms.tolist()
    report["singular_values"] = np.linalg.svd(V, compute_uv=False).tolist()
    erank, s_unit = effective_rank(V)
    report["effective_rank"] = erank
    report["rank_95"] = energy_rank(s_unit)
    report["singular_values_normalized"] = s_unit.tolist()
    for j in np.flatnonzero(norms == 0):
        warnings.append(f"column {j} is all zeros")

    unit = V / np.where(norms > 0, norms, 1.0)                                     # [F, K]
    cos = unit.T @ unit                                                            # [K, K]
    off = np.abs(cos - np.diag(np.diag(cos)))                                      # [K, K], diagonal 0
    report["cos_columns"] = cos.tolist()
    report["max_abs_cos"] = float(off.max()) if K > 1 else 0.0
    report["cos_ref"] = None
    if v_ref is not None:
        v = _as_matrix(v_ref, "v_ref").reshape(-1)                                 # [F]
        if v.shape[0] != n_features:
            raise InputError(f"v_ref has {v.shape[0]} features, V has F={n_features}")
        report["cos_ref"] = (unit.T @ v / max(np.linalg.norm(v), 1e-300)).tolist()  # [K]

    if K > 1 and erank < COLLAPSE_RANK:
        reasons.append(f"effective rank {erank:.3f} < {COLLAPSE_RANK}: the {K} columns span about "
                       f"one direction")
    if K > 1 and report["max_abs_cos"] > COLLAPSE_COS:
        i, j = sorted(np.unravel_index(np.argmax(off), off.shape))
        reasons.append(f"columns {i} and {j} have |cos| = {off[i, j]:.4f} (> {COLLAPSE_COS}): the "
                       f"same direction")

    # Users: how the weights spread over the columns, and what their rewards V w_i span.
    report.update(N=None, user_effective_rank=None, user_rank_95=None, user_singular_values=None,
                  usage=None, columns_in_use=None, diversity=None, user_cos_ref=None)
    if W is not None:
        W = _as_matrix(W, "W")                                                     # [N, K]
        if W.shape[1] != K or W.shape[0] < 1:
            raise InputError(f"W has shape {tuple(W.shape)}, expected [users, K={K}]")
        N = W.shape[0]
        report["N"] = N
        # the reward vectors V w_i in an orthonormal basis Q of V's span (V = Q B): the same norms,
        # cosines and singular values as V W^T [F, N] at K / F of its size (at 1e5 users and F = 2048
        # the [F, N] matrix and its SVD took GBs and minutes)
        Q, B = np.linalg.qr(V)                                                     # [F, K], [K, K]
        R = B @ W.T                                                                # [K, N]
        report["user_effective_rank"], s_users = effective_rank(R)
        report["user_rank_95"] = energy_rank(s_users)
        report["user_singular_values"] = s_users[:K].tolist()  # R = V W^T has rank <= K
        usage = _column_usage(W)
        report["usage"] = usage
        report["columns_in_use"] = int(sum(share >= IN_USE_SHARE for share in usage["top_share"]))
        r_norms = np.linalg.norm(R, axis=0)                                        # [N]
        R_unit = R / np.where(r_norms > 0, r_norms, 1.0)                           # [K, N]
        report["diversity"] = _pairwise_cosines(R_unit, seed)
        if v_ref is not None:
            c = R_unit.T @ (Q.T @ v) / max(np.linalg.norm(v), 1e-300)              # [N]
            report["user_cos_ref"] = _quantiles(c)
        top = int(np.argmax(usage["top_share"]))
        if K > 1 and usage["top_share"][top] >= COLLAPSE_SHARE:
            reasons.append(f"column {top} is the largest weight of {usage['top_share'][top]:.1%} of "
                           f"the users (>= {COLLAPSE_SHARE:.0%}): everyone gets the same reward")
        unused = K - report["columns_in_use"]
        if unused > 0:
            warnings.append(f"{unused} of {K} columns are the largest weight of fewer than "
                            f"{IN_USE_SHARE:.0%} of the users")

    # Accuracy against the reference model, user by user.
    report["accuracy"] = None
    if acc is not None and acc_ref is not None:
        acc, acc_ref = np.asarray(acc, np.float64).reshape(-1), np.asarray(acc_ref, np.float64).reshape(-1)
        if acc.shape != acc_ref.shape or (report["N"] is not None and len(acc) != report["N"]):
            raise InputError(f"acc has {len(acc)} users, acc_ref {len(acc_ref)}, W {report['N']}")
        change = acc - acc_ref                                                     # [N]
        report["accuracy"] = {"mean": float(acc.mean()), "mean_ref": float(acc_ref.mean()),
                              "mean_change": float(change.mean()),
                              "gained": int((change > 1e-9).sum()), "lost": int((change < -1e-9).sum()),
                              "unchanged": int((np.abs(change) <= 1e-9).sum())}
        if change.mean() < 0:
            warnings.append(f"the personal rewards are less accurate than the reference model on "
                            f"average ({change.mean():+.4f}; {report['accuracy']['lost']} users lost)")

    report["collapsed"] = bool(reasons)
    report["collapse_reasons"] = reasons
    report["warnings"] = reasons + warnings
    return report


def _as_matrix(x, name):
    """Tensor or array -> float64 numpy matrix; InputError on NaN/inf or the wrong number of dims."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1 and name == "v_ref":
        x = x[:, None]
    if x.ndim != 2:
        raise InputError(f"{name} has shape {x.shape}, expected a matrix")
    if not np.isfinite(x).all():
        raise InputError(f"{name} has NaN or inf entries")
    return x


def _column_usage(W):
    """Per column of W [N, K]: weight_max, weight_mean, top_users (ties split evenly), top_share."""
    N = W.shape[0]
    is_top = W >= W.max(axis=1, keepdims=True) - 1e-9                              # [N, K]
    top_users = np.round((is_top / is_top.sum(axis=1, keepdims=True)).sum(axis=0), 9)  # [K]
    return {"weight_max": W.max(axis=0).tolist(), "weight_mean": W.mean(axis=0).tolist(),
            "top_users": top_users.tolist(), "top_share": (top_users / N).tolist()}


def _pairwise_cosines(R_unit, seed):
    """Quantiles of the cosines between distinct columns of R_unit [F, N] (unit columns)."""
    N = R_unit.shape[1]
    if N < 2:
        return None
    n_pairs = N * (N - 1) // 2
    if n_pairs <= DIVERSITY_MAX_PAIRS:
        i, j = np.triu_indices(N, k=1)                                             # every pair i < j
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, N, DIVERSITY_MAX_PAIRS)
        j = (i + rng.integers(1, N, DIVERSITY_MAX_PAIRS)) % N                      # j != i, uniform
    if N <= 8192:   # the Gram matrix [N, N] is one BLAS call; gathering [F, pairs] would take GBs
        c = (R_unit.T @ R_unit)[i, j]                                              # [pairs]
    else:           # users' rows gathered in chunks of pairs
        R = np.ascontiguousarray(R_unit.T)                                         # [N, F]
        chunk = max(1, (1 << 22) // R.shape[1])
        c = np.concatenate([(R[i[s:s + chunk]] * R[j[s:s + chunk]]).sum(1) for s in range(0, len(i), chunk)])
    return {**_quantiles(c), "pairs": int(len(c)), "sampled": bool(n_pairs > DIVERSITY_MAX_PAIRS)}


def _quantiles(x):
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"q05": float(q[0]), "q25": float(q[1]), "q50": float(q[2]), "q75": float(q[3]),
            "q95": float(q[4]), "mean": float(np.mean(x))}


def format_basis_report(report):
    """A basis_report as readable lines: a summary, one row per column, the users, the accuracy
    against the reference, and a loud WARNING line when the basis has collapsed."""
    K, lines = report["K"], []
    setting = ", ".join(f"{k}={v}" for k, v in report.get("setting", {}).items())
    lines.append(f"Basis report: V [{report['F']} x {K}]" + (f", {report['N']} users" if report["N"] else "")
                 + (f"  ({setting})" if setting else ""))
    if report["collapsed"]:
        lines.append("!" * 100)
        lines.append("WARNING: the basis has collapsed: " + "; ".join(report["collapse_reasons"]))
        lines.append("!" * 100)
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)
    lines.append(f"effective rank of V      {report['effective_rank']:.3f} of {K}   (exp entropy of the "
                 f"singular values of V with unit columns; 95% of the energy in {report['rank_95']})")
    if report["user_effective_rank"] is not None:
        lines.append(f"effective rank of users  {report['user_effective_rank']:.3f}   (of the reward vectors "
                     f"V w_i; 95% of their energy in {report['user_rank_95']})")
        lines.append(f"columns in use           {report['columns_in_use']} of {K}   "
                     f"(the largest weight of >= {IN_USE_SHARE:.0%} of the users)")
    lines.append(f"max |cos| between columns {report['max_abs_cos']:.4f}")
    lines.append("singular values of V     " + " ".join(f"{s:.4g}" for s in report["singular_values"][:12])
                 + (" ..." if K > 12 else ""))
    lines.append("")
    usage = report["usage"] or {}
    cos = np.abs(np.asarray(report["cos_columns"]) - np.eye(K))                    # [K, K]
    lines.append(f"{'col':>4} {'norm':>10} {'cos v_ref':>10} {'max|cos|':>9} {'w max':>7} {'w mean':>7} "
                 f"{'top users':>10} {'share':>7}")
    for j in range(K):
        row = [f"{j:>4}", f"{report['column_norms'][j]:>10.4g}",
               f"{fmt(report['cos_ref'][j] if report['cos_ref'] else None):>10}",
               f"{fmt(cos[j].max() if K > 1 else None, '.4f'):>9}"]
        if usage:
            row += [f"{usage['weight_max'][j]:>7.3f}", f"{usage['weight_mean'][j]:>7.3f}",
                    f"{usage['top_users'][j]:>10.4g}", f"{usage['top_share'][j]:>7.1%}"]
        lines.append(" ".join(row))
    if report["diversity"]:
        d = report["diversity"]
        lines.append("")
        lines.append(f"cos between users' rewards  q05 {d['q05']:+.3f}  q25 {d['q25']:+.3f}  median "
                     f"{d['q50']:+.3f}  q75 {d['q75']:+.3f}  q95 {d['q95']:+.3f}  mean {d['mean']:+.3f}"
                     f"  ({d['pairs']} pairs{', sampled' if d['sampled'] else ''})")
    if report["user_cos_ref"]:
        c = report["user_cos_ref"]
        lines.append(f"cos of users' rewards with v_ref  q05 {c['q05']:+.3f}  median {c['q50']:+.3f}  "
                     f"q95 {c['q95']:+.3f}  mean {c['mean']:+.3f}")
    if report["accuracy"]:
        a = report["accuracy"]
        lines.append(f"held-out accuracy        {a['mean']:.4f} vs reference {a['mean_ref']:.4f} "
                     f"({a['mean_change']:+.4f}); users gained {a['gained']}, lost {a['lost']}, "
                     f"unchanged {a['unchanged']}")
    if report["warnings"]:
        lines.append("")
        lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def basis_report_records(reports):
    """One flat row per report: the setting's entries (method, K, alpha, ...), then the headline
    numbers. K is the setting's K when it has one (K = 0, the reference model, has a 1-column V)."""
    records = []
    for r in reports:
        usage, div, acc = r.get("usage") or {}, r.get("diversity") or {}, r.get("accuracy") or {}
        row = {"method": None, "K": r["K"], "alpha": None}
        row.update({k: v for k, v in r.get("setting", {}).items() if isinstance(v, (int, float, str, bool))})
        row.update({"columns": r["K"], "effective_rank": r["effective_rank"],
                    "user_effective_rank": r["user_effective_rank"], "rank_95": r["rank_95"],
                    "user_rank_95": r["user_rank_95"], "columns_in_use": r["columns_in_use"],
                    "max_abs_cos": r["max_abs_cos"],
                    "top_share_max": max(usage["top_share"]) if usage else None,
                    "user_cos_median": div.get("q50"), "accuracy": acc.get("mean"),
                    "accuracy_change": acc.get("mean_change"), "users_gained": acc.get("gained"),
                    "users_lost": acc.get("lost"), "collapsed": r["collapsed"],
                    "warnings": " | ".join(r["warnings"])})
        records.append(row)
    return records


# Interpretation: what a column rewards, read off the dataset's own conversations. A column's sign
# is meaningful (users mix columns with non-negative weights), so "highest" is what it promotes.

TEXT_CHARS = 240   # characters of a message kept in an interpretation row (the rest is cut with "...")


def interpret_basis(V, table, conversations, v_ref=None, pairs=None, top=5, max_chars=TEXT_CHARS):
    """For every column j of V [F, K]: the `top` conversations of the embedding table [E, F] it
    scores highest and lowest, and (with v_ref [F, 1] and pairs) the `top` pairs on which it most
    disagrees with v_ref. conversations: {row: messages} or a DataFrame with columns row, messages
    (a list of {"role", "content"} or its JSON); pairs: a DataFrame with columns chosen, rejected
    (rows of the table; duplicates counted once).

    A disagreement is a pair whose margins phi(chosen)-phi(rejected) under column j and under v_ref
    have opposite signs; they are ranked by min(|m_j| / sd_j, |m_ref| / sd_ref), sd the margins'
    standard deviation over all pairs: both must be confident, in their own units.
    -> list of flat records: column, kind (highest / lowest / disagrees_with_ref), rank, row(s),
    score or margins (and score_ref / margin_ref), and the text cut to max_chars per message:
    context (the messages before the last) and reply (the last), or chosen / rejected replies."""
    check_count(top, "top")
    check_count(max_chars, "max_chars")
    V = torch.as_tensor(V, dtype=torch.float32)                                    # [F, K]
    if V.dim() != 2 or V.shape[0] != table.shape[1]:
        raise InputError(f"V has shape {tuple(V.shape)}, the embeddings F={table.shape[1]}")
    cols = V if v_ref is None else torch.cat([V, torch.as_tensor(v_ref, dtype=torch.float32).reshape(-1, 1)], 1)
    scores = _table_scores(table, cols)                                            # [E, K (+1)]
    texts = _conversation_lookup(conversations)
    K, top = V.shape[1], min(top, len(table))
    records = []
    for j in range(K):
        for kind, descending in (("highest", True), ("lowest", False)):
            order = torch.argsort(scores[:, j], descending=descending)[:top]
            for rank, row in enumerate(order.tolist()):
                rec = {"column": j, "kind": kind, "rank": rank, "row": row, "score": float(scores[row, j])}
                if v_ref is not None:
                    rec["score_ref"] = float(scores[row, K])
                records.append({**rec, **_message_text(texts, row, max_chars)})
    if v_ref is not None and pairs is not None and len(pairs):
        unique = pairs[["chosen", "rejected"]].drop_duplicates()
        chosen = torch.tensor(unique["chosen"].to_numpy(), dtype=torch.long)       # [P]
        rejected = torch.tensor(unique["rejected"].to_numpy(), dtype=torch.long)   # [P]
        margins = scores[chosen] - scores[rejected]                                # [P, K + 1]
        sd = margins.std(0).clamp_min(1e-12) if len(margins) > 1 else torch.ones(K + 1)
        confident = (margins / sd).abs()                                           # [P, K + 1]
        for j in range(K):
            disagree = torch.sign(margins[:, j]) * torch.sign(margins[:, K]) < 0   # [P]
            strength = torch.minimum(confident[:, j], confident[:, K]).masked_fill(~disagree, -1.0)
            order = torch.argsort(strength, descending=True)[:min(top, int(disagree.sum()))]
            for rank, p in enumerate(order.tolist()):
                c, r = int(chosen[p]), int(rejected[p])
                chosen_text, rejected_text = _message_text(texts, c, max_chars), _message_text(texts, r, max_chars)
                records.append({"column": j, "kind": "disagrees_with_ref", "rank": rank, "chosen_row": c,
                                "rejected_row": r, "margin": float(margins[p, j]),
                                "margin_ref": float(margins[p, K]), "context": chosen_text["context"],
                                "chosen": chosen_text["reply"], "rejected": rejected_text["reply"]})
    return records


def format_interpretation(records, width=100):
    """interpret_basis' records as a readable text, column by column."""
    lines = []
    for j in sorted({r["column"] for r in records}):
        lines.append("=" * width)
        lines.append(f"column {j}")
        for kind, title in (("highest", "scores highest"), ("lowest", "scores lowest"),
                            ("disagrees_with_ref", "disagrees most with v_ref (chosen vs rejected)")):
            rows = [r for r in records if r["column"] == j and r["kind"] == kind]
            if not rows:
                continue
            lines.append(f"-- {title}")
            for r in rows:
                if kind == "disagrees_with_ref":
                    lines.append(f"  [{r['rank']}] margin {r['margin']:+.3g} (v_ref {r['margin_ref']:+.3g})  "
                                 f"rows {r['chosen_row']} > {r['rejected_row']}")
                    lines.append(f"      context:  {_one_line(r['context'], width - 16)}")
                    lines.append(f"      chosen:   {_one_line(r['chosen'], width - 16)}")
                    lines.append(f"      rejected: {_one_line(r['rejected'], width - 16)}")
                else:
                    ref = f" (v_ref {r['score_ref']:+.3g})" if "score_ref" in r else ""
                    lines.append(f"  [{r['rank']}] score {r['score']:+.3g}{ref}  row {r['row']}")
                    lines.append(f"      context: {_one_line(r['context'], width - 15)}")
                    lines.append(f"      reply:   {_one_line(r['reply'], width - 15)}")
    return "\n".join(lines)


def _table_scores(table, V):
    """table [E, F] (any float dtype) @ V [F, K] in float32, in slices: no float32 copy of the table."""
    V = V.to(table.device, torch.float32)
    return torch.cat([t.float() @ V for t in table.split(1 << 15)]).cpu()          # [E, K]


def _conversation_lookup(conversations):
    """{row: messages} from a dict or a DataFrame with columns row, messages (lists or JSON)."""
    if isinstance(conversations, dict):
        return conversations
    if "row" not in conversations.columns or "messages" not in conversations.columns:
        raise InputError(f"conversations need columns row and messages, got {list(conversations.columns)}")
    return dict(zip(conversations["row"].tolist(), conversations["messages"].tolist()))


def _message_text(texts, row, max_chars):
    """-> {"context": the messages before the last as 'role: text | ...', "reply": the last message},
    each cut to max_chars."""
    messages = texts.get(row)
    if messages is None:
        return {"context": "", "reply": f"<row {row}: no conversation>"}
    if isinstance(messages, str):
        messages = json.loads(messages)
    context = " | ".join(f"{m['role']}: {_cut(m['content'], max_chars)}" for m in messages[:-1])
    return {"context": _cut(context, 2 * max_chars), "reply": _cut(messages[-1]["content"], max_chars)}


def _cut(text, n):
    text = " ".join(str(text).split())  # one line: newlines and runs of spaces become one space
    return text if len(text) <= n else text[:n - 3] + "..."


def _one_line(text, n):
    return _cut(text, max(n, 10))
