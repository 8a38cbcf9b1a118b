"""PersonalLLM, step 1: embed every response of both splits, keep the 10 reward models' scores, and
draw the simulated users and their pairs.

    python PersonalLLM/prepare.py                              # namkoong-lab/PersonalLLM from the hub
    python PersonalLLM/prepare.py --data-files train=train.parquet test=test.parquet   # local copies
    python PersonalLLM/prepare.py --synthetic                  # a planted population, no download
    python PersonalLLM/prepare.py --synthetic --population misspecified   # one LoRe was not built for

The hub dataset has a row per prompt: `prompt`, `response_1` ... `response_8`, and the score of
response i by reward model m in `response_{i}_{m}` for the 10 models of REWARD_MODELS. Each response
is embedded as the conversation [user: prompt, assistant: response_i] (the 8 share their prompt, so
the extraction encodes it once).

Simulated users (the paper's recipe): 1000 seen and 500 unseen users, each a Dirichlet(0.1) mixture
of the 10 reward models. A user scores the 8 responses of a prompt with its mixture of the models'
scores; its preference pair is the best minus the worst response. Seen users get 0.5% of the train
prompts (seen_train, 47 of 9402) and every test prompt (seen_test; --seen-test-prompts N samples N
per user instead, for large populations: data.json's test_sample says which); unseen users a pool of 1% of the
train prompts in random order (unseen_fewshot: train_basis.py fits on the first 9 = 0.1%,
vary_fewshot.py draws its shots from all 94) and every test prompt (unseen_test). Pairs are rows of
the embedding table: the dense [users, prompts, F] tensor (77 GB) is never built.

--synthetic writes the same files without a model or a download (with the defaults, prepare,
train_basis and vary_fewshot take about 75 s on 2 CPU cores): Gaussian response embeddings, and 10
"reward models" that score a response phi as phi . u_m plus noise, every u_m a mixture of --rank
planted directions that point partly against each other (users disagree). A user mixing the 10
models then has a linear reward in a --rank-dimensional subspace: LoRe should climb with K up to
--rank and then come close to the oracle (each user's true direction). v_ref is the models' mean
direction plus noise: a generic reward, decent for everyone and personal to no one.

--synthetic --population misspecified (the default stays `planted`) breaks every assumption the
planted population grants LoRe, so that the comparison is not won by construction:
  - the 10 reward models are nonlinear in the embeddings: s_m(phi) = sum_j b_mj tanh(g a_mj . phi / sd
    + c_mj), 16 tanh units each (--hidden-gain g), standardized; data.json states each model's R^2
    under its best linear fit on the embeddings; --noise adds per-response score noise as in the
    planted population (no embedding carries it: with the default 1.0, half of a score's variance);
  - users are not mixtures of a few directions: --clusters cluster centres (Dirichlet(0.3) mixtures
    of the 10 models) plus each user's own Gaussian offset (--individual, signed: off the simplex),
    so the users' rewards are 10 nonlinear functions mixed with signed weights;
  - every pair is an arbitrary pair of two distinct responses of a prompt (not best-versus-worst),
    labelled by a draw from the Bradley-Terry probability sigma(--bt-beta (r_a - r_b) / sd_i), sd_i
    the user's reward spread over the responses (noisy labels);
  - a pair whose true rewards differ by less than --tie-margin sd_i is a tie: recorded (ties.parquet,
    counts in data.json) and excluded from the pairs;
  - v_ref is the least-squares linear fit of the models' mean score on the train embeddings, plus
    --ref-noise: the best generic linear reward, blurred. No synthetic_truth.safetensors is written
    (no linear oracle exists); users.safetensors holds each user's signed weights W and cluster.
data.json's `population` states which population and its parameters.

Writes to --out (default PersonalLLM/data/) the common data layout (lore.data.DATA_FILES: embeddings,
conversations.parquet, pairs.parquet, v_ref.safetensors, data.json) and:
    scores.safetensors       {"train": [S_train, 8, 10], "test": [S_test, 8, 10]} float32, the
                             reward models in the order of REWARD_MODELS; response r of prompt s of
                             a split is row offset(split) + 8 s + r (offsets in its metadata)
    users.safetensors        the simulated users' true mixtures W_seen [1000, 10], W_unseen [500, 10]
    synthetic_truth.safetensors   (--synthetic only) {"reward_models": [F, 10] the u_m,
                             "directions": [F, rank], "mixing": [10, rank]}
"""
import json
import math
import os
import sys

FOLDER = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(FOLDER, ".."))
from lore.checks import InputError, set_seed  # noqa: E402
from lore.cli import (add_prepare_args, ArgumentParser, cache_path, command_line, config_of, fraction,
                      link_into, nonnegative_float, positive_float, positive_int, run_folder, seed_int)  # noqa: E402
from lore.data import write_data_folder  # noqa: E402
from lore.extract import embed_conversations, read_reward_head  # noqa: E402
from lore.io import load_splits, read_metadata, save_tensors, write_table  # noqa: E402
from lore.pairs import SETS  # noqa: E402
import utils  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

HUB_ID = "namkoong-lab/PersonalLLM"
SPLITS = ("train", "test")
RESPONSES = 8
SCRIPT = "PersonalLLM/prepare.py"
POPULATIONS = ("planted", "misspecified")
HIDDEN = 16   # tanh units per reward model of the misspecified population
REWARD_MODELS = ("gemma_2b", "gemma_7b", "mistral_raft", "llama3_sfairx", "oasst_deberta_v3",
                 "beaver_7b", "oasst_pythia_7b", "oasst_pythia_1b", "mistral_ray", "mistral_weqweasdas")


def parse_args(argv=None):
    p = ArgumentParser(__doc__)
    add_prepare_args(p, FOLDER)
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the simulated users (and of the synthetic data)")
    u = p.add_argument_group("the simulated users")
    u.add_argument("--n-users", type=positive_int, default=1000, help="seen users")
    u.add_argument("--n-unseen", type=positive_int, default=500, help="unseen users")
    u.add_argument("--dirichlet", type=positive_float, default=0.1, help="users ~ Dirichlet(this * ones(10))")
    u.add_argument("--train-frac", type=fraction, default=0.005,
                   help="fraction of the train prompts per seen user (seen_train)")
    u.add_argument("--pool-frac", type=fraction, default=0.01,
                   help="fraction of the train prompts in each unseen user's few-shot pool (unseen_fewshot)")
    u.add_argument("--test-frac", type=fraction, default=1.0,
                   help="fraction of the test prompts per user (seen_test, unseen_test)")
    u.add_argument("--seen-test-prompts", type=positive_int, default=None,
                   help="seen users' test sample: this many random test prompts per seen user instead of "
                        "--test-frac (seen_test; 1e5 users x 1000 prompts would be 1e8 pairs); stated in data.json")
    s = p.add_argument_group("synthetic data (--synthetic)")
    s.add_argument("--synthetic", action="store_true", help="write a planted population instead")
    s.add_argument("--population", choices=POPULATIONS, default="planted",
                   help="--synthetic's population: planted (LoRe's own model class) or misspecified (nonlinear "
                        "rewards, clustered users with individual offsets, random pairs, noisy BT labels, ties)")
    s.add_argument("--prompts-train", type=positive_int, default=9402, help="prompts of the train split")
    s.add_argument("--prompts-test", type=positive_int, default=1000, help="prompts of the test split")
    s.add_argument("--features", type=positive_int, default=64, help="embedding size F")
    s.add_argument("--rank", type=positive_int, default=3, help="planted directions the 10 models mix")
    s.add_argument("--cosine", type=float, default=-0.4,
                   help="pairwise cosine of the planted directions (negative: users disagree)")
    s.add_argument("--norm", type=positive_float, default=30.0, help="typical norm of a response embedding")
    s.add_argument("--noise", type=nonnegative_float, default=1.0,
                   help="score noise, relative to the spread of a model's noiseless scores")
    s.add_argument("--direction-noise", type=nonnegative_float, default=0.1,
                   help="each u_m's component outside the planted subspace, relative to its norm")
    s.add_argument("--ref-noise", type=nonnegative_float, default=0.5,
                   help="v_ref = mean of the u_m plus noise of this relative norm")
    m = p.add_argument_group("the misspecified population (--population misspecified)")
    m.add_argument("--hidden-gain", type=positive_float, default=2.0, help="gain g of the models' tanh units")
    m.add_argument("--clusters", type=positive_int, default=5, help="cluster centres of the users")
    m.add_argument("--individual", type=nonnegative_float, default=0.15,
                   help="sd of each user's own offset from its centre, per reward model weight")
    m.add_argument("--bt-beta", type=positive_float, default=3.0,
                   help="labels ~ Bernoulli(sigma(beta (r_a - r_b) / sd_i))")
    m.add_argument("--tie-margin", type=nonnegative_float, default=0.05,
                   help="|r_a - r_b| < this * sd_i is a tie: recorded, excluded")
    args = p.parse_args(argv)
    if args.population != "planted" and not args.synthetic:
        p.error(f"--population {args.population} needs --synthetic")
    return args


@command_line
def main(args):
    set_seed(args.seed)
    files = [path for _, path in args.data_files or ()]
    # locked, recovered and checked before any work; written as a whole at the end, or not at all
    with run_folder(args, SCRIPT, inputs=files) as out:
        if args.synthetic:
            keep_real_embeddings(args.out)
            if args.population == "misspecified":
                table, scores, conversations, v_ref, about = misspecified(args)
                truth = None
            else:
                table, scores, conversations, v_ref, truth = synthetic(args)
                about = None
            if out is None:
                return
            save_tensors(os.path.join(out, "embeddings.safetensors"), {"embeddings": table},
                               {"model": "synthetic", "n": str(len(table)), "dtype": "bfloat16",
                                "config": json.dumps(config_of(args))})
            if about is not None:
                users, W, pairs, ties = misspecified_population(args, scores)
                about["ties"] = {name: int((ties["set"] == name).sum()) for name in SETS}
                write(out, args, table, scores, conversations, v_ref, None, users, W, pairs, about, ties)
                return
        else:
            # the head first: a model without one fails before anything is computed
            v_ref = read_reward_head(args.model)                             # [F, 1]
            table, scores, conversations = from_dataset(args, out)
            truth = None
            if out is None:   # torchrun: the other processes only helped embed
                return
        users, W, pairs = population(args, scores)
        write(out, args, table, scores, conversations, v_ref, truth, users, W, pairs)


def from_dataset(args, out):
    """The hub dataset (or local files in its schema) -> embeddings, scores, conversations."""
    data = load_splits(HUB_ID, SPLITS, dict(args.data_files) if args.data_files else None)
    scores, conversations = {}, []
    for split in SPLITS:
        df = data[split].to_pandas()
        scores[split] = score_tensor(df, split)                                    # [S, 8, 10]
        for s, prompt in enumerate(text(df, s, "prompt", split) for s in range(len(df))):
            conversations += [[{"role": "user", "content": prompt},
                               {"role": "assistant", "content": text(df, s, f"response_{r + 1}", split)}]
                              for r in range(RESPONSES)]
    keep_synthetic_embeddings(args.out)
    cache = cache_path(args, "embeddings.safetensors")   # outlives a failed run: extraction resumes
    table = embed_conversations(conversations, cache, args.model, device=args.device,
                                      batch_tokens=args.batch_tokens)
    if out is not None:
        link_into(cache, out)
    return table, scores, conversations


def score_tensor(df, split):
    """Columns response_{i}_{m} -> float32 [S, 8, 10]; a missing column or value is an error."""
    columns = [f"response_{r + 1}_{m}" for r in range(RESPONSES) for m in REWARD_MODELS]
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{split} split: no score column {missing[0]!r} "
                               f"({len(missing)} of the {len(columns)} score columns missing)")
    values = df[columns].apply(pd.to_numeric, errors="coerce").to_numpy("float64")  # [S, 80]
    bad = ~np.isfinite(values)
    if bad.any():
        s, c = np.argwhere(bad)[0]
        raise InputError(f"{split} split, prompt {s}: score {columns[c]!r} is missing or not a "
                               f"number ({df[columns[c]].iloc[s]!r})")
    return torch.tensor(values.astype("float32")).reshape(len(df), RESPONSES, len(REWARD_MODELS))


def text(df, s, column, split):
    if column not in df.columns:
        raise InputError(f"{split} split: no column {column!r}")
    value = df[column].iloc[s]
    if not isinstance(value, str):
        raise InputError(f"{split} split, prompt {s}: {column!r} is not text ({value!r})")
    return value


def synthetic(args):
    """Planted data: embeddings phi ~ N(0, norm^2 / F) per coordinate; model m scores phi . u_m + noise
    with u_m = D a_m + (direction noise), D [F, rank] the planted directions and a_m on the simplex."""
    F, rank, M = args.features, args.rank, len(REWARD_MODELS)
    if min(args.prompts_train, args.prompts_test, rank) < 1 or rank > F:
        raise InputError(f"need --prompts-train, --prompts-test >= 1 and 1 <= --rank <= --features, "
                               f"got {args.prompts_train}, {args.prompts_test}, {rank}, {F}")
    if not -1 / max(rank - 1, 1) < args.cosine < 1:
        raise InputError(f"--cosine {args.cosine}: {rank} unit vectors can only have a pairwise "
                               f"cosine in ({-1 / max(rank - 1, 1):.3g}, 1)")
    gram = torch.full((rank, rank), args.cosine).fill_diagonal_(1.0)
    D = torch.linalg.qr(torch.randn(F, rank))[0] @ torch.linalg.cholesky(gram).T   # [F, rank] unit columns
    # each model mixes the directions, most of it on one of them (Dirichlet(0.2))
    A = torch.distributions.Dirichlet(torch.full((rank,), 0.2)).sample((M,))       # [10, rank]
    U = D @ A.T                                                                    # [F, 10]
    U = U + args.direction_noise * U.norm(dim=0) * torch.randn(F, M) / math.sqrt(F)
    v_ref = U.mean(1, keepdim=True)                                                # [F, 1]
    v_ref = v_ref + args.ref_noise * v_ref.norm() * torch.randn(F, 1) / math.sqrt(F)
    S = {"train": args.prompts_train, "test": args.prompts_test}
    # bf16 like real embeddings; the scores read the rounded values, so they are exactly linear in them
    table = (args.norm / math.sqrt(F) * torch.randn(RESPONSES * sum(S.values()), F)).bfloat16()
    clean = torch.cat([t.float() @ U for t in table.split(1 << 15)])               # [E, 10]
    noisy = clean + args.noise * clean.std(0) * torch.randn_like(clean)
    scores = dict(zip(SPLITS, noisy.reshape(-1, RESPONSES, M).split(list(S.values()))))
    conversations = [[{"role": "user", "content": f"synthetic {split} prompt {s}"},
                      {"role": "assistant", "content": f"response {r + 1}"}]
                     for split in SPLITS for s in range(S[split]) for r in range(RESPONSES)]
    return table, scores, conversations, v_ref, {"reward_models": U, "directions": D, "mixing": A}


def misspecified(args):
    """The misspecified population's data (see the module's docstring): Gaussian embeddings as the
    planted one, 10 nonlinear reward models, v_ref the least-squares linear fit of their mean.
    -> (table, scores, conversations, v_ref, the population's description for data.json)."""
    F, M = args.features, len(REWARD_MODELS)
    S = {"train": args.prompts_train, "test": args.prompts_test}
    table = (args.norm / math.sqrt(F) * torch.randn(RESPONSES * sum(S.values()), F)).bfloat16()
    A = torch.nn.functional.normalize(torch.randn(M, HIDDEN, F), dim=-1)          # [10, J, F] unit directions
    B = torch.randn(M, HIDDEN) / math.sqrt(HIDDEN)                                 # [10, J] signed output weights
    C = torch.randn(M, HIDDEN)                                                     # [10, J] offsets
    sd = args.norm / math.sqrt(F)                                                  # the spread of a . phi
    def score(t):                                                                  # [e, F] -> [e, 10]
        H = torch.tanh(args.hidden_gain * torch.einsum("ef,mjf->emj", t.float(), A) / sd + C)  # [e, 10, J]
        return (H * B).sum(-1)
    clean = torch.cat([score(t) for t in table.split(1 << 14)])                    # [E, 10]
    clean = (clean - clean.mean(0)) / clean.std(0)
    X = table.float()                                                              # [E, F]
    n_train = RESPONSES * S["train"]
    fit = torch.linalg.lstsq(X[:n_train], clean[:n_train]).solution                # [F, 10]
    resid = clean[:n_train] - X[:n_train] @ fit
    r2 = 1 - resid.var(0) / clean[:n_train].var(0)                                 # [10]
    v_ref = fit.mean(1, keepdim=True)                                              # [F, 1]
    v_ref = v_ref + args.ref_noise * v_ref.norm() * torch.randn(F, 1) / math.sqrt(F)
    noisy = clean + args.noise * torch.randn_like(clean)
    scores = dict(zip(SPLITS, noisy.reshape(-1, RESPONSES, M).split(list(S.values()))))
    conversations = [[{"role": "user", "content": f"synthetic {split} prompt {s}"},
                      {"role": "assistant", "content": f"response {r + 1}"}]
                     for split in SPLITS for s in range(S[split]) for r in range(RESPONSES)]
    about = {"name": "misspecified",
             "about": f"10 reward models, each a sum of {HIDDEN} tanh units of the embeddings (gain "
                      f"{args.hidden_gain}), standardized, plus score noise of sd {args.noise} that no embedding "
                      f"carries; users: {args.clusters} cluster centres (Dirichlet(0.3) mixtures) plus "
                      f"a signed Gaussian offset of sd {args.individual} per weight; arbitrary pairs of two "
                      f"responses; labels ~ Bernoulli(sigma({args.bt_beta} (r_a - r_b) / sd_i)); ties "
                      f"(|r_a - r_b| < {args.tie_margin} sd_i) recorded in ties.parquet and excluded",
             "linear_r2_of_reward_models": [round(float(v), 4) for v in r2],   # of the noiseless scores
             "score_noise": args.noise}
    return table, scores, conversations, v_ref, about


def misspecified_population(args, scores):
    """Users (clusters plus individual offsets) and their pairs: per user and drawn prompt an arbitrary
    pair of two distinct responses, labelled from the Bradley-Terry probability; ties apart.
    -> (users, W {"W_seen", "W_unseen", "cluster_seen", "cluster_unseen"}, pairs, ties DataFrames)."""
    M, R = len(REWARD_MODELS), RESPONSES
    rng = np.random.default_rng(args.seed)
    centres = rng.dirichlet(np.full(M, 0.3), args.clusters)                        # [C, 10]
    counts = {"seen": args.n_users, "unseen": args.n_unseen}
    W, cluster = {}, {}
    for group, n in counts.items():
        cluster[group] = rng.integers(args.clusters, size=n)                       # [N]
        W[group] = centres[cluster[group]] + args.individual * rng.standard_normal((n, M))  # [N, 10] signed
    users = {g: [f"{g}_{i}" for i in range(n)] for g, n in counts.items()}
    train = scores["train"].double().reshape(-1, M).numpy()
    cov = np.cov(train, rowvar=False)                                              # [10, 10]
    offsets = {"train": 0, "test": RESPONSES * len(scores["train"])}
    frames, tie_frames = [], []
    for name, split, flag in (("seen_train", "train", "train_frac"), ("seen_test", "test", "test_frac"),
                              ("unseen_fewshot", "train", "pool_frac"), ("unseen_test", "test", "test_frac")):
        group = "unseen" if name.startswith("unseen") else "seen"
        n, S = counts[group], len(scores[split])
        m = args.seen_test_prompts if name == "seen_test" and args.seen_test_prompts else int(getattr(args, flag) * S)
        if not 1 <= m <= S:
            raise InputError(f"{name} ({split} split, --{flag.replace('_', '-')}): {m} prompts per user of {S}")
        w = W[group]
        sd = np.sqrt(np.einsum("nm,mk,nk->n", w, cov, w)).clip(1e-12)             # [N] each user's reward spread
        prompt = np.argsort(rng.random((n, S)), axis=1)[:, :m]                     # [N, m] without replacement
        a = rng.integers(R, size=(n, m))
        b = (a + rng.integers(1, R, size=(n, m))) % R                              # [N, m] a different response
        sc = scores[split].double().numpy()                                        # [S, R, 10]
        diff = np.einsum("nkm,nm->nk", sc[prompt, a] - sc[prompt, b], w) / sd[:, None]   # [N, m] (r_a - r_b) / sd_i
        a_wins = rng.random((n, m)) < 1 / (1 + np.exp(-args.bt_beta * diff))
        tie = np.abs(diff) < args.tie_margin
        user = np.repeat(np.arange(n), m)
        rows = {"set": name, "user": np.array(users[group])[user], "split": split, "prompt": prompt.reshape(-1),
                "draw": np.tile(np.arange(m), n)}
        first = offsets[split] + prompt * R
        chosen = np.where(a_wins, first + a, first + b).reshape(-1)
        rejected = np.where(a_wins, first + b, first + a).reshape(-1)
        keep = ~tie.reshape(-1)
        frame = pd.DataFrame({**rows, "chosen": chosen, "rejected": rejected})
        frames.append(frame[keep])
        tie_frames.append(frame[~keep].rename(columns={"chosen": "response_a", "rejected": "response_b"}))
    W_out = {"W_seen": torch.tensor(W["seen"], dtype=torch.float32),
             "W_unseen": torch.tensor(W["unseen"], dtype=torch.float32),
             "cluster_seen": torch.tensor(cluster["seen"]), "cluster_unseen": torch.tensor(cluster["unseen"])}
    return users, W_out, pd.concat(frames, ignore_index=True), pd.concat(tie_frames, ignore_index=True)


def embeddings_model(out):
    """The model named in --out's embeddings.safetensors; None when there is none, or when it cannot be
    read (truncated, corrupt): a broken file of an earlier prepare holds nothing to keep, and is
    replaced as a whole, as every file a prepare owns."""
    path = os.path.join(out, "embeddings.safetensors")
    if not os.path.exists(path):
        return None
    try:
        return read_metadata(path).get("model")
    except InputError as e:
        print(f"{e}: replaced by this run")
        return None


def keep_real_embeddings(out):
    """--synthetic into a folder holding real embeddings (hours of GPU time) is refused."""
    model = embeddings_model(out)
    if model not in (None, "synthetic"):
        raise InputError(f"{os.path.join(out, 'embeddings.safetensors')} holds the embeddings of {model}: "
                         f"--synthetic would overwrite them; pick another --out")


def keep_synthetic_embeddings(out):
    """A real prepare into a folder of synthetic data is refused: pick another --out for real data."""
    if embeddings_model(out) == "synthetic":
        raise InputError(f"{os.path.join(out, 'embeddings.safetensors')} holds synthetic embeddings: a real "
                         f"prepare would overwrite them; pick another --out")


CHUNK_PAIRS = 1 << 22   # pairs simulated and written at a time: 10^7 users' pairs are never whole in memory


def population(args, scores):
    """The simulated users (seen first, then unseen, from NumPy's seeded generator) and their pairs.
    -> (users {"seen": ids, "unseen": ids}, W {"W_seen": [N, 10], "W_unseen": [N', 10]}, pairs: an
    iterator of pyarrow Tables, the four sets in order, each in chunks of about CHUNK_PAIRS pairs of
    consecutive users). The pairs are drawn as the iterator is consumed, chunk after chunk, from the
    same generator in the same order as all at once: the same pairs for any chunk size."""
    import pyarrow as pa
    M = len(REWARD_MODELS)
    W = {"W_seen": utils.generate_popupulation(args.dirichlet * np.ones(M), args.n_users),
         "W_unseen": utils.generate_popupulation(args.dirichlet * np.ones(M), args.n_unseen)}
    for key, w in W.items():   # a tiny concentration underflows: 0/0 mixtures, every pair a tie
        bad = ~np.isfinite(w).all(1)
        if bad.any():
            raise InputError(f"--dirichlet {args.dirichlet:g}: {int(bad.sum())} of {len(w)} "
                             f"{'seen' if key == 'W_seen' else 'unseen'} users' mixtures are NaN (the draw "
                             f"underflows); use a larger --dirichlet")
    for split, s in scores.items():
        if not torch.isfinite(s).all():
            raise InputError(f"the {split} split's scores overflow (not finite): lower --noise ({args.noise:g})")
    users = {"seen": [f"seen_{i}" for i in range(args.n_users)], "unseen": [f"unseen_{i}" for i in range(args.n_unseen)]}
    offsets = {"train": 0, "test": RESPONSES * len(scores["train"])}

    def pairs():
        ids = {group: pa.array(users[group]) for group in users}                   # each pair's user: a code
        for name, split, flag in (("seen_train", "train", "train_frac"), ("seen_test", "test", "test_frac"),
                                  ("unseen_fewshot", "train", "pool_frac"), ("unseen_test", "test", "test_frac")):
            group = "unseen" if name.startswith("unseen") else "seen"
            per_user = args.seen_test_prompts if name == "seen_test" else None
            if per_user is not None:
                flag = "seen_test_prompts"
            w = W[f"W_{group}"]
            chunk = max(1, CHUNK_PAIRS // max(1, per_user or int(getattr(args, flag) * len(scores[split]))))
            for start in range(0, len(w), chunk):
                try:
                    sim = utils.simulate_pairs(scores[split].numpy(), w[start:start + chunk], getattr(args, flag),
                                               per_user)
                except InputError as e:
                    raise InputError(f"{name} ({split} split, --{flag.replace('_', '-')}): {e}") from None
                ties = (sim["chosen"] == sim["rejected"]).numpy()
                if ties.any():   # every response scored alike: a pair that states no preference
                    i = int(np.flatnonzero(ties)[0])
                    raise InputError(f"{name}: {int(ties.sum())} of {len(ties)} pairs are ties (user "
                                     f"{users[group][start + int(sim['user'][i])]}, {split} prompt "
                                     f"{int(sim['prompt'][i])}: every response scores the same); check "
                                     f"--dirichlet and --noise")
                n = len(ties)
                yield pa.table({
                    "set": pa.array([name]).take(np.zeros(n, np.int32)),
                    "user": ids[group].take(sim["user"].numpy() + start),
                    "split": pa.array([split]).take(np.zeros(n, np.int32)), "prompt": sim["prompt"].numpy(),
                    "chosen": offsets[split] + sim["chosen"].numpy(),
                    "rejected": offsets[split] + sim["rejected"].numpy(), "draw": sim["draw"].numpy()})
    return users, {k: torch.tensor(v, dtype=torch.float32) for k, v in W.items()}, pairs()


def write(out, args, table, scores, conversations, v_ref, truth, users, W, pairs, population=None, ties=None):
    import pandas as pd
    if population is None:
        population = ({"name": "planted", "about": f"every user a Dirichlet({args.dirichlet}) mixture of 10 linear "
                       f"reward models spanning {args.rank} planted directions; best-versus-worst pairs, "
                       "deterministic labels, no ties"} if args.synthetic else
                      {"name": "personalllm", "about": f"every user a Dirichlet({args.dirichlet}) mixture of the 10 "
                       "reward models' scores; best-versus-worst pairs, deterministic labels"})
    counts = {split: len(scores[split]) for split in SPLITS}
    offsets = {"train": 0, "test": RESPONSES * counts["train"]}
    if table.shape[0] != RESPONSES * sum(counts.values()) or v_ref.shape != (table.shape[1], 1):
        raise InputError(f"{out}: {table.shape[0]} embeddings of F={table.shape[1]} and v_ref "
                               f"{tuple(v_ref.shape)} do not fit {counts} prompts x {RESPONSES} responses")
    truth_path = os.path.join(out, "synthetic_truth.safetensors")
    files = ["scores.safetensors", "users.safetensors"]
    if ties is not None:
        write_table(os.path.join(out, "ties.parquet"), ties)
        files.append("ties.parquet")
    if truth is not None:
        save_tensors(truth_path, truth)
        files.append("synthetic_truth.safetensors")
    save_tensors(os.path.join(out, "scores.safetensors"), {k: v.float() for k, v in scores.items()},
                       {"reward_models": json.dumps(REWARD_MODELS), "responses": str(RESPONSES),
                        "prompts": json.dumps(counts), "offsets": json.dumps(offsets)})
    save_tensors(os.path.join(out, "users.safetensors"), W, {"reward_models": json.dumps(REWARD_MODELS)})
    write_data_folder(
        out, dataset="PersonalLLM", users=users, pairs=pairs, v_ref=v_ref, config=config_of(args),
        conversations=pd.DataFrame({"row": np.arange(len(conversations)),
                                    "messages": [json.dumps(c, ensure_ascii=False) for c in conversations]}),
        files=files, reward_models=list(REWARD_MODELS), responses=RESPONSES, offsets=offsets, prompts=counts,
        test_sample=test_sample(args, counts["test"]), population=population)


def test_sample(args, n_test):
    """The test prompts each user is scored on, for data.json: a sample when not every prompt."""
    seen = args.seen_test_prompts or int(args.test_frac * n_test)
    return {"test_prompts": n_test, "seen_test_prompts_per_user": seen,
            "unseen_test_prompts_per_user": int(args.test_frac * n_test),
            "seen_test_is_sample": seen < n_test}


if __name__ == "__main__":
    main(parse_args())
