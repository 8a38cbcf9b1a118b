"""Active selection of new users' pairs (lore.active), the closed-form basis pca (lore.pca) and the
LoRe entries' init="svd": the criterion against a direct computation, what a selection may and may
not read, planted-basis recovery, determinism, and the scripts' flags."""
import os

import pytest
import torch

from conftest import REPO, load_script

import utils
from lore import active
from lore.checks import InputError, set_seed
from lore.data import load_data
from lore.io import load_tensors, read_json
from lore.methods import load_method, METHODS
from lore.pairs import Pairs
from lore.pca import principal_basis, principal_directions

FOLDER = os.path.join(REPO, "PersonalLLM")
prepare = load_script(os.path.join(FOLDER, "prepare.py"), "active_prepare")
train_basis = load_script(os.path.join(FOLDER, "train_basis.py"), "active_train_basis")
vary_fewshot = load_script(os.path.join(FOLDER, "vary_fewshot.py"), "active_vary_fewshot")
FAST = ["--iters", "60", "--fewshot-iters", "60", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A planted PersonalLLM population: 40 seen, 12 unseen users, F = 16, rank 3, pools of 12 pairs."""
    out = str(tmp_path_factory.mktemp("active") / "data")
    prepare.main(prepare.parse_args(["--synthetic", "--out", out, "--prompts-train", "400", "--prompts-test", "60",
                                     "--features", "16", "--n-users", "40", "--n-unseen", "12",
                                     "--train-frac", "0.1", "--pool-frac", "0.03"]))
    return out


def fitted_lore(d, K=3):
    set_seed(0)
    method = METHODS["lore"](K, 0.0, d.v_ref, "cpu", iters=60, fewshot_iters=60)
    method.fit(d.sets["seen_train"])
    return method


def test_information_against_a_direct_computation():
    """Posterior precision and the log det gain of every candidate, single pairs and groups, by loops."""
    torch.manual_seed(0)
    N, P, D, var = 2, 7, 3, 0.5
    user = torch.tensor([0, 0, 0, 1, 1, 1, 1])
    g, lam = torch.randn(P, D), torch.rand(P) + 0.1
    revealed = torch.tensor([True, False, False, False, True, True, False])
    H = active.posterior_precision(lam, g, user, N, var, revealed)
    for i in range(N):
        direct = torch.eye(D, dtype=torch.float64) / var
        for p in range(P):
            if revealed[p] and user[p] == i:
                direct += lam[p].double() * torch.outer(g[p], g[p]).double()
        assert torch.allclose(H[i], direct)
    info = active.information(lam, g, user, H)
    for p in range(P):
        Hi = H[user[p]]
        gain = torch.logdet(Hi + lam[p].double() * torch.outer(g[p], g[p]).double()) - torch.logdet(Hi)
        assert info[p].item() == pytest.approx(gain.item(), rel=1e-5)
    gid = torch.tensor([0, 0, 1, 2, 2, 2, 3])   # groups asked whole: their pairs' information together
    grouped = active.information(lam, g, user, H, gid, 4)
    for k in range(4):
        members = (gid == k).nonzero()[:, 0]
        Hi = H[user[members[0]]]
        A = sum(lam[p].double() * torch.outer(g[p], g[p]).double() for p in members)
        assert grouped[k].item() == pytest.approx((torch.logdet(Hi + A) - torch.logdet(Hi)).item(), rel=1e-5)


def test_lore_margin_gradient_is_the_softmax_jacobian():
    """g = d (z . softmax(theta)) / d theta = (diag(w) - w w^T) z, by torch.func for every pair at once."""
    torch.manual_seed(1)
    method = METHODS["lore"](3, 0.0, None, "cpu")
    method.V = torch.randn(8, 3)
    theta, zc, zr = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    m, g = active.margin_gradients(method, theta, zc, zr)
    w = torch.softmax(theta, -1)
    for p in range(5):
        J = torch.diag(w[p]) - torch.outer(w[p], w[p])
        assert torch.allclose(g[p], J @ (zc[p] - zr[p]), atol=1e-6)
        assert m[p].item() == pytest.approx(((zc[p] - zr[p]) @ w[p]).item(), abs=1e-5)
    assert torch.allclose(method.free_parameters(w).softmax(-1), w)   # log w: the logits of w
    # the answer is not read: swapping chosen and rejected leaves lambda and g g^T unchanged
    m2, g2 = active.margin_gradients(method, theta, zr, zc)
    assert torch.allclose(m2, -m) and torch.allclose(g2, -g)
    assert torch.allclose(active.fisher_weight(method, m2), active.fisher_weight(method, m))


def test_active_reveals_one_new_pair_per_round_from_the_pool_only(data):
    d = load_data(data, "cpu")
    method = fitted_lore(d)
    pool = d.sets["unseen_fewshot"]
    size = pool.counts()                                                           # 12 per user
    set_seed(3)
    masks = [mask.clone() for _, mask, _ in active.active_shots(method, pool, int(size.max()) + 2)]
    for n, mask in enumerate(masks, 1):
        # n pairs per user (all of them once the pool is spent): never a pair twice, nothing outside the pool
        assert torch.equal(torch.bincount(pool.user[mask], minlength=pool.n_users), size.clamp(max=n))
        if n > 1:
            assert (mask >= masks[n - 2]).all()   # nested: what was revealed stays revealed
    # same seed, same choices
    set_seed(3)
    again = [mask.clone() for _, mask, _ in active.active_shots(method, pool, 4)]
    assert all(torch.equal(a, b) for a, b in zip(again, masks))
    # the first question does not read the answers: the pool with every pair flipped gives the same picks
    from dataclasses import replace
    flipped = replace(pool, chosen=pool.rejected, rejected=pool.chosen)
    set_seed(3)
    _, first, _ = next(active.active_shots(method, flipped, 1))
    assert torch.equal(first, masks[0])


def test_sweep_shots_active_never_reads_the_held_out_pairs(data):
    """The held-out pairs flipped (every answer wrong): the chosen shots and their fit are the same,
    so the shots' accuracy is identical and the held-out accuracy is its complement."""
    d = load_data(data, "cpu")
    test = d.sets["unseen_test"]
    from dataclasses import replace
    flipped = replace(test, chosen=test.rejected, rejected=test.chosen)
    runs = [utils.sweep_shots(methods=["lore"], K_list=[3], shots=[1, 3], trials=2, seed=0, select=["active"],
                              hparams={"lore": {"iters": 60, "fewshot_iters": 60}}, seen_train=d.sets["seen_train"],
                              unseen_fewshot=d.sets["unseen_fewshot"], unseen_test=t) for t in (test, flipped)]
    for a, b in zip(*runs):
        assert a["select"] == "active" and a["unseen_fewshot"] == b["unseen_fewshot"]
        assert a["unseen_test"] + b["unseen_test"] == pytest.approx(1.0, abs=0.02)   # ties count wrong twice


def test_a_method_without_margin_gradients_is_refused(data):
    d = load_data(data, "cpu")
    with pytest.raises(InputError, match="method pal cannot choose pairs actively"):
        utils.sweep_shots(methods=["lore", "pal"], K_list=[2], shots=[1], trials=1, select=["random", "active"],
                          seen_train=d.sets["seen_train"], unseen_fewshot=d.sets["unseen_fewshot"],
                          unseen_test=d.sets["unseen_test"])
    with pytest.raises(InputError, match="select must be"):
        utils.sweep_shots(methods=["lore"], K_list=[2], shots=[1], trials=1, select=["greedy"],
                          seen_train=d.sets["seen_train"], unseen_fewshot=d.sets["unseen_fewshot"],
                          unseen_test=d.sets["unseen_test"])


def test_every_pair_offers_all_28_pairs_answered_by_the_true_mixture(data):
    d = load_data(data, "cpu")
    scores = load_tensors(os.path.join(data, "scores.safetensors"))
    row_scores = torch.cat([scores["train"], scores["test"]]).reshape(-1, scores["train"].shape[-1])   # [E, M]
    W = load_tensors(os.path.join(data, "users.safetensors"))["W_unseen"]
    pool = d.sets["unseen_fewshot"]
    cands = utils.every_pair(pool, 8, row_scores, W)
    assert torch.equal(cands.counts(), 28 * pool.counts())   # every pool prompt once per user (no repeats here)
    true = lambda rows: (row_scores[rows].double() * W[cands.user].double()).sum(-1)
    assert (true(cands.chosen) >= true(cands.rejected)).all()
    assert torch.equal(cands.chosen // 8, cands.rejected // 8)   # the two responses of one prompt
    # the pool's own pairs (best vs worst) are among them
    key = lambda p: set(zip(p.user.tolist(), p.chosen.tolist(), p.rejected.tolist()))
    assert key(pool) <= key(cands)


def planted(seed=0, N=30, m=40, F=12, K=3, E=400):
    """Users' difference rows in the span of a planted orthonormal D [F, K] (plus 1% noise), in table form."""
    g = torch.Generator().manual_seed(seed)
    D = torch.linalg.qr(torch.randn(F, K, generator=g))[0]
    table = torch.randn(E, K, generator=g) * torch.tensor([5.0, 3.0, 2.0]) @ D.T + 0.01 * torch.randn(E, F, generator=g)
    user = torch.arange(N).repeat_interleave(m)
    c, r = torch.randint(0, E, (2, N * m), generator=g)
    return D, Pairs(user, N, table=table, chosen=c, rejected=r)


def test_pca_recovers_a_planted_basis_in_table_and_row_form():
    D, pairs = planted()
    V, evals = principal_directions(pairs, 3)
    cos = torch.linalg.svdvals(D.T @ V)                    # cosines of the principal angles
    assert cos.min() > 0.999 and (evals[:-1] >= evals[1:]).all()
    rows = Pairs(pairs.user, pairs.n_users, X=pairs.rows())
    V_rows, evals_rows = principal_directions(rows, 3)
    assert torch.allclose(evals_rows, evals, rtol=1e-4)
    assert torch.allclose((V_rows * V).sum(0).abs(), torch.ones(3), atol=1e-4)
    # the basis: oriented (the users' mean margin >= 0 on every column), rms margin 100
    B = principal_basis(pairs, 3, 100.0)
    Z = pairs.project(B)                                                         # [P, 3]
    assert (Z.mean(0) >= 0).all() and torch.allclose(Z.pow(2).mean(0).sqrt(), torch.full((3,), 100.0), rtol=1e-3)


def test_pca_is_the_exact_top_eigenvectors_of_the_second_moment():
    """On a flat spectrum (where a few power iterations fail) pca's directions are torch.linalg.eigh's
    top-K of G = sum_i mean_{x in X_i} x x^T built here by a loop over users, to < 0.5 degrees."""
    g = torch.Generator().manual_seed(3)
    N, m, F, K, E = 30, 20, 24, 5, 200
    scale = torch.tensor([6.0, 5.0, 4.0, 3.9, 3.85] + [3.8] * (F - 5))            # flat after the third
    table = torch.randn(E, F, generator=g) * scale
    user = torch.arange(N).repeat_interleave(m)
    c, r = torch.randint(0, E, (2, N * m), generator=g)
    pairs = Pairs(user, N, table=table, chosen=c, rejected=r)
    G = torch.zeros(F, F, dtype=torch.float64)
    for i in range(N):                                                           # the loop-form reference
        X = (table[c[user == i]] - table[r[user == i]]).double()
        G += X.T @ X / len(X)
    evals, evecs = torch.linalg.eigh(G)
    ref = evecs[:, -K:].flip(1)                                                  # [F, K] decreasing
    D, got = principal_directions(pairs, K)
    angles = torch.rad2deg(torch.arccos((D.double() * ref).sum(0).abs().clamp(max=1)))
    assert angles.max() < 0.5, angles
    assert torch.allclose(got.double(), evals.flip(0)[:K], rtol=1e-5)
    D_rows, _ = principal_directions(Pairs(user, N, X=pairs.rows()), K)          # row form: the same
    assert (D_rows * D).sum(0).abs().min() > 1 - 1e-5


def test_pca_and_svd_init_through_the_scripts(data, tmp_path):
    """--method pca beats the reference model (lore K = 0) on planted data; lore init=svd gives the same
    basis for every seed; both scripts and the basis report run for pca."""
    out = str(tmp_path / "tb")
    records = train_basis.main(train_basis.parse_args(["--data", data, "--out", out, "--method", "lore,pca",
                                                      "--k-list", "0,3", *FAST]))
    acc = {(r["method"], r["K"]): r for r in records}
    for name in ("seen_test", "unseen_test"):
        assert acc[("pca", 3)][name] > acc[("lore", 0)][name] + 0.02
    assert os.path.exists(os.path.join(out, "pca_K3.report.json")) and "basis_reports.csv" in os.listdir(out)
    method, _ = load_method(os.path.join(out, "pca_K3.safetensors"))
    assert method.name == "pca" and method.V.shape == (16, 3)
    Vs = []
    for seed in ("0", "1"):
        run = str(tmp_path / f"svd{seed}")
        train_basis.main(train_basis.parse_args(["--data", data, "--out", run, "--k-list", "3", "--seed", seed,
                                                "--lore-init", "svd", "--stop", "fixed", *FAST]))
        Vs.append(load_method(os.path.join(run, "lore_K3_alpha0.safetensors"))[0].V)
    # svd at the fixed recipe: a function of the data (full batch), whatever the seed (stopped by the
    # rule, the held-out slice is the seed's draw)
    assert torch.equal(Vs[0], Vs[1])
    vf = str(tmp_path / "vf")
    records = vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", vf, "--method", "pca",
                                                        "--k-list", "3", "--shots", "1,3", "--trials", "2",
                                                        "--select", "random,active", "--candidates", "all", *FAST]))
    assert [(r["select"], r["shots"]) for r in records] == [("random", 1), ("random", 3), ("active", 1), ("active", 3)]
    assert "accuracy_vs_shots.png" in os.listdir(vf)
    assert read_json(os.path.join(vf, "config.json"))["candidates"] == "all"


def test_init_svd_for_both_entries_and_bad_values(data):
    d = load_data(data, "cpu")
    for name in ("lore", "lore_regularized"):
        Vs = []
        for seed in (0, 1):
            set_seed(seed)
            method = METHODS[name](3, 0.0, d.v_ref, "cpu", iters=30, init="svd")
            method.fit(d.sets["seen_train"])
            Vs.append(method.V)
        assert torch.equal(Vs[0], Vs[1]), name
        # both entries answer active selection: one new pair per user in a round
        pool = d.sets["unseen_fewshot"]
        _, mask, U = next(active.active_shots(method, pool, 1))
        assert torch.equal(torch.bincount(pool.user[mask], minlength=pool.n_users), torch.ones(pool.n_users).long())
        assert U.shape == (pool.n_users, method.V.shape[1])
    with pytest.raises(InputError, match="init must be one of"):
        METHODS["lore"](3, 0.0, d.v_ref, "cpu", init="zeros")
    with pytest.raises(SystemExit) as e:
        train_basis.parse_args(["--lore-init", "zeros"])
    assert e.value.code == 2


def test_active_with_a_method_that_cannot_exits_2(data, tmp_path, capsys):
    out = str(tmp_path / "vf")
    with pytest.raises(SystemExit) as e:
        vary_fewshot.main(vary_fewshot.parse_args(["--data", data, "--out", out, "--method", "lore,pal", "--k-list", "2",
                                                   "--shots", "1", "--trials", "1", "--select", "active", *FAST]))
    assert e.value.code == 2 and "method pal cannot choose pairs actively" in capsys.readouterr().err
    assert not os.path.exists(out)   # refused before anything was written
    with pytest.raises(SystemExit) as e:
        vary_fewshot.parse_args(["--select", "random,greedy"])
    assert e.value.code == 2
