"""The personalized reward object (lore.reward): phi^T V w of the project's extraction, the prior,
the online fit against a loop-form posterior mode, restore = online, the question against a
brute-force information, the cache, concurrent callers, bad inputs, and TRL's GRPOTrainer."""

import random
import threading

import pytest
import torch
import torch.nn.functional as F

from lore.checks import InputError
from lore.extract import embed_conversations, load_reward_model
from lore.methods import get_method, load_method, save_method
from lore.reward import PersonalReward, conversation

K, FEATURES, SCALE = 4, 64, 100.0   # the tiny reward model's width; margins of a few BT logits


def planted_checkpoint(path, n_seen=50, seed=1, K=K, scale=SCALE):
    """A lore checkpoint with a random basis V [F, K] (entries ~ N(0, scale^2)) and the Dirichlet
    weights W [n_seen, K] of its seen users -> (path, V, W)."""
    torch.manual_seed(seed)
    method = get_method("lore")(K, 0.0, None, "cpu")
    method.V = torch.randn(FEATURES, K) * scale
    W = torch.distributions.Dirichlet(torch.ones(K)).sample((n_seen,))
    save_method(str(path), method, W=W)
    return str(path), method.V, W


def words(rng, k):
    return " ".join(f"w{rng.randrange(200)}" for _ in range(k))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return planted_checkpoint(tmp_path_factory.mktemp("reward") / "lore_K4_alpha0.safetensors")


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_reward_model(tiny_model_dir, device="cpu")


def make_reward(checkpoint, loaded, **kwargs):
    method, tensors = load_method(checkpoint[0], "cpu")
    return PersonalReward(method, *loaded, checkpoint_tensors=tensors, **kwargs)


@pytest.fixture(scope="module")
def reward(checkpoint, loaded):
    r = make_reward(checkpoint, loaded)
    yield r
    r.close()


def test_rewards_are_phi_V_w_and_the_prior_is_the_seen_users_mean(reward, checkpoint, loaded, tmp_path):
    path, V, W = checkpoint
    rng = random.Random(0)
    prompts, completions = [words(rng, 8) for _ in range(5)], [words(rng, 4) for _ in range(5)]
    conversations = [conversation(p, c) for p, c in zip(prompts, completions)]
    phi = embed_conversations(conversations, tmp_path / "phi.safetensors", model=loaded[0], tokenizer=loaded[1])
    prior = W.mean(0)                                                              # [K]
    assert torch.allclose(reward.prior_weights.float(), prior, atol=1e-6)
    expected = (phi @ V @ prior).tolist()                                          # [5]
    assert reward(prompts, completions) == pytest.approx(expected, rel=1e-5)
    # TRL's conversational format gives the same numbers; a user id per completion, None = the prior
    chat_prompts = [[{"role": "user", "content": p}] for p in prompts]
    chat_completions = [[{"role": "assistant", "content": c}] for c in completions]
    assert reward(chat_prompts, chat_completions, user=[None] * 5, trainer_state=None) == pytest.approx(expected, rel=1e-5)
    reward.add_preference("scored", prompts[0], completions[0], completions[1])
    w, n = reward.weights("scored")
    mixed = reward(prompts, completions, user=["scored", None, "scored", None, 7])
    assert n == 1 and mixed == pytest.approx([float(phi[i] @ V @ (w.float() if i in (0, 2) else prior))
                                              for i in range(5)], rel=1e-5)


def negative_log_posterior(theta, Zc, Zr, mean, variance, s):
    """The loop form: one term per answer, -log sigmoid(s (zc - zr) . softmax(theta)), plus the prior."""
    total = ((theta - mean) ** 2).sum() / (2 * variance)
    for zc, zr in zip(Zc, Zr):
        total = total - F.logsigmoid(s * ((zc - zr) * torch.softmax(theta, -1)).sum())
    return total


def test_the_online_fit_is_the_posterior_mode_and_restore_gives_it_again(reward, checkpoint, loaded):
    rng = random.Random(1)
    answers = []
    for u in ("ann", "bob", "cid"):
        for _ in range({"ann": 1, "bob": 3, "cid": 6}[u]):
            answers.append((u, words(rng, 6), words(rng, 3), words(rng, 3)))
    rng.shuffle(answers)
    online = {}
    for a in answers:
        online[a[0]] = reward.add_preference(*a)
    s, mean = reward.method.bt_scale, reward.prior_mean
    for u, (w, n) in online.items():
        mine = [a for a in answers if a[0] == u]
        assert n == len(mine)
        Z = reward.features([conversation(a[1], a[k]) for a in mine for k in (2, 3)])
        theta = mean.clone().requires_grad_()
        opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = negative_log_posterior(theta, Z[0::2], Z[1::2], mean, reward.variance, s)
            loss.backward()
            return loss
        opt.step(closure)
        assert torch.allclose(w, torch.softmax(theta.detach(), -1), atol=1e-6), u
        # the precision at the mode: I / variance + sum of the answers' Fisher terms, pair by pair
        state, H = reward.users[u], torch.eye(K, dtype=torch.float64) / reward.variance
        for zc, zr in zip(Z[0::2], Z[1::2]):
            g = torch.func.grad(lambda t: ((zc - zr) * torch.softmax(t, -1)).sum())(state.theta)
            p = torch.sigmoid(s * ((zc - zr) * torch.softmax(state.theta, -1)).sum())
            H = H + s ** 2 * p * (1 - p) * torch.outer(g, g)
        assert torch.allclose(state.H, H, atol=1e-10)
    fresh = make_reward(checkpoint, loaded)
    fresh.restore(answers)                                                         # all users in one fit
    for u, (w, n) in online.items():
        assert fresh.weights(u)[1] == n and torch.allclose(fresh.weights(u)[0], w, atol=1e-9)
    fresh.close()


def test_next_question_is_the_most_informative_pair_and_not_asked_twice(reward):
    rng = random.Random(2)
    prompt, responses = words(rng, 7), [words(rng, 3) for _ in range(6)]
    reward.add_preference("quiz", words(rng, 5), words(rng, 2), words(rng, 2))
    state, s = reward.users["quiz"], reward.method.bt_scale
    Z = reward.features([conversation(prompt, r) for r in responses])
    gains = {}
    for i in range(6):                                                             # brute force, pair by pair
        for j in range(i + 1, 6):
            margin = lambda t: ((Z[i] - Z[j]) * torch.softmax(t, -1)).sum()   # noqa: E731
            g = torch.func.grad(margin)(state.theta)
            p = torch.sigmoid(s * margin(state.theta))
            A = state.H + s ** 2 * p * (1 - p) * torch.outer(g, g)
            gains[(i, j)] = float(torch.logdet(A) - torch.logdet(state.H))
    i, j, info = reward.next_question("quiz", prompt, responses)
    assert (i, j) == max(gains, key=gains.get) and info == pytest.approx(gains[(i, j)], rel=1e-4)
    reward.add_preference("quiz", prompt, responses[j], responses[i])
    assert reward.next_question("quiz", prompt, responses)[:2] != (i, j)
    # a user with no answers is asked at the prior
    assert reward.next_question("nobody-yet", prompt, responses)[:2] == reward.next_question("nobody-2", prompt, responses)[:2]


def test_the_cache_is_bounded_and_changes_no_number(checkpoint, loaded):
    rng = random.Random(3)
    prompts, completions = [words(rng, 5) for _ in range(4)], [words(rng, 3) for _ in range(4)]
    none, two = make_reward(checkpoint, loaded, cache_size=0), make_reward(checkpoint, loaded, cache_size=2)
    expected = none(prompts, completions)
    assert none.cache.stats()["size"] == 0
    assert two(prompts, completions) == pytest.approx(expected, rel=1e-6)
    assert two.cache.stats()["size"] == 2
    hits = two.cache.hits
    assert two(prompts[-2:], completions[-2:]) == pytest.approx(expected[-2:], rel=1e-6)
    assert two.cache.hits == hits + 2                                              # the last two stayed
    none.close()
    two.close()


def test_concurrent_callers_get_the_numbers_of_one_caller(checkpoint, loaded):
    rng = random.Random(4)
    batches = [([words(rng, 6) for _ in range(3)], [words(rng, 3) for _ in range(3)]) for _ in range(8)]
    alone = make_reward(checkpoint, loaded, cache_size=0)
    expected = [alone(p, c) for p, c in batches]
    shared, results = make_reward(checkpoint, loaded, cache_size=0), [None] * 8
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, shared(*batches[k]))) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got, want in zip(results, expected):
        assert got == pytest.approx(want, rel=1e-5)
    alone.close()
    shared.close()


@pytest.mark.parametrize("call, message", [
    (lambda r: r(["a"], ["b", "c"]), "lists of one length"),
    (lambda r: r("a", "b"), "lists of one length"),
    (lambda r: r([""], ["b"]), "prompt is empty"),
    (lambda r: r([5], ["b"]), "prompt must be a non-empty string or list of messages"),
    (lambda r: r([[{"role": "bot", "content": "x"}]], ["b"]), "prompt: every message needs a role"),
    (lambda r: r([[{"role": "user"}]], ["b"]), "prompt: every message needs a role"),
    (lambda r: r(["a"], ["b"], user=["u", "v"]), "user has 2 entries for 1 completions"),
    (lambda r: r(["a"], ["b"], user=[""]), "user must be a non-empty printable string"),
    (lambda r: r.add_preference("x" * 129, "a", "b", "c"), "at most 128 characters"),
    (lambda r: r.add_preference(3, "a", "b", "c"), "user must be"),
    (lambda r: r.add_preference("u", "a", "", "c"), "chosen is empty"),
    (lambda r: r.add_preference("u", "a", "b", None), "rejected must be"),
    (lambda r: r.next_question("u", "a", ["b"]), "at least 2 responses"),
    (lambda r: r.next_question("u", "a", ["b", 3]), "responses[1] must be"),
])
def test_bad_inputs_name_what_is_wrong(reward, call, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call(reward)


def test_a_failed_store_changes_nothing_and_wrong_methods_are_refused(reward, loaded):
    def refuse(*answer):
        raise OSError("disk full")
    with pytest.raises(OSError):
        reward.add_preference("careful", "a b", "c", "d", store=refuse)
    assert reward.weights("careful")[1] == 0
    other = get_method("lore")(K, 0.0, None, "cpu")
    other.V = torch.randn(32, K)                                                   # fitted on another F
    with pytest.raises(InputError, match="gives F=64, the checkpoint was fitted on F=32"):
        PersonalReward(other, *loaded)
    with pytest.raises(InputError, match="has no basis V"):
        PersonalReward(get_method("pal")(2, device="cpu"), *loaded)


def test_inside_trl_grpo_trainer_for_two_steps(reward, tmp_path):
    """TRL's GRPOTrainer calls the reward with the prompts, the completions and the user column."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    tokenizer = reward.tokenizer
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=32, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=128)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    calls = []

    def personal(prompts, completions, user, **kwargs):   # the reward, with its inputs and outputs kept
        out = reward(prompts, completions, user=user, **kwargs)
        calls.append((prompts, completions, user, out))
        return out
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "w1 w2 w3"}], [{"role": "user", "content": "w4"}]],
                              "user": ["ann", None]})
    args = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=2,
                          max_completion_length=4, max_steps=2, logging_steps=1, report_to=[], save_strategy="no",
                          use_cpu=True, seed=0, bf16=False, dataloader_num_workers=0)
    trainer = trl.GRPOTrainer(model=policy, reward_funcs=personal, args=args, train_dataset=data,
                              processing_class=tokenizer)
    trainer.train()
    assert len(calls) == 2 and trainer.state.global_step == 2
    for (prompts, completions, user, out), log in zip(calls, trainer.state.log_history):
        assert len(prompts) == len(completions) == len(user) == len(out) == 4
        assert set(user) <= {"ann", None} and isinstance(completions[0], list)
        expected = reward.rewards(user, [p + c for p, c in zip(prompts, completions)])
        assert out == pytest.approx(expected, rel=1e-6)
        assert log["rewards/personal/mean"] == pytest.approx(sum(out) / 4, rel=1e-4)
