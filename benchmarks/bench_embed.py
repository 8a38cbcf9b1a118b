"""Embedding extraction speed: one sequence per forward (the original code) vs embed_conversations.

A random-weight Llama-3.1-8B-shaped model is built directly on the device (no download), and N
TLDR-like pairs are embedded both ways: a 150-550-token post shared by two 15-60-token summaries.
Reports pairs/s, sequences/s, tokens/s, model-FLOP utilization and the speedup; writes a JSON with --out.

    python benchmarks/bench_embed.py --device cuda --batch-tokens 65536 --out benchmarks/results/embed_h100_64k.json
    python benchmarks/bench_embed.py --smoke   # tiny model on CPU, a few seconds
"""

import argparse
import json
import os
import random
import string
import sys
import tempfile
import time

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaModel, PreTrainedTokenizerFast

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lore.extract import embed_conversations  # noqa: E402

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
    "\n\n{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
)
SMOKE = dict(device="cpu", dtype="float32", hidden=256, layers=2, heads=4, kv_heads=2, intermediate=512,
             vocab=2048, pairs=8, batch_tokens=4096)


def tiny_chat_tokenizer(n_words=1000):
    """A word-piece tokenizer with Llama-3's special tokens and a Llama-3-like chat template; nothing is
    downloaded. The words w0 .. w{n_words-1} are one token each, so token lengths are exact (messages
    with k such words in all render to 1 + 4 * messages + k tokens); any other ASCII word is spelled
    out in characters, so distinct texts get distinct token ids."""
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>", "<unk>"]
    characters = [c for c in string.printable if not c.isspace()]
    vocab = (specials + ["user", "assistant", "system"] + [f"w{i}" for i in range(n_words)]
             + characters + [f"##{c}" for c in characters])
    backend = Tokenizer(WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", pad_token="<|pad|>", unk_token="<unk>",
                                        additional_special_tokens=specials[1:3])
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer


def tldr_like_pairs(n_pairs, n_words, seed):
    """n_pairs (chosen, rejected) conversations: a 150-550-word post and two 15-60-word summaries."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(n_words)}" for _ in range(k))  # noqa: E731
    pairs = []
    for _ in range(n_pairs):
        post = {"role": "user", "content": words(rng.randint(150, 550))}
        pairs.append([[post, {"role": "assistant", "content": words(rng.randint(15, 60))}] for _ in range(2)])
    return pairs


def attention_flops(config, queries, cached):
    """Score and value matmuls of `queries` new tokens over `cached` keys plus themselves (causal)."""
    pairs = queries * cached + queries * (queries + 1) / 2  # (query, key) pairs
    return 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * pairs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--attn", default="sdpa", help="sdpa or eager (prefix sharing needs a 4D mask)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--pairs", type=int, default=2048, help="pairs embedded by embed_conversations")
    parser.add_argument("--baseline-pairs", type=int, default=256,
                        help="the first pairs, timed one sequence per forward as well (rates are compared)")
    parser.add_argument("--batch-tokens", type=int, default=16384)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes become the defaults; flags given explicitly still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         intermediate_size=args.intermediate, max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(device):  # initialize on the device: a CPU init of 8B parameters takes minutes
        model = LlamaModel._from_config(config, dtype=dtype, attn_implementation=args.attn).eval()
    n_params = sum(p.numel() for p in model.parameters()) - args.vocab * args.hidden  # the lookup table does no FLOPs
    tokenizer = tiny_chat_tokenizer()
    pairs = tldr_like_pairs(args.pairs, 1000, args.seed)
    conversations = [conversation for pair in pairs for conversation in pair]
    ids = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True)["input_ids"] for c in conversations]

    # Work each method does: the baseline encodes every sequence whole; embed_conversations encodes
    # each post once and each summary against it.
    n_base = 2 * min(args.baseline_pairs, args.pairs)                                # baseline sequences
    baseline_flops = sum(2 * n_params * len(s) + attention_flops(config, len(s), 0) for s in ids[:n_base])
    shared_tokens, shared_flops = 0, 0.0
    for chosen, rejected in zip(ids[0::2], ids[1::2]):
        plen = len(os.path.commonprefix([chosen, rejected]))
        replies = [len(s) - plen for s in (chosen, rejected)]
        shared_tokens += plen + sum(replies)
        shared_flops += 2 * n_params * (plen + sum(replies)) + attention_flops(config, plen, 0)
        shared_flops += sum(attention_flops(config, r, plen) for r in replies)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def one_per_forward(convs):
        out = []
        for conv in convs:
            # transformers 5: apply_chat_template(tokenize=True) returns a BatchEncoding
            seq = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
            out.append(model(torch.tensor([seq], device=device)).last_hidden_state[0, -1].cpu())
        return torch.stack(out)

    with tempfile.TemporaryDirectory() as tmp:
        one_per_forward(conversations[:4])  # warm-up: kernels, allocator
        embed_conversations(conversations[:8], os.path.join(tmp, "warmup.safetensors"), model=model,
                            tokenizer=tokenizer, batch_tokens=args.batch_tokens)
        sync()
        start = time.perf_counter()
        reference = one_per_forward(conversations[:n_base])
        sync()
        baseline_s = time.perf_counter() - start
        start = time.perf_counter()
        embeddings = embed_conversations(conversations, os.path.join(tmp, "bench.safetensors"), model=model,
                                         tokenizer=tokenizer, batch_tokens=args.batch_tokens)
        sync()
        shared_s = time.perf_counter() - start

    reference, embeddings = reference.float(), embeddings[:n_base].float()
    cosine = torch.nn.functional.cosine_similarity(reference, embeddings, dim=1)  # [2N]
    rows = {}
    for method, seconds, n_seqs, tokens, flops in [
            ("one per forward", baseline_s, n_base, sum(map(len, ids[:n_base])), baseline_flops),
            ("embed_conversations", shared_s, len(conversations), shared_tokens, shared_flops)]:
        rows[method] = {"seconds": seconds, "pairs": n_seqs // 2, "pairs_per_s": n_seqs / 2 / seconds,
                        "sequences_per_s": n_seqs / seconds, "tokens_processed": tokens,
                        "tokens_per_s": tokens / seconds, "tflops_per_s": flops / seconds / 1e12,
                        "mfu": flops / seconds / (args.peak_tflops * 1e12)}
    result = {"config": vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
              else "cpu", "non_embedding_params": n_params, "methods": rows,
              "speedup": rows["embed_conversations"]["pairs_per_s"] / rows["one per forward"]["pairs_per_s"],
              "max_abs_diff": (reference - embeddings).abs().max().item(), "min_cosine": cosine.min().item()}

    print(f"\n{len(pairs)} pairs, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{n_params / 1e9:.2f}B non-embedding params, {args.dtype} on {result['device_name']}")
    print(f"{'method':<22}{'pairs':>7}{'s':>9}{'pairs/s':>10}{'seq/s':>10}{'tok/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
    for method, r in rows.items():
        print(f"{method:<22}{r['pairs']:>7}{r['seconds']:>9.2f}{r['pairs_per_s']:>10.1f}{r['sequences_per_s']:>10.1f}"
              f"{r['tokens_per_s']:>12.0f}{r['tflops_per_s']:>10.2f}{r['mfu']:>8.1%}")
    print(f"speedup (pairs/s) {result['speedup']:.2f}x; on the baseline's pairs max |difference| "
          f"{result['max_abs_diff']:.2e}, "
          f"min cosine {result['min_cosine']:.5f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
