"""Embedding extraction: batched, prefix-shared, sharded, resumable and multi-process extraction must
give the numbers of the plain one-sequence-per-forward loop, and phi @ v_ref the model's own reward."""

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForSequenceClassification, LlamaModel

from lore import extract as ex
from conftest import REPO
from lore.checks import InputError
from lore.distributed import is_main_process
from lore.io import read_metadata


def mixed_conversations(seed=0):
    """Prompts with 2-8 replies, multi-turn histories with several last replies, single-message and
    lone conversations, a reply that extends another, duplicates, and a few long sequences."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(200)}" for _ in range(k))  # noqa: E731
    user = lambda k: {"role": "user", "content": words(k)}  # noqa: E731
    bot = lambda k: {"role": "assistant", "content": words(k)}  # noqa: E731
    conversations = []
    for _ in range(6):  # a prompt with 2-8 replies
        prompt = user(rng.randint(5, 40))
        conversations += [[prompt, bot(rng.randint(1, 20))] for _ in range(rng.randint(2, 8))]
    for _ in range(3):  # a dialogue history with 2-3 candidate last replies
        history = [user(rng.randint(5, 30)), bot(rng.randint(5, 30)), user(rng.randint(5, 30))]
        conversations += [history + [bot(rng.randint(1, 20))] for _ in range(rng.randint(2, 3))]
    conversations += [[user(rng.randint(1, 30))] for _ in range(3)]  # single messages: one group, key []
    conversations += [[user(rng.randint(5, 30)), bot(rng.randint(1, 20))] for _ in range(3)]  # lone pairs
    conversations += [[user(250), bot(10)], [user(120), bot(5), user(100), bot(30)]]  # longer than small budgets
    prompt = user(8)
    conversations += [[prompt, {"role": "assistant", "content": "w1 w2"}],
                      [prompt, {"role": "assistant", "content": "w1 w2 w3"}]]  # shares part of the reply too
    conversations += [conversations[i] for i in (0, 3, 17, 40)]  # duplicates
    rng.shuffle(conversations)
    return conversations


def tldr_pairs(n=6, seed=1):
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(200)}" for _ in range(k))  # noqa: E731
    conversations = []
    for _ in range(n):
        post = {"role": "user", "content": words(rng.randint(20, 60))}
        conversations += [[post, {"role": "assistant", "content": words(rng.randint(3, 10))}] for _ in range(2)]
    return conversations


def one_at_a_time(model, tokenizer, conversations):
    """The original extraction: each conversation alone, the last token's final hidden state."""
    out = []
    with torch.inference_mode():
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
            out.append(model(torch.tensor([ids])).last_hidden_state[0, -1])
    return torch.stack(out)  # [n, F]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return ex.load_reward_model(tiny_model_dir, device="cpu")


@pytest.mark.parametrize("batch_tokens", [40, 200, 10**6])
def test_matches_one_at_a_time(loaded, tmp_path, batch_tokens):
    model, tokenizer = loaded
    conversations = mixed_conversations()
    out = tmp_path / "emb.safetensors"
    embeddings = ex.embed_conversations(conversations, out, model=model, tokenizer=tokenizer,
                                     batch_tokens=batch_tokens, shard_size=7)
    reference = one_at_a_time(model, tokenizer, conversations)
    assert embeddings.dtype == torch.float32 and embeddings.shape == reference.shape
    torch.testing.assert_close(embeddings, reference, atol=1e-5, rtol=1e-5)
    file = load_file(out)
    assert torch.equal(file["embeddings"], embeddings)
    assert not os.path.exists(f"{out}.parts")
    metadata = read_metadata(out)
    assert (metadata["n"], metadata["F"], metadata["model"]) == (str(len(conversations)), "64", model.name_or_path)


def test_eager_attention_matches_one_at_a_time(tiny_model_dir, tmp_path):
    model, tokenizer = ex.load_reward_model(tiny_model_dir, device="cpu", attn_implementation="eager")
    conversations = mixed_conversations(seed=2)
    embeddings = ex.embed_conversations(conversations, tmp_path / "emb.safetensors", model=model, tokenizer=tokenizer,
                                     batch_tokens=200, shard_size=7)
    torch.testing.assert_close(embeddings, one_at_a_time(model, tokenizer, conversations), atol=1e-5, rtol=1e-5)


def test_shared_prefix_is_encoded_once(loaded, tmp_path):
    """Each post is encoded once, each summary against it; duplicates are not encoded again."""
    model, tokenizer = loaded
    conversations = tldr_pairs()
    conversations += conversations[:3]
    encoded = []

    def count_tokens(module, args, kwargs):  # real tokens among this forward's inputs: every real
        # token of a row sees the row's first token (the shared prefix); padding sees only itself
        encoded.append(int((kwargs["attention_mask"][:, 0, :, 0] == 0).sum()))

    hook = model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    try:
        ex.embed_conversations(conversations, tmp_path / "emb.safetensors", model=model, tokenizer=tokenizer)
    finally:
        hook.remove()
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in tldr_pairs()]
    expected = 0
    for chosen, rejected in zip(ids[0::2], ids[1::2]):
        shared = len(os.path.commonprefix([chosen, rejected]))
        expected += len(chosen) + len(rejected) - shared
    assert sum(encoded) == expected < sum(map(len, ids))


def test_reward_is_embedding_times_head(tiny_model_dir, tiny_sharded_model_dir, tmp_path):
    conversations = mixed_conversations(seed=3)[:12]
    embeddings = ex.embed_conversations(conversations, tmp_path / "emb.safetensors", tiny_model_dir, device="cpu")
    v_ref = ex.read_reward_head(tiny_model_dir)
    assert v_ref.shape == (64, 1) and v_ref.dtype == torch.float32
    assert torch.equal(ex.read_reward_head(tiny_sharded_model_dir), v_ref)
    assert len([f for f in os.listdir(tiny_sharded_model_dir) if f.endswith(".safetensors")]) > 1
    reward_model = LlamaForSequenceClassification.from_pretrained(tiny_model_dir).eval()
    _, tokenizer = ex.load_reward_model(tiny_model_dir, device="cpu")
    with torch.inference_mode():
        rewards = torch.stack([reward_model(**tokenizer.apply_chat_template(c, tokenize=True, return_dict=True,
                                                                            return_tensors="pt")).logits[0]
                               for c in conversations])  # [n, 1]
    torch.testing.assert_close(embeddings @ v_ref, rewards, atol=1e-5, rtol=1e-5)


def test_resume_gives_identical_bytes(loaded, tmp_path, monkeypatch):
    model, tokenizer = loaded
    conversations = mixed_conversations(seed=5)
    settings = dict(model=model, tokenizer=tokenizer, batch_tokens=200, shard_size=5)
    ex.embed_conversations(conversations, tmp_path / "full.safetensors", **settings)

    out = tmp_path / "resumed.safetensors"
    save = ex.save_tensors
    writes = []

    def interrupted_after_two(path, tensors, metadata=None):
        if len(writes) == 2:
            raise KeyboardInterrupt
        writes.append(path)
        save(path, tensors, metadata)

    monkeypatch.setattr(ex, "save_tensors", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        ex.embed_conversations(conversations, out, **settings)
    parts = f"{out}.parts"
    assert sorted(os.listdir(parts)) == ["manifest.json", "shard_000000.safetensors", "shard_000001.safetensors"]

    writes.clear()
    monkeypatch.setattr(ex, "save_tensors", lambda *a: (writes.append(a[0]), save(*a)))
    ex.embed_conversations(conversations, out, **settings)
    assert all(os.path.basename(p) not in ("shard_000000.safetensors", "shard_000001.safetensors") for p in writes)
    assert writes[-1] == str(out) and not os.path.exists(parts)
    assert out.read_bytes() == (tmp_path / "full.safetensors").read_bytes()

    def no_compute(*args):
        raise AssertionError("recomputed an existing output")

    monkeypatch.setattr(ex, "_embed_batch", no_compute)  # same inputs and settings: the file is reused
    assert torch.equal(ex.embed_conversations(conversations, out, **settings), load_file(out)["embeddings"])


TORCHRUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, {repo!r})
import torch
from safetensors.torch import load_file
from lore import extract as ex

out, model_dir, conversations = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
save = ex.save_tensors
def logged(path, tensors, metadata=None):
    print(f"rank {{os.environ.get('RANK', '0')}} wrote {{os.path.basename(path)}}", flush=True)
    save(path, tensors, metadata)
ex.save_tensors = logged
embeddings = ex.embed_conversations(conversations, out, model_dir, device="cpu", batch_tokens=200, shard_size=5)
assert torch.equal(embeddings, load_file(out)["embeddings"])
print(f"rank {{os.environ.get('RANK', '0')}} returned {{tuple(embeddings.shape)}} main={{ex.is_main_process()}}")
"""


def test_torchrun_two_processes_match_one(tiny_model_dir, tmp_path):
    script, data = tmp_path / "embed.py", tmp_path / "conversations.json"
    script.write_text(TORCHRUN_SCRIPT.format(repo=REPO))
    conversations = mixed_conversations(seed=7)
    data.write_text(json.dumps(conversations))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same threads in both runs: same float reductions
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run = lambda *cmd: subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)  # noqa: E731
    single = run(sys.executable, str(script), str(one), tiny_model_dir, str(data))
    assert single.returncode == 0, single.stderr[-3000:]
    multi = run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(script), str(two), tiny_model_dir, str(data))
    assert multi.returncode == 0, multi.stderr[-3000:]
    for rank in (0, 1):  # both ranks embedded shards and returned the final tensor
        assert f"rank {rank} wrote shard_" in multi.stdout
        assert f"rank {rank} returned ({len(conversations)}, 64) main={rank == 0}" in multi.stdout
    assert torch.equal(load_file(two)["embeddings"], load_file(one)["embeddings"])
    assert two.read_bytes() == one.read_bytes()


def test_input_errors(tiny_model_dir, tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(InputError, match="no_such_model"):
        ex.load_reward_model(missing)
    with pytest.raises(InputError, match="no_such_model"):
        ex.read_reward_head(missing)
    start = time.time()
    with pytest.raises(InputError, match="lore-test-nobody/no-such-model.*--model PATH"):
        ex.load_reward_model("lore-test-nobody/no-such-model")
    assert time.time() - start < 30

    base = tmp_path / "base_model"
    LlamaModel(LlamaForSequenceClassification.from_pretrained(tiny_model_dir).config).save_pretrained(base)
    with pytest.raises(InputError, match=f"{base}.*score.weight"):
        ex.read_reward_head(base)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=f"{empty}.*safetensors"):
        ex.read_reward_head(empty)

    with pytest.raises(InputError, match="no conversations.*out.safetensors"):
        ex.embed_conversations([], tmp_path / "out.safetensors", tiny_model_dir)
    with pytest.raises(InputError, match="conversation 1 has no messages"):
        ex.embed_conversations([[{"role": "user", "content": "w1"}], []], tmp_path / "out.safetensors", tiny_model_dir)


def test_is_main_process(monkeypatch):
    assert is_main_process()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert not is_main_process()


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_embed.py"), "--smoke",
                             "--pairs", "4", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["methods"]) == {"one per forward", "embed_conversations"}
    assert report["speedup"] > 0 and report["max_abs_diff"] < 1e-4
    assert "speedup" in result.stdout
