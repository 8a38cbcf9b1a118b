"""Load benchmark of the reward server (tools/serve.py): 16 concurrent clients over loopback.

Two random-weight reward models, built here (nothing downloaded): "tiny" (the tests' Llama: 64
wide, 2 layers) and "wide" (Llama-3.1-8B's width: hidden 4096, 32 heads, 8 KV heads, MLP 14336,
but 1 layer of its 32, so that a CPU finishes: it measures the server at a realistic F, not an 8B
forward). Each gets a lore K = 5 checkpoint with a random basis, and a server process of its own
on 127.0.0.1 with a fresh database. Then, for each, in this order:
    rewards, cold cache   every client POSTs /v1/rewards for prompts no one sent before (R responses each)
    rewards, warm cache   the same requests again: every embedding comes from the LRU cache
    preferences           every client answers preferences (its own user) on texts already scored:
                          the refit, the SQLite commit (synchronous=FULL) and the round trip
Reported per phase: requests/s, responses scored/s, p50 and p99 latency of a request, and the
conversations per embedding batch (requests of different clients embedded in one forward).

    python benchmarks/bench_serve.py --out benchmarks/results/bench_serve_cpu.json
    python benchmarks/bench_serve.py --table benchmarks/results/bench_serve_cpu.json   # the docs' table
    python benchmarks/bench_serve.py --demo demo      # docs/serving.md's tiny model and TLDR-format data

Writes the JSON to --out (machine, load average, OMP_NUM_THREADS, settings, one record per model
and phase) and prints the table. --demo writes DIR/model (a tiny random reward model with its
tokenizer) and DIR/tldr/{train,validation}.jsonl (comparisons in openai/summarize_from_feedback's
schema by 16 planted workers) and exits.
"""
import argparse
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import requests
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.bench_embed import tiny_chat_tokenizer  # noqa: E402
from lore.io import write_json  # noqa: E402
from lore.methods import get_method, save_method  # noqa: E402

MODELS = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128),
          "wide": dict(hidden_size=4096, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=14336)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON of the results (default: print only)")
    p.add_argument("--table", default=None, help="print the markdown table of this results JSON and exit")
    p.add_argument("--demo", default=None, help="write the docs' tiny model and TLDR-format data to this folder and exit")
    p.add_argument("--models", default="tiny,wide", help="which of tiny, wide")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--responses", type=int, default=4, help="responses per /v1/rewards request")
    p.add_argument("--requests", default="tiny:16,wide:2", help="requests per client and phase, per model")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def reward_model(tokenizer, seed=0, **shape):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    config = LlamaConfig(vocab_size=len(tokenizer), num_labels=1, pad_token_id=tokenizer.pad_token_id,
                         max_position_embeddings=1024, **shape)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


def save_model(folder, seed=0, **shape):
    tokenizer = tiny_chat_tokenizer(n_words=200)
    reward_model(tokenizer, seed, **shape).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def random_checkpoint(path, F, K=5, seed=0):
    """lore K checkpoint: V ~ N(0, 100^2 / F) (margins of a few logits) and 50 seen users' weights."""
    torch.manual_seed(seed)
    method = get_method("lore")(K, 0.0, None, "cpu")
    method.V = torch.randn(F, K) * (100.0 / F ** 0.5)
    save_method(path, method, W=torch.distributions.Dirichlet(torch.ones(K)).sample((50,)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, model, db):
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "serve.py"), "--checkpoint", checkpoint,
                             "--model", model, "--db", db, "--port", str(port), "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):   # at most 120 s
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            requests.get(url + "/health", timeout=5)
            return proc, url
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start in 120 s")


def run_phase(url, bodies, clients):
    """bodies[c] = client c's [(path, json)]: its requests in order, one session each, all clients at
    once -> (wall seconds, latencies in seconds)."""
    latencies, errors = [], []
    start = threading.Barrier(clients + 1)

    def client(c):
        with requests.Session() as session:
            start.wait()
            for path, body in bodies[c]:
                t = time.perf_counter()
                r = session.post(url + path, json=body, timeout=600)
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(r.text[:200])
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} requests failed: {errors[0]}")
    return wall, latencies


def bench_model(name, shape, n_requests, args, folder):
    model, checkpoint, db = (os.path.join(folder, name), os.path.join(folder, f"{name}.safetensors"),
                             os.path.join(folder, f"{name}.db"))
    save_model(model, **shape)
    random_checkpoint(checkpoint, shape["hidden_size"])
    proc, url = start_server(checkpoint, model, db)
    rng = random.Random(args.seed)
    words = lambda k: " ".join(f"w{rng.randrange(200)}" for _ in range(k))  # noqa: E731
    scored = [[{"prompt": words(rng.randint(20, 60)), "responses": [words(rng.randint(10, 30)) for _ in range(args.responses)]}
               for _ in range(n_requests)] for _ in range(args.clients)]
    phases = {
        "rewards, cold cache": [[("/v1/rewards", {"user": f"user{c}", **b}) for b in scored[c]] for c in range(args.clients)],
        "rewards, warm cache": [[("/v1/rewards", {"user": f"user{c}", **b}) for b in scored[c]] for c in range(args.clients)],
        "preferences": [[(f"/v1/users/user{c}/preferences", {"prompt": b["prompt"], "chosen": b["responses"][0],
                                                             "rejected": b["responses"][1]}) for b in scored[c]]
                        for c in range(args.clients)]}
    records = []
    try:
        for phase, bodies in phases.items():
            before = requests.get(url + "/health", timeout=30).json()["embedding"]
            wall, latencies = run_phase(url, bodies, args.clients)
            after = requests.get(url + "/health", timeout=30).json()["embedding"]
            batches = after["batches"] - before["batches"]
            n = len(latencies)
            records.append({
                "model": name, "F": shape["hidden_size"], "layers": shape["num_hidden_layers"], "phase": phase,
                "clients": args.clients, "requests": n, "responses_per_request": args.responses,
                "wall_s": wall, "requests_per_s": n / wall,
                "responses_per_s": n * args.responses / wall if phase.startswith("rewards") else None,
                "p50_ms": 1e3 * float(np.percentile(latencies, 50)), "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
                "embedding_batches": batches,
                "conversations_per_batch": (after["conversations"] - before["conversations"]) / batches if batches else None})
            print(f"{name} {phase}: {records[-1]['requests_per_s']:.1f} requests/s, p50 {records[-1]['p50_ms']:.0f} ms, "
                  f"p99 {records[-1]['p99_ms']:.0f} ms", flush=True)
    finally:
        proc.kill()
        proc.wait()
    return records


def table(result):
    """The markdown table of a results JSON (what docs/serving.md shows)."""
    lines = ["| model (F, layers) | phase | requests | requests/s | responses/s | p50 ms | p99 ms | conversations per batch |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in result["records"]:
        lines.append(f"| {r['model']} ({r['F']}, {r['layers']}) | {r['phase']} | {r['requests']} | "
                     f"{r['requests_per_s']:.1f} | {fmt(r['responses_per_s'], '.1f')} | {r['p50_ms']:.0f} | "
                     f"{r['p99_ms']:.0f} | {fmt(r['conversations_per_batch'], '.1f')} |")
    return "\n".join(lines)


def write_demo(folder, seed=0):
    """A tiny reward model and TLDR comparisons: 16 workers over 40 posts with 4 summaries each;
    half the workers prefer the longer summary, half the shorter (a rank-2 population), 90% of the time."""
    save_model(os.path.join(folder, "model"), seed, **MODELS["tiny"])
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(200)}" for _ in range(k))  # noqa: E731
    posts = [(f"t3_{p}", words(rng.randint(20, 50)), [words(rng.randint(3, 15)) for _ in range(4)]) for p in range(40)]
    os.makedirs(os.path.join(folder, "tldr"), exist_ok=True)
    for split, first, n in (("train", 0, 30), ("validation", 30, 10)):
        with open(os.path.join(folder, "tldr", f"{split}.jsonl"), "w") as f:
            for w in range(16):
                for _ in range(n):
                    pid, post, summaries = posts[rng.randrange(first, first + 30 if split == "train" else 40)]
                    a, b = rng.sample(range(4), 2)
                    longer = int(len(summaries[b]) > len(summaries[a]))
                    choice = longer if (w % 2 == 0) == (rng.random() < 0.9) else 1 - longer
                    f.write(json.dumps({"info": {"id": pid, "post": post, "title": "t", "subreddit": "demo"},
                                        "summaries": [{"text": summaries[a], "policy": "p", "note": None},
                                                      {"text": summaries[b], "policy": "p", "note": None}],
                                        "choice": choice, "worker": f"worker{w}", "batch": "b", "split": split,
                                        "extra": {}}) + "\n")
    print(f"wrote {folder}/model and {folder}/tldr/train.jsonl, validation.jsonl")


def main(args):
    if args.table:
        with open(args.table) as f:
            print(table(json.load(f)))
        return
    if args.demo:
        return write_demo(args.demo, args.seed)
    counts = dict(item.split(":") for item in args.requests.split(","))
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        records = [r for name in args.models.split(",")
                   for r in bench_model(name, MODELS[name], int(counts[name]), args, folder)]
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                          "load_average_before": load, "load_average_after": os.getloadavg()},
              "settings": vars(args), "records": records}
    print(table(result))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main(parse_args())
