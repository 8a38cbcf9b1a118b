"""The tools that read and use a learned basis: the health report (collapse, effective ranks, usage,
diversity), interpretation, personalized scoring, best-of-N; numbers checked against loops and planted populations."""
import json
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import utils  # noqa: E402
from conftest import load_script  # noqa: E402
from lore.basis import (DIVERSITY_MAX_PAIRS, basis_report, basis_report_records, format_basis_report,  # noqa: E402
                        format_interpretation, interpret_basis)
from lore.scoring import fit_new_users, score_items  # noqa: E402
from lore.checks import InputError, set_seed  # noqa: E402
from lore.extract import embed_conversations  # noqa: E402
from lore.io import load_tensors, read_metadata, write_table  # noqa: E402
from lore.methods import METHODS, save_method  # noqa: E402
from lore.results import plot_basis_reports  # noqa: E402

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Health report
# ----------------------------------------------------------------------------------------------


def orthonormal(F, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(F, K, generator=g, dtype=torch.float64))[0]   # [F, K]


def test_copies_of_one_direction_are_a_collapsed_basis():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(64, 1, generator=g)
    V = v * torch.tensor([[1.0, -2.0, 3.0, 0.5, 10.0]])          # 5 copies, different lengths and signs
    W = torch.softmax(torch.randn(200, 5, generator=g), dim=1)
    report = basis_report(V, W, v_ref=v)
    assert report["effective_rank"] == pytest.approx(1.0, abs=1e-4)
    assert report["rank_95"] == 1
    assert report["user_effective_rank"] == pytest.approx(1.0, abs=1e-4)
    assert report["max_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(np.abs(report["cos_ref"]), 1.0)
    assert report["collapsed"] is True
    assert any("effective rank" in w for w in report["collapse_reasons"])
    assert any("|cos|" in w for w in report["collapse_reasons"])
    text = format_basis_report(report)
    assert "WARNING: the basis has collapsed" in text
    json.dumps(report)  # JSON-serializable as it is


def test_orthonormal_basis_with_uniform_users_has_full_rank():
    K = 6
    V = orthonormal(40, K)
    for W in (torch.full((50, K), 1.0 / K),                                         # everyone equal
              torch.distributions.Dirichlet(torch.ones(K)).sample((300,))):        # uniform on the simplex
        report = basis_report(V, W)
        assert report["effective_rank"] == pytest.approx(K, abs=1e-6)
        assert report["rank_95"] == K
        assert report["max_abs_cos"] == pytest.approx(0.0, abs=1e-9)
        assert report["columns_in_use"] == K
        assert report["collapsed"] is False and report["collapse_reasons"] == []
        assert "WARNING" not in format_basis_report(report)
    # all users tied on every column: each column gets 1/K of every user
    tied = basis_report(V, torch.full((50, K), 1.0 / K))
    assert tied["usage"]["top_users"] == pytest.approx([50 / K] * K)


def test_one_column_for_everyone_is_collapse():
    V = orthonormal(30, 4)
    W = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 96 + [[0.1, 0.7, 0.1, 0.1]] * 4)  # 96% on column 0
    report = basis_report(V, W)
    assert report["effective_rank"] == pytest.approx(4.0)
    assert report["collapsed"] is True
    assert report["collapse_reasons"] == [r for r in report["collapse_reasons"] if "column 0 is the largest" in r]
    assert report["columns_in_use"] == 2
    # K = 1 (or the reference model) is never "collapsed": it has nothing to collapse
    assert basis_report(V[:, :1], torch.ones(10, 1))["collapsed"] is False


def test_report_numbers_equal_loops():
    g = torch.Generator().manual_seed(1)
    F, K, N = 20, 4, 37
    V = torch.randn(F, K, generator=g, dtype=torch.float64)
    V[:, 3] = V[:, 0] + 0.1 * V[:, 3]                    # two close columns
    v_ref = torch.randn(F, 1, generator=g, dtype=torch.float64)
    W = torch.softmax(3 * torch.randn(N, K, generator=g, dtype=torch.float64), dim=1)
    W[5] = torch.tensor([0.4, 0.4, 0.1, 0.1])           # a tie: half a user each to columns 0 and 1
    acc = torch.rand(N, generator=g, dtype=torch.float64).numpy()
    acc_ref = acc.copy()
    acc_ref[:10] += 0.1
    acc_ref[10:15] -= 0.05
    report = basis_report(V, W, v_ref, acc, acc_ref, setting={"method": "LoRe", "K": K, "alpha": 0.0})

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    Vn, Wn, v = V.numpy(), W.numpy(), v_ref.numpy()[:, 0]
    for j in range(K):
        assert report["cos_ref"][j] == pytest.approx(cos(Vn[:, j], v), abs=1e-12)
        for k in range(K):
            assert report["cos_columns"][j][k] == pytest.approx(cos(Vn[:, j], Vn[:, k]), abs=1e-12)
    assert report["max_abs_cos"] == pytest.approx(
        max(abs(cos(Vn[:, j], Vn[:, k])) for j in range(K) for k in range(K) if j != k), abs=1e-12)
    top = [0.0] * K
    for i in range(N):
        best = [j for j in range(K) if Wn[i, j] >= Wn[i].max() - 1e-9]
        for j in best:
            top[j] += 1 / len(best)
    assert report["usage"]["top_users"] == pytest.approx(top)
    assert report["usage"]["weight_max"] == pytest.approx([max(Wn[:, j]) for j in range(K)])
    assert report["usage"]["weight_mean"] == pytest.approx([sum(Wn[:, j]) / N for j in range(K)])
    assert report["columns_in_use"] == sum(t / N >= 0.01 for t in top)
    rewards = [Vn @ Wn[i] for i in range(N)]
    pair_cos = [cos(rewards[i], rewards[j]) for i in range(N) for j in range(i + 1, N)]
    assert report["diversity"]["pairs"] == N * (N - 1) // 2
    assert report["diversity"]["q50"] == pytest.approx(float(np.median(pair_cos)), abs=1e-12)
    assert report["diversity"]["mean"] == pytest.approx(float(np.mean(pair_cos)), abs=1e-12)
    s = np.linalg.svd(Vn / np.linalg.norm(Vn, axis=0), compute_uv=False)
    p = s / s.sum()
    assert report["effective_rank"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), abs=1e-12)
    assert report["accuracy"] == {"mean": pytest.approx(acc.mean()), "mean_ref": pytest.approx(acc_ref.mean()),
                                  "mean_change": pytest.approx((acc - acc_ref).mean()),
                                  "gained": 5, "lost": 10, "unchanged": N - 15}
    assert report["setting"] == {"method": "LoRe", "K": K, "alpha": 0.0}
    # the same seed gives the same sampled diversity; the sample is used when there are many pairs
    big = torch.softmax(torch.randn(800, K, generator=g, dtype=torch.float64), dim=1)
    a, b = basis_report(V, big, seed=3), basis_report(V, big, seed=3)
    assert a["diversity"]["sampled"] and a["diversity"]["pairs"] == DIVERSITY_MAX_PAIRS
    assert a["diversity"] == b["diversity"]


def test_report_rejects_bad_shapes():
    V = orthonormal(10, 3)
    with pytest.raises(InputError, match="W has shape"):
        basis_report(V, torch.ones(5, 4) / 4)
    with pytest.raises(InputError, match="v_ref has 9 features"):
        basis_report(V, v_ref=torch.ones(9, 1))
    with pytest.raises(InputError, match="NaN"):
        basis_report(V * float("nan"))


def planted_rank3(seed=0, n_features=32, rank=3, n_users=100, n_pairs=100):
    """Users are Dirichlet(0.3) mixtures of 3 hidden reward directions, choices Bradley-Terry (as
    test_core.py's planted population): pair features with norms in the tens."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    V_true = 0.3 * torch.randn(n_features, rank, generator=g)                      # [F, 3]
    W = torch.tensor(rng.dirichlet([0.3] * rank, n_users), dtype=torch.float32)   # [N, 3]
    X = 10 * torch.randn(n_users, n_pairs, n_features, generator=g)              # [N, m, F]
    first = torch.rand(n_users, n_pairs, generator=g) < torch.sigmoid(torch.einsum("nmf,fk,nk->nm", X, V_true, W))
    return list(torch.where(first[..., None], X, -X)), V_true, W


def test_planted_rank_shows_in_the_users_effective_rank():
    train, V_true, W_true = planted_rank3()
    truth = basis_report(V_true, W_true)
    assert 2.5 <= truth["user_effective_rank"] <= 3.0 and truth["user_rank_95"] == 3
    set_seed(0)
    W, V = utils.solve_regularized(torch.randn(32, 1), 0.0, train, 5, num_iterations=1000, learning_rate=0.5,
                                   device=CPU)
    report = basis_report(V, W)
    assert 2.5 <= report["user_effective_rank"] <= 3.6
    assert report["user_rank_95"] == 3
    assert report["user_effective_rank"] < report["effective_rank"]   # 5 columns, 3 used directions
    assert report["collapsed"] is False


def test_records_and_figure(tmp_path):
    V = orthonormal(16, 3)
    reports = [basis_report(V[:, :K], torch.full((20, K), 1.0 / K), setting={"method": "LoRe", "K": K,
                                                                                   "alpha": 0.0})
               for K in (1, 2, 3)]
    reports.append(basis_report(V[:, :1].repeat(1, 3), torch.full((20, 3), 1 / 3),
                                      setting={"method": "LoRe", "K": 3, "alpha": 1e4}))
    reports.append(basis_report(V[:, :1], setting={"method": "reference", "K": 0}))
    records = basis_report_records(reports)
    assert [(r["method"], r["K"], r["alpha"]) for r in records] == [
        ("LoRe", 1, 0.0), ("LoRe", 2, 0.0), ("LoRe", 3, 0.0), ("LoRe", 3, 1e4), ("reference", 0, None)]
    assert [r["collapsed"] for r in records] == [False, False, False, True, False]
    assert records[2]["effective_rank"] == pytest.approx(3.0)
    json.dumps(records)
    write_table(str(tmp_path / "basis.csv"), records)
    plot_basis_reports(reports, str(tmp_path / "basis.png"))
    assert os.path.getsize(tmp_path / "basis.png") > 1000


# ----------------------------------------------------------------------------------------------
# Interpretation, personalized scoring, the commands
# ----------------------------------------------------------------------------------------------

basis_report_cli = load_script(os.path.join(REPO, "tools", "basis_report.py"), "tools_basis_report")
interpret_cli = load_script(os.path.join(REPO, "tools", "interpret.py"), "tools_interpret")
personalize_cli = load_script(os.path.join(REPO, "tools", "personalize.py"), "tools_personalize")
prepare = load_script(os.path.join(REPO, "PersonalLLM", "prepare.py"), "personalllm_prepare")
train_basis = load_script(os.path.join(REPO, "PersonalLLM", "train_basis.py"), "personalllm_train_basis")
best_of_n = load_script(os.path.join(REPO, "PersonalLLM", "best_of_n.py"), "personalllm_best_of_n")


def test_interpret_basis_equals_loops():
    g = torch.Generator().manual_seed(2)
    E, F = 40, 6
    table = torch.randn(E, F, generator=g).bfloat16()
    V, v_ref = torch.randn(F, 2, generator=g), torch.randn(F, 1, generator=g)
    conversations = {e: [{"role": "user", "content": f"prompt {e // 4}"},
                         {"role": "assistant", "content": f"reply {e} " + "x" * 500}] for e in range(E)}
    import pandas as pd
    pairs = pd.DataFrame({"chosen": [0, 1, 2, 3, 4, 5, 6, 7, 0] * 3, "rejected": [8, 9, 10, 11, 12, 13, 14, 15, 8] * 3})
    records = interpret_basis(V, table, conversations, v_ref, pairs, top=3, max_chars=50)
    phi = table.float()
    for j in range(2):
        s = [float(phi[e] @ V[:, j]) for e in range(E)]
        highest = sorted(range(E), key=lambda e: -s[e])[:3]
        lowest = sorted(range(E), key=lambda e: s[e])[:3]
        rows = lambda kind: [r["row"] for r in records if r["column"] == j and r["kind"] == kind]  # noqa: E731
        assert rows("highest") == highest and rows("lowest") == lowest
        # disagreements: distinct pairs with opposite signs, the strongest first
        distinct = sorted(set(zip(pairs["chosen"], pairs["rejected"])))
        m = {p: float((phi[p[0]] - phi[p[1]]) @ V[:, j]) for p in distinct}
        m_ref = {p: float((phi[p[0]] - phi[p[1]]) @ v_ref[:, 0]) for p in distinct}
        sd, sd_ref = np.std(list(m.values()), ddof=1), np.std(list(m_ref.values()), ddof=1)
        opposite = [p for p in distinct if m[p] * m_ref[p] < 0]
        expected = sorted(opposite, key=lambda p: -min(abs(m[p]) / sd, abs(m_ref[p]) / sd_ref))[:3]
        got = [r for r in records if r["column"] == j and r["kind"] == "disagrees_with_ref"]
        assert [(r["chosen_row"], r["rejected_row"]) for r in got] == expected
        for r in got:
            assert r["margin"] * r["margin_ref"] < 0
    top = next(r for r in records if r["kind"] == "highest")
    assert top["context"] == f"user: prompt {top['row'] // 4}" and len(top["reply"]) == 50 and top["reply"].endswith("...")
    assert "column 1" in format_interpretation(records)


def lore_method(V, **hparams):
    method = METHODS["lore"](V.shape[1], 0.0, None, CPU, **hparams)
    method.V = V.float()
    return method


def test_fit_new_users_recovers_planted_users_in_any_order():
    g = torch.Generator().manual_seed(3)
    F, K, N, m = 16, 3, 8, 40
    V = torch.randn(F, K, generator=g)
    W_true = torch.eye(K)[torch.arange(N) % K] * 0.9 + 0.1 / K                     # each user leans on one column
    a, b = 10 * torch.randn(N * m, F, generator=g), 10 * torch.randn(N * m, F, generator=g)
    user = torch.arange(N).repeat(m)                                               # interleaved: 0, 1, ..., 0, 1, ...
    better = ((a - b) @ V * W_true[user]).sum(1) > 0
    chosen, rejected = torch.where(better[:, None], a, b), torch.where(better[:, None], b, a)
    method = lore_method(V, fewshot_iters=200, fewshot_lr=0.1)
    set_seed(0)
    W = fit_new_users(method, chosen, rejected, user, N)
    assert W.shape == (N, K) and torch.allclose(W.sum(1), torch.ones(N))
    assert (W.argmax(1) == torch.arange(N) % K).all()
    # the same pairs sorted by user give the same weights: the order of the lines does not matter
    order = torch.argsort(user, stable=True)
    set_seed(0)
    assert torch.equal(fit_new_users(method, chosen[order], rejected[order], user[order], N), W)
    # every user's score of an item is phi^T V w
    items = torch.randn(5, F, generator=g).bfloat16()
    scores = score_items(method, items, W)
    assert scores.shape == (N, 5)
    for i in range(N):
        for c in range(5):
            assert float(scores[i, c]) == pytest.approx(float(items[c].float() @ V @ W[i]), rel=1e-5, abs=1e-4)
    with pytest.raises(InputError, match="has no pairs"):
        fit_new_users(method, chosen[:3], rejected[:3], torch.tensor([0, 2, 2]), 3)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def test_personalize_command_scores_are_phi_V_w(tiny_model_dir, tmp_path, capsys):
    F, K = 64, 3
    method = lore_method(torch.randn(F, K, generator=torch.Generator().manual_seed(4)), fewshot_iters=50)
    ckpt = str(tmp_path / "lore_K3_alpha0.safetensors")
    save_method(ckpt, method, W=torch.full((4, K), 1 / K), W_unseen=torch.full((2, K), 1 / K))
    conv = lambda prompt, reply: [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]  # noqa: E731
    prefs = [{"user": u, "chosen": conv(f"w{i} w7", f"w{i + 10} w{u == 'bob'}"), "rejected": conv(f"w{i} w7", f"w{i + 40}")}
             for u in ("bob", "alice") for i in range(3)]
    prefs.append({"user": "bob", "chosen": conv("w1", "w2 w3"), "rejected": conv("w1", "w4")})
    candidates = [{"id": f"c{j}", "messages": conv("w5 w6", f"w{20 + j} w{30 + j}")} for j in range(4)]
    write_jsonl(tmp_path / "prefs.jsonl", prefs)
    write_jsonl(tmp_path / "cands.jsonl", candidates)
    out = str(tmp_path / "personal")
    personalize_cli.main(personalize_cli.parse_args([
        "--checkpoint", ckpt, "--model", tiny_model_dir, "--prefs", str(tmp_path / "prefs.jsonl"),
        "--candidates", str(tmp_path / "cands.jsonl"), "--out", out, "--device", "cpu"]))
    saved = load_tensors(os.path.join(out, "weights.safetensors"), ["W"])["W"]   # [2, K]
    users = json.loads(read_metadata(os.path.join(out, "weights.safetensors"))["users"])
    assert users == ["bob", "alice"] and saved.shape == (2, K)
    phi = embed_conversations([c["messages"] for c in candidates], str(tmp_path / "phi.safetensors"),
                                    tiny_model_dir, device="cpu")                   # [4, F]
    import pandas as pd
    scores = pd.read_csv(os.path.join(out, "scores.csv"))
    assert len(scores) == 2 * 4 and set(scores["rank"]) == {1, 2, 3, 4}
    for row in scores.itertuples():
        w = saved[users.index(row.user)]
        by_hand = float(phi[int(row.candidate[1:])].float() @ method.V @ w)
        assert row.score == pytest.approx(by_hand, rel=1e-4, abs=1e-4)
    assert os.path.isfile(os.path.join(out, "config.json"))
    # bad input: one line, exit code 2, the file and line named
    write_jsonl(tmp_path / "bad.jsonl", [prefs[0], {"user": "carol", "chosen": prefs[0]["chosen"]}])
    with pytest.raises(SystemExit) as e:
        personalize_cli.main(personalize_cli.parse_args(["--checkpoint", ckpt, "--model", tiny_model_dir, "--prefs",
                                                         str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o2")]))
    assert e.value.code == 2 and "bad.jsonl:2: 'rejected'" in capsys.readouterr().err


def test_tie_only_preferences_are_refused_not_fitted_as_the_random_start(tiny_model_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """A user whose every pair has the same chosen and rejected response has nothing to fit: its
    weights would be the random start. fit_new_users and tools/personalize.py refuse it (personalize
    before embedding), naming the user; a user with one real pair among ties is fitted."""
    F, K = 64, 3
    method = lore_method(torch.randn(F, K, generator=torch.Generator().manual_seed(4)), fewshot_iters=20)
    a, b = torch.randn(4, F), torch.randn(4, F)
    with pytest.raises(InputError, match=r"user 1: every pair's chosen and rejected have the same embedding"):
        fit_new_users(method, a, torch.cat([b[:2], a[2:]]), torch.tensor([0, 0, 1, 1]))
    assert fit_new_users(method, a, torch.cat([a[:1], b[1:]]), torch.tensor([0, 0, 1, 1])).shape == (2, K)
    ckpt = str(tmp_path / "lore_K3_alpha0.safetensors")
    save_method(ckpt, method, W=torch.full((4, K), 1 / K), W_unseen=torch.full((2, K), 1 / K))
    conv = lambda reply: [{"role": "user", "content": "w1"}, {"role": "assistant", "content": reply}]  # noqa: E731
    write_jsonl(tmp_path / "ties.jsonl", [{"user": "bob", "chosen": conv("w2"), "rejected": conv("w3")},
                                          {"user": "alice", "chosen": conv("w4"), "rejected": conv("w4")}])
    monkeypatch.setattr(personalize_cli, "embed_conversations", lambda *a, **k: pytest.fail("embedded tie-only prefs"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        personalize_cli.main(personalize_cli.parse_args(["--checkpoint", ckpt, "--model", tiny_model_dir, "--prefs",
                                                         str(tmp_path / "ties.jsonl"), "--out", str(tmp_path / "o"),
                                                         "--device", "cpu"]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "every preference of user 'alice' has the same chosen and rejected conversation" in err
    assert not os.path.exists(tmp_path / "o")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny synthetic PersonalLLM folder (400 + 100 prompts, F = 16, 60 seen and 40 unseen users
    with pools of 20 few-shot pairs) and lore K = 0 and 3 fitted on it."""
    root = tmp_path_factory.mktemp("basis_tools")
    data, results = str(root / "data"), str(root / "results")
    prepare.main(prepare.parse_args(["--synthetic", "--out", data, "--prompts-train", "400", "--prompts-test", "100",
                                     "--features", "16", "--n-users", "60", "--n-unseen", "40", "--train-frac", "0.1",
                                     "--pool-frac", "0.05"]))
    train_basis.main(train_basis.parse_args(["--data", data, "--out", os.path.join(results, "train_basis"),
                                             "--k-list", "0,3", "--iters", "200", "--fewshot-iters", "200",
                                             "--fewshot-pairs", "5", "--device", "cpu"]))
    return data, os.path.join(results, "train_basis")


def test_basis_report_and_interpret_commands(fitted, tmp_path, capsys):
    data, ckpts = fitted
    paths = [os.path.join(ckpts, f"lore_K{K}_alpha0.safetensors") for K in (0, 3)]
    reports = basis_report_cli.main(basis_report_cli.parse_args([*paths, "--v-ref-from", data,
                                                                 "--out", str(tmp_path / "report")]))
    assert [r["setting"]["K"] for r in reports] == [0, 3]
    assert reports[0]["cos_ref"] == pytest.approx([1.0]) and reports[0]["accuracy"]["mean_change"] == 0.0
    assert reports[1]["user_rank_95"] == 3 and not reports[1]["collapsed"]
    assert reports[1]["accuracy"]["mean_change"] > 0.1          # K = 3 beats the reference on seen_test
    assert json.load(open(tmp_path / "report" / "basis_report.json")) == json.loads(json.dumps(reports))
    assert "effective rank of users" in capsys.readouterr().out
    # the default --out is basis_report/ beside the checkpoints' folder
    assert basis_report_cli.parse_args(paths).out == os.path.join(os.path.dirname(ckpts), "basis_report")

    records = interpret_cli.main(interpret_cli.parse_args([paths[1], "--data", data, "--top", "2",
                                                          "--out", str(tmp_path / "interpret")]))
    kinds = {(r["column"], r["kind"]) for r in records}
    assert kinds == {(j, k) for j in range(3) for k in ("highest", "lowest", "disagrees_with_ref")}
    import pandas as pd
    assert len(pd.read_csv(tmp_path / "interpret" / "interpretation.csv")) == len(records) == 3 * 3 * 2
    assert "synthetic" in records[0]["context"]

    code = pytest.raises(SystemExit, basis_report_cli.main,
                         basis_report_cli.parse_args([str(tmp_path / "missing.safetensors")])).value.code
    assert code == 2 and "missing.safetensors: no such file" in capsys.readouterr().err


def test_best_of_n_personal_beats_v_ref_and_improves_with_shots(fitted, tmp_path, capsys):
    data, ckpts = fitted
    out = str(tmp_path / "bon")
    records = best_of_n.main(best_of_n.parse_args(["--data", data, "--checkpoint",
                                                   os.path.join(ckpts, "lore_K3_alpha0.safetensors"), "--out", out,
                                                   "--shots", "1,20", "--trials", "2", "--device", "cpu"]))
    rule = {(r["rule"], r["shots"]): r for r in records}
    assert rule["oracle", 0]["win_rate"] == 1.0 and rule["oracle", 0]["regret"] == 0.0
    assert rule["random", 0]["win_rate"] == 0.5
    assert rule["true_linear", 0]["win_rate"] > rule["personal", 1]["win_rate"] > rule["random", 0]["win_rate"]
    assert rule["personal", 20]["win_rate"] > rule["v_ref", 0]["win_rate"] + 0.05
    assert rule["personal", 20]["win_rate"] > rule["personal", 1]["win_rate"] + 0.03
    assert rule["personal", 20]["regret"] < rule["personal", 1]["regret"] < rule["random", 0]["regret"]
    assert rule["active", 20]["win_rate"] > rule["v_ref", 0]["win_rate"] + 0.05   # the active personal rule
    assert rule["active", 1]["trials"] == 2 and rule["active", 20]["regret"] < rule["random", 0]["regret"]
    assert json.load(open(os.path.join(out, "best_of_n.json"))) == records
    assert os.path.isfile(os.path.join(out, "best_of_n.png"))
    code = pytest.raises(SystemExit, best_of_n.main, best_of_n.parse_args(
        ["--data", data, "--checkpoint", os.path.join(ckpts, "lore_K3_alpha0.safetensors"), "--out", out,
         "--shots", "21", "--device", "cpu"])).value.code
    assert code == 2 and "pool of 20 few-shot pairs" in capsys.readouterr().err


def test_pick_quality_equals_loops():
    g = torch.Generator().manual_seed(5)
    true = torch.randint(0, 4, (3, 5, 6), generator=g).double()                    # many ties
    picks = torch.randn(3, 5, 6, generator=g).double()
    win, regret = best_of_n.pick_quality(true, picks)
    for i in range(3):
        for s in range(5):
            p = int(picks[i, s].argmax())
            others = [r for r in range(6) if r != p]
            expected = sum(1.0 if true[i, s, p] > true[i, s, r] else 0.5 if true[i, s, p] == true[i, s, r] else 0.0
                           for r in others) / len(others)
            assert float(win[i, s]) == pytest.approx(expected)
            assert float(regret[i, s]) == pytest.approx(float(true[i, s].max() - true[i, s, p]))
    shared, _ = best_of_n.pick_quality(true, picks[:1])                              # one reward for everyone
    assert shared.shape == (3, 5)
