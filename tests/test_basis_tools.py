"""The tools that read a learned basis: the health report (collapse, effective ranks, usage,
diversity), and their numbers checked against plain loops and planted populations."""
import json
import os
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import utils  # noqa: E402

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
    report = utils.basis_report(V, W, v_ref=v)
    assert report["effective_rank"] == pytest.approx(1.0, abs=1e-4)
    assert report["rank_95"] == 1
    assert report["user_effective_rank"] == pytest.approx(1.0, abs=1e-4)
    assert report["max_abs_cos"] == pytest.approx(1.0, abs=1e-6)
    assert np.allclose(np.abs(report["cos_ref"]), 1.0)
    assert report["collapsed"] is True
    assert any("effective rank" in w for w in report["collapse_reasons"])
    assert any("|cos|" in w for w in report["collapse_reasons"])
    text = utils.format_basis_report(report)
    assert "WARNING: the basis has collapsed" in text
    json.dumps(report)  # JSON-serializable as it is


def test_orthonormal_basis_with_uniform_users_has_full_rank():
    K = 6
    V = orthonormal(40, K)
    for W in (torch.full((50, K), 1.0 / K),                                         # everyone equal
              torch.distributions.Dirichlet(torch.ones(K)).sample((300,))):        # uniform on the simplex
        report = utils.basis_report(V, W)
        assert report["effective_rank"] == pytest.approx(K, abs=1e-6)
        assert report["rank_95"] == K
        assert report["max_abs_cos"] == pytest.approx(0.0, abs=1e-9)
        assert report["columns_in_use"] == K
        assert report["collapsed"] is False and report["collapse_reasons"] == []
        assert "WARNING" not in utils.format_basis_report(report)
    # all users tied on every column: each column gets 1/K of every user
    tied = utils.basis_report(V, torch.full((50, K), 1.0 / K))
    assert tied["usage"]["top_users"] == pytest.approx([50 / K] * K)


def test_one_column_for_everyone_is_collapse():
    V = orthonormal(30, 4)
    W = torch.tensor([[0.97, 0.01, 0.01, 0.01]] * 96 + [[0.1, 0.7, 0.1, 0.1]] * 4)  # 96% on column 0
    report = utils.basis_report(V, W)
    assert report["effective_rank"] == pytest.approx(4.0)
    assert report["collapsed"] is True
    assert report["collapse_reasons"] == [r for r in report["collapse_reasons"] if "column 0 is the largest" in r]
    assert report["columns_in_use"] == 2
    # K = 1 (or the reference model) is never "collapsed": it has nothing to collapse
    assert utils.basis_report(V[:, :1], torch.ones(10, 1))["collapsed"] is False


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
    report = utils.basis_report(V, W, v_ref, acc, acc_ref, setting={"method": "LoRe", "K": K, "alpha": 0.0})

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
    a, b = utils.basis_report(V, big, seed=3), utils.basis_report(V, big, seed=3)
    assert a["diversity"]["sampled"] and a["diversity"]["pairs"] == utils.DIVERSITY_MAX_PAIRS
    assert a["diversity"] == b["diversity"]


def test_report_rejects_bad_shapes():
    V = orthonormal(10, 3)
    with pytest.raises(utils.InputError, match="W has shape"):
        utils.basis_report(V, torch.ones(5, 4) / 4)
    with pytest.raises(utils.InputError, match="v_ref has 9 features"):
        utils.basis_report(V, v_ref=torch.ones(9, 1))
    with pytest.raises(utils.InputError, match="NaN"):
        utils.basis_report(V * float("nan"))


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
    truth = utils.basis_report(V_true, W_true)
    assert 2.5 <= truth["user_effective_rank"] <= 3.0 and truth["user_rank_95"] == 3
    utils.set_seed(0)
    W, V = utils.solve_regularized(torch.randn(32, 1), 0.0, train, 5, num_iterations=1000, learning_rate=0.5,
                                   device=CPU)
    report = utils.basis_report(V, W)
    assert 2.5 <= report["user_effective_rank"] <= 3.6
    assert report["user_rank_95"] == 3
    assert report["user_effective_rank"] < report["effective_rank"]   # 5 columns, 3 used directions
    assert report["collapsed"] is False


def test_records_and_figure(tmp_path):
    V = orthonormal(16, 3)
    reports = [utils.basis_report(V[:, :K], torch.full((20, K), 1.0 / K), setting={"method": "LoRe", "K": K,
                                                                                   "alpha": 0.0})
               for K in (1, 2, 3)]
    reports.append(utils.basis_report(V[:, :1].repeat(1, 3), torch.full((20, 3), 1 / 3),
                                      setting={"method": "LoRe", "K": 3, "alpha": 1e4}))
    reports.append(utils.basis_report(V[:, :1], setting={"method": "reference", "K": 0}))
    records = utils.basis_report_records(reports)
    assert [(r["method"], r["K"], r["alpha"]) for r in records] == [
        ("LoRe", 1, 0.0), ("LoRe", 2, 0.0), ("LoRe", 3, 0.0), ("LoRe", 3, 1e4), ("reference", 0, None)]
    assert [r["collapsed"] for r in records] == [False, False, False, True, False]
    assert records[2]["effective_rank"] == pytest.approx(3.0)
    json.dumps(records)
    utils.write_table(str(tmp_path / "basis.csv"), records)
    utils.plot_basis_reports(reports, str(tmp_path / "basis.png"))
    assert os.path.getsize(tmp_path / "basis.png") > 1000
