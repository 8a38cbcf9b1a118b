"""Shared fixtures: a tiny random Llama reward model and chat tokenizer saved to disk (nothing downloaded)."""

import os
import sys

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one pytest worker per core (`-n auto`): one thread each, in the worker and the scripts it
    # starts, so that workers do not oversubscribe the cores and every run reduces floats alike
    os.environ["OMP_NUM_THREADS"] = "1"
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForSequenceClassification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `import utils` from any working directory

from benchmarks.bench_embed import tiny_chat_tokenizer  # noqa: E402


def load_script(path, name):
    """A script imported by path under a name of its own (every dataset folder has a train_basis.py:
    a plain `import train_basis` would find whichever folder came first on sys.path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_reward_model(tokenizer, seed=0):
    """A 2-layer LlamaForSequenceClassification with one reward logit and random weights."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, max_position_embeddings=1024)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Folder of a tiny reward model checkpoint (single model.safetensors) with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny_reward_model")
    tokenizer = tiny_chat_tokenizer(n_words=200)
    tiny_reward_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_sharded_model_dir(tmp_path_factory):
    """The same checkpoint saved in many shards with a model.safetensors.index.json."""
    path = tmp_path_factory.mktemp("tiny_reward_model_sharded")
    tokenizer = tiny_chat_tokenizer(n_words=200)
    tiny_reward_model(tokenizer).save_pretrained(path, max_shard_size="20KB")
    tokenizer.save_pretrained(path)
    return str(path)
