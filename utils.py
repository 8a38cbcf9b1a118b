"""LoRe: personalized reward models by low-rank reward modeling (Bose et al., 2025).

User i's reward of a response with reward-model embedding phi is  phi^T V w_i:  V holds K shared
reward directions learned on top of a frozen reward model, w_i = softmax(W_i) is a point of the
simplex. A preference pair is one row x = phi(chosen) - phi(rejected), and the Bradley-Terry
probability that the chosen response wins is sigmoid(x^T V w_i / 100). A new user needs only w.

Shape alphabet, used in the comments of every tensor line that matters:
    N  users (seen users; functions that see only unseen users call them N too)
    P  preference pairs, all users' packed together (row p belongs to user[p])
    F  features: the reward model's hidden size (4096 for Llama-3.1-8B)
    K  rank: number of shared reward directions, the columns of V
    E  rows of an embedding table (one per distinct conversation)
    S  prompts;  R  responses per prompt;  M  reward models (PersonalLLM's 10 scorers)

Sections, in order: models, training, evaluation, pipelines (the method); data, I/O, command-line
helpers, embedding extraction; then the reference-compatible helpers no script calls.
"""
import atexit
import datetime
import functools
import hashlib
import json
import os
import random
import shutil
import socket
import sys
from array import array
from dataclasses import dataclass, replace
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm

TEMPERATURE = 100.0      # logits are x^T V w / 100: part of the method, not a tuning knob
PRUNE_THRESHOLD = 1e-2   # LoRe_regularized drops directions no user weighs at least this much
STD_FACTOR = 0.25        # the reference reports std across users times 0.25


class InputError(ValueError):
    """Bad input. The message names the file, the user or the shape at fault; scripts exit with 2."""


def resolve_device(device=None):
    """None means CUDA when available, else CPU. A device this machine does not have is an InputError
    (torch would only fail at the first tensor moved there, after files were read or written)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device}: not a device (expected cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device}: MPS is not available on this machine")
    elif resolved.type != "cpu":
        raise InputError(f"--device {device}: not supported (expected cpu, cuda or cuda:N)")
    return resolved


def set_seed(seed):
    """Seed every generator the project draws from (Python, NumPy, torch) and make CUDA kernels
    deterministic, so the same seed gives the same numbers on the same device."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


def simplex(W):
    """User logits -> user weights on the simplex. The only place the softmax is taken."""
    return F.softmax(W, dim=-1)


def mix(Z, W, user):
    """s_p = z_p . w_user(p), each pair's reward margin under its own user's weights.
    Z [P, K] projections x^T V, W [N, K], user [P] -> [P]."""
    return (Z * W.index_select(0, user)).sum(-1)   # backward: index_add, not a sort-based index_put


def bt_nll(s, weight):
    """sum_p weight_p * -log sigmoid(s_p / 100): the Bradley-Terry loss of all pairs at once."""
    return -(F.logsigmoid(s / TEMPERATURE) * weight).sum()


def project_rows(X, V):
    """X V for X [P, F], V [F, K] -> [P, K], as F.linear: on CPU twice as fast as X @ V."""
    return F.linear(X, V.t().contiguous())


def user_scores(X, V, W, user, Z=None):
    """mix(X V, W, user) -> [P], differentiable in V and W, reading X once forward and once
    backward. Z: X V when it is already computed for this very V (skips the forward read)."""
    return _UserScores.apply(X, V, W, user, Z)


class _UserScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, V, W, user, Z):
        Z = project_rows(X, V) if Z is None else Z                                 # [P, K]
        ctx.save_for_backward(X, Z, W, user)
        return mix(Z, W, user)                                                     # [P]

    @staticmethod
    def backward(ctx, g):                                                          # g [P]
        X, Z, W, user = ctx.saved_tensors
        dV = dW = None
        if ctx.needs_input_grad[1]:
            if X.is_cuda:
                dV = X.t() @ (g[:, None] * W[user])                                # [F, K]
            else:
                # dV = X^T (g * W[user]) = (A X)^T W with A [N, P] holding g_p at (user_p, p): one
                # streaming pass over X. The dense small-K GEMM is ~2x slower on CPU, autograd's
                # default X^T G ~10x.
                A = torch.sparse_coo_tensor(torch.stack([user, torch.arange(len(user))]), g,
                                            (len(W), len(user)), check_invariants=False)
                dV = (A @ X).t() @ W                                               # [F, N] [N, K]
        if ctx.needs_input_grad[2]:
            dW = torch.zeros_like(W).index_add_(0, user, g[:, None] * Z)            # [N, K]
        return None, dV, dW, None, None


class LoRe(nn.Module):
    """Joint Adam on (V, W), full batch:
        sum_i mean_{x in X_i} -log sigmoid(x^T V w_i / 100) + alpha sum_j ||V_j - v_ref||^2
    (every user weighs the same). V, W ~ N(0, 1). train(X) -> (softmax(W) [N, K], V [F, K])."""

    def __init__(self, V_sft, alpha, num_classes, num_features, num_basis_vectors, num_iterations,
                 learning_rate, device=None):
        super().__init__()
        self.device = resolve_device(device)
        self.alpha, self.num_iterations = alpha, num_iterations
        self.num_classes, self.num_features = num_classes, num_features
        self.num_basis_vectors = num_basis_vectors
        self.V_sft = None if V_sft is None else _as_column(V_sft, num_features).to(self.device)
        # drawn on the CPU generator, then moved: the same seed gives the same start on any device
        self.W = nn.Parameter(torch.randn(num_classes, num_basis_vectors).to(self.device))
        self.V = nn.Parameter(torch.randn(num_features, num_basis_vectors).to(self.device))
        self.optimizer = _adam(self.parameters(), learning_rate, self.device)

    def regularizer(self):
        if self.alpha == 0:
            return torch.zeros((), device=self.device)
        return self.alpha * ((self.V - self.V_sft) ** 2).sum()   # [F, K] - [F, 1]: column by column

    def forward(self, X):
        """-> (nll, alpha * sum_j ||V_j - v_ref||^2) on X (a list of [m_i, F] or Pairs)."""
        pairs = _pack_for(X, self.num_classes, self.num_features, self.device)
        s = mix(pairs.project(self.V), simplex(self.W), pairs.user)                 # [P]
        return bt_nll(s, _per_user_mean(pairs)), self.regularizer()

    def train(self, X):
        if isinstance(X, bool):  # nn.Module.eval() calls train(False)
            return super().train(X)
        pairs = _pack_for(X, self.num_classes, self.num_features, self.device)
        X, user, weight = pairs.rows(), pairs.user, _per_user_mean(pairs)          # [P, F], [P], [P]
        _loop(self.num_iterations, lambda: self.step(X, user, weight), self.device,
              f"LoRe K={self.num_basis_vectors}")
        return simplex(self.W).detach(), self.V.detach()

    def step(self, X, user, weight):
        """One Adam step on packed pairs: X [P, F], user [P], weight [P] (1 / pairs of the user)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = bt_nll(user_scores(X, self.V, simplex(self.W), user), weight) + self.regularizer()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


class LoRe_regularized(nn.Module):
    """Alternating Adam (two optimizers, same lr): each step first updates W with V fixed on
        mean over all pairs of -log sigmoid(x^T V w_user / 100)      (every pair weighs the same)
    then V with W fixed on that loss + alpha_t * mean_j (1 - cos(V_j, v_ref)), alpha_t warmed up
    (0 for the first 20% of the steps, linear to alpha by 80%). W ~ U(0, 1), V ~ N(0, 1). After
    training, directions with max_i softmax(W)_ij < 1e-2 are dropped (the kept columns are not
    renormalized). train(X) -> (softmax(W)[:, kept] [N, K'], V[:, kept] [F, K'])."""

    def __init__(self, V_sft, alpha, num_classes, num_features, num_basis_vectors, num_iterations,
                 learning_rate, device=None):
        super().__init__()
        self.device = resolve_device(device)
        self.alpha, self.num_iterations, self.learning_rate = alpha, num_iterations, learning_rate
        self.num_classes, self.num_features = num_classes, num_features
        self.num_basis_vectors = num_basis_vectors
        self.V_sft_norm = F.normalize(_as_column(V_sft, num_features), dim=0).to(self.device)
        self.W = nn.Parameter(torch.rand(num_classes, num_basis_vectors).to(self.device))
        self.V = nn.Parameter(torch.randn(num_features, num_basis_vectors).to(self.device))
        self.optimizer_W = _adam([self.W], learning_rate, self.device)
        self.optimizer_V = _adam([self.V], learning_rate, self.device)

    def alpha_at_step(self, step):
        start, end = int(0.2 * self.num_iterations), int(0.8 * self.num_iterations)
        if step < start:
            return 0.0
        if step >= end:
            return float(self.alpha)
        return float(self.alpha) * (step - start) / (end - start)

    def regularizer(self):
        """mean_j (1 - cos(V_j, v_ref))."""
        return (1 - (F.normalize(self.V, dim=0) * self.V_sft_norm).sum(0)).mean()

    def forward(self, X, alpha_curr=0.0):
        """-> (nll, alpha_curr * mean_j (1 - cos(V_j, v_ref))) on X (a list of [m_i, F] or Pairs)."""
        pairs = _pack_for(X, self.num_classes, self.num_features, self.device)
        nll = bt_nll(mix(pairs.project(self.V), simplex(self.W), pairs.user), _per_pair_mean(pairs))
        return nll, alpha_curr * self.regularizer()

    def train(self, X):
        if isinstance(X, bool):  # nn.Module.eval() calls train(False)
            return super().train(X)
        pairs = _pack_for(X, self.num_classes, self.num_features, self.device)
        X, user, weight = pairs.rows(), pairs.user, _per_pair_mean(pairs)          # [P, F], [P], [P]
        alpha_t = torch.zeros((), device=self.device)   # a tensor, so that a CUDA graph sees it change
        _loop(self.num_iterations, lambda: self.step(X, user, weight, alpha_t), self.device,
              f"LoRe_regularized K={self.num_basis_vectors}",
              before=lambda i: alpha_t.fill_(self.alpha_at_step(i)))
        W = simplex(self.W).detach()                                               # [N, K]
        kept = W.max(dim=0).values >= PRUNE_THRESHOLD                              # [K]
        print(f"kept {int(kept.sum())}/{self.num_basis_vectors} directions "
              f"(max user weight >= {PRUNE_THRESHOLD})")
        return W[:, kept], self.V.detach()[:, kept]

    def step(self, X, user, weight, alpha_t):
        """Update W with V fixed, then V with the new W fixed. V is the same in both half-steps, so
        one projection serves both: one read of X forward, one in the V update's backward."""
        with torch.no_grad():
            Z = project_rows(X, self.V)                                            # [P, K]
        self.optimizer_W.zero_grad(set_to_none=True)
        bt_nll(mix(Z, simplex(self.W), user), weight).backward()
        self.optimizer_W.step()
        self.optimizer_V.zero_grad(set_to_none=True)
        loss_V = bt_nll(user_scores(X, self.V, simplex(self.W).detach(), user, Z), weight)
        loss_V = loss_V + alpha_t * self.regularizer()   # alpha_t = 0 adds exactly nothing
        loss_V.backward()
        self.optimizer_V.step()
        return loss_V.detach()


class PersonalizeBatch(nn.Module):
    """Few-shot weights of new users with V fixed:
        sum_i mean_{x in X_i} -log sigmoid(x^T V softmax(w_i) / 100),  w_i ~ N(0, 1), Adam.
    X is projected onto V once; every step then works in K dimensions.
    train(X, V) -> list of N simplex weights [K]."""

    def __init__(self, num_classes, num_features, num_basis_vectors, num_iterations, learning_rate,
                 device=None):
        super().__init__()
        self.device = resolve_device(device)
        self.num_classes, self.num_features = num_classes, num_features
        self.num_basis_vectors, self.num_iterations = num_basis_vectors, num_iterations
        self.w = nn.Parameter(torch.randn(num_classes, num_basis_vectors).to(self.device))  # [N, K]
        self.optimizer = _adam(self.parameters(), learning_rate, self.device)

    def forward(self, X, V):
        pairs = _pack_for(X, self.num_classes, self.num_features, self.device)
        return bt_nll(mix(pairs.project(V.detach()), simplex(self.w), pairs.user), _per_user_mean(pairs))

    def train(self, X, V=None):
        if isinstance(X, bool):  # nn.Module.eval() calls train(False)
            return super().train(X)
        pairs = _pack_for(X, self.num_classes, self.num_features, self.device)
        Z, user, weight = pairs.project(V.detach()), pairs.user, _per_user_mean(pairs)  # [P, K]
        _loop(self.num_iterations, lambda: self.step(Z, user, weight), self.device)
        return list(simplex(self.w).detach())

    def step(self, Z, user, weight):
        """One Adam step on projected pairs Z = X V [P, K]."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = bt_nll(mix(Z, simplex(self.w), user), weight)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def _adam(params, learning_rate, device):
    return optim.Adam(params, lr=learning_rate, capturable=device.type == "cuda")


_GRAPH_WARMUP = 3


def _loop(num_iterations, step, device, desc=None, before=None):
    """Call before(i) then step() for i in range(num_iterations), with a tqdm bar when desc is given.
    On CUDA the step is captured once as a CUDA graph and replayed: a step is ~100 small kernels
    around two reads of X, and launching them one by one from Python takes longer than running
    them (H100, PersonalLLM scale: LoRe_regularized 2.5 ms -> see README). The first steps run
    eagerly on a side stream, as graph capture requires."""
    graphed = device.type == "cuda" and num_iterations > _GRAPH_WARMUP
    side, graph = (torch.cuda.Stream(device), None) if graphed else (None, None)
    for i in tqdm(range(num_iterations), desc=desc, leave=False, disable=desc is None):
        if before is not None:
            before(i)
        if graph is not None:
            graph.replay()
        elif graphed and i == _GRAPH_WARMUP:
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            graph.replay()
        elif graphed:
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                step()
        else:
            step()


def _as_column(v, num_features):
    v = torch.as_tensor(v, dtype=torch.float32).reshape(-1, 1)                     # [F, 1]
    if v.shape[0] != num_features:
        raise InputError(f"v_ref has {v.shape[0]} features but the pairs have F={num_features}")
    return v


def _pack_for(X, num_classes, num_features, device):
    pairs = pack(X, "features", device)
    if pairs.n_users != num_classes or pairs.n_features != num_features:
        raise InputError(f"the model was built for {num_classes} users x F={num_features}, the "
                         f"data has {pairs.n_users} users x F={pairs.n_features}")
    return pairs


def _per_user_mean(pairs):
    return 1.0 / pairs.counts()[pairs.user].float()                                # [P]


def _per_pair_mean(pairs):
    return torch.full((len(pairs),), 1.0 / len(pairs), device=pairs.device)        # [P]


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def solve_regularized(V_sft, alpha, train_features, num_basis_vectors, num_iterations=1000,
                      learning_rate=0.01, device=None):
    """LoRe with alpha * sum_j ||V_j - v_ref||^2 -> (W [N, K], V [F, K])."""
    pairs = _pack_basis_input(train_features, num_basis_vectors, device)
    model = LoRe(V_sft, alpha, pairs.n_users, pairs.n_features, num_basis_vectors, num_iterations,
                 learning_rate, pairs.device)
    W, V = model.train(pairs)
    return W, V.detach()


def solve_regularized_simplex(V_sft, alpha, train_features, num_basis_vectors, num_iterations=1000,
                              learning_rate=0.01, device=None):
    """LoRe_regularized (cosine pull towards v_ref, pruning) -> (W [N, K'], V [F, K']), K' <= K."""
    pairs = _pack_basis_input(train_features, num_basis_vectors, device)
    model = LoRe_regularized(V_sft, alpha, pairs.n_users, pairs.n_features, num_basis_vectors,
                             num_iterations, learning_rate, pairs.device)
    W, V = model.train(pairs)
    return W, V.detach()


def learn_multiple_few_shot(train_features, V, num_iterations=1000, learning_rate=0.01, device=None):
    """Weights of new users on a fixed basis V [F, K] -> list of N simplex weights [K]."""
    pairs = pack(train_features, "train_features", device)
    fitw = PersonalizeBatch(pairs.n_users, pairs.n_features, V.shape[1], num_iterations,
                            learning_rate, pairs.device)
    return fitw.train(pairs, V.to(pairs.device))


def _pack_basis_input(train_features, K, device):
    if K < 1:
        raise InputError(f"a basis needs K >= 1 directions, got K={K}")
    return pack(train_features, "train_features", device)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def per_user_accuracy(pairs, V, W):
    """Accuracy of every user at once: pairs (Pairs), V [F, K], W [N, K] -> numpy [N]."""
    Z = pairs.project(V)                                                           # [P, K]
    correct = mix(Z, W.to(Z.device, torch.float32), pairs.user) > 0                # [P]
    hits = torch.bincount(pairs.user[correct], minlength=pairs.n_users)            # [N]
    return (hits.double() / pairs.counts().double()).cpu().numpy()


def eval_multiple(W_list, V_list, test_features):
    """Per-user accuracy of N users sharing one basis. W_list: [N, K] or a list of N weights [K];
    V_list: the basis [F, K] (or the seed's list of N references to it); test_features: a list of
    N tensors [m_i, F] or Pairs. Prints the mean and std; returns numpy [N]."""
    if isinstance(V_list, (list, tuple)):
        if any(v is not V_list[0] and not torch.equal(v, V_list[0]) for v in V_list):
            raise InputError("eval_multiple evaluates users that share one basis V")
        V_list = V_list[0]
    W = torch.stack(list(W_list)) if isinstance(W_list, (list, tuple)) else W_list  # [N, K]
    pairs = pack(test_features, "test_features", V_list.device)
    if W.shape != (pairs.n_users, V_list.shape[1]):
        raise InputError(f"weights of shape {tuple(W.shape)} do not fit {pairs.n_users} users "
                         f"and a basis of shape {tuple(V_list.shape)}")
    accuracies = per_user_accuracy(pairs, V_list, W)
    print(f"Average accuracy: {accuracies.mean():.4f}")
    print(f"Standard deviation of accuracy: {accuracies.std():.4f}")
    return accuracies


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------


METRICS = ("train", "seen_unseen_prompts", "fewshot_train", "unseen_unseen_prompts")


def run(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
        test_features_sparse_unseen, N, N_unseen, device=None, *, num_iterations=1000,
        learning_rate=0.5, fewshot_iterations=500, fewshot_learning_rate=0.1, out_dir=None):
    """For each alpha (outer) and K (inner): fit the basis on seen users with LoRe
    (solve_regularized), evaluate them on their training and held-out pairs, fit the unseen users'
    weights on their few-shot pairs with V fixed, evaluate those on the few-shot and held-out pairs.
    K = 0 is the reference reward model (V = v_ref, w = [1]); K = 1 a single learned direction
    (unseen users get w = [1]). Returns 8 numpy arrays of length len(alpha_list) * len(K_list):
    the mean accuracies of METRICS, then their std across users times 0.25.
    With out_dir, V and the weights of every (K, alpha) are saved there (basis_K{K}_alpha{a}.safetensors)."""
    return _sweep(solve_regularized, **locals())


def run_regularized(K_list, alpha_list, V_final, train_features, test_features_sparse,
                    train_features_unseen, test_features_sparse_unseen, N, N_unseen, device=None, *,
                    num_iterations=20000, learning_rate=0.5, fewshot_iterations=500,
                    fewshot_learning_rate=0.5, out_dir=None):
    """run() with LoRe_regularized (solve_regularized_simplex: cosine pull, warm-up, pruning) for the
    basis. With out_dir (the caller's choice, never a fixed path), V and W of every (K, alpha) are
    saved there as safetensors."""
    return _sweep(solve_regularized_simplex, **locals())


def run_few_shot_vary_shots(trials, alpha_list, K_list, num_shots, train_features,
                            train_features_unseen, test_features_sparse_unseen, V_final, N, N_unseen,
                            device=None, *, num_iterations=500, learning_rate=0.5,
                            fewshot_iterations=500, fewshot_learning_rate=0.1):
    """For each alpha (outer) and K (inner): fit the basis with LoRe (500 steps, lr 0.5); then for
    every shot count, `trials` times: sample_shots of the unseen users, fit their weights, evaluate
    on the sampled shots and on their held-out pairs. Returns 4 numpy arrays
    [len(alpha_list) * len(K_list), len(num_shots)]: mean few-shot train accuracy, its std over
    trials, mean held-out accuracy, its std over trials."""
    _check_sweep(K_list, alpha_list)
    if len(num_shots) == 0 or min(num_shots) < 1:
        raise InputError(f"num_shots must be a non-empty list of counts >= 1, got {list(num_shots)}")
    device = resolve_device(device)
    train, fewshot, test = _pack_sweep_data(train_features, train_features_unseen,
                                            test_features_sparse_unseen, N, N_unseen, device)
    v_ref = _as_column(V_final, train.n_features).to(device)
    out = np.zeros((4, len(alpha_list) * len(K_list), len(num_shots)))
    for a, alpha in enumerate(alpha_list):
        for k, K in enumerate(K_list):
            print(f"alpha : {alpha}  K : {K}")
            W, V = _fit_basis(solve_regularized, K, alpha, v_ref, train, num_iterations, learning_rate)
            # V is fixed from here on: project the unseen users' pairs once and run every trial in
            # K dimensions (the basis of the projected rows is the identity)
            fewshot_z, test_z = _projected(fewshot, V), _projected(test, V)
            eye = torch.eye(V.shape[1], device=device)
            for s, shots in enumerate(tqdm(num_shots, desc="shots", leave=False)):
                acc = np.zeros((2, trials))
                for t in range(trials):
                    sampled = sample_shots(fewshot_z, shots)
                    W_new = _fit_weights(K, sampled, eye, fewshot_iterations, fewshot_learning_rate)
                    acc[0, t] = per_user_accuracy(sampled, eye, W_new).mean()
                    acc[1, t] = per_user_accuracy(test_z, eye, W_new).mean()
                row = a * len(K_list) + k
                out[:, row, s] = acc[0].mean(), acc[0].std(), acc[1].mean(), acc[1].std()
                print(f"  shots {shots:>4}: few-shot train {out[0, row, s]:.4f} +- {out[1, row, s]:.4f}"
                      f"  unseen users, unseen prompts {out[2, row, s]:.4f} +- {out[3, row, s]:.4f}")
    return out[0], out[1], out[2], out[3]


def _sweep(solver, K_list, alpha_list, V_final, train_features, test_features_sparse,
           train_features_unseen, test_features_sparse_unseen, N, N_unseen, device, num_iterations,
           learning_rate, fewshot_iterations, fewshot_learning_rate, out_dir):
    _check_sweep(K_list, alpha_list)
    device = resolve_device(device)
    train, fewshot, test_unseen = _pack_sweep_data(train_features, train_features_unseen,
                                                   test_features_sparse_unseen, N, N_unseen, device)
    test = pack(test_features_sparse, "test_features_sparse", device)
    if test.n_users != train.n_users or test.n_features != train.n_features:
        raise InputError(f"test_features_sparse has {test.n_users} users x F={test.n_features}, "
                         f"train_features {train.n_users} x F={train.n_features}")
    v_ref = _as_column(V_final, train.n_features).to(device)
    means, stds = [], []
    for alpha in alpha_list:
        for K in K_list:
            print(f"alpha : {alpha}  K : {K}")
            W, V = _fit_basis(solver, K, alpha, v_ref, train, num_iterations, learning_rate)
            W_new = _fit_weights(K, fewshot, V, fewshot_iterations, fewshot_learning_rate)
            accuracies = []
            for title, weights, pairs in (("Train Performance", W, train),
                                          ("Seen User Unseen Prompts", W, test),
                                          ("Few Shot Train Performance", W_new, fewshot),
                                          ("Unseen User Unseen Prompts", W_new, test_unseen)):
                print(title)
                accuracies.append(eval_multiple(weights, V, pairs))
            means.append([a.mean() for a in accuracies])
            stds.append([a.std() for a in accuracies])
            if out_dir is not None:
                save_tensors(os.path.join(out_dir, f"basis_K{K}_alpha{alpha:g}.safetensors"),
                             {"V": V, "W": W, "W_unseen": W_new},
                             {"K": str(K), "alpha": repr(alpha), "solver": solver.__name__})
    means, stds = np.array(means).T, STD_FACTOR * np.array(stds).T                 # [4, settings]
    return (*means, *stds)


def _check_sweep(K_list, alpha_list):
    if len(K_list) == 0 or len(alpha_list) == 0:
        raise InputError(f"K_list and alpha_list must be non-empty, got {list(K_list)} and {list(alpha_list)}")
    if min(K_list) < 0:
        raise InputError(f"K must be >= 0, got K_list={list(K_list)}")


def _pack_sweep_data(train_features, train_features_unseen, test_features_sparse_unseen, N,
                     N_unseen, device):
    train = pack(train_features, "train_features", device)
    fewshot = pack(train_features_unseen, "train_features_unseen", device)
    test = pack(test_features_sparse_unseen, "test_features_sparse_unseen", device)
    if (train.n_users, fewshot.n_users, test.n_users) != (N, N_unseen, N_unseen):
        raise InputError(f"N={N}, N_unseen={N_unseen} but the data has {train.n_users} seen users and "
                         f"{fewshot.n_users} / {test.n_users} unseen users (few-shot / held-out)")
    for name, pairs in (("train_features_unseen", fewshot), ("test_features_sparse_unseen", test)):
        if pairs.n_features != train.n_features:
            raise InputError(f"{name} has F={pairs.n_features}, train_features F={train.n_features}")
    return train, fewshot, test


def _fit_basis(solver, K, alpha, v_ref, train, num_iterations, learning_rate):
    """K = 0: the reference reward model, V = v_ref and w = [1] for every user."""
    if K == 0:
        return torch.ones(train.n_users, 1, device=train.device), v_ref
    return solver(v_ref, alpha, train, K, num_iterations, learning_rate)


def _fit_weights(K, pairs, V, iterations, learning_rate):
    """Unseen users' weights with V fixed; K <= 1 has nothing to adapt: w = [1]."""
    if K <= 1:
        return torch.ones(pairs.n_users, V.shape[1], device=pairs.device)
    return torch.stack(learn_multiple_few_shot(pairs, V, iterations, learning_rate))   # [N, K]


def _projected(pairs, V):
    return Pairs(pairs.user, pairs.n_users, X=pairs.project(V), group=pairs.group)  # rows [P, K]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Preference pairs of N users packed into one matrix, with the user of every row.

    Either the rows are given directly (X), or as two row indices into an embedding table, so that
    x_p = table[chosen[p]] - table[rejected[p]]. The table form never materializes the [P, F]
    differences: projections are computed as (table @ V)[chosen] - (table @ V)[rejected], which
    is how millions of held-out pairs are evaluated on a few GB.
    `group` (optional) ties pairs that must be sampled together (the turns of one PRISM dialog).
    """
    user: torch.Tensor                     # [P] long, pairs of a user are contiguous
    n_users: int
    X: torch.Tensor = None                 # [P, F] float32
    table: torch.Tensor = None             # [E, F] any float dtype (bfloat16 on disk)
    chosen: torch.Tensor = None            # [P] long rows of table
    rejected: torch.Tensor = None          # [P] long rows of table
    group: torch.Tensor = None             # [P] long, ids unique within a user

    def __len__(self):
        return self.user.numel()

    @property
    def n_features(self):
        return (self.X if self.X is not None else self.table).shape[1]

    @property
    def device(self):
        return self.user.device

    def counts(self):
        return torch.bincount(self.user, minlength=self.n_users)                  # [N]

    def rows(self):
        """The [P, F] float32 difference matrix (materialized for the table form)."""
        if self.X is not None:
            return self.X
        return self.table[self.chosen].float() - self.table[self.rejected].float()  # [P, F]

    def project(self, V):
        """x_p^T V for every pair, without building [P, F] for the table form."""
        V = V.to(self.device, torch.float32)                                       # [F, K]
        if self.X is not None:
            return project_rows(self.X, V)                                         # [P, K]
        T = torch.cat([project_rows(t.float(), V) for t in self.table.split(1 << 15)])  # [E, K]
        return T[self.chosen] - T[self.rejected]                                   # [P, K]

    def select(self, idx):
        """The pairs idx (a bool mask or sorted indices), for the same N users."""
        pick = lambda t: None if t is None else t[idx]
        return replace(self, user=self.user[idx], X=pick(self.X), chosen=pick(self.chosen),
                       rejected=pick(self.rejected), group=pick(self.group))

    def split(self):
        """The seed's format: a list of N tensors [m_i, F]."""
        return list(self.rows().split(self.counts().tolist()))

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return Pairs(move(self.user), self.n_users, move(self.X), move(self.table),
                     move(self.chosen), move(self.rejected), move(self.group))


def pack(features, name="features", device=None):
    """A list of N per-user tensors [m_i, F] (the seed's format) -> Pairs in float32 on `device`.
    Pairs pass through (moved to `device`). Checks the data once, here, with errors that name the
    user and the shape at fault."""
    if isinstance(features, Pairs):
        pairs = features if device is None else features.to(device)
    else:
        device = resolve_device(device)
        features = [torch.as_tensor(x) for x in features]
        if len(features) == 0:
            raise InputError(f"{name}: no users (an empty list)")
        n_features = features[0].shape[-1] if features[0].dim() == 2 else None
        for i, x in enumerate(features):
            if x.dim() != 2 or x.shape[1] != n_features:
                raise InputError(f"{name}[{i}] has shape {tuple(x.shape)}: every user needs "
                                 f"[pairs, F] with the same F (user 0 has F={n_features})")
        X = torch.cat([x.to(device, torch.float32) for x in features])              # [P, F]
        counts = torch.tensor([len(x) for x in features], device=device)
        user = torch.repeat_interleave(torch.arange(len(features), device=device), counts)
        pairs = Pairs(user, len(features), X=X)
    if pairs.n_users == 0:
        raise InputError(f"{name}: no users")
    if len(pairs) and (pairs.user.min() < 0 or pairs.user.max() >= pairs.n_users
                       or (pairs.user[1:] < pairs.user[:-1]).any()):
        raise InputError(f"{name}: user indices must lie in [0, {pairs.n_users}) with each user's pairs contiguous")
    counts = pairs.counts()
    if (counts == 0).any():
        i = int(torch.nonzero(counts == 0)[0])
        raise InputError(f"{name}: user {i} has no pairs")
    values = pairs.X if pairs.X is not None else pairs.table
    # a NaN or inf anywhere in a row makes its sum non-finite; no [P, F] temporary as isfinite makes
    finite = torch.isfinite(values.sum(dim=1, dtype=torch.float32))                # [P] or [E]
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0])
        where = f"user {int(pairs.user[bad])}" if pairs.X is not None else f"embedding row {bad}"
        raise InputError(f"{name}: {where} has NaN or inf in its features")
    return pairs


def sample_shots(train_features_unseen, shots):
    """Per user, `shots` random rows drawn without replacement (all rows when the user has fewer).
    Pairs with a `group` are sampled by group: `shots` groups per user, each with all its pairs.
    A list in gives a list out; Pairs in gives Pairs out. Kept rows stay in their original order."""
    if shots < 1:
        raise InputError(f"shots must be >= 1, got {shots}")
    if isinstance(train_features_unseen, Pairs):
        return train_features_unseen.select(_sample_groups(train_features_unseen, shots))
    pairs = pack(train_features_unseen, "train_features_unseen",
                 train_features_unseen[0].device if len(train_features_unseen) else None)
    return pairs.select(_sample_groups(pairs, shots)).split()


def _sample_groups(pairs, shots):
    """Bool mask [P] keeping `shots` random groups of every user (a group per pair by default)."""
    P = len(pairs)
    group = pairs.group if pairs.group is not None else torch.arange(P, device=pairs.device)
    # one id per (user, group); rank the ids of each user in a random order, keep rank < shots
    _, gid = torch.unique(torch.stack([pairs.user, group]), dim=1, return_inverse=True)  # [P]
    G = int(gid.max()) + 1
    owner = torch.zeros(G, dtype=torch.long, device=pairs.device).scatter_(0, gid, pairs.user)
    order = torch.argsort(torch.rand(G, device=pairs.device))
    order = order[torch.argsort(owner[order], stable=True)]                        # [G]
    counts = torch.bincount(owner, minlength=pairs.n_users)
    rank = torch.arange(G, device=pairs.device) - (torch.cumsum(counts, 0) - counts)[owner[order]]
    kept = torch.zeros(G, dtype=torch.bool, device=pairs.device)
    kept[order[rank < shots]] = True
    return kept[gid]                                                               # [P]


def simulate_sparse_population(reward_tensor, table, W, sample_percentage, device=None):
    """create_sparse_tensor(simulate_population(...), sample_percentage) without the dense tensor:
    the prompts of each user are sampled first (the same draws, in the same order), and the pairs
    are returned in table form. table [S*R, F] holds response r of prompt s at row s*R + r."""
    S, R, _ = np.shape(reward_tensor)
    idx = torch.as_tensor(_sample_prompts(len(W), S, sample_percentage))          # [N, m]
    chosen, rejected = _simulate_choices(reward_tensor, W)                         # [N, S]
    user = torch.arange(len(W)).repeat_interleave(idx.shape[1])                    # [P]
    prompt = idx.reshape(-1)                                                       # [P]
    pairs = Pairs(user, len(W), table=table, chosen=prompt * R + chosen[user, prompt],
                  rejected=prompt * R + rejected[user, prompt])
    return pairs.to(resolve_device(device))


def _simulate_choices(reward_tensor, W):
    """Best and worst response of every prompt for every user: two [N, S] index tensors.
    Scores in float64 with the first index on ties (numpy's argmax/argmin convention); users in
    chunks so that [N, S, R] scores never exist at once."""
    rewards = torch.as_tensor(np.asarray(reward_tensor), dtype=torch.float64)      # [S, R, M]
    best, worst = [], []
    for w in torch.as_tensor(np.asarray(W), dtype=torch.float64).split(64):        # [n, M]
        scores = torch.einsum("srm,nm->nsr", rewards, w)                           # [n, S, R]
        best.append(scores.argmax(-1))
        worst.append(scores.argmin(-1))
    return torch.cat(best), torch.cat(worst)


def _sample_prompts(N, S, sample_percentage):
    m = int(sample_percentage * S)
    if m < 1:
        raise InputError(f"sample_percentage={sample_percentage} of {S} prompts is 0 prompts per user")
    return np.stack([np.random.choice(S, m, replace=False) for _ in range(N)])     # [N, m]


def generate_popupulation(alpha, N):
    """N users drawn from Dirichlet(alpha): [N, len(alpha)], rows on the simplex. (The seed's
    spelling; generate_population is the same function.)"""
    return np.random.dirichlet(alpha, N)


def table_pairs(df, table, users, name="pairs", group=None):
    """Pairs of `users` (user index = position in that list) from a table df with columns user,
    chosen, rejected (rows of the embedding table [E, F]); `group`: a column of df whose pairs are
    sampled together (PRISM's dialogs). Every listed user must have at least one pair."""
    index = {u: i for i, u in enumerate(users)}
    df = df[df["user"].isin(index)]
    missing = sorted(set(index) - set(df["user"]), key=str)
    if missing:
        raise InputError(f"{name}: user {missing[0]!r} has no pairs ({len(missing)} users without pairs)")
    df = df.assign(_u=df["user"].map(index)).sort_values("_u", kind="stable")
    ids = lambda col: torch.tensor(df[col].to_numpy(), dtype=torch.long)
    groups = None if group is None else torch.tensor(
        df.groupby(["_u", group], sort=False).ngroup().to_numpy(), dtype=torch.long)
    return Pairs(ids("_u"), len(users), table=table, chosen=ids("chosen"), rejected=ids("rejected"),
                 group=groups)


def load_embeddings(data_dir):
    """What prepare.py wrote: the embedding table [E, F] (bfloat16) and v_ref [F, 1] (float32)."""
    table = load_tensors(os.path.join(data_dir, "embeddings.safetensors"), ["embeddings"])["embeddings"]
    v_ref = load_tensors(os.path.join(data_dir, "v_ref.safetensors"), ["v_ref"])["v_ref"]
    if v_ref.shape != (table.shape[1], 1):
        raise InputError(f"{data_dir}: v_ref has shape {tuple(v_ref.shape)}, the embeddings F={table.shape[1]}")
    return table, v_ref


# ----------------------------------------------------------------------------------------------
# I/O
# ----------------------------------------------------------------------------------------------


def save_tensors(path, tensors, metadata=None):
    """safetensors, written under a temporary name and renamed: a crash never leaves half a file. The
    header is re-serialized with sorted keys because safetensors writes it from a hash map whose order
    changes from one process to the next, and a resumed run must give identical bytes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode()
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(blob[:8])
        f.write(header.ljust(n))  # the same length: safetensors pads its header with spaces
        f.write(memoryview(blob)[8 + n:])
    os.replace(tmp, path)


def load_tensors(path, keys=()):
    """-> dict of tensors; InputError naming the file when it is missing or unreadable (truncated,
    corrupt, not safetensors), or when one of `keys` is missing."""
    with _open_safetensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise InputError(f"{path}: missing tensor(s) {missing}")
    return tensors


def read_metadata(path):
    """The string metadata in a safetensors file's header; InputError naming a missing or unreadable file."""
    with _open_safetensors(path) as f:
        return f.metadata() or {}


def _open_safetensors(path):
    """safe_open(path), which checks the header and that the file is as long as the header says: a
    missing, truncated or corrupt file is an InputError naming it."""
    from safetensors import SafetensorError
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _first_line(e):
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def read_json(path):
    """-> the parsed JSON file; InputError naming the file and line when it is missing, not UTF-8 or not JSON."""
    try:
        return json.loads("".join(line for _, line in _utf8_lines(path)))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None


def write_table(path, records):
    """A list of dicts as CSV (or Parquet for a .parquet path), atomically."""
    import pandas as pd
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    df = pd.DataFrame(records)
    df.to_parquet(tmp, index=False) if path.endswith(".parquet") else df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def read_table(path, columns=()):
    """Parquet -> pandas DataFrame; InputError naming the file when it is missing or unreadable, or a
    column is missing. A file of zero rows is read: whether that is an error is the caller's to say."""
    import pandas as pd
    import pyarrow as pa
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        df = pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}")
    return df


def load_splits(hub_id, splits, data_files=None, config=None):
    """{split: datasets.Dataset} from local files (data_files: {split: path to .json/.jsonl/.parquet})
    or else from the Hugging Face hub. Errors name the split or file at fault, and the line of a
    local JSON / JSON-lines file."""
    import datasets
    data_files = data_files or {}
    out = {}
    for split in splits:
        if data_files:
            if split not in data_files:
                raise InputError(f"--data-files has no {split}=PATH (given: {sorted(data_files)})")
            path = data_files[split]
            if not os.path.isfile(path):
                raise InputError(f"{path}: no such file (the {split} split)")
            kind = "parquet" if path.endswith(".parquet") else "json"
            if path.endswith((".json", ".jsonl")):
                _check_json_rows(path)
            if kind == "parquet" and _parquet_rows(path) == 0:  # datasets cannot build a split of no rows
                out[split] = datasets.Dataset.from_pandas(read_table(path), preserve_index=False)
                continue
            try:
                out[split] = datasets.load_dataset(kind, data_files={split: path}, split=split)
            except Exception as e:  # datasets raises many types for unreadable files
                raise InputError(f"{path}: cannot read it as {kind} ({_first_line(e)})")
        else:
            if not hf_constants.HF_HUB_OFFLINE and not hub_reachable():  # else: retries for half a minute
                raise InputError(f"the Hugging Face hub is unreachable, so {hub_id} cannot be downloaded; "
                                 f"pass local files with --data-files {split}=PATH (or set HF_HUB_OFFLINE=1 "
                                 f"to use a cached copy)")
            try:
                out[split] = datasets.load_dataset(hub_id, config, split=split)
            except Exception as e:
                raise InputError(f"could not load {hub_id} ({split}) from the hub ({type(e).__name__}); "
                                 f"offline? pass local files with --data-files {split}=PATH")
    return out


def _check_json_rows(path):
    """A local .json / .jsonl data file is read here first, because the datasets library reports a bad
    line without its number, an empty file as a bare StopIteration and bad bytes with a traceback.
    A .json file is one JSON document (a list of row objects) or, as datasets also accepts, JSON lines."""
    lines = list(_utf8_lines(path))
    rows = [(n, line) for n, line in lines if line.strip()]
    if not rows:
        raise InputError(f"{path}: no rows")
    if path.endswith(".json"):
        try:
            document = json.loads("".join(line for _, line in lines))
        except json.JSONDecodeError as e:
            if not isinstance(_json_or_none(rows[0][1]), dict):  # not JSON lines either: report the document's error
                raise InputError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
        else:
            if isinstance(document, list):
                if not document:
                    raise InputError(f"{path}: no rows")
                bad = next((i for i, row in enumerate(document) if not isinstance(row, dict)), None)
                if bad is not None:
                    raise InputError(f"{path}: row {bad} is {type(document[bad]).__name__}, expected a JSON object")
            return
    for n, line in rows:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: {type(row).__name__}, expected a JSON object per line")


def _parquet_rows(path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read it as parquet ({_first_line(e)})") from None


def _json_or_none(text):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _utf8_lines(path):
    """Yields (line number, text) of a file, decoded line by line so that bytes that are not UTF-8 are
    reported with their line."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                yield n, line.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}:{n}: not UTF-8") from None


# ----------------------------------------------------------------------------------------------
# Command-line helpers: the flags, outputs and exit codes every dataset script shares
# ----------------------------------------------------------------------------------------------


def command_line(main):
    """Wrap a script's main(args): bad input ends with a one-line message and exit code 2."""
    def wrapped(args):
        try:
            return main(args)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
    wrapped.__doc__, wrapped.__name__ = main.__doc__, main.__name__
    return wrapped


def rank_list(text, least=0, what="ranks"):
    """argparse type for '0,1,2' -> [0, 1, 2]; every value >= least."""
    import argparse
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < least:
        raise argparse.ArgumentTypeError(f"expected {what} >= {least}, got {text!r}")
    return values


def shot_list(text):
    """argparse type for '5,10' -> [5, 10]; shots must be >= 1."""
    return rank_list(text, 1, "shots")


def positive_int(text):
    """argparse type for an integer >= 1."""
    import argparse
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def float_list(text):
    """argparse type for '0,1e4' -> [0.0, 10000.0]."""
    import argparse
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def add_sweep_args(parser, folder, *, k_list, alpha_list, iters, lr, fewshot_iters, fewshot_lr,
                   out="results"):
    """The flags train_basis.py and vary_fewshot.py share; the defaults are the dataset's recipe."""
    parser.add_argument("--data", default=os.path.join(folder, "data"),
                        help="what prepare.py wrote (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(folder, out),
                        help="output folder (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k-list", type=rank_list, default=k_list, help="ranks K, e.g. 0,1,2")
    parser.add_argument("--alpha-list", type=float_list, default=alpha_list,
                        help="regularization strengths, e.g. 0,1e4")
    parser.add_argument("--iters", type=int, default=iters, help="basis training steps")
    parser.add_argument("--lr", type=float, default=lr, help="basis learning rate")
    parser.add_argument("--fewshot-iters", type=int, default=fewshot_iters,
                        help="steps fitting unseen users' weights")
    parser.add_argument("--fewshot-lr", type=float, default=fewshot_lr)
    return parser


def load_script(path, name):
    """A script imported by path under a name of its own (every dataset folder has a train_basis.py:
    a plain `import train_basis` would find whichever folder came first on sys.path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_shots_args(parser, *, trials, shots, unit="pairs"):
    """The flags every vary_fewshot.py adds to add_sweep_args'."""
    parser.add_argument("--trials", type=positive_int, default=trials, help="draws of the shots per shot count")
    parser.add_argument("--shots", type=shot_list, default=shots, help=f"{unit} per unseen user, e.g. 5,10")
    return parser


def data_files_arg(text):
    """argparse type for 'split=PATH'."""
    import argparse
    split, sep, path = text.partition("=")
    if not sep or not split or not path:
        raise argparse.ArgumentTypeError(f"expected split=PATH, got {text!r}")
    return split, path


def add_prepare_args(parser, folder):
    """The flags every prepare.py shares."""
    parser.add_argument("--out", default=os.path.join(folder, "data"), help="output folder (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="reward model: hub id or local folder")
    parser.add_argument("--data-files", type=data_files_arg, nargs="+", default=None, metavar="SPLIT=PATH",
                        help="local .json/.jsonl/.parquet files in the hub's schema instead of the hub")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="padded tokens per forward pass")
    return parser


def save_config(args, name="config.json", **extra):
    """The resolved command-line config (and the command itself) as JSON in args.out."""
    write_json(os.path.join(args.out, name), {**vars(args), **extra, "command": " ".join(sys.argv)})


def start_run(args, name="config.json"):
    """Seed everything, create --out, save the resolved config beside the outputs, print it.
    -> the torch device."""
    set_seed(args.seed)
    device = resolve_device(args.device)
    save_config(args, name, device=str(device))
    print(f"seed {args.seed}, device {device}, writing to {args.out}")
    return device


def sweep_records(K_list, alpha_list, results):
    """The 8 arrays of run()/run_regularized() -> one record per (alpha, K), in their order."""
    settings = [(alpha, K) for alpha in alpha_list for K in K_list]
    return [{"alpha": alpha, "K": K,
             **{m: float(results[j][s]) for j, m in enumerate(METRICS)},
             **{f"{m}_std": float(results[4 + j][s]) for j, m in enumerate(METRICS)}}
            for s, (alpha, K) in enumerate(settings)]


def shots_records(K_list, alpha_list, num_shots, results):
    """The 4 arrays of run_few_shot_vary_shots() -> one record per (alpha, K, shots)."""
    settings = [(alpha, K) for alpha in alpha_list for K in K_list]
    return [{"alpha": alpha, "K": K, "shots": shots,
             "fewshot_train": float(results[0][s, j]), "fewshot_train_std": float(results[1][s, j]),
             "unseen_unseen_prompts": float(results[2][s, j]),
             "unseen_unseen_prompts_std": float(results[3][s, j])}
            for s, (alpha, K) in enumerate(settings) for j, shots in enumerate(num_shots)]


def save_results(records, out_dir, name="results"):
    """results.json and results.csv in out_dir, and a readable table on stdout."""
    import pandas as pd
    write_json(os.path.join(out_dir, f"{name}.json"), records)
    write_table(os.path.join(out_dir, f"{name}.csv"), records)
    print(pd.DataFrame(records).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def plot_accuracy_vs_rank(records, path, title="", hlines=None):
    """One panel per alpha: the four accuracies against K, with the reported std as error bars.
    hlines: {metric: accuracy} drawn as dotted lines of the metric's color (e.g. an oracle's)."""
    plt = _pyplot()
    alphas = sorted({r["alpha"] for r in records})
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.5 * len(alphas), 4), squeeze=False)
    labels = {"train": "seen users, train pairs", "seen_unseen_prompts": "seen users, held-out",
              "fewshot_train": "unseen users, few-shot pairs", "unseen_unseen_prompts": "unseen users, held-out"}
    for ax, alpha in zip(axes[0], alphas):
        rows = sorted((r for r in records if r["alpha"] == alpha), key=lambda r: r["K"])
        for i, (metric, label) in enumerate(labels.items()):
            ax.errorbar([r["K"] for r in rows], [r[metric] for r in rows], color=f"C{i}",
                        yerr=[r[f"{metric}_std"] for r in rows], marker="o", capsize=3, label=label)
            if metric in (hlines or {}):
                ax.axhline(hlines[metric], color=f"C{i}", ls=":", label=f"oracle: {label}")
        ax.set(xlabel="rank K (0 = reference reward model)", ylabel="accuracy",
               title=f"{title}  alpha={alpha:g}".strip())
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    _save_figure(fig, path)


def plot_accuracy_vs_shots(records, path, title="", hline=None):
    """Unseen users' held-out accuracy against shots, a band of +- one std across trials; the
    accuracy on the shots themselves dashed; `hline` (e.g. an oracle's held-out accuracy) dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for alpha, K in sorted({(r["alpha"], r["K"]) for r in records}):
        rows = sorted((r for r in records if (r["alpha"], r["K"]) == (alpha, K)), key=lambda r: r["shots"])
        x = np.array([r["shots"] for r in rows])
        y = np.array([r["unseen_unseen_prompts"] for r in rows])
        s = np.array([r["unseen_unseen_prompts_std"] for r in rows])
        line, = ax.plot(x, y, marker="o", label=f"K={K}, alpha={alpha:g}: held-out")
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2)
        ax.plot(x, [r["fewshot_train"] for r in rows], ls="--", color=line.get_color(),
                label=f"K={K}, alpha={alpha:g}: few-shot pairs")
    if hline is not None:
        ax.axhline(hline, color="k", ls=":", label="oracle: held-out")
    ax.set(xlabel="shots per unseen user", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_figure(fig, path)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path):
    import matplotlib.pyplot as plt
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Embedding extraction
# ----------------------------------------------------------------------------------------------
# phi(conversation) is the reward model's final hidden state (after the final norm) at the last token
# of the chat-templated conversation, and v_ref is its scoring head, so phi @ v_ref is the model's own
# reward logit (SPEC §1). Most conversations come in groups that differ only in their last message
# (a prompt with a chosen and a rejected reply, PersonalLLM's 8 responses, a PRISM history with several
# replies): a group is packed into one row, its shared token prefix once and then every reply, and a
# block mask lets each reply see the prefix and itself only, with positions restarting after the
# prefix, so that each reply is encoded exactly as if alone while the prefix is encoded once. Work is cut into shards written as they finish, so an interrupted run
# resumes where it stopped, and shards can be spread over processes with torchrun.

DEFAULT_MODEL = "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2"


def load_reward_model(model_name_or_path=DEFAULT_MODEL, device=None, dtype=None, attn_implementation="sdpa"):
    """-> (model, tokenizer): the base transformer of the reward model (AutoModel, whose output is the
    hidden state after the final norm; the scoring head is not needed), in eval mode on `device`
    (None: cuda if available, else cpu). dtype None: bfloat16 on CUDA, float32 on CPU.
    attn_implementation: "sdpa" or "eager", the attentions that take the block masks of prefix sharing
    (flash_attention_2 takes none: flash-attn is not needed; SDPA runs cuDNN's flash kernel with them)."""
    if attn_implementation not in ("sdpa", "eager"):
        raise InputError(f"attn_implementation {attn_implementation!r}: prefix sharing needs 'sdpa' or 'eager'")
    device = resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    from transformers import AutoModel  # here, not at the top: training needs no transformers
    source, offline = _locate(model_name_or_path)
    tokenizer = _load_tokenizer(source, offline)
    try:
        # The load report lists score.weight as unexpected: the base model has no head, as intended.
        model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                          local_files_only=offline)
    except Exception as e:  # transformers and safetensors raise many types for a config or weights they cannot read
        raise InputError(f"could not load reward model {source}: {_first_line(e)}") from e
    return model.to(device).eval(), tokenizer


def read_reward_head(model_name_or_path=DEFAULT_MODEL):
    """-> v_ref, float32 [F, 1]: the checkpoint's `score.weight` ([1, F]) transposed, read from its
    safetensors file without building the model. Of a sharded checkpoint only the index and the shard
    that holds score.weight are opened (for a hub id: downloaded). An unreadable index or weights file,
    or a head with NaN or inf values, is an InputError naming it."""
    source, offline = _locate(model_name_or_path)
    index = _checkpoint_file(source, "model.safetensors.index.json", offline)
    if index is not None:
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: no weight_map (not a safetensors index)")
        shard = weight_map.get("score.weight")
        if shard is None:
            raise InputError(f"checkpoint {source} has no score.weight: not a sequence-classification reward model")
        path = _checkpoint_file(source, shard, offline)
        if path is None:
            raise InputError(f"checkpoint {source} is missing {shard}, the shard that holds score.weight")
    else:
        path = _checkpoint_file(source, "model.safetensors", offline)
        if path is None:
            raise InputError(f"checkpoint {source} has no model.safetensors or model.safetensors.index.json")
    with _open_safetensors(path) as f:
        if "score.weight" not in f.keys():
            raise InputError(f"checkpoint {source} has no score.weight: not a sequence-classification reward model")
        weight = f.get_tensor("score.weight")  # [1, F]
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise InputError(f"score.weight of {source} has shape {list(weight.shape)}, expected [1, F] (one reward)")
    if not torch.isfinite(weight).all():
        raise InputError(f"score.weight of {source} has {int((~torch.isfinite(weight)).sum())} NaN or inf values")
    return weight.float().T.contiguous()  # [F, 1]


def embed_conversations(conversations, out_path, model_name_or_path=DEFAULT_MODEL, *, device=None,
                        dtype=None, batch_tokens=16384, shard_size=4096, model=None, tokenizer=None,
                        contents=None):
    """Embeds n conversations (each a list of {"role": "user"|"assistant", "content": str}): the final
    hidden state at the last token of the conversation rendered with the tokenizer's chat template.
    Writes `out_path` (safetensors) holding {"embeddings": [n, F]} in input order, in the model's dtype
    (bfloat16 for the default GPU load), with model, n, F, dtype and a fingerprint of the inputs,
    the model's weights and the settings in the header metadata, and returns the [n, F] tensor on CPU.
    If `out_path` already holds the embeddings of the same fingerprint it is returned without
    recomputing; if it holds another fingerprint's, or is unreadable, it is recomputed.

    An existing file at out_path that embed_conversations did not write, or whose `contents` differ, is
    never replaced (InputError), nor is a path another run is extracting into (a lock, `<out_path>.lock`).

    batch_tokens: each forward holds at most this many padded token positions (rows x padded length);
    a longer sequence runs alone.
    shard_size: sequences per shard, the unit of resumption and of work spread over torchrun processes.
    model/tokenizer: already loaded ones; otherwise load_reward_model(model_name_or_path, device, dtype)
    is called, and only if some shard is left to compute.
    contents: what is embedded, in a few words (e.g. "RewardBench 2 replies"), kept in the metadata."""
    if len(conversations) == 0:
        raise InputError(f"no conversations to embed into {out_path}")
    if batch_tokens < 1 or shard_size < 1:
        raise InputError(f"batch_tokens ({batch_tokens}) and shard_size ({shard_size}) must be >= 1")
    out_path = str(out_path)
    rank, world, local_rank = _distributed()
    if model is not None:
        device, dtype, name = model.device, model.dtype, model.name_or_path
    else:
        device = resolve_device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per torchrun process
        dtype, name = _resolve_dtype(dtype, device), str(model_name_or_path)
    if tokenizer is None:
        tokenizer = _load_tokenizer(*_locate(name))

    ids = _chat_token_ids(tokenizer, conversations)
    fingerprint = _fingerprint(ids, name, dtype, batch_tokens, shard_size)
    # A single process reads a finished file without the lock (files are replaced atomically), so runs
    # that share a finished file never conflict; torchrun ranks look under it, where no other run can
    # change the file between one rank's look and another's.
    cached = _reuse(out_path, fingerprint, contents) if world == 1 else None
    if cached is not None:
        return cached
    lock = _lock(out_path, rank, world, local_rank)
    try:
        cached = _reuse(out_path, fingerprint, contents) if world > 1 else None
        if cached is not None:
            return cached
        seqs, inverse, shards = _plan(ids, conversations, batch_tokens, shard_size)
        if rank == 0:
            total = sum(len(s) for s in ids)
            encoded = sum(plen + sum(len(seqs[u]) - plen for u in us) for shard in shards for plen, us in shard)
            print(f"{out_path}: {len(ids)} conversations, {len(seqs)} distinct, {encoded} tokens to encode "
                  f"instead of {total} (shared prefixes), {len(shards)} shards of up to {shard_size}")

        parts = out_path + ".parts"
        if rank == 0:
            _open_parts(parts, {"fingerprint": fingerprint, "model": name, "dtype": str(dtype), "n": len(ids),
                                "batch_tokens": batch_tokens, "shard_size": shard_size, "shards": len(shards)})
        _barrier(world, local_rank)  # the shard folder is this run's
        todo = [i for i in range(len(shards))
                if i % world == rank and not _shard_done(_shard_path(parts, i), _shard_rows(shards[i]))]
        if todo and model is None:
            model, _ = load_reward_model(name, device, dtype)
        bar = tqdm(total=sum(len(us) for i in todo for _, us in shards[i]), unit="seq", disable=rank != 0,
                   desc=f"embedding {os.path.basename(out_path)}")
        for i in todo:
            embeddings, rows = [], []
            for batch in _batches(shards[i], seqs, batch_tokens):
                embeddings.append(_embed_batch(model, batch, seqs).cpu())  # [m, F]
                rows += [u for _, us in batch for u in us]
                bar.update(sum(len(us) for _, us in batch))
            save_tensors(_shard_path(parts, i), {"embeddings": torch.cat(embeddings), "rows": torch.tensor(rows)})
        bar.close()

        _barrier(world, local_rank)  # every shard is on disk
        if rank == 0:
            metadata = {"model": name, "n": str(len(ids)), "dtype": str(dtype).removeprefix("torch."),
                        "fingerprint": fingerprint}
            _merge(parts, len(shards), len(seqs), inverse, out_path,
                   {**metadata, "contents": contents} if contents is not None else metadata)
        _barrier(world, local_rank)  # the final file is on disk
        return load_tensors(out_path, ["embeddings"])["embeddings"]
    finally:
        _unlock(lock, out_path)


def is_main_process():
    """True unless this process is a torchrun worker of rank > 0: print and save results only when True."""
    return _torchrun()[0] == 0


def _resolve_dtype(dtype, device):
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def _locate(model_name_or_path):
    """-> (what from_pretrained gets, local_files_only). A local folder is used as is; anything else is
    a hub id. When the hub is unreachable only the local cache is consulted, so that an offline machine
    fails at once with a clear message instead of after minutes of retries."""
    name = str(model_name_or_path)
    if os.path.isdir(name):
        return name, True
    if os.path.exists(name) or name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise InputError(f"model folder {name} does not exist; pass a checkpoint folder with --model PATH")
    offline = not hub_reachable()
    if offline and not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise InputError(f"model {name} could not be found: no such local folder, the Hugging Face hub is unreachable "
                         f"and it is not in the local cache; download it and pass its folder with --model PATH")
    return name, offline


@functools.lru_cache(maxsize=None)
def hub_reachable():
    """A 3-second connection test, so that an offline machine fails at once instead of retrying."""
    if hf_constants.HF_HUB_OFFLINE:
        return False
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True  # a direct connection may be refused where the proxy works: let the hub client try
    url = urlparse(hf_constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return True
    except OSError:
        return False


def _load_tokenizer(source, offline):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for a missing or broken tokenizer
        raise InputError(f"could not load the tokenizer of {source}: {_first_line(e)}") from e


def _checkpoint_file(source, filename, offline):
    """Local path of one file of a checkpoint folder or hub repo (downloading only that file); None if absent."""
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        return path if os.path.exists(path) else None
    try:
        return hf_hub_download(source, filename, local_files_only=offline)
    except EntryNotFoundError:
        return None


def _chat_token_ids(tokenizer, conversations):
    """Token ids of each conversation rendered with the chat template, as the Skywork reward model is used."""
    for i, conversation in enumerate(conversations):
        if len(conversation) == 0:
            raise InputError(f"conversation {i} has no messages")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InputError(f"the tokenizer of {tokenizer.name_or_path} has no chat template")
    # transformers 5 returns a BatchEncoding here (return_dict defaults to True); 4.x returned a list
    ids = tokenizer.apply_chat_template(list(conversations), tokenize=True, return_dict=True)["input_ids"]
    for i, seq in enumerate(ids):
        if len(seq) == 0:
            raise InputError(f"conversation {i} renders to no tokens with the chat template of the tokenizer")
    return ids


def _fingerprint(ids, name, dtype, batch_tokens, shard_size):
    """Hash of everything that determines the output bytes: the token ids, the model's weights and the settings."""
    h = hashlib.sha256(json.dumps([name, _weights_key(name), str(dtype), batch_tokens, shard_size]).encode())
    for seq in ids:
        h.update(len(seq).to_bytes(8, "little"))
        h.update(array("q", seq).tobytes())
    return h.hexdigest()


def _weights_key(name):
    """What identifies the weights behind a model name: the name alone would reuse a finished file (or
    resume into its shards) after new weights were saved at the same path or a new revision downloaded.
    A local folder: name, size and mtime of each weight file and config.json. A hub id: the commit its
    local cache resolves `main` to, else the same listing of the cached snapshots. Hashing the weights
    themselves would read 16 GB for an 8B model. None for a model built in memory, which has neither."""
    if os.path.isdir(name):
        return _weight_files(name)
    from huggingface_hub.file_download import repo_folder_name
    try:
        folder = os.path.join(hf_constants.HF_HUB_CACHE, repo_folder_name(repo_id=name, repo_type="model"))
    except ValueError:  # not a hub id either
        return None
    ref = os.path.join(folder, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            return f.read().strip()
    snapshots = os.path.join(folder, "snapshots")
    return [_weight_files(os.path.join(snapshots, s)) for s in sorted(os.listdir(snapshots))] \
        if os.path.isdir(snapshots) else None


def _weight_files(folder):
    """[[file, size, mtime in ns]] of a checkpoint folder's weight files and config.json."""
    listing = []
    for file in sorted(os.listdir(folder)):
        if file.endswith((".safetensors", ".bin")) or file == "config.json":
            stat = os.stat(os.path.join(folder, file))  # follows the hub cache's links to the blobs
            listing.append([file, stat.st_size, stat.st_mtime_ns])
    return listing


_MAX_ROW = 8192


def _plan(ids, conversations, batch_tokens, shard_size):
    """Cut the work into shards. Returns (seqs, inverse, shards): seqs the distinct token sequences,
    inverse [n] the distinct sequence of each input, shards lists of units (plen, us): distinct
    sequences `us` whose first plen tokens are identical and encoded once, in one row with every
    member's own tokens after them.
    Everything here is deterministic, so shard i means the same work in every run and every process."""
    # Identical token ids are encoded once; distinct sequences are grouped by their conversation
    # minus its last message (the replies to one prompt or one dialogue history).
    distinct, inverse, groups = {}, [], {}
    for conversation, seq in zip(conversations, ids):
        seq = tuple(seq)
        if seq not in distinct:
            distinct[seq] = len(distinct)
            groups.setdefault(json.dumps(conversation[:-1], sort_keys=True), []).append(distinct[seq])
        inverse.append(distinct[seq])
    seqs = list(distinct)

    units = []
    for us in groups.values():
        us.sort(key=lambda u: -len(seqs[u]))
        plen = len(os.path.commonprefix([seqs[u] for u in us]))  # longest common prefix of the token tuples
        # one row per unit: the prefix, then each member's own tokens. A row longer than the budget or
        # than _MAX_ROW is cut: a batch's [rows, T, T] mask grows with the longest row.
        chunk, length = [], plen
        for u in us:
            if chunk and length + len(seqs[u]) - plen > min(batch_tokens, _MAX_ROW):
                units.append((plen, chunk))
                chunk, length = [], plen
            chunk.append(u)
            length += len(seqs[u]) - plen
        units.append((plen, chunk))
    # Longest rows first: similar lengths end up in the same batch (little padding), and a run that
    # will not fit in memory fails at once.
    units.sort(key=lambda unit: -_row_length(unit, seqs))

    shards, count = [[]], 0
    for unit in units:
        if shards[-1] and count + len(unit[1]) > shard_size:
            shards.append([])
            count = 0
        shards[-1].append(unit)
        count += len(unit[1])
    return seqs, inverse, shards


def _batches(units, seqs, batch_tokens):
    """Consecutive units, one row each, packed while rows x longest row <= batch_tokens."""
    batch, longest = [], 0
    for unit in units:
        length = _row_length(unit, seqs)
        if batch and (len(batch) + 1) * max(longest, length) > batch_tokens:
            yield batch
            batch, longest = [], 0
        batch.append(unit)
        longest = max(longest, length)
    yield batch


def _row_length(unit, seqs):
    plen, us = unit
    return plen + sum(len(seqs[u]) - plen for u in us)


@torch.inference_mode()
def _embed_batch(model, batch, seqs):
    """[m, F] embeddings of the members of a batch of units, in order, in one forward. Row b holds
    unit b's prefix (segment 0) and then each member's own tokens (segments 1, 2, ...); a token sees
    the earlier tokens of its own segment and of the prefix, and its position continues from the
    prefix, so each member is encoded exactly as if alone. A member that is its whole prefix is read
    at the prefix's last token."""
    device, B = model.device, len(batch)
    T = max(_row_length(unit, seqs) for unit in batch)
    ids = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -1, dtype=torch.long)                              # -1: padding
    last = []                                                                       # (row, column) per member
    for b, (plen, us) in enumerate(batch):
        ids[b, :plen] = torch.tensor(seqs[us[0]][:plen], dtype=torch.long)
        positions[b, :plen] = torch.arange(plen)
        segment[b, :plen] = 0
        start = plen
        for k, u in enumerate(us, 1):
            own = seqs[u][plen:]
            ids[b, start:start + len(own)] = torch.tensor(own, dtype=torch.long)
            positions[b, start:start + len(own)] = torch.arange(plen, plen + len(own))
            segment[b, start:start + len(own)] = k
            start += len(own)
            last.append((b, start - 1 if own else plen - 1))
    segment = segment.to(device)
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()               # [T, T]
    visible = (segment[:, None, :] == segment[:, :, None]) | (segment[:, None, :] == 0)  # [B, T, T]
    real = segment >= 0
    allowed = causal & visible & real[:, None, :] & real[:, :, None]
    allowed |= torch.eye(T, dtype=torch.bool, device=device)  # padding sees only itself: no empty softmax row
    mask = torch.zeros(B, 1, T, T, dtype=model.dtype, device=device)                # additive, [B, 1, T, T]
    mask.masked_fill_(~allowed[:, None], torch.finfo(model.dtype).min)
    hidden = model(input_ids=ids.to(device), attention_mask=mask,
                   position_ids=positions.to(device)).last_hidden_state             # [B, T, F]
    rows, columns = torch.tensor(last, device=device).T
    return hidden[rows, columns]                                                    # [m, F]


def _torchrun():
    """-> (rank, world_size, local_rank). Only WORLD_SIZE > 1 with MASTER_ADDR set, as torchrun sets them,
    is a multi-process run: a stray RANK (left in a shell, set by a scheduler) must not make a lone
    process skip saving its results or wait forever for peers."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) <= 1 or not os.environ.get("MASTER_ADDR"):
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), int(world), int(os.environ.get("LOCAL_RANK", "0"))


def _distributed():
    """-> (rank, world_size, local_rank), joining the torchrun process group if there is one."""
    rank, world, local_rank = _torchrun()
    if world > 1 and not dist.is_initialized():
        # A long timeout: ranks wait at a barrier until the slowest one has finished its shards.
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=datetime.timedelta(hours=12))
        atexit.register(dist.destroy_process_group)
    return rank, world, local_rank


def _barrier(world, local_rank):
    if world > 1:
        dist.barrier(device_ids=[local_rank] if dist.get_backend() == "nccl" else None)


def _all_ranks(ok, world, local_rank):
    """True when `ok` holds on every torchrun rank, so that all of them stop together."""
    if world == 1:
        return ok
    flag = torch.tensor([int(ok)], device=f"cuda:{local_rank}" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _lock(out_path, rank, world, local_rank):
    """Take an exclusive flock on `<out_path>.lock` for the time of an extraction into out_path (rank 0
    takes it for a whole torchrun job), so that two runs never write into one shard folder or output: a
    second run fails at once. The OS releases a flock when its process dies, so a killed run leaves no
    stuck lock. -> the locked file (None on ranks > 0), for _unlock."""
    import fcntl
    lock_path, lock, error = out_path + ".lock", None, None
    while rank == 0 and lock is None and error is None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            lock = open(lock_path, "a")
        except OSError as e:
            error = InputError(f"{lock_path}: cannot create the lock file ({_first_line(e)})")
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = InputError(f"{out_path}: another run is using it (it holds {lock_path}); "
                               f"wait for it to finish or choose another path")
        if error is not None or not _same_file(lock, lock_path):  # not ours, or deleted by the run that just ended
            lock.close()
            lock = None
    if not _all_ranks(error is None, world, local_rank):
        raise error or InputError(f"{out_path}: rank 0 could not lock it (see its message)")
    return lock


def _unlock(lock, out_path):
    if lock is not None:
        os.remove(out_path + ".lock")  # while still locked: a run that opened this file sees that it is gone
        lock.close()


def _same_file(f, path):
    try:
        return os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _reuse(out_path, fingerprint, contents):
    """-> the embeddings at out_path if they are this run's (same fingerprint), else None: compute them.
    Only a file that embed_conversations wrote, of the same `contents`, may be replaced: anything else
    there (a dataset's table, a synthetic one, any other file) is an InputError naming it. A cache whose
    header is readable but whose tensors are not (truncated, corrupt) is recomputed."""
    if not os.path.lexists(out_path):
        return None
    metadata = _header_metadata(out_path)
    if metadata is None or "fingerprint" not in metadata:
        raise InputError(f"{out_path} exists and is not an embeddings cache written by embed_conversations; "
                         f"it would be overwritten: move it away or choose another path")
    if metadata.get("contents") != contents:
        raise InputError(f"{out_path} holds the embeddings of {metadata.get('contents') or 'other conversations'}, "
                         f"not of {contents or 'these conversations'}: it would be overwritten; choose another path")
    if metadata["fingerprint"] != fingerprint:
        if is_main_process():
            print(f"{out_path}: made from other inputs, model weights or settings; computing it again")
        return None
    try:
        return load_tensors(out_path, ["embeddings"])["embeddings"]
    except InputError as e:
        if is_main_process():
            print(f"{e}; computing it again")
        return None


def _header_metadata(path):
    """The metadata of a safetensors header, read by hand so that it is found even in a file whose tensors
    are truncated; None when the path holds no safetensors header at all."""
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > 100_000_000:  # safetensors' own limit on a header
            return None
        try:
            header = json.loads(f.read(n))
        except ValueError:  # not JSON, or not UTF-8
            return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else None


def _open_parts(parts, manifest):
    """Create the shard folder with this run's manifest. Shards are trusted only under a manifest equal to
    this run's: a folder without one or with another run's (other inputs, weights or settings) is cleared,
    with a note, rather than mixed into this output."""
    path = os.path.join(parts, "manifest.json")
    if os.path.lexists(parts):
        try:
            found = read_json(path)
        except InputError:
            found = None
        if found == manifest:
            return
        print(f"{parts}: {'shards of another run' if found is not None else 'shards without a valid manifest'}; "
              f"deleting them and starting over")
        if os.path.isdir(parts) and not os.path.islink(parts):
            shutil.rmtree(parts)
        else:
            os.remove(parts)
    os.makedirs(parts)
    write_json(path, manifest)


def _shard_path(parts, i):
    return os.path.join(parts, f"shard_{i:06d}.safetensors")


def _shard_rows(shard):
    """The distinct sequences of a shard, in the order its file holds them."""
    return [u for _, us in shard for u in us]


def _shard_done(path, rows):
    """True when the shard file exists and holds the embeddings of `rows`; one that cannot be read
    (truncated by a full disk, corrupt) is deleted, with a note, to be computed again."""
    if not os.path.exists(path):
        return False
    try:
        with _open_safetensors(path) as f:
            shape = f.get_slice("embeddings").get_shape() if "embeddings" in f.keys() else []
            done = "rows" in f.keys() and f.get_tensor("rows").tolist() == rows and len(shape) == 2 \
                and shape[0] == len(rows)
        reason = f"{path}: not the embeddings of its rows"
    except InputError as e:
        done, reason = False, str(e)
    if not done:
        print(f"{reason}; computing it again")
        os.remove(path)
    return done


def _merge(parts, n_shards, n_distinct, inverse, out_path, metadata):
    """Gather the shards into the final [n, F] file in input order (metadata gains F), then delete the
    shard folder. A shard that cannot be read now is deleted, so that the next run computes it again."""
    distinct = None
    for i in range(n_shards):
        path = _shard_path(parts, i)
        try:
            tensors = load_tensors(path, ["embeddings", "rows"])
        except InputError as e:
            if os.path.exists(path):
                os.remove(path)
            raise InputError(f"{e}; deleted it: run again to compute it anew") from None
        if distinct is None:
            distinct = torch.empty(n_distinct, tensors["embeddings"].shape[1], dtype=tensors["embeddings"].dtype)
        distinct[tensors["rows"]] = tensors["embeddings"]  # [s, F] into [d, F]
    save_tensors(out_path, {"embeddings": distinct[torch.tensor(inverse)]},  # [n, F]
                 {**metadata, "F": str(distinct.shape[1])})
    shutil.rmtree(parts)


# ----------------------------------------------------------------------------------------------
# Reference-compatible helpers that no script calls: the original API, kept for users of it
# ----------------------------------------------------------------------------------------------


generate_population = generate_popupulation


def simulate_user(reward_tensor, features, w):
    """One simulated user: per prompt, score the R responses with reward_tensor[s] @ w; the best is
    chosen, the worst rejected. reward_tensor [S, R, M], features [S, R, F] (or nested lists),
    w [M] -> [S, F] chosen-minus-rejected rows."""
    return simulate_population(reward_tensor, features, np.asarray(w)[None])[0]


def simulate_population(reward_tensor, features, W):
    """simulate_user for every row of W [N, M] -> dense [N, S, F]. Fine for small data; at
    PersonalLLM scale use simulate_sparse_population, which never builds this tensor."""
    features = _as_response_tensor(features)                                       # [S, R, F]
    chosen, rejected = _simulate_choices(reward_tensor, W)                         # [N, S]
    prompt = torch.arange(features.shape[0])
    return features[prompt, chosen] - features[prompt, rejected]                   # [N, S, F]


def create_sparse_tensor(dense_tensor, sample_percentage, device=None):
    """Per user, floor(sample_percentage * S) of the S rows of dense_tensor [N, S, F], drawn without
    replacement -> list of N float32 tensors on `device`."""
    N, S, _ = dense_tensor.shape
    idx = _sample_prompts(N, S, sample_percentage)                                 # [N, m]
    dense = torch.as_tensor(dense_tensor)
    return [dense[i, torch.as_tensor(idx[i])].to(resolve_device(device), torch.float32)
            for i in range(N)]


def create_dataset_prism(embeddings, device=None):
    """{user: {dialog: {"chosen": [e...], "rejected": [e...]}}} -> list of N tensors [m_i, F] of
    chosen[j] - rejected[j], users and dialogs in the dict's order."""
    return _prism_pairs(embeddings, device).split()


def create_dataset_prism_shots(embeddings, shots, device=None):
    """create_dataset_prism with `shots` random dialogs per user (all of them when a user has
    fewer); a dialog brings all of its pairs."""
    return sample_shots(_prism_pairs(embeddings, device), shots).split()


def _prism_pairs(embeddings, device):
    rows, user, group = [], [], []
    for i, dialogs in enumerate(embeddings.values()):
        for j, d in enumerate(dialogs.values()):
            chosen = torch.stack([torch.as_tensor(e, dtype=torch.float32) for e in d["chosen"]])
            rejected = torch.stack([torch.as_tensor(e, dtype=torch.float32) for e in d["rejected"]])
            rows.append(chosen - rejected)                                         # [pairs, F]
            user += [i] * len(chosen)
            group += [j] * len(chosen)
    if not rows:
        raise InputError("embeddings: no users with dialogs")
    pairs = Pairs(torch.tensor(user), len(embeddings), X=torch.cat(rows), group=torch.tensor(group))
    return pack(pairs, "embeddings", device)


def _as_response_tensor(features):
    if isinstance(features, torch.Tensor):
        return features.float()
    return torch.stack([torch.stack([torch.as_tensor(f) for f in fs]) for fs in features]).float()


def solve(train_features, num_basis_vectors, num_iterations=1000, learning_rate=0.01, device=None):
    """LoRe without regularization -> (W [N, K], V [F, K])."""
    return solve_regularized(None, 0, train_features, num_basis_vectors, num_iterations,
                             learning_rate, device)


def evaluate_model(X, V, w):
    """Accuracy of one user: the fraction of rows with x^T V w > 0 (ties count as wrong)."""
    X = torch.as_tensor(X, dtype=torch.float32)
    return ((X @ V.to(X.device, torch.float32) @ w.to(X.device, torch.float32)) > 0).float().mean().item()
