"""The LoRe core in utils.py against plain loop-form references written here, a planted low-rank
population, the pipelines' return contracts and every bad input."""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import utils  # noqa: E402

from lore.checks import InputError, set_seed  # noqa: E402
from lore.data import load_data  # noqa: E402
from lore.draws import choice_without_replacement  # noqa: E402
from lore.methods import check_fitted  # noqa: E402
from lore.io import load_tensors  # noqa: E402
from lore.pairs import pack, Pairs  # noqa: E402
from lore.results import save_results  # noqa: E402
from lore.steps import user_scores  # noqa: E402

CPU = torch.device("cpu")


def random_users(n_users=6, n_features=12, lo=2, hi=9, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(int(torch.randint(lo, hi, (1,), generator=g)), n_features, generator=g)
            for _ in range(n_users)]


# ---- loop-form references: the method's formulas (docs/method.md), one user and one column at a time ---------

def ref_lore_loss(X, V, W_logits, v_ref, alpha):
    X, nll = [x.double() for x in X], 0.0
    for i, x in enumerate(X):
        w = torch.softmax(W_logits[i], 0)
        nll += sum(-math.log(1 / (1 + math.exp(-float(row @ V @ w) / 100))) for row in x) / len(x)
    reg = sum(float(((V[:, j] - v_ref[:, 0]) ** 2).sum()) for j in range(V.shape[1]))
    return nll, alpha * reg


def ref_regularized_loss(X, V, W_logits, v_ref, alpha):
    X, terms = [x.double() for x in X], []
    for i, x in enumerate(X):
        w = torch.softmax(W_logits[i], 0)
        terms += [-math.log(1 / (1 + math.exp(-float(row @ V @ w) / 100))) for row in x]
    cos = [float(V[:, j] @ v_ref[:, 0] / (V[:, j].norm() * v_ref.norm())) for j in range(V.shape[1])]
    return sum(terms) / len(terms), alpha * sum(1 - c for c in cos) / len(cos)


def ref_accuracy(x, V, w):
    x, V, w = x.double(), V.double(), w.double()
    return sum(float(row @ V @ w) > 0 for row in x) / len(x)


# ---- losses and steps ----------------------------------------------------------------------------

def test_lore_loss_equals_loop_form():
    X, v_ref = random_users(), torch.randn(12, 1)
    model = utils.LoRe(v_ref, 0.3, 6, 12, 3, 1, 0.5, CPU)
    nll, reg = model(X)
    ref_nll, ref_reg = ref_lore_loss(X, model.V.detach().double(), model.W.detach().double(),
                                     v_ref.double(), 0.3)
    assert nll.item() == pytest.approx(ref_nll, rel=1e-5)
    assert reg.item() == pytest.approx(ref_reg, rel=1e-5)


def test_lore_regularized_loss_equals_loop_form():
    X, v_ref = random_users(seed=1), torch.randn(12, 1)
    model = utils.LoRe_regularized(v_ref, 7.0, 6, 12, 4, 1, 0.5, CPU)
    nll, reg = model(X, alpha_curr=2.5)
    ref_nll, ref_reg = ref_regularized_loss(X, model.V.detach().double(), model.W.detach().double(),
                                            v_ref.double(), 2.5)
    assert nll.item() == pytest.approx(ref_nll, rel=1e-5)
    assert reg.item() == pytest.approx(ref_reg, rel=1e-5)


def test_personalize_batch_loss_equals_loop_form():
    X, V = random_users(seed=2), torch.randn(12, 3)
    model = utils.PersonalizeBatch(6, 12, 3, 1, 0.1, CPU)
    ref, _ = ref_lore_loss(X, V.double(), model.w.detach().double(), torch.zeros(12, 1), 0.0)
    assert model(X, V).item() == pytest.approx(ref, rel=1e-5)


def test_user_scores_gradient():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 7, dtype=torch.float64, generator=g)
    user = torch.tensor([0] * 5 + [1] * 9 + [2] * 6)
    V = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda V, W: user_scores(X, V, W, user), (V, W))


def loop_lore_step(V, W, opt, X, v_ref, alpha):
    """The reference's joint step: a Python loop over users."""
    opt.zero_grad()
    nll = sum(-torch.log(torch.sigmoid(x @ (V @ torch.softmax(W[i], 0)) / 100)).mean()
              for i, x in enumerate(X))
    reg = alpha * sum(((V[:, j] - v_ref[:, 0]) ** 2).sum() for j in range(V.shape[1]))
    (nll + reg).backward()
    opt.step()


def test_lore_training_equals_loop_form():
    X, v_ref = random_users(seed=4), torch.randn(12, 1)
    torch.manual_seed(0)
    W, V = utils.solve_regularized(v_ref, 0.01, X, 3, num_iterations=5, learning_rate=0.1, device=CPU)
    torch.manual_seed(0)
    W_ref = torch.nn.Parameter(torch.randn(6, 3))
    V_ref = torch.nn.Parameter(torch.randn(12, 3))
    opt = torch.optim.Adam([W_ref, V_ref], lr=0.1)
    for _ in range(5):
        loop_lore_step(V_ref, W_ref, opt, X, v_ref, 0.01)
    torch.testing.assert_close(V, V_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W, torch.softmax(W_ref.detach(), 1), rtol=1e-5, atol=1e-5)


def test_lore_regularized_training_equals_loop_form():
    X, v_ref, T, alpha = random_users(seed=5), torch.randn(12, 1), 10, 3.0
    torch.manual_seed(0)
    W, V = utils.solve_regularized_simplex(v_ref, alpha, X, 3, num_iterations=T, learning_rate=0.1,
                                           device=CPU)
    torch.manual_seed(0)
    W_ref = torch.nn.Parameter(torch.rand(6, 3))
    V_ref = torch.nn.Parameter(torch.randn(12, 3))
    opt_W, opt_V = torch.optim.Adam([W_ref], lr=0.1), torch.optim.Adam([V_ref], lr=0.1)

    def nll():
        terms = [-torch.log(torch.sigmoid(x @ (V_ref @ torch.softmax(W_ref[i], 0)) / 100))
                 for i, x in enumerate(X)]
        return torch.cat(terms).mean()
    for step in range(T):
        a = 0.0 if step < 2 else alpha if step >= 8 else alpha * (step - 2) / 6
        opt_W.zero_grad(); nll().backward(); opt_W.step()
        opt_V.zero_grad()
        cos = torch.stack([F.cosine_similarity(V_ref[:, j], v_ref[:, 0], dim=0) for j in range(3)])
        (nll() + a * (1 - cos).mean()).backward()
        opt_V.step()
    W_full = torch.softmax(W_ref.detach(), 1)
    kept = W_full.max(0).values >= 1e-2
    torch.testing.assert_close(V, V_ref.detach()[:, kept], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W, W_full[:, kept], rtol=1e-5, atol=1e-5)


def test_personalize_batch_training_equals_loop_form():
    X, V = random_users(seed=6), torch.randn(12, 4)
    torch.manual_seed(0)
    W = utils.learn_multiple_few_shot(X, V, num_iterations=5, learning_rate=0.1, device=CPU)
    torch.manual_seed(0)
    w_ref = torch.nn.Parameter(torch.randn(6, 4))
    opt = torch.optim.Adam([w_ref], lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        sum(-torch.log(torch.sigmoid(x @ (V @ torch.softmax(w_ref[i], 0)) / 100)).mean()
            for i, x in enumerate(X)).backward()
        opt.step()
    assert isinstance(W, list) and len(W) == 6 and W[0].shape == (4,)
    torch.testing.assert_close(torch.stack(W), torch.softmax(w_ref.detach(), 1), rtol=1e-5, atol=1e-5)


def test_solve_is_unregularized_lore():
    X, v_ref = random_users(seed=7), 50 * torch.randn(12, 1)
    torch.manual_seed(0)
    W1, V1 = utils.solve(X, 2, num_iterations=4, learning_rate=0.2, device=CPU)
    torch.manual_seed(0)
    W2, V2 = utils.solve_regularized(v_ref, 0, X, 2, 4, 0.2, device=CPU)
    assert torch.equal(V1, V2) and torch.equal(W1, W2)
    assert W1.shape == (6, 2) and V1.shape == (12, 2)


def test_warmup_schedule():
    model = utils.LoRe_regularized(torch.ones(3), 8.0, 1, 3, 2, 100, 0.5, CPU)
    a = [model.alpha_at_step(s) for s in range(100)]
    assert a[:21] == [0.0] * 21                      # 0 for the first 20%, still 0 at step 20
    assert a[50] == pytest.approx(8.0 * 30 / 60)    # linear between 20% and 80%
    assert a[79] == pytest.approx(8.0 * 59 / 60)
    assert a[80:] == [8.0] * 20


def test_pruning_drops_unused_directions_without_renormalizing():
    X = random_users(n_users=3, seed=8)
    model = utils.LoRe_regularized(torch.ones(12), 1.0, 3, 12, 4, 1, 1e-6, CPU)   # one tiny step (0 is refused)
    logits = torch.tensor([[5.0, 0.0, -9.0, 1.0], [0.0, 5.0, -9.0, 0.0], [1.0, 1.0, -9.0, -9.0]])
    model.W.data.copy_(logits)
    W, V = model.train(X)
    full = torch.softmax(model.W.detach(), 1)
    torch.testing.assert_close(full, torch.softmax(logits, 1), atol=1e-4, rtol=0)
    assert full[:, 2].max() < 1e-2 and full[:, 3].max() >= 1e-2
    torch.testing.assert_close(W, full[:, [0, 1, 3]])
    torch.testing.assert_close(V, model.V.detach()[:, [0, 1, 3]])
    assert not torch.allclose(W.sum(1), torch.ones(3))


def test_eval_multiple_equals_loop_and_ties_count_as_wrong():
    X, V = random_users(seed=9), torch.randn(12, 3)
    X[0][0] = 0.0                                                       # a tie: x^T V w = 0
    W = [torch.softmax(torch.randn(3), 0) for _ in X]
    acc = utils.eval_multiple(W, [V] * len(X), X)
    assert acc.shape == (6,)
    np.testing.assert_allclose(acc, [ref_accuracy(x, V, w) for x, w in zip(X, W)])
    assert utils.evaluate_model(X[0], V, W[0]) == pytest.approx(ref_accuracy(X[0], V, W[0]))
    with pytest.raises(InputError, match="share one basis"):
        utils.eval_multiple(W, [V] + [V + 1] * 5, X)


def test_table_form_projects_like_rows():
    table = torch.randn(10, 6).to(torch.bfloat16)
    pairs = Pairs(torch.tensor([0, 0, 1, 2]), 3, table=table,
                        chosen=torch.tensor([1, 2, 3, 9]), rejected=torch.tensor([0, 5, 4, 8]))
    V = torch.randn(6, 2)
    torch.testing.assert_close(pairs.project(V), pairs.rows() @ V)
    assert [t.shape[0] for t in pairs.split()] == [2, 1, 1]


# ---- data helpers ------------------------------------------------------------------------------

def test_sample_shots_rows_and_counts():
    X = [torch.arange(m * 2, dtype=torch.float32).reshape(m, 2) + 100 * i for i, m in enumerate([3, 8, 5])]
    torch.manual_seed(0)
    out = utils.sample_shots(X, 4)
    assert [len(t) for t in out] == [3, 4, 4]
    for x, t in zip(X, out):
        rows = {tuple(r) for r in x.tolist()}
        assert len({tuple(r) for r in t.tolist()}) == len(t) and all(tuple(r) in rows for r in t.tolist())
    torch.manual_seed(1)
    assert not all(torch.equal(a, b) for a, b in zip(out, utils.sample_shots(X, 4)))
    with pytest.raises(InputError, match="shots"):
        utils.sample_shots(X, 0)


def test_sample_shots_takes_whole_groups():
    user = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    group = torch.tensor([0, 0, 1, 2, 5, 5, 7])
    pairs = Pairs(user, 2, X=torch.arange(7.0)[:, None], group=group)
    for seed in range(5):
        torch.manual_seed(seed)
        s = utils.sample_shots(pairs, 1)
        assert s.user.tolist().count(1) in (1, 2) and s.user.tolist().count(0) in (1, 2)
        for u in (0, 1):
            groups = set(s.group[s.user == u].tolist())
            assert len(groups) == 1
            assert (s.group[s.user == u] == s.group[s.user == u][0]).sum() == (group == groups.pop()).sum()


def test_simulate_user_and_population_equal_loop_form():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(7, 4, 3))                              # [S, R, M]
    features = [[torch.randn(5) for _ in range(4)] for _ in range(7)]
    W = rng.dirichlet(np.ones(3), 4)
    for w, got in zip(W, utils.simulate_population(rewards, features, W)):
        ref = torch.stack([features[s][np.argmax(rewards[s] @ w)] - features[s][np.argmin(rewards[s] @ w)]
                           for s in range(7)])
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(utils.simulate_user(rewards, features, w), ref)
    W = utils.generate_popupulation(0.1 * np.ones(3), 11)
    assert W.shape == (11, 3) and np.allclose(W.sum(1), 1)
    assert utils.generate_population is utils.generate_popupulation


def test_sparse_population_equals_dense_route():
    rng = np.random.default_rng(1)
    S, R, Fd, N = 40, 5, 6, 9
    rewards, table = rng.normal(size=(S, R, 3)), torch.randn(S * R, Fd)
    W = rng.dirichlet(np.ones(3), N)
    np.random.seed(3)
    dense = utils.create_sparse_tensor(utils.simulate_population(rewards, table.reshape(S, R, Fd), W), 0.1, CPU)
    np.random.seed(3)
    pairs = utils.simulate_sparse_population(rewards, table, W, 0.1, CPU)
    assert [len(x) for x in dense] == [4] * N
    for a, b in zip(dense, pairs.split()):
        torch.testing.assert_close(a, b)
    with pytest.raises(InputError, match="0 prompts"):
        utils.create_sparse_tensor(torch.zeros(2, 5, 3), 0.1)


def test_create_dataset_prism_and_shots():
    g = torch.Generator().manual_seed(0)
    emb = {u: {d: {"chosen": [torch.randn(4, generator=g) for _ in range(n)],
                   "rejected": [torch.randn(4, generator=g) for _ in range(n)]}
               for d, n in zip(["a", "b", "c"], counts)}
           for u, counts in [("u1", [1, 2, 3]), ("u2", [2, 1, 1])]}
    out = utils.create_dataset_prism(emb, CPU)
    for (u, dialogs), got in zip(emb.items(), out):
        ref = torch.stack([c - r for d in dialogs.values() for c, r in zip(d["chosen"], d["rejected"])])
        torch.testing.assert_close(got, ref)
    torch.manual_seed(0)
    shots = utils.create_dataset_prism_shots(emb, 1, CPU)
    for dialogs, got in zip(emb.values(), shots):   # one whole dialog per user
        options = [torch.stack([c - r for c, r in zip(d["chosen"], d["rejected"])]) for d in dialogs.values()]
        assert any(o.shape == got.shape and torch.allclose(o, got) for o in options)


# ---- a planted low-rank population -----------------------------------------------------------------

def planted_population(seed=0, n_features=32, rank=3, n_seen=100, n_unseen=60, n_train=100, n_fewshot=50,
                       n_test=200):
    """Users are Dirichlet(0.3) mixtures of 3 hidden reward directions; choices are Bradley-Terry.
    Pair features have the spread of reward-model embedding differences (norms in the tens), the
    scale the method's 1/100 temperature is made for."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    V_true = 0.3 * torch.randn(n_features, rank, generator=g)

    def users(n):
        return torch.tensor(rng.dirichlet([0.3] * rank, n), dtype=torch.float32)

    def pairs(W, m):
        out = []
        for w in W:
            x = 10 * torch.randn(m, n_features, generator=g)
            chose_first = torch.rand(m, generator=g) < torch.sigmoid(x @ V_true @ w)
            out.append(torch.where(chose_first[:, None], x, -x))
        return out
    W_seen, W_unseen = users(n_seen), users(n_unseen)
    data = dict(train=pairs(W_seen, n_train), test=pairs(W_seen, n_test),
                fewshot=pairs(W_unseen, n_fewshot), test_unseen=pairs(W_unseen, n_test))
    data["oracle"] = np.mean([ref_accuracy(x, V_true, w) for x, w in zip(data["test_unseen"], W_unseen)])
    data["oracle_seen"] = np.mean([ref_accuracy(x, V_true, w) for x, w in zip(data["test"], W_seen)])
    return data


@pytest.fixture(scope="module")
def planted():
    return planted_population()


def test_planted_population_is_recovered(planted):
    d = planted
    set_seed(0)
    res = utils.run([1, 3], [0], torch.randn(32, 1), d["train"], d["test"], d["fewshot"],
                    d["test_unseen"], 100, 60, CPU)
    seen, unseen = res[1], res[3]
    assert d["oracle"] > 0.93
    assert unseen[1] >= d["oracle"] - 0.03 and seen[1] >= d["oracle_seen"] - 0.03   # K = true rank
    assert unseen[0] < unseen[1] - 0.1 and seen[0] < seen[1] - 0.1                 # K = 1


def test_fewshot_accuracy_rises_with_shots(planted):
    d = planted
    set_seed(0)
    res = utils.run_few_shot_vary_shots(3, [0], [3], [1, 5, 20, 50], d["train"], d["fewshot"],
                                        d["test_unseen"], torch.randn(32, 1), 100, 60, CPU)
    held_out = res[2][0]
    assert all(b > a for a, b in zip(held_out, held_out[1:])), held_out
    assert held_out[-1] >= d["oracle"] - 0.03


# ---- pipelines: K = 0 and K = 1, shapes and orders, checkpoints, determinism -----------------------

@pytest.fixture(scope="module")
def small():
    d = planted_population(seed=1, n_features=10, n_seen=8, n_unseen=5, n_train=12, n_fewshot=12, n_test=15)
    d["v_ref"] = torch.randn(10, 1)
    return d


def sweep(d, fn=utils.run, K_list=(0, 1, 2), alpha_list=(0.0, 0.5), **kw):
    return fn(list(K_list), list(alpha_list), d["v_ref"], d["train"], d["test"], d["fewshot"],
              d["test_unseen"], 8, 5, CPU, num_iterations=kw.pop("num_iterations", 30), **kw)


def test_run_shapes_order_and_reference_model(small):
    d = small
    set_seed(0)
    res = sweep(d)
    assert len(res) == 8 and all(r.shape == (6,) for r in res)
    # K = 0 is the reference reward model for every user, at positions 0 and 3 (alpha outer, K inner)
    ref = [np.mean([ref_accuracy(x, d["v_ref"], torch.ones(1)) for x in d[k]])
           for k in ("train", "test", "fewshot", "test_unseen")]
    ref_std = [0.25 * np.std([ref_accuracy(x, d["v_ref"], torch.ones(1)) for x in d[k]])
               for k in ("train", "test", "fewshot", "test_unseen")]
    for pos in (0, 3):
        np.testing.assert_allclose([r[pos] for r in res[:4]], ref)
        np.testing.assert_allclose([r[pos] for r in res[4:]], ref_std)


def test_k1_unseen_users_get_unit_weight(small, tmp_path):
    d = small
    set_seed(0)
    res = sweep(d, K_list=[1], alpha_list=[0.0], out_dir=str(tmp_path))
    saved = load_tensors(str(tmp_path / "lore_K1_alpha0.safetensors"), ["V", "W", "W_unseen"])
    assert torch.equal(saved["W_unseen"], torch.ones(5, 1)) and torch.equal(saved["W"], torch.ones(8, 1))
    V = saved["V"]
    assert res[3][0] == pytest.approx(np.mean([ref_accuracy(x, V, torch.ones(1)) for x in d["test_unseen"]]))


def test_run_regularized_saves_every_setting(small, tmp_path):
    d = small
    set_seed(0)
    res = sweep(d, utils.run_regularized, K_list=[0, 1, 3], alpha_list=[0.0, 10.0], out_dir=str(tmp_path))
    assert len(res) == 8 and all(r.shape == (6,) for r in res)
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(f"lore_regularized_K{K}_alpha{a}{ext}" for a in ("0", "10") for K in (0, 1, 3)
                           for ext in (".safetensors", ".report.json", ".fit.json"))
    t = load_tensors(str(tmp_path / "lore_regularized_K3_alpha10.safetensors"))
    K_kept = t["V"].shape[1]
    assert 1 <= K_kept <= 3 and t["W"].shape == (8, K_kept) and t["W_unseen"].shape == (5, K_kept)
    torch.testing.assert_close(load_tensors(str(tmp_path / "lore_regularized_K0_alpha0.safetensors"))["V"], d["v_ref"])


def test_vary_shots_shapes(small):
    d = small
    set_seed(0)
    res = utils.run_few_shot_vary_shots(2, [0.0, 1.0], [0, 2], [1, 3, 5], d["train"], d["fewshot"],
                                        d["test_unseen"], d["v_ref"], 8, 5, CPU, num_iterations=20)
    assert len(res) == 4 and all(r.shape == (4, 3) for r in res)
    ref = np.mean([ref_accuracy(x, d["v_ref"], torch.ones(1)) for x in d["test_unseen"]])
    np.testing.assert_allclose(res[2][0], ref)      # K = 0: no adaptation, same for every shot count
    np.testing.assert_allclose(res[3][0], 0.0, atol=1e-12)


def test_same_seed_same_numbers(small):
    outs = []
    for _ in range(2):
        set_seed(123)
        outs.append(np.concatenate(sweep(small, utils.run_regularized, K_list=[2], alpha_list=[1.0])))
    np.testing.assert_array_equal(outs[0], outs[1])


# ---- bad input ----------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors(small):
    d = small
    good = [d["v_ref"], d["train"], d["test"], d["fewshot"], d["test_unseen"], 8, 5, CPU]

    def call(*changes, K_list=(2,), alpha_list=(0.0,)):
        args = list(good)
        for i, v in changes:
            args[i] = v
        return utils.run(list(K_list), list(alpha_list), *args, num_iterations=2)

    cases = [
        (dict(changes=[(1, [])]), "no users"),
        (dict(changes=[(1, d["train"][:3] + [torch.zeros(0, 10)] + d["train"][4:])]), "user 3 has no pairs"),
        (dict(changes=[(1, d["train"][:2] + [torch.zeros(4, 11)] + d["train"][3:])]), r"train_features\[2\] has shape \(4, 11\)"),
        (dict(changes=[(0, torch.randn(11, 1))]), "v_ref has 11 features"),
        (dict(changes=[(3, [x[:, :9] for x in d["fewshot"]])]), "train_features_unseen has F=9"),
        (dict(changes=[(5, 9)]), "N=9"),
        (dict(K_list=[-1]), "K must be >= 0"),
        (dict(K_list=[]), "non-empty"),
        (dict(alpha_list=[]), "non-empty"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            call(*kwargs.get("changes", []), K_list=kwargs.get("K_list", (2,)),
                 alpha_list=kwargs.get("alpha_list", (0.0,)))
    for bad in (float("nan"), float("inf")):
        X = [x.clone() for x in d["train"]]
        X[5][1, 2] = bad
        with pytest.raises(InputError, match="user 5 has NaN or inf"):
            call((1, X))
    with pytest.raises(InputError, match="num_shots"):
        utils.run_few_shot_vary_shots(1, [0], [2], [0, 1], d["train"], d["fewshot"], d["test_unseen"],
                                      d["v_ref"], 8, 5, CPU)
    with pytest.raises(InputError, match="K >= 1"):
        utils.solve(d["train"], 0)


def test_reference_pipelines_reject_float_K_and_swapped_arguments(small):
    d = small
    with pytest.raises(InputError, match=r"K_list must be a list of integers, got \[0.0\]"):
        utils.run_few_shot_vary_shots(2, [0.0], [0.0], [1], d["train"], d["fewshot"], d["test_unseen"],
                                      d["v_ref"], 8, 5, CPU)
    # run()'s order given to run_few_shot_vary_shots: K_list lands on `trials`, v_ref on `num_shots`
    with pytest.raises(InputError, match=r"trials must be an integer >= 1, got \[0, 2\]"):
        utils.run_few_shot_vary_shots([0, 2], [0.0], d["v_ref"], d["train"], d["test"], d["fewshot"],
                                      d["test_unseen"], 8, 5, CPU)
    with pytest.raises(InputError, match=r"K_list must be a list of integers, got \[2.0\]"):
        utils.run([2.0], [0.0], d["v_ref"], d["train"], d["test"], d["fewshot"], d["test_unseen"], 8, 5, CPU)
    # run_few_shot_vary_shots' order given to run(): trials lands on K_list
    with pytest.raises(InputError, match="K_list must be a non-empty list of integers, got 2"):
        utils.run(2, [0.0], [0, 2], [1, 3], d["train"], d["fewshot"], d["test_unseen"], d["v_ref"], 8, 5)
    with pytest.raises(InputError, match=r"trials must be an integer >= 1, got \[0, 2\]"):
        utils.sweep_shots(K_list=[2], shots=[1], trials=[0, 2], seen_train=d["train"], unseen_fewshot=d["fewshot"],
                          unseen_test=d["test_unseen"], v_ref=d["v_ref"])
    with pytest.raises(InputError, match=r"unknown method 'nope'; registered: lore, lore_regularized"):
        utils.sweep(methods=["nope"], K_list=[2], seen_train=d["train"], seen_test=d["test"],
                    unseen_fewshot=d["fewshot"], unseen_test=d["test_unseen"], v_ref=d["v_ref"])


def test_api_values_are_checked_where_they_enter(small):
    d = small
    F = 10
    # a v_ref that is not a column is an error, never reshaped
    with pytest.raises(InputError, match=r"v_ref has shape \(5, 2\)"):
        utils.solve_regularized(torch.randn(5, 2), 1.0, d["train"], 2, num_iterations=2)
    with pytest.raises(InputError, match="v_ref has NaN"):
        utils.solve_regularized(torch.full((F, 1), float("nan")), 1.0, d["train"], 2, num_iterations=2)
    with pytest.raises(InputError, match="alpha = 1 pulls V towards V_sft"):
        utils.solve_regularized(None, 1.0, d["train"], 2, num_iterations=2)
    with pytest.raises(InputError, match="K >= 1"):
        utils.solve_regularized(d["v_ref"], 0.0, d["train"], 2.0, num_iterations=2)
    # V and W: shapes, dimensions, NaN; NumPy is taken as it is
    V = torch.randn(F, 2)
    with pytest.raises(InputError, match=r"V has shape \(2, 10\)"):
        utils.learn_multiple_few_shot(d["fewshot"], V.T, num_iterations=2)
    with pytest.raises(InputError, match="V must be a 2-D float matrix"):
        utils.learn_multiple_few_shot(d["fewshot"], V[:, 0], num_iterations=2)
    with pytest.raises(InputError, match="V has NaN or inf"):
        utils.learn_multiple_few_shot(d["fewshot"], V * float("nan"), num_iterations=2)
    W = torch.full((5, 2), 0.5)
    np.testing.assert_array_equal(utils.eval_multiple(W.numpy(), V.numpy(), d["test_unseen"]),
                                  utils.eval_multiple(W, V, d["test_unseen"]))
    with pytest.raises(InputError, match="W has NaN or inf"):
        utils.eval_multiple(W * float("nan"), V, d["test_unseen"])
    with pytest.raises(InputError, match=r"weights \(5, 3\) and basis \(10, 2\) do not fit"):
        utils.eval_multiple(torch.ones(5, 3), V, d["test_unseen"])
    # table indices: negative or past the end is an error naming the pair, not a wrapped row
    table = torch.randn(6, F)
    for bad in (-1, 6):
        pairs = Pairs(torch.tensor([0, 0, 1]), 2, table=table, chosen=torch.tensor([0, bad, 2]),
                            rejected=torch.tensor([1, 2, 3]))
        with pytest.raises(InputError, match=f"pair 1 \\(user 0\\) has chosen row {bad}, outside the 6 rows"):
            pack(pairs)
    # finite rows near the float32 maximum are finite (no overflowing row sum)
    big = [torch.full((3, F), 3e38)] * 2
    assert pack(big).checked


def test_a_diverged_fit_is_an_error_not_a_result(small):
    d = small
    method = utils.LoReMethod(2, 0.0, d["v_ref"])
    with pytest.raises(InputError, match=r"lore\(K=2, alpha=0\): the fit diverged .* lower the learning rate"):
        check_fitted(method, torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(InputError, match="every direction was pruned"):
        check_fitted(method, torch.zeros(3, 0), torch.zeros(10, 0))
    with pytest.raises(InputError, match=r"lore, alpha=0, K=2: \['seen_test'\] is not a finite number"):
        save_results([{"method": "lore", "K": 2, "alpha": 0.0, "seen_test": float("nan")}], "/nonexistent")


def test_reference_api_checks_its_inputs_as_the_flags_do():
    """The seed's reference API: every bad argument is an InputError naming it, before any step (0
    steps or a 0 rate would return the random start as a fit)."""
    X, v = random_users(n_users=3, n_features=4, seed=11), torch.randn(4)
    bad = [(lambda: utils.solve(X, 2, num_iterations=0), "num_iterations"),
           (lambda: utils.solve(X, 2, num_iterations=2.5), "num_iterations"),
           (lambda: utils.solve(X, 2, learning_rate=0.0), "learning_rate"),
           (lambda: utils.solve(X, 2, learning_rate=float("nan")), "learning_rate"),
           (lambda: utils.solve(X, -1), "K"),
           (lambda: utils.solve_regularized(v, float("nan"), X, 2), "alpha"),
           (lambda: utils.solve_regularized(v, -1.0, X, 2), "alpha"),
           (lambda: utils.solve_regularized_simplex(None, 1.0, X, 2), "V_sft"),
           (lambda: utils.solve_regularized_simplex(v, 1.0, X, 2, learning_rate=-1.0), "learning_rate"),
           (lambda: utils.learn_multiple_few_shot(X, torch.randn(4, 2), num_iterations=0), "num_iterations"),
           (lambda: utils.learn_multiple_few_shot(X, torch.randn(4, 2), learning_rate=0), "learning_rate"),
           (lambda: utils.LoRe(None, 0, 3, 4, 2, 0, 0.1, CPU), "num_iterations"),
           (lambda: utils.PersonalizeBatch(3, 4, 2, 5, 0.1, CPU).train(X), "V"),
           (lambda: utils.PersonalizeBatch(3, 4, 2, 5, 0.1, CPU).train(X, torch.randn(4, 3)), "V has shape"),
           (lambda: utils.sample_shots(X, "3"), "shots"), (lambda: utils.sample_shots(X, 2.5), "shots"),
           (lambda: utils.sample_shots(X, float("nan")), "shots")]
    for call, named in bad:
        with pytest.raises(InputError, match=named):
            call()
    sets = dict(seen_train=X, seen_test=X, unseen_fewshot=X, unseen_test=X)
    quick = {"lore": {"iters": 2, "fewshot_iters": 2}}
    with pytest.raises(InputError, match="twice"):
        utils.sweep(K_list=[1, 1], hparams=quick, device=CPU, **sets)
    for seed in (-1, 2**40, 1.5, "abc"):
        with pytest.raises(InputError, match="seed"):
            utils.sweep(K_list=[1], hparams=quick, device=CPU, seed=seed, **sets)
    shots = dict(seen_train=X, unseen_fewshot=X, unseen_test=X, K_list=[1], trials=1, hparams=quick, device=CPU)
    with pytest.raises(InputError, match="twice"):
        utils.sweep_shots(shots=[1, 1], **shots)
    with pytest.raises(InputError, match="more than any unseen user's pool"):
        utils.sweep_shots(shots=[100], **shots)
    with pytest.raises(InputError, match="load_data"):
        load_data(None)


def test_tools_api_refuses_what_the_flags_refuse():
    from lore.basis import interpret_basis
    from lore.compare import compare
    from lore.methods import load_method
    with pytest.raises(InputError, match="top"):
        interpret_basis(torch.randn(4, 2), torch.randn(5, 4), {}, top=-2)
    with pytest.raises(InputError, match="methods must be a non-empty list"):
        compare(None, None, "lore", 1, 1)
    with pytest.raises(InputError, match="allow_other_data must be True or False"):
        load_method("x.safetensors", allow_other_data="no")


def test_a_missing_keyword_of_the_sweeps_is_an_input_error_naming_it():
    """sweep / sweep_shots without a pair set (or K_list, shots, trials): InputError naming it, not
    Python's TypeError about a missing keyword-only argument."""
    X = [torch.randn(4, 3) for _ in range(2)]
    with pytest.raises(InputError, match=r"^seen_test must be given"):
        utils.sweep(K_list=[0], seen_train=X, unseen_fewshot=X, unseen_test=X)
    with pytest.raises(InputError, match=r"^seen_train, unseen_test must be given"):
        utils.sweep_shots(K_list=[0], shots=[1], trials=1, unseen_fewshot=X)
    with pytest.raises(InputError, match=r"K_list must be a non-empty list of integers, got None"):
        utils.sweep(seen_train=X, seen_test=X, unseen_fewshot=X, unseen_test=X)
    with pytest.raises(InputError, match=r"trials must be an integer >= 1, got None"):
        utils.sweep_shots(K_list=[0], shots=[1], seen_train=X, unseen_fewshot=X, unseen_test=X)


@pytest.mark.parametrize("S, m, n", [(9402, 47, 40), (1000, 20, 60), (5, 5, 30), (2, 1, 20), (1, 1, 3), (70000, 3, 5)])
def test_compiled_draws_are_numpys_legacy_choice(S, m, n):
    """choice_without_replacement == n calls of np.random.choice(S, m, replace=False) on the global
    generator, and leaves the generator where those calls leave it (the next draws agree)."""
    np.random.seed(3)
    np.random.random(7)   # a state in the middle of a block of 624 words
    loop = np.stack([np.random.choice(S, m, replace=False) for _ in range(n)])
    after = np.random.random(5)
    np.random.seed(3)
    np.random.random(7)
    drawn = choice_without_replacement(n, S, m)
    assert drawn.shape == (n, m) and drawn.dtype == np.int64
    assert np.array_equal(drawn, loop) and np.array_equal(np.random.random(5), after)
