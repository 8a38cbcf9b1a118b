"""A planted Reddit-TLDR-like data folder for docs/active.md: workers who each label their own posts'
two summaries, with noisy labels, and nothing else to ask them (the candidates of active selection
are a worker's own labelled pool, as on the real TLDR).

    python benchmarks/planted_tldr.py --out RedditTLDR/results/planted_tldr
    python RedditTLDR/vary_fewshot.py --data RedditTLDR/results/planted_tldr --k-list 3 --shots 1,2,5,10,20 \\
        --trials 5 --select random,active --out RedditTLDR/results/active_planted

Summaries have Gaussian embeddings (F = --features, norm --norm); worker i's true reward of a
summary phi is phi . D w_i, D [F, --rank] planted unit directions, w_i ~ Dirichlet(--dirichlet) on
the simplex; it labels a pair (a, b) a > b with probability sigmoid(--beta (phi_a - phi_b) . D w_i /
|D w_i| / (norm sqrt(2/F))) (the logit's spread across pairs is --beta): noisy, like real
annotators. Seen workers label --train pairs (seen_train) and --test pairs (seen_test), unseen
workers a pool of --pool pairs in random order (unseen_fewshot) and --test pairs (unseen_test); every
pair is a new post. v_ref is the workers' mean direction plus noise of --ref-noise relative norm.
Writes the common data layout (lore.data.write_data_folder) to --out.
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lore.checks import set_seed  # noqa: E402
from lore.data import write_data_folder  # noqa: E402
from lore.io import save_tensors  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="RedditTLDR/results/planted_tldr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-users", type=int, default=300, help="seen workers")
    p.add_argument("--n-unseen", type=int, default=200, help="unseen workers")
    p.add_argument("--train", type=int, default=60, help="train pairs per seen worker")
    p.add_argument("--pool", type=int, default=50, help="few-shot pool per unseen worker")
    p.add_argument("--test", type=int, default=100, help="held-out pairs per worker")
    p.add_argument("--features", type=int, default=64)
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--dirichlet", type=float, default=0.3)
    p.add_argument("--norm", type=float, default=30.0)
    p.add_argument("--beta", type=float, default=4.0, help="spread of the labels' true logits")
    p.add_argument("--ref-noise", type=float, default=0.5)
    return p.parse_args(argv)


def main(args):
    set_seed(args.seed)
    F, rank = args.features, args.rank
    D = torch.linalg.qr(torch.randn(F, rank))[0]                                   # [F, rank]
    W = {g: torch.distributions.Dirichlet(torch.full((rank,), args.dirichlet)).sample((n,))
         for g, n in (("seen", args.n_users), ("unseen", args.n_unseen))}         # [N, rank]
    sets = (("seen_train", "seen", args.train), ("seen_test", "seen", args.test),
            ("unseen_fewshot", "unseen", args.pool), ("unseen_test", "unseen", args.test))
    n_pairs = sum(len(W[g]) * n for _, g, n in sets)
    table = (args.norm / math.sqrt(F) * torch.randn(2 * n_pairs, F)).bfloat16()  # post p: rows 2p, 2p + 1
    frames, start = [], 0
    import pandas as pd
    for name, group, n in sets:
        N = len(W[group])
        post = start + torch.arange(N * n)                                         # [P]
        user = torch.arange(N).repeat_interleave(n)
        u = D @ W[group].T                                                         # [F, N]: true directions
        u = u / u.norm(dim=0)
        x = table[2 * post].float() - table[2 * post + 1].float()                  # [P, F]
        logit = args.beta * (x * u.T[user]).sum(-1) / (args.norm * math.sqrt(2 / F))
        first = torch.rand(len(post)) < torch.sigmoid(logit)                       # the label: a > b
        frames.append(pd.DataFrame({
            "set": name, "user": [f"{group}_{i}" for i in user.tolist()],
            "chosen": torch.where(first, 2 * post, 2 * post + 1).numpy(),
            "rejected": torch.where(first, 2 * post + 1, 2 * post).numpy(),
            "draw": torch.arange(n).repeat(N).numpy()}))
        start += N * n
    v_ref = (D @ torch.cat(list(W.values())).mean(0))[:, None]                     # [F, 1]
    v_ref = v_ref + args.ref_noise * v_ref.norm() * torch.randn(F, 1) / math.sqrt(F)
    os.makedirs(args.out, exist_ok=True)
    save_tensors(os.path.join(args.out, "embeddings.safetensors"), {"embeddings": table},
                       {"model": "planted_tldr", "config": json.dumps(vars(args))})
    users = {g: [f"{g}_{i}" for i in range(len(W[g]))] for g in W}
    conversations = pd.DataFrame({"row": np.arange(len(table)),
                                  "messages": [json.dumps([{"role": "user", "content": f"post {r // 2}"},
                                                           {"role": "assistant", "content": f"summary {r % 2}"}])
                                               for r in range(len(table))]})
    write_data_folder(args.out, dataset="planted_tldr", users=users, pairs=pd.concat(frames, ignore_index=True),
                            conversations=conversations, v_ref=v_ref, config=vars(args))


if __name__ == "__main__":
    main(parse_args())
