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
import argparse
import atexit
import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import random
import re
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
        if self.V_sft is None and _check_alpha(alpha, "LoRe"):
            raise InputError(f"LoRe with alpha = {alpha:g} pulls V towards V_sft: V_sft (v_ref) is needed")
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
    # a bar on a terminal only (disable=None): in a log, redrawn bars are noise
    for i in tqdm(range(num_iterations), desc=desc, leave=False, disable=True if desc is None else None):
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
    v = _check_v_ref(v)                                                            # [F, 1]
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
# Methods: one registry for LoRe and the baselines
# ----------------------------------------------------------------------------------------------

class Method:
    """A way to personalize a reward, the value of an entry of METHODS. User i's reward of a
    response with embedding phi is reward(item_features(phi), u_i): a shared part (this object,
    fitted on the seen users) and per-user parameters u_i (a row of U [N, U]), which a new user
    fits from a few pairs with the shared part fixed. A new method is one subclass and one entry;
    the sweeps, the scripts, the checkpoints and the evaluation then work for it unchanged.

    Class attributes:
        name        its key in METHODS
        defaults    hyperparameter -> default (ints and floats). Each one is a flag --{name}-{hp}
                    of every script (hyphens for underscores), except those in recipe_hparams
        recipe_hparams  those read from the dataset recipe's --iters --lr --fewshot-iters
                    --fewshot-lr (the LoRe entries' step counts and rates)
        min_K       the smallest K it takes; sweeps skip smaller K (K = 0, the reference reward
                    model, is LoRe's convention)
        uses_alpha  whether alpha means something for it; if not, a sweep fits it once per K and
                    its records carry alpha None
        linear      reward(item_features(phi), u) is linear in phi without offset, so difference
                    rows x = phi(chosen) - phi(rejected) (the seed's list format) suffice; other
                    methods need the table form of Pairs (both embeddings of every pair)

    Methods to implement; Pairs reach them checked (pack / load_data), on self.device:
        fit(pairs) -> U [N, U]        fit the shared part and the seen users' parameters
        fit_users(pairs) -> U [N, U]  new users' parameters, shared part fixed; pairs may be
                                      featurized (see featurize): use pair_features(self, pairs)
        item_features(rows) -> [n, D] user-independent features of embeddings rows [n, F]
        reward(Z, U) -> [n]           reward of item features Z [n, D] for the users U [n, U]
        state() -> {name: tensor}     the shared part, saved in checkpoints; load_state(tensors)
    Randomness comes from torch's global generator: seed it (set_seed) for repeatable fits.
    """
    name, defaults, min_K, uses_alpha, linear = None, {}, 1, False, False
    recipe_hparams = ()   # hyperparameters read from the recipe's --iters --lr --fewshot-iters --fewshot-lr

    def __init__(self, K, alpha=None, v_ref=None, device=None, **hparams):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise InputError(f"method {self.name}: unknown hyperparameter(s) {unknown}; it has {sorted(self.defaults)}")
        if not _is_int(K) or K < self.min_K:
            raise InputError(f"method {self.name}: K must be an integer >= {self.min_K}, got {K!r}")
        self.K, self.device = int(K), resolve_device(device)
        self.alpha = _check_alpha(alpha, self.name) if self.uses_alpha else None
        self.hparams = {**self.defaults, **hparams}
        self.v_ref = None if v_ref is None else _check_v_ref(v_ref).to(self.device)   # [F, 1]

    def __repr__(self):
        alpha = f", alpha={self.alpha:g}" if self.uses_alpha else ""
        return f"{self.name}(K={self.K}{alpha})"

    def setting(self):
        """What names a fit: the method, K and alpha (None when it does not use alpha)."""
        return {"method": self.name, "K": self.K, "alpha": self.alpha}


class LoReMethod(Method):
    """LoRe as run() fits it: the LoRe model (joint Adam on V and W, users weighed equally, alpha
    times the L2 pull of every column towards v_ref), new users by PersonalizeBatch. U = the users'
    simplex weights w [N, K]. K = 0 is the reference reward model (V = v_ref, w = [1] for everyone);
    K = 1 is one learned direction, and new users get w = [1] (nothing to adapt)."""
    name, min_K, uses_alpha, linear = "lore", 0, True, True
    defaults = {"iters": 1000, "lr": 0.5, "fewshot_iters": 500, "fewshot_lr": 0.1}
    recipe_hparams = ("iters", "lr", "fewshot_iters", "fewshot_lr")
    model = LoRe

    def fit(self, pairs):
        if self.K == 0:
            if self.v_ref is None:
                raise InputError(f"{self.name} with K = 0 is the reference reward model: it needs v_ref")
            self.V = self.v_ref                                                    # [F, 1]
            return torch.ones(pairs.n_users, 1, device=self.device)
        if self.v_ref is None and self.alpha:
            raise InputError(f"{self.name} with alpha = {self.alpha:g} pulls V towards v_ref: it needs v_ref")
        model = self.model(self.v_ref, self.alpha, pairs.n_users, pairs.n_features, self.K,
                           self.hparams["iters"], self.hparams["lr"], self.device)
        W, self.V = model.train(pairs)                                             # [N, K'], [F, K']
        return _check_fitted(self, W, self.V)

    def fit_users(self, pairs):
        Z = pair_features(self, pairs)[0]                                          # [P, K]: x^T V
        if self.V.shape[1] <= 1:
            return torch.ones(pairs.n_users, self.V.shape[1], device=self.device)
        eye = torch.eye(self.V.shape[1], device=self.device)   # the basis of projected rows
        fitw = PersonalizeBatch(pairs.n_users, eye.shape[0], eye.shape[1], self.hparams["fewshot_iters"],
                                self.hparams["fewshot_lr"], self.device)
        W = torch.stack(fitw.train(replace(pairs, X=Z, table=None, chosen=None, rejected=None), eye))
        return _check_fitted(self, W)

    def item_features(self, rows):
        return project_rows(rows.float(), self.V)                                  # [n, K]

    def reward(self, Z, U):
        return (Z * U).sum(-1)                                                     # [n]

    def state(self):
        return {"V": self.V}

    def load_state(self, tensors):
        self.V = tensors["V"].to(self.device, torch.float32)


class LoReRegularizedMethod(LoReMethod):
    """LoRe as run_regularized() fits it: the LoRe_regularized model (alternating Adam, pairs
    weighed equally, alpha_t times the cosine pull towards v_ref, warmed up; directions no user
    weighs >= 1e-2 pruned, so V may have K' < K columns), new users by PersonalizeBatch."""
    name = "lore_regularized"
    defaults = {"iters": 20000, "lr": 0.5, "fewshot_iters": 500, "fewshot_lr": 0.5}
    model = LoRe_regularized

    def fit(self, pairs):
        if self.K > 0 and self.v_ref is None:
            raise InputError(f"{self.name} measures V against v_ref (the cosine pull): it needs v_ref")
        return super().fit(pairs)


METHODS = {
    "lore": LoReMethod,
    "lore_regularized": LoReRegularizedMethod,
}


def _check_fitted(method, *tensors):
    """A fit that diverged (a learning rate too large) gives NaN; say so rather than report it."""
    if not all(torch.isfinite(t).all() for t in tensors):
        raise InputError(f"{method}: the fit diverged (NaN or inf in the fitted parameters); lower the "
                         f"learning rate (hyperparameters {method.hparams})")
    if any(t.shape[-1] == 0 for t in tensors):
        raise InputError(f"{method}: every direction was pruned (no user weighs any at least {PRUNE_THRESHOLD})")
    return tensors[0]


def get_method(name):
    """The class registered as `name`; InputError listing the registered names otherwise."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_alpha(alpha, what):
    if alpha is None:
        return 0.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
            or not math.isfinite(alpha) or alpha < 0:
        raise InputError(f"{what}: alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def _check_v_ref(v_ref):
    """v_ref as float32 [F, 1]: a [F] vector or an [F, 1] / [1, F] matrix, finite; nothing else is
    reshaped (a [F/2, 2] matrix is an error, not a column)."""
    v = torch.as_tensor(v_ref)
    if not v.is_floating_point():
        raise InputError(f"v_ref must be a float tensor, got {v.dtype}")
    if v.dim() == 2 and v.shape[0] == 1:
        v = v.T
    if v.dim() == 1:
        v = v[:, None]
    if v.dim() != 2 or v.shape[1] != 1:
        raise InputError(f"v_ref has shape {tuple(torch.as_tensor(v_ref).shape)}: expected [F], [F, 1] or [1, F]")
    if not torch.isfinite(v).all():
        raise InputError(f"v_ref has NaN or inf (row {int(torch.nonzero(~torch.isfinite(v))[0, 0])})")
    return v.float()


def checkpoint_name(method):
    """The file a fit is saved as: {method}_K{K}[_alpha{a}].safetensors."""
    alpha = f"_alpha{method.alpha:g}" if method.uses_alpha else ""
    return f"{method.name}_K{method.K}{alpha}.safetensors"


def save_method(path, method, **users):
    """A fitted method's shared part and the users' parameters (e.g. W=..., W_unseen=...) in one
    safetensors file; the metadata names the method, K, alpha and the hyperparameters."""
    save_tensors(path, {**method.state(), **users},
                 {"method": method.name, "K": str(method.K), "alpha": json.dumps(method.alpha),
                  "hparams": json.dumps(method.hparams)})


def load_method(path, device=None):
    """-> (method, tensors): the Method saved by save_method, ready to fit new users and score, and
    every tensor of the file (the users' parameters among them)."""
    meta = read_metadata(path)
    missing = [k for k in ("method", "K", "alpha", "hparams") if k not in meta]
    if missing:
        raise InputError(f"{path}: not a checkpoint of a method (its metadata lacks {missing})")
    cls = get_method(meta["method"])
    try:
        method = cls(int(meta["K"]), json.loads(meta["alpha"]), None, device, **json.loads(meta["hparams"]))
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: unreadable checkpoint metadata ({e})") from None
    tensors = load_tensors(path)
    method.load_state({k: v.to(method.device) for k, v in tensors.items()})
    return method, tensors


# ----------------------------------------------------------------------------------------------
# Baselines: PAL and VPL (entries of METHODS beside LoRe)
# ----------------------------------------------------------------------------------------------
# Two published personalized reward models, re-implemented on the same frozen reward-model
# embeddings as LoRe so that the sweeps compare them on equal terms. Neither is linear in phi, so both
# need the table form of Pairs (both embeddings of every pair). Their defaults are the originals'
# recipes; each names its source: PAL = RamyaLab/pluralistic-alignment @ fcfc03c, VPL =
# WEIRDLabUW/vpl_llm @ fdfdfa7 (file:line). Both train as the originals do, by minibatch: a step
# is one batch of pairs drawn across users, gathered from the table in one go (no loop over users
# or pairs inside a step). Steps run eagerly on every device (no CUDA graph: the last batch of an
# epoch is smaller and VPL's learning rate follows a schedule).

PAL_LOGIT_SCALE_INIT = math.log(1 / 0.07)   # pal_rm_b/learner.py:54 (CLIP's initial temperature)
PAL_MAX_SCALE = 100.0                       # exp(logit_scale) is clamped here: pal_rm_b/learner.py:141-142
VPL_SLOPE = 0.2                             # LeakyReLU(0.2) in every MLP: vae_utils.py:21,23,78,80
VPL_ANNEAL_BASELINE = 0.1                   # the KL weight's annealing starts at 10%: vae_utils.py:171
VPL_MAX_GRAD_NORM = 1.0                     # transformers' Trainer clips to this by default (TrainingArguments.max_grad_norm)


def _need_table(method, pairs, fitting=False):
    if pairs.X is not None:
        raise InputError(f"method {method.name} needs both embeddings of every pair (the table form of Pairs: "
                         f"table, chosen, rejected); difference rows phi(chosen) - phi(rejected) do not determine "
                         f"its rewards")
    if fitting and pairs.featurized is not None:
        raise InputError(f"method {method.name} fits its shared part on embeddings, not on item features")


def _check_positive(method):
    """Every hyperparameter a number > 0 of its default's kind (they are also positive flags)."""
    for hp, v in method.hparams.items():
        ok = _is_int(v) if _is_int(method.defaults[hp]) else \
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v <= 0:
            kind = "an integer" if _is_int(method.defaults[hp]) else "a number"
            raise InputError(f"method {method.name}: {hp} must be {kind} > 0, got {v!r}")


def _user_slots(pairs, shuffle):
    """[N, m] pair indices: row i holds user i's pairs (in a random order with shuffle), -1 after
    its last (m = the most pairs of a user). Pairs of a user are contiguous (pack checks this)."""
    counts = pairs.counts()                                                        # [N]
    start = torch.cumsum(counts, 0) - counts                                       # [N]
    order = torch.arange(len(pairs), device=pairs.device)                          # [P]
    if shuffle:
        # a random order within every user: sort by a random key, then stably by user
        order = torch.randperm(len(pairs)).to(pairs.device)
        order = order[torch.argsort(pairs.user[order], stable=True)]
    rank = torch.arange(len(pairs), device=pairs.device) - start[pairs.user[order]]  # [P]
    slots = torch.full((pairs.n_users, int(counts.max())), -1, dtype=torch.long, device=pairs.device)
    slots[pairs.user[order], rank] = order
    return slots


class _RowAdam:
    """Adam on the rows of a user matrix W [N, K] where only the given users step, each with its
    own step count. The originals hold one Parameter per user, so a user without a pair in the
    batch gets no gradient and no step; torch's Adam on one [N, K] tensor would move every row by
    its momentum. (With weight decay 0, as both PAL recipes use for W, AdamW is the same update.)"""

    def __init__(self, W, lr, betas=(0.9, 0.999), eps=1e-8):
        self.W, self.lr, self.betas, self.eps = W, lr, betas, eps
        self.m, self.v = torch.zeros_like(W), torch.zeros_like(W)                  # [N, K]
        self.t = torch.zeros(len(W), 1, device=W.device)                           # [N, 1]

    @torch.no_grad()
    def step(self, active):                                                        # active [N] bool
        b1, b2 = self.betas
        g, on = self.W.grad, active[:, None]                                       # [N, K], [N, 1]
        self.t += on
        self.m.copy_(torch.where(on, b1 * self.m + (1 - b1) * g, self.m))
        self.v.copy_(torch.where(on, b2 * self.v + (1 - b2) * g * g, self.v))
        t = self.t.clamp(min=1)
        update = self.lr * (self.m / (1 - b1 ** t)) / ((self.v / (1 - b2 ** t)).sqrt() + self.eps)
        self.W -= torch.where(on, update, torch.zeros_like(update))
        self.W.grad = None


class PAL(Method):
    """PAL-B (Chen et al., ICLR 2025), the frozen-LLM variant (main_pal_b_fix_llm.py), on reward-model
    embeddings. A shared projector f (3-layer GELU MLP, F -> dim) maps a response embedding into
    the preference space; user i's ideal point is u_i = sum_k softmax(W_i)_k p_k, a mixture of K
    prototypes; the reward is  s_i(phi) = min(exp(logit_scale), 100) * cos(f(phi), u_i)  and the loss
    is the Bradley-Terry -log sigmoid(s_i(chosen) - s_i(rejected)), the mean over a batch of 4 pairs.

    The one change: PAL-B's prototypes are K projectors g_k of a separate *prompt* embedding
    (pal_rm_b/userLearner.py:98). Here an embedding is of a whole conversation and there is no
    separate prompt embedding, so the prototypes are K free vectors of the preference space (what
    g_k(prompt) is for a constant prompt; PAL-A's P, pal_rm_a/userLearner.py:48, with its init and
    learning rate).

    Seen users: Adam on f (lr 1e-4, L2 0.01), the prototypes (5e-3), logit_scale (0.1) and every user's
    W (5e-3, only the users in the batch step), 1 epoch of shuffled batches of 4 pairs. New users
    (main_pal_b_unseen.py): the shared part fixed, W ~ N(0, 1), AdamW lr 5e-3 for 20 epochs; as in the
    original each user's W takes one step per pair per epoch, run here for all users at once (the
    original's batches of 4 pairs rarely hold two pairs of one user). U = softmax(W), the user's
    point of the simplex [N, K]; item features are f(phi) / |f(phi)| [n, dim]."""
    name = "pal"
    defaults = {
        "dim": 512,            # d_pref: prefLearner_config/b-dim512-k2-opt350m-mlp2.yaml:2, the config main_pal_b_fix_llm.py:22 loads
        "epochs": 1,           # optim_config/vanilla-e1.yaml:2, the default of main_pal_b_fix_llm.py:23
        "batch_size": 4,       # prefLearner_config/b-dim512-k2-opt350m-mlp2.yaml:14 (bs)
        "lr": 1e-4,            # projector_f: optim_config/vanilla-e1.yaml:10
        "weight_decay": 0.01,  # projector_f: optim_config/vanilla-e1.yaml:11 (torch Adam: L2 added to the gradient)
        "proto_lr": 5e-3,      # P: optim_config/vanilla-e1.yaml:16 (weight decay 0, :17)
        "w_lr": 5e-3,          # W: optim_config/vanilla-e1.yaml:19 (weight decay 0, :20)
        "scale_lr": 0.1,       # logit_scale: optim_config/vanilla-e1.yaml:22 (weight decay 0, :23)
        "fewshot_epochs": 20,  # optim_config/vanilla-e20.yaml:3, as README.md:172 runs main_pal_b_unseen.py
        "fewshot_lr": 5e-3,    # W alone, AdamW: optim_config/vanilla-e20.yaml:19, pal_rm_b/lightningmodule.py:140-144
    }

    def __init__(self, K, alpha=None, v_ref=None, device=None, **hparams):
        super().__init__(K, alpha, v_ref, device, **hparams)
        _check_positive(self)

    def _build(self, n_features):
        """The shared part, drawn on the CPU generator then moved (same seed, same start on any device)."""
        d = self.hparams["dim"]
        # proj_arch 'mlp2-gelu-dropout0' (b-dim512-k2-opt350m-mlp2.yaml:6 -> connector.py:52-78 ->
        # projector.py:52-65): Linear, GELU, Linear, GELU, Linear; the dropout has p = 0
        self.f = nn.Sequential(nn.Linear(n_features, d), nn.GELU(), nn.Linear(d, d), nn.GELU(),
                               nn.Linear(d, d)).to(self.device)
        # unit-norm Gaussian rows: tensor_initializer.py:22-26 with is_expectation_norm_init False
        self.P = nn.Parameter(F.normalize(torch.randn(self.K, d), dim=1).to(self.device))          # [K, d]
        self.logit_scale = nn.Parameter(torch.tensor(PAL_LOGIT_SCALE_INIT).to(self.device))

    def _scale(self):
        # clamped after exp, so above 100 the scale gets no gradient, as in the original
        return self.logit_scale.exp().clamp(max=PAL_MAX_SCALE)

    def _features(self, rows):
        return F.normalize(self.f(rows.float()), dim=-1)                          # [n, d]

    def _ideal_points(self, weights):
        return F.normalize(weights @ self.P, dim=-1)                              # [n, K] [K, d] -> [n, d]

    def loss(self, pairs, idx):
        """The loss of the pairs idx [B] (raw embeddings, the seen users' W): the mean over them of
        -log sigmoid(s(chosen) - s(rejected)), i.e. the cross-entropy over the two logits
        (pal_rm_b/lightningmodule.py:74-78, learner.py:134-146)."""
        B = len(idx)
        rows = pairs.table[torch.cat([pairs.chosen[idx], pairs.rejected[idx]])]   # [2B, F]
        Z = self._features(rows)                                                  # [2B, d]
        u = self._ideal_points(simplex(self.W.index_select(0, pairs.user[idx])))  # [B, d]
        s = self._scale() * ((Z[:B] - Z[B:]) * u).sum(-1)                         # [B]
        return -F.logsigmoid(s).mean()

    def step(self, pairs, idx):
        """One Adam step on the pairs idx [B]: the shared part, and the W rows of their users."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(pairs, idx)
        loss.backward()
        self.optimizer.step()
        active = torch.zeros(pairs.n_users, dtype=torch.bool, device=self.device)
        self.w_adam.step(active.index_fill_(0, pairs.user[idx], True))
        return loss.detach()

    def start(self, pairs):
        """Fresh shared part and seen users' W ~ N(0, 1) (userLearner.py:52-53), with their optimizers."""
        _need_table(self, pairs, fitting=True)
        self._build(pairs.n_features)
        self.W = nn.Parameter(torch.randn(pairs.n_users, self.K).to(self.device))              # [N, K]
        h = self.hparams
        # per-group Adam as pal_rm_b/lightningmodule.py:128-139 builds it
        self.optimizer = optim.Adam([
            {"params": self.f.parameters(), "lr": h["lr"], "weight_decay": h["weight_decay"]},
            {"params": [self.P], "lr": h["proto_lr"]},
            {"params": [self.logit_scale], "lr": h["scale_lr"]}])
        self.w_adam = _RowAdam(self.W, h["w_lr"])

    def fit(self, pairs):
        self.start(pairs)
        B = self.hparams["batch_size"]
        for epoch in range(self.hparams["epochs"]):
            # shuffled batches, the last one smaller (the original's DataLoader, datamodule.py:49)
            batches = torch.randperm(len(pairs)).to(self.device).split(B)
            for idx in tqdm(batches, desc=f"{self} epoch {epoch + 1}", leave=False, disable=None):
                self.step(pairs, idx)
        return simplex(self.W).detach()

    def fit_users(self, pairs):
        _need_table(self, pairs)
        Zc, Zr = pair_features(self, pairs)                                       # [P, d] each
        if self.K == 1:
            return torch.ones(pairs.n_users, 1, device=self.device)
        with torch.no_grad():
            D = self._scale() * (Zc - Zr)                                         # [P, d]; scale frozen too
        W = torch.randn(pairs.n_users, self.K).to(self.device).requires_grad_()   # [N, K]
        adam = _RowAdam(W, self.hparams["fewshot_lr"])
        for _ in range(self.hparams["fewshot_epochs"]):
            slots = _user_slots(pairs, shuffle=True)                              # [N, m]
            for s in range(slots.shape[1]):
                # step s of the epoch: every user with an s-th pair takes one AdamW step on it
                p = slots[:, s]                                                   # [N]
                active = p >= 0
                margin = (D[p.clamp(min=0)] * self._ideal_points(simplex(W))).sum(-1)   # [N]
                # the original's loss is a mean over its batch of 4 pairs: the same gradient scale
                loss = -(F.logsigmoid(margin) * active).sum() / self.hparams["batch_size"]
                loss.backward()
                adam.step(active)
        return simplex(W).detach()

    def item_features(self, rows):
        with torch.no_grad():
            return self._features(rows)

    def reward(self, Z, U):
        return self._scale() * (Z * self._ideal_points(U.to(Z.dtype))).sum(-1)   # [n]

    def state(self):
        return {**{f"f.{k}": v for k, v in self.f.state_dict().items()},
                "P": self.P.detach(), "logit_scale": self.logit_scale.detach()}

    def load_state(self, tensors):
        self._build(tensors["f.0.weight"].shape[1])
        self.f.load_state_dict({k[2:]: v for k, v in tensors.items() if k.startswith("f.")})
        with torch.no_grad():
            self.P.copy_(tensors["P"])
            self.logit_scale.copy_(tensors["logit_scale"])


class VPL(Method):
    """VPL (Poddar et al., 2024) in its embedding mode (fixed_contexts and fixed_llm_embeddings of
    hidden_context/train_llm_vae_preference_model.py), K = the latent dimension.

    Encoder (vae_utils.py:11-70): every context pair (chosen, rejected) of a user is coded by an MLP
    of concat(phi_c, phi_r) (2F -> hidden -> hidden -> K, LeakyReLU 0.2); one self-attention layer
    over the user's codes (q, k, v: K -> K; softmax(q k^T / sqrt(K)) v), averaged over the codes,
    gives the Gaussian posterior's mean and log-variance (K -> K each), both clamped to [-1, 1].
    Reward network (vae_utils.py:73-89): an MLP of concat(phi, z) (F + K -> hidden -> hidden -> 1).
    Loss (vae_utils.py:175-179, 265-288): mean over the batch of -log sigmoid(r(chosen, z) -
    r(rejected, z)) + kl_weight * annealing(step) * KL(q || N(0, I)); during training z = mean +
    std * eps rescaled to norm sqrt(K) (vae_utils.py:114-118), when scoring z = mean (:152-153).

    Training: every pair is a target `duplicates` times per epoch, each time with its own context
    of 2..8 other pairs of its user drawn without replacement (add_survey_contexts.py:146-147);
    AdamW (weight decay on the weight matrices, not the biases, as transformers' Trainer does),
    cosine learning rate with 3% warm-up, gradients clipped to norm 1. New users are encoded from
    their few-shot pairs, all of them as the context, with no gradient step; the seen users are
    encoded from their training pairs the same way. U = the posterior mean [N, K].
    Item features: the three first-layer products of an embedding (with the pair encoder's chosen
    half, its rejected half, and the reward network's phi half) [n, 3 hidden]: everything both
    networks need of phi, so that new users are encoded and scored without the embeddings."""
    name = "vpl"
    defaults = {
        "hidden": 512,         # hidden_dim: train_llm_vae_preference_model.py:142, submit_job_UF_P_4.sh:26
        "epochs": 2,           # submit_job_UF_P_4.sh:17 (num_train_epochs)
        "duplicates": 4,       # every target with 4 resampled contexts: generate_llm_embeddings_UF_P_4.sh:27 (num_duplicates), add_survey_contexts.py:161-189
        "batch_size": 32,      # 4 per device x 8 accumulation steps: submit_job_UF_P_4.sh:23-24
        "lr": 1e-4,            # submit_job_UF_P_4.sh:27
        "weight_decay": 1e-3,  # train_llm_vae_preference_model.py:48, AdamW (optim adamw_hf, :127)
        "warmup": 0.03,        # cosine schedule, 3% linear warm-up: vae_utils.py:315-322
        "kl_weight": 3e-6,     # submit_job_UF_P_4.sh:29 (the script's default is 0.01, :140)
        "anneal_steps": 1250,  # the annealer's cycle, 1e4 micro-batches (vae_utils.py:171), is 1250 steps of 8
        "context_min": 2,      # add_survey_contexts.py:146 (random.randint(2, max))
        "context_max": 8,      # add_survey_contexts.py:89-90 (context_length)
    }

    def __init__(self, K, alpha=None, v_ref=None, device=None, **hparams):
        super().__init__(K, alpha, v_ref, device, **hparams)
        _check_positive(self)
        if self.hparams["context_min"] > self.hparams["context_max"]:
            raise InputError(f"method vpl: context_min {self.hparams['context_min']} > context_max {self.hparams['context_max']}")

    def _build(self, n_features):
        """Layers as the original's nn.Linear (torch's default init), drawn on the CPU generator then moved."""
        H, L = self.hparams["hidden"], self.K
        self.n_features = n_features
        self.net = nn.ModuleDict(dict(
            pair1=nn.Linear(2 * n_features, H), pair2=nn.Linear(H, H), pair3=nn.Linear(H, L),   # PairEncoder
            q=nn.Linear(L, L), k=nn.Linear(L, L), v=nn.Linear(L, L),                             # SequenceEncoder
            mean=nn.Linear(L, L), log_var=nn.Linear(L, L),
            dec1=nn.Linear(n_features + L, H), dec2=nn.Linear(H, H), dec3=nn.Linear(H, 1),      # Decoder
        )).to(self.device)

    # The first layers of both networks are linear in phi, so they are split into the products
    # with phi (item features) and the rest: W [phi_c; phi_r] = W_c phi_c + W_r phi_r.
    def _first_layers(self, rows, parts):
        """rows [..., F] -> [..., H] per part: 'c'/'r' the pair encoder's chosen/rejected half, 'd' the
        reward network's phi half (no biases: they are added after)."""
        n, W1, Wd = self.n_features, self.net.pair1.weight, self.net.dec1.weight
        weight = {"c": W1[:, :n], "r": W1[:, n:], "d": Wd[:, :n]}
        return [rows.float() @ weight[p].T for p in parts]

    def _encode(self, hc, hr, mask):
        """The posterior of each set of context pairs: hc, hr [n, C, H] their first-layer products,
        mask [n, C] the pairs present -> (mean, log_var) [n, K], clamped (vae_utils.py:141-143)."""
        net, L = self.net, self.K
        h = F.leaky_relu(hc + hr + net.pair1.bias, VPL_SLOPE)
        h = F.leaky_relu(net.pair2(h), VPL_SLOPE)
        x = net.pair3(h)                                                          # [n, C, K]
        scores = net.q(x) @ net.k(x).transpose(1, 2) / math.sqrt(L)               # [n, C, C]
        a = torch.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), dim=-1)
        m = mask[..., None].float()                                               # [n, C, 1]
        out = ((a @ net.v(x)) * m).sum(1) / m.sum(1)                              # [n, K]: mean over the set
        return net.mean(out).clamp(-1, 1), net.log_var(out).clamp(-1, 1)

    def _reward(self, hd, z):
        """Reward network on the item's first-layer product hd [n, H] and the latent z [n, K] -> [n]."""
        net = self.net
        h = F.leaky_relu(hd + z @ net.dec1.weight[:, self.n_features:].T + net.dec1.bias, VPL_SLOPE)
        h = F.leaky_relu(net.dec2(h), VPL_SLOPE)
        return net.dec3(h).squeeze(-1)

    def kl_slope(self, step):
        """The annealed share of kl_weight: cosine from 10% to 100% over a cycle, then again
        (Annealer(shape='cosine', baseline=0.1, cyclical=True), vae_utils.py:359-419)."""
        T = self.hparams["anneal_steps"]
        y = (math.cos(math.pi * ((step % T) / T - 1)) + 1) / 2
        return y * (1 - VPL_ANNEAL_BASELINE) + VPL_ANNEAL_BASELINE

    def loss(self, pairs, target, context, eps, step=0):
        """The ELBO loss of the target pairs target [B], each with its context context [B, C] (pair
        indices of the same user, -1 = none) and noise eps [B, K] -> (loss, nll, kl)."""
        tab, B = pairs.table, len(target)
        mask, c = context >= 0, context.clamp(min=0)                              # [B, C]
        hc, = self._first_layers(tab[pairs.chosen[c]], "c")                       # [B, C, H]
        hr, = self._first_layers(tab[pairs.rejected[c]], "r")                     # [B, C, H]
        mean, log_var = self._encode(hc, hr, mask)                                # [B, K] each
        z = mean + torch.exp(0.5 * log_var) * eps                                 # reparameterization
        z = F.normalize(z, dim=-1) * math.sqrt(self.K)                            # vae_utils.py:117
        hd, = self._first_layers(tab[torch.cat([pairs.chosen[target], pairs.rejected[target]])], "d")  # [2B, H]
        r = self._reward(hd, z.repeat(2, 1))                                      # [2B]
        nll = -F.logsigmoid(r[:B] - r[B:]).mean()
        kl = (-0.5 * (1 + log_var - mean ** 2 - log_var.exp()).sum(-1)).mean()   # vae_utils.py:283
        return nll + self.hparams["kl_weight"] * self.kl_slope(step) * kl, nll.detach(), kl.detach()

    def step(self, pairs, target, context, eps, step=0):
        """One AdamW step (clipped, then the schedule advances) on a batch of targets."""
        self.optimizer.zero_grad(set_to_none=True)
        loss, nll, kl = self.loss(pairs, target, context, eps, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), VPL_MAX_GRAD_NORM)
        self.optimizer.step()
        self.schedule.step()
        return loss.detach()

    def draw_epoch(self, pairs):
        """One epoch's targets [T] (every pair `duplicates` times, shuffled) and their contexts
        [T, context_max]: context_min..context_max other pairs of the target's user, uniform in
        number, drawn without replacement (fewer when the user has fewer; the target itself when
        it has no other pair), -1 after the last. Drawn on the CPU generator, then moved."""
        h, user, counts = self.hparams, pairs.user.cpu(), pairs.counts().cpu()
        T, C = len(pairs) * h["duplicates"], h["context_max"]
        target = torch.randperm(T) % len(pairs)                                   # [T]
        u = user[target]
        start = (torch.cumsum(counts, 0) - counts)[u]                             # [T]
        avail = counts[u] - 1                                                     # [T] the user's other pairs
        size = torch.randint(h["context_min"], C + 1, (T,)).minimum(avail)        # [T]
        # slot j draws uniformly among the avail - j offsets not taken yet: the r-th free offset is r
        # moved past every taken offset <= it, taken ones visited in increasing order
        taken = torch.zeros(T, 0, dtype=torch.long)
        for j in range(C):
            r = (torch.rand(T) * (avail - j).clamp(min=1)).long()                 # [T]
            for t in taken.sort(dim=1).values.T:
                r += (r >= t).long()
            taken = torch.cat([taken, r[:, None]], 1)                             # [T, j + 1]
        own = target - start                                                      # [T] the target's offset
        context = start[:, None] + taken + (taken >= own[:, None]).long()         # [T, C] skip the target
        context[torch.arange(C)[None, :] >= size[:, None]] = -1
        alone = avail == 0
        context[alone, 0] = target[alone]
        return target.to(self.device), context.to(self.device)

    def start(self, pairs):
        """A fresh model and its optimizer and schedule for a fit on pairs; -> steps per epoch."""
        _need_table(self, pairs, fitting=True)
        self._build(pairs.n_features)
        h = self.hparams
        named = list(self.net.named_parameters())
        self.optimizer = optim.AdamW([
            {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": h["weight_decay"]},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}],
            lr=h["lr"], betas=(0.9, 0.999), eps=1e-8)                             # transformers' AdamW defaults
        per_epoch = math.ceil(len(pairs) * h["duplicates"] / h["batch_size"])
        total = h["epochs"] * per_epoch
        warm = int(h["warmup"] * total)

        def lr_factor(s):   # transformers' get_cosine_schedule_with_warmup
            if s < warm:
                return s / max(1, warm)
            return max(0.0, 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
        self.schedule = optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        return per_epoch

    def fit(self, pairs):
        self.start(pairs)
        B, step = self.hparams["batch_size"], 0
        self.net.train()
        for epoch in range(self.hparams["epochs"]):
            target, context = self.draw_epoch(pairs)
            for b in tqdm(range(0, len(target), B), desc=f"{self} epoch {epoch + 1}", leave=False, disable=None):
                eps = torch.randn(len(target[b:b + B]), self.K).to(self.device)  # [B, K]
                self.step(pairs, target[b:b + B], context[b:b + B], eps, step)
                step += 1
        return self.fit_users(pairs)

    def fit_users(self, pairs):
        _need_table(self, pairs)
        Zc, Zr = pair_features(self, pairs)                                       # [P, 3H] each
        H = self.hparams["hidden"]
        slots = _user_slots(pairs, shuffle=False)                                 # [N, m]: a user's pairs
        # users in chunks: the padded [n, m, H] codes and [n, m, m] attention stay ~100 MB
        chunk = max(1, (1 << 25) // (slots.shape[1] * max(H, slots.shape[1])))
        means = []
        with torch.no_grad():
            for c in slots.split(chunk):
                mask, p = c >= 0, c.clamp(min=0)                                  # [n, m]
                means.append(self._encode(Zc[:, :H][p], Zr[:, H:2 * H][p], mask)[0])   # [n, m, H] parts
        return torch.cat(means)                                                   # [N, K]

    def item_features(self, rows):
        with torch.no_grad():
            return torch.cat(self._first_layers(rows, "crd"), dim=-1)             # [n, 3H]

    def reward(self, Z, U):
        H = self.hparams["hidden"]
        return self._reward(Z[:, 2 * H:], U.to(Z.dtype))                          # [n]

    def state(self):
        return {f"net.{k}": v for k, v in self.net.state_dict().items()}

    def load_state(self, tensors):
        self._build(tensors["net.dec1.weight"].shape[1] - self.K)
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})


METHODS["pal"] = PAL
METHODS["vpl"] = VPL


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
    V = _check_matrix(V, "V")                                                      # [F, K]
    if V.shape[0] != pairs.n_features:
        raise InputError(f"V has shape {tuple(V.shape)} but the pairs have F={pairs.n_features}: V must be [F, K]")
    fitw = PersonalizeBatch(pairs.n_users, pairs.n_features, V.shape[1], num_iterations,
                            learning_rate, pairs.device)
    return fitw.train(pairs, V.to(pairs.device))


def _pack_basis_input(train_features, K, device):
    if not _is_int(K) or K < 1:
        raise InputError(f"a basis needs K >= 1 directions, got K={K}")
    return pack(train_features, "train_features", device)


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------

def per_user_accuracy(pairs, V, W):
    """Accuracy of every user of a linear basis at once: pairs (Pairs), V [F, K], W [N, K] -> numpy [N]."""
    Z = pairs.project(V)                                                           # [P, K]
    return _user_fraction(mix(Z, W.to(Z.device, torch.float32), pairs.user) > 0, pairs)


def eval_multiple(W_list, V_list, test_features):
    """Per-user accuracy of N users sharing one basis. W_list: [N, K] or a list of N weights [K];
    V_list: the basis [F, K] (or the seed's list of N references to it); test_features: a list of
    N tensors [m_i, F] or Pairs. Prints the mean and std; returns numpy [N]."""
    if isinstance(V_list, (list, tuple)):
        if len(V_list) == 0 or any(v is not V_list[0] and not torch.equal(v, V_list[0]) for v in V_list):
            raise InputError("eval_multiple evaluates users that share one basis V (V_list holds different ones)")
        V_list = V_list[0]
    V = _check_matrix(V_list, "V")                                                 # [F, K]
    W = _check_matrix(torch.stack([torch.as_tensor(w) for w in W_list])
                      if isinstance(W_list, (list, tuple)) else W_list, "W")       # [N, K]
    pairs = pack(test_features, "test_features", V.device)
    if W.shape != (pairs.n_users, V.shape[1]) or V.shape[0] != pairs.n_features:
        raise InputError(f"weights {tuple(W.shape)} and basis {tuple(V.shape)} do not fit {pairs.n_users} "
                         f"users with F={pairs.n_features}: need W [N, K] and V [F, K]")
    accuracies = per_user_accuracy(pairs, V, W)
    print(f"Average accuracy: {accuracies.mean():.4f}")
    print(f"Standard deviation of accuracy: {accuracies.std():.4f}")
    return accuracies


def featurize(method, pairs):
    """The pairs with their rows replaced by the method's item features, computed once (project
    once where the shared part is fixed): the table form keeps the rows its pairs use, as [E', D]
    with the indices remapped; the difference form (linear methods only) becomes [P, D]. Fitting
    new users and evaluating then run in the method's small feature space."""
    if pairs.featurized is method:
        return pairs
    if pairs.featurized is not None:
        raise InputError(f"these pairs hold the item features of {pairs.featurized}, not of {method}")
    with torch.no_grad():
        if pairs.X is not None:
            if not method.linear:
                raise InputError(f"method {method.name} needs both embeddings of every pair (the table form of Pairs)")
            return replace(pairs, X=_chunked(method.item_features, pairs.X), featurized=method)     # [P, D]
        used, inverse = torch.unique(torch.cat([pairs.chosen, pairs.rejected]), return_inverse=True)
        Z = _chunked(method.item_features, pairs.table, used)                      # [E', D]
        return replace(pairs, table=Z, chosen=inverse[:len(pairs)], rejected=inverse[len(pairs):],
                       featurized=method)


def pair_features(method, pairs):
    """-> (Zc, Zr): the item features [P, D] of every pair's chosen and rejected response; for the
    difference form (linear methods) Zc are the features of x and Zr is None."""
    pairs = featurize(method, pairs)
    if pairs.X is not None:
        return pairs.X, None
    return pairs.table[pairs.chosen], pairs.table[pairs.rejected]


def pair_margins(method, pairs, U):
    """reward(chosen) - reward(rejected) of every pair under its own user's parameters U [N, U] -> [P]."""
    pairs = featurize(method, pairs)
    U = U.to(pairs.device, torch.float32)
    out = []
    with torch.no_grad():
        for idx in torch.arange(len(pairs), device=pairs.device).split(1 << 16):  # bounded [chunk, D] temporaries
            Zc, Zr = pair_features(method, pairs.select(idx))
            Uu = U.index_select(0, pairs.user[idx])                                # [chunk, U]
            m = method.reward(Zc, Uu)
            out.append(m if Zr is None else m - method.reward(Zr, Uu))
    return torch.cat(out)                                                          # [P]


def accuracy(method, pairs, U):
    """Every user's accuracy: the fraction of its pairs with a positive margin (ties count as
    wrong) -> numpy [N]."""
    return _user_fraction(pair_margins(method, pairs, U) > 0, pairs)


def _user_fraction(correct, pairs):
    hits = torch.bincount(pairs.user[correct], minlength=pairs.n_users)            # [N]
    return (hits.double() / pairs.counts().double()).cpu().numpy()


def _chunked(fn, rows, index=None, chunk=1 << 15):
    """fn over [n, F] rows (or rows[index]) in chunks, so no [n, F] float32 copy of a bf16 table exists."""
    n = len(rows) if index is None else len(index)
    parts = [fn(rows[i:i + chunk] if index is None else rows[index[i:i + chunk]]) for i in range(0, n, chunk)]
    return torch.cat(parts)


def _check_matrix(M, name):
    """A 2-D finite float tensor (NumPy arrays are taken as they are), else InputError naming it."""
    M = torch.as_tensor(M)
    if M.dim() != 2 or not M.is_floating_point():
        raise InputError(f"{name} must be a 2-D float matrix, got shape {tuple(M.shape)} of {M.dtype}")
    if not torch.isfinite(M).all():
        raise InputError(f"{name} has NaN or inf")
    return M.float()


# ----------------------------------------------------------------------------------------------
# Understanding and using a basis: health report, interpretation, personalized scoring
# ----------------------------------------------------------------------------------------------

# A basis can look fine by its accuracy and still be one reward in disguise: the original LoRe code
# on PRISM ended with singular values [4490, 14, 0.9, ...], every column pointing the same way and
# 1025 of 1029 users on one column. basis_report measures exactly those symptoms from V, the users'
# weights and (optionally) v_ref and per-user accuracies, with no data needed.

COLLAPSE_RANK = 1.5          # effective rank below this: one direction in all but name
COLLAPSE_COS = 0.99          # two columns with |cos| above this are the same direction
COLLAPSE_SHARE = 0.95        # one column the largest for this share of users: one reward for all
IN_USE_SHARE = 0.01          # a column is in use when it is the largest for at least 1% of users
DIVERSITY_MAX_PAIRS = 200_000  # pairwise user cosines: all pairs up to this many, else a seeded sample


def energy_rank(s, share=0.95):
    """The fewest singular directions holding `share` of the energy sum_j s_j^2 (0 for all zeros):
    an integer companion of effective_rank that ignores a long tail of small singular values."""
    e = np.asarray(s, dtype=np.float64) ** 2
    if e.sum() <= 0:
        return 0
    return int(np.searchsorted(np.cumsum(e) / e.sum(), share - 1e-12) + 1)


def effective_rank(M):
    """exp(entropy of p), p_j = s_j / sum_k s_k, s the singular values of M with its columns scaled
    to unit norm (columns of zero norm stay zero). 1 for any number of copies of one direction, K
    for K orthogonal columns, in between otherwise (Roy & Vetterli, 2007).
    M [F, K] -> (effective rank, singular values [min(F, K)]), numpy float64."""
    M = np.asarray(M, dtype=np.float64)
    norms = np.linalg.norm(M, axis=0)                                              # [K]
    unit = M / np.where(norms > 0, norms, 1.0)                                     # [F, K]
    s = np.linalg.svd(unit, compute_uv=False)                                      # [min(F, K)]
    if s.sum() <= 0:
        return 0.0, s
    p = s / s.sum()
    p = p[p > 0]                                                                   # 0 log 0 = 0
    return float(np.exp(-(p * np.log(p)).sum())), s


def basis_report(V, W=None, v_ref=None, acc=None, acc_ref=None, setting=None, seed=0):
    """The health of a learned basis, as a JSON-serializable dict (floats, ints, bools, lists, None).

    V [F, K] the basis; W [N, K] the users' simplex weights (softmax(W_i), what the trainers return);
    v_ref [F, 1] the reward model's own head; acc, acc_ref [N] each user's held-out accuracy with its
    personal reward and with v_ref; setting: a dict (method, K, alpha, ...) copied into the result.
    Tensors or arrays. Every part that needs a missing input is None. seed: the pair sample of
    `diversity` when N is large (the same seed gives the same report).

    Definitions (every number below is computed in float64):
      effective_rank       exp(-sum_j p_j log p_j), p_j = s_j / sum_k s_k, s the singular values of V
                           with its columns scaled to unit norm (so a column's length cannot hide a
                           copy): 1 = all columns one direction, K = orthogonal columns.
      user_effective_rank  the same for the users' reward vectors V w_i ([F, N], each scaled to unit
                           norm): how many directions the users' rewards really span, which shows a
                           planted rank when K is larger than it.
      rank_95, user_rank_95  the fewest singular directions (of the same unit-column matrices)
                           holding 95% of the energy sum_j s_j^2: integers, blind to a small tail.
      cos_ref              [K] cosine of each column with v_ref.  cos_columns [K, K] the columns'
                           cosines; max_abs_cos the largest |off-diagonal| one (0 when K = 1).
      usage                per column: weight_max and weight_mean over users, top_users = users for
                           whom it is the largest weight (a user tied between t columns counts 1/t
                           to each; ties within 1e-9), top_share = top_users / N.
      columns_in_use       columns with top_share >= IN_USE_SHARE (1%): the largest weight of at
                           least 1% of the users. A column that is nobody's largest is unused even
                           if it is mixed in.
      diversity            quantiles 5/25/50/75/95 and mean of the cosines between two users' reward
                           vectors V w_i, V w_j (i < j): all pairs when there are at most
                           DIVERSITY_MAX_PAIRS, else that many pairs drawn with `seed`.
      accuracy             with acc and acc_ref: their means, mean_change = mean(acc - acc_ref), and
                           the users who gained (change > 1e-9), lost (< -1e-9) or are unchanged.
      collapsed            K > 1 and (effective_rank < 1.5 or max_abs_cos > 0.99 or one column is
                           the largest for >= 95% of the users); `collapse_reasons` says which, in
                           words, and `warnings` holds them and softer notes (unused columns, users
                           losing to the reference).
    """
    V = _as_matrix(V, "V")                                                         # [F, K]
    n_features, K = V.shape
    if K < 1:
        raise InputError(f"V has shape {tuple(V.shape)}: a basis needs at least one column")
    report = {"setting": dict(setting) if setting else {}, "K": K, "F": n_features}
    warnings, reasons = [], []

    # Directions: the columns' lengths, the raw spectrum, and the spectrum of the unit columns.
    norms = np.linalg.norm(V, axis=0)                                              # [K]
    report["column_norms"] = norms.tolist()
    report["singular_values"] = np.linalg.svd(V, compute_uv=False).tolist()
    erank, s_unit = effective_rank(V)
    report["effective_rank"] = erank
    report["rank_95"] = energy_rank(s_unit)
    report["singular_values_normalized"] = s_unit.tolist()
    for j in np.flatnonzero(norms == 0):
        warnings.append(f"column {j} is all zeros")

    unit = V / np.where(norms > 0, norms, 1.0)                                     # [F, K]
    cos = unit.T @ unit                                                            # [K, K]
    off = np.abs(cos - np.diag(np.diag(cos)))                                      # [K, K], diagonal 0
    report["cos_columns"] = cos.tolist()
    report["max_abs_cos"] = float(off.max()) if K > 1 else 0.0
    report["cos_ref"] = None
    if v_ref is not None:
        v = _as_matrix(v_ref, "v_ref").reshape(-1)                                 # [F]
        if v.shape[0] != n_features:
            raise InputError(f"v_ref has {v.shape[0]} features, V has F={n_features}")
        report["cos_ref"] = (unit.T @ v / max(np.linalg.norm(v), 1e-300)).tolist()  # [K]

    if K > 1 and erank < COLLAPSE_RANK:
        reasons.append(f"effective rank {erank:.3f} < {COLLAPSE_RANK}: the {K} columns span about "
                       f"one direction")
    if K > 1 and report["max_abs_cos"] > COLLAPSE_COS:
        i, j = sorted(np.unravel_index(np.argmax(off), off.shape))
        reasons.append(f"columns {i} and {j} have |cos| = {off[i, j]:.4f} (> {COLLAPSE_COS}): the "
                       f"same direction")

    # Users: how the weights spread over the columns, and what their rewards V w_i span.
    report.update(N=None, user_effective_rank=None, user_rank_95=None, user_singular_values=None,
                  usage=None, columns_in_use=None, diversity=None, user_cos_ref=None)
    if W is not None:
        W = _as_matrix(W, "W")                                                     # [N, K]
        if W.shape[1] != K or W.shape[0] < 1:
            raise InputError(f"W has shape {tuple(W.shape)}, expected [users, K={K}]")
        N = W.shape[0]
        report["N"] = N
        R = V @ W.T                                                                # [F, N]
        report["user_effective_rank"], s_users = effective_rank(R)
        report["user_rank_95"] = energy_rank(s_users)
        report["user_singular_values"] = s_users[:K].tolist()  # R = V W^T has rank <= K
        usage = _column_usage(W)
        report["usage"] = usage
        report["columns_in_use"] = int(sum(share >= IN_USE_SHARE for share in usage["top_share"]))
        r_norms = np.linalg.norm(R, axis=0)                                        # [N]
        R_unit = R / np.where(r_norms > 0, r_norms, 1.0)                           # [F, N]
        report["diversity"] = _pairwise_cosines(R_unit, seed)
        if v_ref is not None:
            c = R_unit.T @ v / max(np.linalg.norm(v), 1e-300)                      # [N]
            report["user_cos_ref"] = _quantiles(c)
        top = int(np.argmax(usage["top_share"]))
        if K > 1 and usage["top_share"][top] >= COLLAPSE_SHARE:
            reasons.append(f"column {top} is the largest weight of {usage['top_share'][top]:.1%} of "
                           f"the users (>= {COLLAPSE_SHARE:.0%}): everyone gets the same reward")
        unused = K - report["columns_in_use"]
        if unused > 0:
            warnings.append(f"{unused} of {K} columns are the largest weight of fewer than "
                            f"{IN_USE_SHARE:.0%} of the users")

    # Accuracy against the reference model, user by user.
    report["accuracy"] = None
    if acc is not None and acc_ref is not None:
        acc, acc_ref = np.asarray(acc, np.float64).reshape(-1), np.asarray(acc_ref, np.float64).reshape(-1)
        if acc.shape != acc_ref.shape or (report["N"] is not None and len(acc) != report["N"]):
            raise InputError(f"acc has {len(acc)} users, acc_ref {len(acc_ref)}, W {report['N']}")
        change = acc - acc_ref                                                     # [N]
        report["accuracy"] = {"mean": float(acc.mean()), "mean_ref": float(acc_ref.mean()),
                              "mean_change": float(change.mean()),
                              "gained": int((change > 1e-9).sum()), "lost": int((change < -1e-9).sum()),
                              "unchanged": int((np.abs(change) <= 1e-9).sum())}
        if change.mean() < 0:
            warnings.append(f"the personal rewards are less accurate than the reference model on "
                            f"average ({change.mean():+.4f}; {report['accuracy']['lost']} users lost)")

    report["collapsed"] = bool(reasons)
    report["collapse_reasons"] = reasons
    report["warnings"] = reasons + warnings
    return report


def _as_matrix(x, name):
    """Tensor or array -> float64 numpy matrix; InputError on NaN/inf or the wrong number of dims."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1 and name == "v_ref":
        x = x[:, None]
    if x.ndim != 2:
        raise InputError(f"{name} has shape {x.shape}, expected a matrix")
    if not np.isfinite(x).all():
        raise InputError(f"{name} has NaN or inf entries")
    return x


def _column_usage(W):
    """Per column of W [N, K]: weight_max, weight_mean, top_users (ties split evenly), top_share."""
    N = W.shape[0]
    is_top = W >= W.max(axis=1, keepdims=True) - 1e-9                              # [N, K]
    top_users = np.round((is_top / is_top.sum(axis=1, keepdims=True)).sum(axis=0), 9)  # [K]
    return {"weight_max": W.max(axis=0).tolist(), "weight_mean": W.mean(axis=0).tolist(),
            "top_users": top_users.tolist(), "top_share": (top_users / N).tolist()}


def _pairwise_cosines(R_unit, seed):
    """Quantiles of the cosines between distinct columns of R_unit [F, N] (unit columns)."""
    N = R_unit.shape[1]
    if N < 2:
        return None
    n_pairs = N * (N - 1) // 2
    if n_pairs <= DIVERSITY_MAX_PAIRS:
        i, j = np.triu_indices(N, k=1)                                             # every pair i < j
    else:
        rng = np.random.default_rng(seed)
        i = rng.integers(0, N, DIVERSITY_MAX_PAIRS)
        j = (i + rng.integers(1, N, DIVERSITY_MAX_PAIRS)) % N                      # j != i, uniform
    if N <= 8192:   # the Gram matrix [N, N] is one BLAS call; gathering [F, pairs] would take GBs
        c = (R_unit.T @ R_unit)[i, j]                                              # [pairs]
    else:           # users' rows gathered in chunks of pairs
        R = np.ascontiguousarray(R_unit.T)                                         # [N, F]
        chunk = max(1, (1 << 22) // R.shape[1])
        c = np.concatenate([(R[i[s:s + chunk]] * R[j[s:s + chunk]]).sum(1) for s in range(0, len(i), chunk)])
    return {**_quantiles(c), "pairs": int(len(c)), "sampled": bool(n_pairs > DIVERSITY_MAX_PAIRS)}


def _quantiles(x):
    q = np.quantile(x, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {"q05": float(q[0]), "q25": float(q[1]), "q50": float(q[2]), "q75": float(q[3]),
            "q95": float(q[4]), "mean": float(np.mean(x))}


def format_basis_report(report):
    """A basis_report as readable lines: a summary, one row per column, the users, the accuracy
    against the reference, and a loud WARNING line when the basis has collapsed."""
    K, lines = report["K"], []
    setting = ", ".join(f"{k}={v}" for k, v in report.get("setting", {}).items())
    lines.append(f"Basis report: V [{report['F']} x {K}]" + (f", {report['N']} users" if report["N"] else "")
                 + (f"  ({setting})" if setting else ""))
    if report["collapsed"]:
        lines.append("!" * 100)
        lines.append("WARNING: the basis has collapsed: " + "; ".join(report["collapse_reasons"]))
        lines.append("!" * 100)
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)
    lines.append(f"effective rank of V      {report['effective_rank']:.3f} of {K}   (exp entropy of the "
                 f"singular values of V with unit columns; 95% of the energy in {report['rank_95']})")
    if report["user_effective_rank"] is not None:
        lines.append(f"effective rank of users  {report['user_effective_rank']:.3f}   (of the reward vectors "
                     f"V w_i; 95% of their energy in {report['user_rank_95']})")
        lines.append(f"columns in use           {report['columns_in_use']} of {K}   "
                     f"(the largest weight of >= {IN_USE_SHARE:.0%} of the users)")
    lines.append(f"max |cos| between columns {report['max_abs_cos']:.4f}")
    lines.append("singular values of V     " + " ".join(f"{s:.4g}" for s in report["singular_values"][:12])
                 + (" ..." if K > 12 else ""))
    lines.append("")
    usage = report["usage"] or {}
    cos = np.abs(np.asarray(report["cos_columns"]) - np.eye(K))                    # [K, K]
    lines.append(f"{'col':>4} {'norm':>10} {'cos v_ref':>10} {'max|cos|':>9} {'w max':>7} {'w mean':>7} "
                 f"{'top users':>10} {'share':>7}")
    for j in range(K):
        row = [f"{j:>4}", f"{report['column_norms'][j]:>10.4g}",
               f"{fmt(report['cos_ref'][j] if report['cos_ref'] else None):>10}",
               f"{fmt(cos[j].max() if K > 1 else None, '.4f'):>9}"]
        if usage:
            row += [f"{usage['weight_max'][j]:>7.3f}", f"{usage['weight_mean'][j]:>7.3f}",
                    f"{usage['top_users'][j]:>10.4g}", f"{usage['top_share'][j]:>7.1%}"]
        lines.append(" ".join(row))
    if report["diversity"]:
        d = report["diversity"]
        lines.append("")
        lines.append(f"cos between users' rewards  q05 {d['q05']:+.3f}  q25 {d['q25']:+.3f}  median "
                     f"{d['q50']:+.3f}  q75 {d['q75']:+.3f}  q95 {d['q95']:+.3f}  mean {d['mean']:+.3f}"
                     f"  ({d['pairs']} pairs{', sampled' if d['sampled'] else ''})")
    if report["user_cos_ref"]:
        c = report["user_cos_ref"]
        lines.append(f"cos of users' rewards with v_ref  q05 {c['q05']:+.3f}  median {c['q50']:+.3f}  "
                     f"q95 {c['q95']:+.3f}  mean {c['mean']:+.3f}")
    if report["accuracy"]:
        a = report["accuracy"]
        lines.append(f"held-out accuracy        {a['mean']:.4f} vs reference {a['mean_ref']:.4f} "
                     f"({a['mean_change']:+.4f}); users gained {a['gained']}, lost {a['lost']}, "
                     f"unchanged {a['unchanged']}")
    if report["warnings"]:
        lines.append("")
        lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def basis_report_records(reports):
    """One flat row per report: the setting's entries (method, K, alpha, ...), then the headline
    numbers. K is the setting's K when it has one (K = 0, the reference model, has a 1-column V)."""
    records = []
    for r in reports:
        usage, div, acc = r.get("usage") or {}, r.get("diversity") or {}, r.get("accuracy") or {}
        row = {"method": None, "K": r["K"], "alpha": None}
        row.update({k: v for k, v in r.get("setting", {}).items() if isinstance(v, (int, float, str, bool))})
        row.update({"columns": r["K"], "effective_rank": r["effective_rank"],
                    "user_effective_rank": r["user_effective_rank"], "rank_95": r["rank_95"],
                    "user_rank_95": r["user_rank_95"], "columns_in_use": r["columns_in_use"],
                    "max_abs_cos": r["max_abs_cos"],
                    "top_share_max": max(usage["top_share"]) if usage else None,
                    "user_cos_median": div.get("q50"), "accuracy": acc.get("mean"),
                    "accuracy_change": acc.get("mean_change"), "users_gained": acc.get("gained"),
                    "users_lost": acc.get("lost"), "collapsed": r["collapsed"],
                    "warnings": " | ".join(r["warnings"])})
        records.append(row)
    return records


def plot_basis_reports(reports, path, title=""):
    """One figure across K, a line per (method, alpha): effective rank of V and of the users'
    rewards and the users' rank_95 (with y = K dotted), columns in use, max |cos| between columns;
    collapsed bases marked with a red x."""
    plt = _pyplot()
    records = basis_report_records(reports)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    series = sorted({(str(r["method"]), str(r["alpha"])) for r in records})
    for n, (method, alpha) in enumerate(series):
        rows = sorted((r for r in records if (str(r["method"]), str(r["alpha"])) == (method, alpha)),
                      key=lambda r: r["K"])
        label = ", ".join(([method] if method != "None" else []) + ([f"alpha={alpha}"] if alpha != "None" else []))
        K = [r["K"] for r in rows]
        color = f"C{n}"
        panels = ((axes[0], "effective_rank", "-", "V"), (axes[0], "user_effective_rank", "--", "users V w"),
                  (axes[0], "user_rank_95", ":", "users: directions of 95% energy"),
                  (axes[1], "columns_in_use", "-", ""), (axes[2], "max_abs_cos", "-", ""))
        for ax, key, ls, what in panels:
            pts = [(k, r[key]) for k, r in zip(K, rows) if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), ls=ls, marker="o", color=color,
                        label=": ".join(x for x in (label, what) if x) or None)
            bad = [(k, r[key]) for k, r in zip(K, rows) if r[key] is not None and r["collapsed"]]
            if bad:
                ax.plot(*zip(*bad), ls="none", marker="x", ms=10, color="red")
    Ks = sorted({r["K"] for r in records})
    for ax in axes[:2]:
        ax.plot(Ks, Ks, ls=":", color="gray", label="y = K")
    axes[2].axhline(COLLAPSE_COS, ls=":", color="red", label=f"collapse: |cos| > {COLLAPSE_COS}")
    axes[0].axhline(COLLAPSE_RANK, ls=":", color="red", label=f"collapse: rank < {COLLAPSE_RANK}")
    axes[0].set(xlabel="K", ylabel="effective rank", title=f"{title} effective rank".strip())
    axes[1].set(xlabel="K", ylabel="columns", title="columns in use (largest weight of >= 1% of users)")
    axes[2].set(xlabel="K", ylabel="max |cos|", title="max |cos| between two columns (x: collapsed)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save_figure(fig, path)


# Interpretation: what a column rewards, read off the dataset's own conversations. A column's sign
# is meaningful (users mix columns with non-negative weights), so "highest" is what it promotes.

TEXT_CHARS = 240   # characters of a message kept in an interpretation row (the rest is cut with "...")


def interpret_basis(V, table, conversations, v_ref=None, pairs=None, top=5, max_chars=TEXT_CHARS):
    """For every column j of V [F, K]: the `top` conversations of the embedding table [E, F] it
    scores highest and lowest, and (with v_ref [F, 1] and pairs) the `top` pairs on which it most
    disagrees with v_ref. conversations: {row: messages} or a DataFrame with columns row, messages
    (a list of {"role", "content"} or its JSON); pairs: a DataFrame with columns chosen, rejected
    (rows of the table; duplicates counted once).

    A disagreement is a pair whose margins phi(chosen)-phi(rejected) under column j and under v_ref
    have opposite signs; they are ranked by min(|m_j| / sd_j, |m_ref| / sd_ref), sd the margins'
    standard deviation over all pairs: both must be confident, in their own units.
    -> list of flat records: column, kind (highest / lowest / disagrees_with_ref), rank, row(s),
    score or margins (and score_ref / margin_ref), and the text cut to max_chars per message:
    context (the messages before the last) and reply (the last), or chosen / rejected replies."""
    V = torch.as_tensor(V, dtype=torch.float32)                                    # [F, K]
    if V.dim() != 2 or V.shape[0] != table.shape[1]:
        raise InputError(f"V has shape {tuple(V.shape)}, the embeddings F={table.shape[1]}")
    cols = V if v_ref is None else torch.cat([V, torch.as_tensor(v_ref, dtype=torch.float32).reshape(-1, 1)], 1)
    scores = _table_scores(table, cols)                                            # [E, K (+1)]
    texts = _conversation_lookup(conversations)
    K, top = V.shape[1], min(top, len(table))
    records = []
    for j in range(K):
        for kind, descending in (("highest", True), ("lowest", False)):
            order = torch.argsort(scores[:, j], descending=descending)[:top]
            for rank, row in enumerate(order.tolist()):
                rec = {"column": j, "kind": kind, "rank": rank, "row": row, "score": float(scores[row, j])}
                if v_ref is not None:
                    rec["score_ref"] = float(scores[row, K])
                records.append({**rec, **_message_text(texts, row, max_chars)})
    if v_ref is not None and pairs is not None and len(pairs):
        unique = pairs[["chosen", "rejected"]].drop_duplicates()
        chosen = torch.tensor(unique["chosen"].to_numpy(), dtype=torch.long)       # [P]
        rejected = torch.tensor(unique["rejected"].to_numpy(), dtype=torch.long)   # [P]
        margins = scores[chosen] - scores[rejected]                                # [P, K + 1]
        sd = margins.std(0).clamp_min(1e-12) if len(margins) > 1 else torch.ones(K + 1)
        confident = (margins / sd).abs()                                           # [P, K + 1]
        for j in range(K):
            disagree = torch.sign(margins[:, j]) * torch.sign(margins[:, K]) < 0   # [P]
            strength = torch.minimum(confident[:, j], confident[:, K]).masked_fill(~disagree, -1.0)
            order = torch.argsort(strength, descending=True)[:min(top, int(disagree.sum()))]
            for rank, p in enumerate(order.tolist()):
                c, r = int(chosen[p]), int(rejected[p])
                chosen_text, rejected_text = _message_text(texts, c, max_chars), _message_text(texts, r, max_chars)
                records.append({"column": j, "kind": "disagrees_with_ref", "rank": rank, "chosen_row": c,
                                "rejected_row": r, "margin": float(margins[p, j]),
                                "margin_ref": float(margins[p, K]), "context": chosen_text["context"],
                                "chosen": chosen_text["reply"], "rejected": rejected_text["reply"]})
    return records


def format_interpretation(records, width=100):
    """interpret_basis' records as a readable text, column by column."""
    lines = []
    for j in sorted({r["column"] for r in records}):
        lines.append("=" * width)
        lines.append(f"column {j}")
        for kind, title in (("highest", "scores highest"), ("lowest", "scores lowest"),
                            ("disagrees_with_ref", "disagrees most with v_ref (chosen vs rejected)")):
            rows = [r for r in records if r["column"] == j and r["kind"] == kind]
            if not rows:
                continue
            lines.append(f"-- {title}")
            for r in rows:
                if kind == "disagrees_with_ref":
                    lines.append(f"  [{r['rank']}] margin {r['margin']:+.3g} (v_ref {r['margin_ref']:+.3g})  "
                                 f"rows {r['chosen_row']} > {r['rejected_row']}")
                    lines.append(f"      context:  {_one_line(r['context'], width - 16)}")
                    lines.append(f"      chosen:   {_one_line(r['chosen'], width - 16)}")
                    lines.append(f"      rejected: {_one_line(r['rejected'], width - 16)}")
                else:
                    ref = f" (v_ref {r['score_ref']:+.3g})" if "score_ref" in r else ""
                    lines.append(f"  [{r['rank']}] score {r['score']:+.3g}{ref}  row {r['row']}")
                    lines.append(f"      context: {_one_line(r['context'], width - 15)}")
                    lines.append(f"      reply:   {_one_line(r['reply'], width - 15)}")
    return "\n".join(lines)


def _table_scores(table, V):
    """table [E, F] (any float dtype) @ V [F, K] in float32, in slices: no float32 copy of the table."""
    V = V.to(table.device, torch.float32)
    return torch.cat([t.float() @ V for t in table.split(1 << 15)]).cpu()          # [E, K]


def _conversation_lookup(conversations):
    """{row: messages} from a dict or a DataFrame with columns row, messages (lists or JSON)."""
    if isinstance(conversations, dict):
        return conversations
    if "row" not in conversations.columns or "messages" not in conversations.columns:
        raise InputError(f"conversations need columns row and messages, got {list(conversations.columns)}")
    return dict(zip(conversations["row"].tolist(), conversations["messages"].tolist()))


def _message_text(texts, row, max_chars):
    """-> {"context": the messages before the last as 'role: text | ...', "reply": the last message},
    each cut to max_chars."""
    messages = texts.get(row)
    if messages is None:
        return {"context": "", "reply": f"<row {row}: no conversation>"}
    if isinstance(messages, str):
        messages = json.loads(messages)
    context = " | ".join(f"{m['role']}: {_cut(m['content'], max_chars)}" for m in messages[:-1])
    return {"context": _cut(context, 2 * max_chars), "reply": _cut(messages[-1]["content"], max_chars)}


def _cut(text, n):
    text = " ".join(str(text).split())  # one line: newlines and runs of spaces become one space
    return text if len(text) <= n else text[:n - 3] + "..."


def _one_line(text, n):
    return _cut(text, max(n, 10))


# Personalized scoring: new users' weights from a handful of their (chosen, rejected) pairs, with
# a saved method's shared part fixed, and their rewards of any candidate responses.


def fit_new_users(method, chosen, rejected, user=None, n_users=None):
    """Fit new users' parameters (LoRe: simplex weights w [K]) from their preference pairs with the
    method's shared part fixed (a method from load_method, or just fitted), all users at once
    through the method's own fit_users (lore: PersonalizeBatch, the few-shot recipe of the
    checkpoint's hyperparameters). Seed the global generator (set_seed) for repeatable weights.

    chosen, rejected [P, F]: embeddings of pair p's chosen and rejected response; user [P]: its
    user in 0..N-1 (default: all one user), n_users N (default max(user) + 1; every user needs a
    pair). -> U [N, U] float32 on the method's device."""
    chosen, rejected = _check_matrix(chosen, "chosen"), _check_matrix(rejected, "rejected")  # [P, F]
    if chosen.shape != rejected.shape or len(chosen) == 0:
        raise InputError(f"chosen {tuple(chosen.shape)} and rejected {tuple(rejected.shape)} must both be "
                         f"[P, F] with P >= 1")
    P = len(chosen)
    user = torch.zeros(P, dtype=torch.long) if user is None else torch.as_tensor(user, dtype=torch.long).cpu()
    if user.shape != (P,) or user.min() < 0:
        raise InputError(f"user must hold one index >= 0 per pair ({P}), got shape {tuple(user.shape)}")
    n_users = int(user.max()) + 1 if n_users is None else int(n_users)
    order = torch.argsort(user, stable=True)    # Pairs wants each user's pairs contiguous
    table = torch.cat([chosen[order], rejected[order]])                            # [2P, F]
    pairs = pack(Pairs(user[order], n_users, table=table, chosen=torch.arange(P), rejected=torch.arange(P, 2 * P)),
                 "new users' pairs", method.device)
    return method.fit_users(pairs).float()                                         # [N, U]


def score_items(method, embeddings, U):
    """Every user's reward of every item: embeddings [C, F] (any float dtype), U [N, U] the users'
    parameters -> [N, C] float32 on the CPU. For LoRe, score[i, c] = phi_c^T V w_i."""
    U = _check_matrix(U, "U").to(method.device)                                    # [N, U]
    with torch.no_grad():
        Z = _chunked(method.item_features, torch.as_tensor(embeddings).to(method.device))   # [C, D]
        N, C = len(U), len(Z)
        out = torch.empty(N, C)
        step = max(1, (1 << 20) // max(C, 1))  # users per block: [block * C, D] temporaries stay small
        for i in range(0, N, step):
            n = min(step, N - i)
            rewards = method.reward(Z.repeat(n, 1), U[i:i + n].repeat_interleave(C, 0))     # [n * C]
            out[i:i + n] = rewards.reshape(n, C).float().cpu()
    return out


def score_conversations(method, U, conversations, model_name_or_path, out_path, **embed_kwargs):
    """Embed conversations (lists of {"role", "content"}) with the reward model the method was
    fitted on (utils.embed_conversations, cached in out_path) and score them for every user.
    -> (scores [N, C], embeddings [C, F])."""
    embeddings = embed_conversations(conversations, out_path, model_name_or_path, **embed_kwargs)   # [C, F]
    F_method = method_features(method)
    if F_method is not None and embeddings.shape[1] != F_method:
        raise InputError(f"the reward model {model_name_or_path} gives F={embeddings.shape[1]} but the "
                         f"checkpoint was fitted on F={F_method}: use the model its data was embedded with")
    return score_items(method, embeddings, U), embeddings


def method_features(method):
    """F of a fitted method's shared part, when it exposes one (LoRe: V [F, K])."""
    V = getattr(method, "V", None)
    return None if V is None else V.shape[0]


def method_basis(method):
    """The basis V [F, K] of a fitted linear method (LoRe's entries; K = 0 gives V = v_ref, one
    column); InputError for a method without one."""
    V = getattr(method, "V", None)
    if V is None:
        raise InputError(f"method {method.name} has no basis V to read (the basis tools read LoRe's V)")
    return V


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------
# The four pair sets, one vocabulary everywhere (records, CSV columns, data files, figures):
#   seen_train      seen users' training pairs: the shared part and their weights are fitted here
#   seen_test       seen users' held-out pairs (unseen prompts)
#   unseen_fewshot  unseen users' few pairs: only their weights are fitted here, the shared part fixed
#   unseen_test     unseen users' held-out pairs
SETS = ("seen_train", "seen_test", "unseen_fewshot", "unseen_test")


def sweep(*, K_list, seen_train, seen_test, unseen_fewshot, unseen_test, methods=("lore",),
          alpha_list=(0.0,), v_ref=None, hparams=None, device=None, out_dir=None, seed=None):
    """Fit every method for every (alpha, K) (alpha outer, K inner; a method that does not use
    alpha once per K) on the seen users, fit the unseen users' parameters on their few-shot pairs
    with the shared part fixed, and measure every user's accuracy on the four pair sets.

    The pair sets are Pairs or the seed's lists of per-user [m_i, F] tensors. hparams: {method:
    {hyperparameter: value}} overriding the method's defaults. out_dir: every fit is saved there as
    checkpoint_name(method) (the shared part, W of the seen users, W_unseen). seed: each setting
    starts from a generator seeded by (seed, method, K, alpha), so a setting's numbers do not
    depend on which other settings ran; None continues the global generator (the reference's way).
    With out_dir, a method with a linear basis V also gets its basis_report (against v_ref, with
    the seen users' held-out accuracy against the reference model's) beside its checkpoint, as
    {checkpoint}.report.json.
    -> one record per fit: method, K, alpha, then for each set its mean accuracy over users and
    `{set}_std`, the std across users times 0.25 (the reference's convention)."""
    sets = _check_sets(dict(seen_train=seen_train, seen_test=seen_test, unseen_fewshot=unseen_fewshot,
                            unseen_test=unseen_test), device)
    records, acc_ref = [], None
    if v_ref is not None and out_dir is not None:   # the reference model's accuracy, for the reports
        acc_ref = per_user_accuracy(sets["seen_test"], _check_v_ref(v_ref), torch.ones(sets["seen_test"].n_users, 1))
    for method in _settings(methods, K_list, alpha_list, v_ref, hparams, sets["seen_train"]):
        _seed_setting(seed, method)
        U = method.fit(sets["seen_train"])                                         # [N, U]
        U_new = method.fit_users(sets["unseen_fewshot"])                           # [N', U]
        record, acc = method.setting(), {}
        for name in SETS:
            acc[name] = accuracy(method, sets[name], U if name.startswith("seen") else U_new)   # [N]
            record.update({name: float(acc[name].mean()), f"{name}_std": STD_FACTOR * float(acc[name].std())})
        print(f"{method}: " + "  ".join(f"{name} {record[name]:.4f}" for name in SETS))
        if out_dir is not None:
            path = os.path.join(out_dir, checkpoint_name(method))
            save_method(path, method, W=U, W_unseen=U_new)
            if method.linear:
                write_json(path.removesuffix(".safetensors") + ".report.json",
                           basis_report(method.V, U, v_ref, acc["seen_test"], acc_ref, method.setting()))
        records.append(record)
    return records


def sweep_shots(*, K_list, shots, trials, seen_train, unseen_fewshot, unseen_test, methods=("lore",),
                alpha_list=(0.0,), v_ref=None, hparams=None, device=None, seed=None):
    """Accuracy of unseen users against the number of shots. For every method and (alpha, K): fit
    on the seen users; then for every shot count, `trials` times, draw `shots` of each unseen
    user's few-shot pairs (sample_shots: pairs, or whole groups such as PRISM's dialogs), fit the
    users' parameters on them with the shared part fixed, and measure the accuracy on the drawn
    shots and on the held-out pairs. Item features are computed once per fit (featurize), so a
    trial costs a fit in the method's small feature space.
    -> one record per (method, alpha, K, shots): unseen_fewshot and unseen_test, the mean over
    trials of the users' mean accuracy, and their `_std` over trials."""
    _check_trials(trials)
    shots = _int_list(shots, "shots", least=1)
    sets = _check_sets(dict(seen_train=seen_train, unseen_fewshot=unseen_fewshot, unseen_test=unseen_test), device)
    records = []
    for method in _settings(methods, K_list, alpha_list, v_ref, hparams, sets["seen_train"]):
        _seed_setting(seed, method)
        method.fit(sets["seen_train"])
        pool, test = featurize(method, sets["unseen_fewshot"]), featurize(method, sets["unseen_test"])
        for n_shots in tqdm(shots, desc=f"{method} shots", leave=False, disable=None):
            acc = np.zeros((2, trials))
            for t in range(trials):
                drawn = sample_shots(pool, n_shots)
                U_new = method.fit_users(drawn)                                    # [N', U]
                acc[:, t] = accuracy(method, drawn, U_new).mean(), accuracy(method, test, U_new).mean()
            records.append({**method.setting(), "shots": n_shots,
                            "unseen_fewshot": acc[0].mean(), "unseen_fewshot_std": acc[0].std(),
                            "unseen_test": acc[1].mean(), "unseen_test_std": acc[1].std()})
            print(f"{method} shots {n_shots:>4}: unseen_fewshot {acc[0].mean():.4f} +- {acc[0].std():.4f}"
                  f"  unseen_test {acc[1].mean():.4f} +- {acc[1].std():.4f}")
    return [{k: float(v) if isinstance(v, np.floating) else v for k, v in r.items()} for r in records]


def run(K_list, alpha_list, V_final, train_features, test_features_sparse, train_features_unseen,
        test_features_sparse_unseen, N, N_unseen, device=None, *, num_iterations=1000,
        learning_rate=0.5, fewshot_iterations=500, fewshot_learning_rate=0.1, out_dir=None):
    """The reference pipeline with method lore (sweep's arguments by the reference's positions).
    Returns 8 numpy arrays of length len(alpha_list) * len(K_list) (alpha outer, K inner): the mean
    accuracies of seen_train, seen_test, unseen_fewshot, unseen_test, then their std across users
    times 0.25. With out_dir, every fit is saved there as lore_K{K}_alpha{a}.safetensors."""
    return _run_adapter("lore", **locals())


def run_regularized(K_list, alpha_list, V_final, train_features, test_features_sparse,
                    train_features_unseen, test_features_sparse_unseen, N, N_unseen, device=None, *,
                    num_iterations=20000, learning_rate=0.5, fewshot_iterations=500,
                    fewshot_learning_rate=0.5, out_dir=None):
    """run() with method lore_regularized (cosine pull, warm-up, pruning); fits are saved as
    lore_regularized_K{K}_alpha{a}.safetensors in out_dir (the caller's choice, never a fixed path)."""
    return _run_adapter("lore_regularized", **locals())


def run_few_shot_vary_shots(trials, alpha_list, K_list, num_shots, train_features,
                            train_features_unseen, test_features_sparse_unseen, V_final, N, N_unseen,
                            device=None, *, num_iterations=500, learning_rate=0.5,
                            fewshot_iterations=500, fewshot_learning_rate=0.1):
    """sweep_shots with method lore, by the reference's positions. Returns 4 numpy arrays
    [len(alpha_list) * len(K_list), len(num_shots)] (alpha outer, K inner): mean few-shot accuracy,
    its std over trials, mean held-out accuracy, its std over trials."""
    _check_trials(trials)
    _check_grid(K_list, alpha_list)
    _int_list(num_shots, "num_shots", least=1)
    data = _check_reference_data(dict(train_features=train_features, train_features_unseen=train_features_unseen,
                                      test_features_sparse_unseen=test_features_sparse_unseen), N, N_unseen, device)
    records = sweep_shots(K_list=K_list, alpha_list=alpha_list, shots=num_shots, trials=trials, v_ref=V_final,
                          seen_train=data["train_features"], unseen_fewshot=data["train_features_unseen"],
                          unseen_test=data["test_features_sparse_unseen"], device=device,
                          hparams={"lore": _reference_hparams(num_iterations, learning_rate, fewshot_iterations,
                                                              fewshot_learning_rate)})
    shape = (len(alpha_list) * len(K_list), len(num_shots))
    return tuple(np.array([r[key] for r in records]).reshape(shape)
                 for key in ("unseen_fewshot", "unseen_fewshot_std", "unseen_test", "unseen_test_std"))


def _run_adapter(name, K_list, alpha_list, V_final, train_features, test_features_sparse,
                 train_features_unseen, test_features_sparse_unseen, N, N_unseen, device, num_iterations,
                 learning_rate, fewshot_iterations, fewshot_learning_rate, out_dir):
    _check_grid(K_list, alpha_list)
    data = _check_reference_data(dict(train_features=train_features, test_features_sparse=test_features_sparse,
                                      train_features_unseen=train_features_unseen,
                                      test_features_sparse_unseen=test_features_sparse_unseen), N, N_unseen, device)
    records = sweep(methods=[name], K_list=K_list, alpha_list=alpha_list, v_ref=V_final, device=device,
                    seen_train=data["train_features"], seen_test=data["test_features_sparse"],
                    unseen_fewshot=data["train_features_unseen"], unseen_test=data["test_features_sparse_unseen"],
                    hparams={name: _reference_hparams(num_iterations, learning_rate, fewshot_iterations,
                                                      fewshot_learning_rate)}, out_dir=out_dir)
    return (*(np.array([r[s] for r in records]) for s in SETS),
            *(np.array([r[f"{s}_std"] for r in records]) for s in SETS))


def _reference_hparams(num_iterations, learning_rate, fewshot_iterations, fewshot_learning_rate):
    return {"iters": num_iterations, "lr": learning_rate, "fewshot_iters": fewshot_iterations,
            "fewshot_lr": fewshot_learning_rate}


def _check_grid(K_list, alpha_list):
    """A sweep's grid: a list of integer K and a list of alpha >= 0 (a swapped argument, such as
    run()'s order given to run_few_shot_vary_shots, fails here with the name at fault)."""
    _int_list(K_list, "K_list", least=0)
    if not isinstance(alpha_list, (list, tuple, np.ndarray)) or len(alpha_list) == 0:
        raise InputError(f"alpha_list must be a non-empty list of numbers >= 0, got {_short(alpha_list)}")
    for alpha in alpha_list:
        _check_alpha(alpha, "alpha_list")


def _check_reference_data(data, N, N_unseen, device):
    """Pack the reference pipelines' per-user lists (checking them once) and check the user counts."""
    for name, n in (("N", N), ("N_unseen", N_unseen)):
        if not _is_int(n):
            raise InputError(f"{name} must be an integer (a user count), got {n!r}")
    packed = {name: pack(x, name, device) for name, x in data.items()}
    for name, pairs in packed.items():
        n = N_unseen if "unseen" in name else N
        if pairs.n_users != n:
            raise InputError(f"N={N}, N_unseen={N_unseen} but {name} has {pairs.n_users} users")
        if pairs.n_features != packed["train_features"].n_features:
            raise InputError(f"{name} has F={pairs.n_features}, train_features F={packed['train_features'].n_features}")
    return packed


def _check_trials(trials):
    if not _is_int(trials) or trials < 1:
        raise InputError(f"trials must be an integer >= 1, got {_short(trials)}")


def _short(value):
    """repr for messages: a tensor or a long list is named by its type and shape, not printed."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__} of length {len(value)}"


def _int_list(values, what, least):
    """[int] from a non-empty list of integers >= least; what: 'K_list' or 'shots'."""
    item = what.removesuffix("_list")
    if not isinstance(values, (list, tuple, np.ndarray)) or len(values) == 0:
        raise InputError(f"{what} must be a non-empty list of integers, got {_short(values)}")
    for v in values:
        if not _is_int(v):
            raise InputError(f"{what} must be a list of integers, got {list(values)!r} ({v!r} is not an integer)")
        if v < least:
            raise InputError(f"{item} must be >= {least}, got {what}={list(values)!r}")
    return [int(v) for v in values]


def _check_sets(sets, device):
    """The pair sets as checked Pairs on one device, with one F, the seen sets with the same users
    and the unseen sets with the same users."""
    device = resolve_device(device)
    sets = {name: pack(pairs, name, device) for name, pairs in sets.items()}
    F = {pairs.n_features for pairs in sets.values()}
    if len(F) > 1:
        raise InputError("the pair sets have different F: " + ", ".join(f"{n} F={p.n_features}" for n, p in sets.items()))
    for group in ("seen", "unseen"):
        users = {name: p.n_users for name, p in sets.items() if name.startswith(group)}
        if len(set(users.values())) > 1:
            raise InputError(f"the {group} users' pair sets have different user counts: {users}")
    return sets


def _settings(methods, K_list, alpha_list, v_ref, hparams, seen_train):
    """The Method objects of a sweep, in order: method, then alpha, then K; checked before any fit."""
    if isinstance(methods, str) or not methods:
        raise InputError(f"methods must be a non-empty list of names, got {methods!r}")
    _check_grid(K_list, alpha_list)
    hparams = hparams or {}
    unknown = sorted(set(hparams) - set(methods))
    if unknown:
        raise InputError(f"hparams for method(s) {unknown} that do not run (methods: {list(methods)})")
    if v_ref is not None:
        v_ref = _check_v_ref(v_ref)                                                # [F, 1]
        if v_ref.shape[0] != seen_train.n_features:
            raise InputError(f"v_ref has {v_ref.shape[0]} features but the pairs have F={seen_train.n_features}")
    settings = []
    for name in methods:
        cls = get_method(name)
        if not cls.linear and seen_train.X is not None:
            raise InputError(f"method {name} needs both embeddings of every pair (the table form of Pairs); "
                             f"difference rows suffice only for linear methods ({', '.join(n for n, c in METHODS.items() if c.linear)})")
        for alpha in (alpha_list if cls.uses_alpha else [None]):
            settings += [cls(K, alpha, v_ref, seen_train.device, **hparams.get(name, {}))
                         for K in K_list if K >= cls.min_K]
    if not settings:
        raise InputError(f"no setting to fit: K_list {K_list} is below every method's smallest K")
    return settings


def _seed_setting(seed, method):
    if seed is not None:
        key = json.dumps([seed, method.name, method.K, method.alpha]).encode()
        torch.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)


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
    `featurized`: the Method whose item features the rows hold instead of embeddings (featurize).
    `checked`: the data passed pack's checks; pack does not scan checked Pairs again.
    """
    user: torch.Tensor                     # [P] long, pairs of a user are contiguous
    n_users: int
    X: torch.Tensor = None                 # [P, F] float32
    table: torch.Tensor = None             # [E, F] any float dtype (bfloat16 on disk)
    chosen: torch.Tensor = None            # [P] long rows of table
    rejected: torch.Tensor = None          # [P] long rows of table
    group: torch.Tensor = None             # [P] long, ids unique within a user
    featurized: object = None
    checked: bool = False

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
        return replace(self, user=move(self.user), X=move(self.X), table=move(self.table),
                       chosen=move(self.chosen), rejected=move(self.rejected), group=move(self.group))


def pack(features, name="features", device=None):
    """A list of N per-user tensors [m_i, F] (the seed's format) -> Pairs in float32 on `device`.
    Pairs pass through (moved to `device`). The data is checked here, once: the errors name the
    user, the row and the shape at fault, and checked Pairs are not scanned again."""
    if isinstance(features, Pairs):
        pairs = features if device is None else features.to(device)
        if pairs.checked:
            return pairs
    else:
        if isinstance(features, torch.Tensor) or not isinstance(features, (list, tuple)):
            raise InputError(f"{name}: expected a list of per-user [pairs, F] tensors or Pairs, got "
                             f"{type(features).__name__}")
        device = resolve_device(device)
        features = [torch.as_tensor(x) for x in features]
        if len(features) == 0:
            raise InputError(f"{name}: no users (an empty list)")
        n_features = features[0].shape[-1] if features[0].dim() == 2 else None
        for i, x in enumerate(features):
            if x.dim() != 2 or x.shape[1] != n_features or not (x.is_floating_point() or len(x) == 0):
                raise InputError(f"{name}[{i}] has shape {tuple(x.shape)} ({x.dtype}): every user needs "
                                 f"float [pairs, F] with the same F (user 0 has F={n_features})")
        X = torch.cat([x.to(device, torch.float32) for x in features])              # [P, F]
        counts = torch.tensor([len(x) for x in features], device=device)
        user = torch.repeat_interleave(torch.arange(len(features), device=device), counts)
        pairs = Pairs(user, len(features), X=X)
    _check_pairs(pairs, name)
    return replace(pairs, checked=True)


def _check_pairs(pairs, name):
    if pairs.n_users == 0:
        raise InputError(f"{name}: no users")
    if len(pairs) and (pairs.user.min() < 0 or pairs.user.max() >= pairs.n_users
                       or (pairs.user[1:] < pairs.user[:-1]).any()):
        raise InputError(f"{name}: user indices must lie in [0, {pairs.n_users}) with each user's pairs contiguous")
    counts = pairs.counts()
    if (counts == 0).any():
        raise InputError(f"{name}: user {int(torch.nonzero(counts == 0)[0])} has no pairs")
    if pairs.X is None:
        E = len(pairs.table)
        for side in ("chosen", "rejected"):
            rows = getattr(pairs, side)
            if rows.dtype != torch.long or rows.shape != pairs.user.shape:
                raise InputError(f"{name}: {side} must be [P] row indices (long), got {tuple(rows.shape)} {rows.dtype}")
            bad = (rows < 0) | (rows >= E)
            if bad.any():
                p = int(torch.nonzero(bad)[0])
                raise InputError(f"{name}: pair {p} (user {int(pairs.user[p])}) has {side} row {int(rows[p])}, "
                                 f"outside the {E} rows of the embedding table")
    values = pairs.X if pairs.X is not None else pairs.table
    if values.dim() != 2 or not values.is_floating_point():
        raise InputError(f"{name}: the rows must be a float [rows, F] matrix, got {tuple(values.shape)} {values.dtype}")
    bad = _first_nonfinite_row(values)
    if bad is not None:
        if pairs.X is not None:
            u = int(pairs.user[bad])
            where = f"user {u} has NaN or inf in its features (its pair {bad - int(pairs.counts()[:u].sum())})"
        else:
            where = f"embedding row {bad} has NaN or inf"
        raise InputError(f"{name}: {where}")


def _first_nonfinite_row(values, chunk=1 << 14):
    """Index of the first row of [n, F] with a NaN or inf, or None. Per chunk, the largest |value|
    is finite unless some value is not (max propagates NaN): one read, no [n, F] temporary, and no
    sum that could overflow on finite values near the float32 maximum."""
    for start in range(0, len(values), chunk):
        block = values[start:start + chunk]
        if len(block) and not torch.isfinite(block.abs().amax()):
            return start + int(torch.nonzero(~torch.isfinite(block).all(dim=1))[0])
    return None


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
    sim = simulate_pairs(reward_tensor, W, sample_percentage)
    pairs = Pairs(sim["user"], len(W), table=table, chosen=sim["chosen"], rejected=sim["rejected"])
    return pairs.to(resolve_device(device))


def simulate_pairs(reward_tensor, W, sample_percentage):
    """The pairs of simulated users as indices: per user, floor(sample_percentage * S) prompts drawn
    without replacement (NumPy's generator), and on each the best minus the worst of its R
    responses under the user's mixture W [N, M] of the reward models' scores reward_tensor
    [S, R, M]. -> dict of [P] long tensors: user, prompt, chosen and rejected (response r of
    prompt s is row s * R + r), draw (the pair's rank in its user's random draw)."""
    S, R, _ = np.shape(reward_tensor)
    idx = torch.as_tensor(_sample_prompts(len(W), S, sample_percentage))          # [N, m]
    chosen, rejected = _simulate_choices(reward_tensor, W)                         # [N, S]
    user = torch.arange(len(W)).repeat_interleave(idx.shape[1])                    # [P]
    prompt = idx.reshape(-1)                                                       # [P]
    return {"user": user, "prompt": prompt, "chosen": prompt * R + chosen[user, prompt],
            "rejected": prompt * R + rejected[user, prompt], "draw": torch.arange(idx.shape[1]).repeat(len(W))}


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


# A prepared data folder, the same for every dataset (write_data_folder writes it, load_data reads it):
#   embeddings.safetensors  {"embeddings": [E, F]}: one row per distinct conversation
#   conversations.parquet   row (of the table), messages (JSON list of {"role", "content"})
#   pairs.parquet           set (one of SETS), user, chosen, rejected (rows of the table), and where
#                           they apply group (pairs drawn together: a PRISM dialog) and draw (the
#                           rank of a few-shot pair in its user's random draw: the first n of them
#                           are a uniform sample of n), plus the dataset's own columns
#   v_ref.safetensors       {"v_ref": [F, 1]}: the reward model's head
#   data.json               dataset, users {"seen": [...], "unseen": [...]} (the rows of W and
#                           W_unseen), the pair counts, the prepare config, and the identity of the
#                           embeddings and the hashes of the other files: written last, it is what
#                           makes the folder complete, and load_data refuses files of another run
DATA_FILES = ("pairs.parquet", "conversations.parquet", "v_ref.safetensors")


@dataclass
class Data:
    """A prepared dataset, as load_data returns it."""
    table: torch.Tensor    # [E, F] the embedding table (dtype as stored), on the device
    v_ref: torch.Tensor    # [F, 1] float32
    sets: dict             # name in SETS -> checked Pairs (table form)
    users: dict            # {"seen": [ids], "unseen": [ids]}: the users of the sets, in order
    info: dict             # data.json
    folder: str


def load_data(folder, device=None, fewshot_pairs=None):
    """The four pair sets of a prepared data folder (see DATA_FILES), checked once, here: the files
    belong together, the table is finite, every pair points into it, every user has pairs.
    fewshot_pairs: keep only the first n drawn few-shot pairs of each unseen user (the recipe's
    few-shot size, where prepare.py drew a larger pool for vary_fewshot.py). -> Data."""
    device = resolve_device(device)
    info_path = os.path.join(folder, "data.json")
    if not os.path.isfile(info_path):
        raise InputError(f"{folder}: no data.json, so not a prepared data folder (or its prepare.py did not "
                         f"finish): run prepare.py")
    info = read_json(info_path)
    for key in ("dataset", "users", "embeddings", "files"):
        if key not in info:
            raise InputError(f"{info_path}: no {key!r}: not written by prepare.py (rerun it)")
    for name, digest in info["files"].items():
        if _file_digest(os.path.join(folder, name)) != digest:
            raise InputError(f"{os.path.join(folder, name)} is not the file data.json was written with (changed "
                             f"or left by another run): rerun prepare.py")
    path = os.path.join(folder, "embeddings.safetensors")
    if _embeddings_identity(path) != info["embeddings"]:
        raise InputError(f"{path} is not the table data.json was written with (replaced since, e.g. by another "
                         f"model or run): rerun prepare.py")
    table = load_tensors(path, ["embeddings"])["embeddings"]
    if table.dim() != 2 or not table.is_floating_point():
        raise InputError(f"{path}: embeddings has shape {tuple(table.shape)} ({table.dtype}), expected float [rows, F]")
    bad = _first_nonfinite_row(table)
    if bad is not None:
        raise InputError(f"{path}: row {bad} has NaN or inf")
    v_ref_path = os.path.join(folder, "v_ref.safetensors")
    try:
        v_ref = _check_v_ref(load_tensors(v_ref_path, ["v_ref"])["v_ref"])
    except InputError as e:
        raise InputError(f"{v_ref_path}: {e}") from None
    if v_ref.shape[0] != table.shape[1]:
        raise InputError(f"{v_ref_path}: v_ref has {v_ref.shape[0]} features, the embeddings F={table.shape[1]}")
    path = os.path.join(folder, "pairs.parquet")
    df = read_table(path, ["set", "user", "chosen", "rejected"])
    _check_pairs_table(df, path, len(table))
    users = info["users"]
    table = table.to(device)
    sets = {}
    for name in SETS:
        part = df[df["set"] == name]
        if name == "unseen_fewshot" and fewshot_pairs is not None:
            if "draw" not in part.columns:
                raise InputError(f"{folder}: pairs.parquet has no draw column, so no first {fewshot_pairs} few-shot pairs")
            part = part[part["draw"] < fewshot_pairs]
        group = "group" if "group" in part.columns and part["group"].notna().all() else None
        pairs = table_pairs(part, table, users["unseen" if name.startswith("unseen") else "seen"],
                            f"{folder}: {name}", group).to(device)
        sets[name] = replace(pairs, checked=True)   # the table and the indices were checked above
    print(f"{folder}: {info['dataset']}, {len(users['seen'])} seen and {len(users['unseen'])} unseen users; "
          + ", ".join(f"{name} {len(p)} pairs" for name, p in sets.items()))
    return Data(table, v_ref, sets, users, info, folder)


def write_data_folder(folder, *, dataset, users, pairs, conversations, v_ref, config, files=(), **extra):
    """Write a prepared data folder (see DATA_FILES) beside its embeddings.safetensors, data.json
    last. pairs: a DataFrame with the columns set, user, chosen, rejected (+ group, draw, ...);
    conversations: a DataFrame with row and messages; files: the dataset's own files already
    written in the folder, hashed like DATA_FILES; extra: more items for data.json."""
    import pandas as pd
    bad = ~pairs["set"].isin(SETS)
    if bad.any():
        raise InputError(f"{folder}: pair set {pairs['set'][bad].iloc[0]!r} is not one of {SETS}")
    for name in SETS:
        group = "unseen" if name.startswith("unseen") else "seen"
        if not set(pairs.loc[pairs["set"] == name, "user"]) <= set(users[group]):
            raise InputError(f"{folder}: {name} has pairs of users that are not {group} users")
    save_tensors(os.path.join(folder, "v_ref.safetensors"), {"v_ref": _check_v_ref(v_ref)})
    write_table(os.path.join(folder, "pairs.parquet"), pairs)
    write_table(os.path.join(folder, "conversations.parquet"), pd.DataFrame(conversations))
    write_json(os.path.join(folder, "data.json"), {
        "dataset": dataset, "users": users,
        "pairs": {name: int((pairs["set"] == name).sum()) for name in SETS},
        "embeddings": _embeddings_identity(os.path.join(folder, "embeddings.safetensors")),
        "files": {name: _file_digest(os.path.join(folder, name)) for name in (*DATA_FILES, *files)},
        "config": config, **extra})
    print(f"{folder}: " + ", ".join(f"{name} {int((pairs['set'] == name).sum())} pairs" for name in SETS)
          + f" of {len(users['seen'])} seen and {len(users['unseen'])} unseen users")


def oracle_accuracies(data):
    """Where the data holds the users' true rewards (PersonalLLM's synthetic population:
    synthetic_truth.safetensors with the reward models' directions U [F, M], users.safetensors with
    the users' mixtures W_seen, W_unseen [N, M]), each set's mean accuracy of the true linear
    rewards U w_i: the ceiling of any linear method. -> {set: accuracy}, or None."""
    truth_path = os.path.join(data.folder, "synthetic_truth.safetensors")
    if not os.path.exists(truth_path):
        return None
    U = load_tensors(truth_path, ["reward_models"])["reward_models"]              # [F, M]
    W = load_tensors(os.path.join(data.folder, "users.safetensors"), ["W_seen", "W_unseen"])
    return {name: float(per_user_accuracy(pairs, U, W["W_unseen" if name.startswith("unseen") else "W_seen"]
                                          .float()).mean()) for name, pairs in data.sets.items()}


def _check_pairs_table(df, path, n_rows):
    """The rows of pairs.parquet: known sets, integer rows inside the table; errors name the row."""
    bad = ~df["set"].isin(SETS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{path}: row {i}: set {df['set'].iloc[i]!r} is not one of {', '.join(SETS)}")
    for column in ("chosen", "rejected"):
        values = df[column]
        if not _is_integer_column(values):
            i = int(np.flatnonzero(values.isna().to_numpy())[0]) if values.isna().any() else 0
            raise InputError(f"{path}: row {i}: {column} must hold integer rows of the embedding table, got "
                             f"{values.iloc[i]!r} ({values.dtype})")
        outside = ((values < 0) | (values >= n_rows)).to_numpy()
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise InputError(f"{path}: row {i}: {column} {values.iloc[i]} is outside the {n_rows} rows of "
                             f"embeddings.safetensors")


def _is_integer_column(series):
    import pandas as pd
    return pd.api.types.is_integer_dtype(series) and not series.isna().any()


def _file_digest(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file (rerun prepare.py)")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _embeddings_identity(path):
    """What tells one embeddings file from another without reading it: its size and its header
    metadata (the extraction's fingerprint of inputs, model and settings; or the synthetic config)."""
    meta = read_metadata(path)
    return {"bytes": os.path.getsize(path), "metadata": meta}


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
    """A list of dicts (or a DataFrame) as CSV (or Parquet for a .parquet path), atomically."""
    import pandas as pd
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(records)
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
    for _ in read_jsonl(path):
        pass


def read_jsonl(path):
    """Yields (line number, object) of a JSON-lines file, blank lines skipped; a line that is not
    UTF-8, not JSON or not an object is an InputError naming path:line."""
    for n, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{n}: {type(row).__name__}, expected a JSON object per line")
        yield n, row


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
    """Wrap a script's main(args): bad input ends with a one-line message and exit code 2; Ctrl-C
    with one line and exit code 130 (run_folder has removed the run's unfinished outputs)."""
    def wrapped(args):
        try:
            return main(args)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted: nothing of this run was written to its output folder", file=sys.stderr)
            raise SystemExit(130)
    wrapped.__doc__, wrapped.__name__ = main.__doc__, main.__name__
    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every script uses it: its module docstring (the exact commands, what it reads
    and writes) as the description, kept as written; a bad flag is one line and exit code 2."""

    def __init__(self, doc, **kwargs):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _argtype(convert, check, expected):
    """An argparse type: convert(text), then check(value), else 'expected ..., got TEXT'."""

    def parse(text):
        try:
            value = convert(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected  # argparse names the type in its messages
    return parse


def _ints(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(text)
    return values


def _floats(text):
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(text)
    return values


def rank_list(text, least=0, what="ranks"):
    """argparse type for '0,1,2' -> [0, 1, 2]; every value >= least, none twice."""
    return _argtype(_ints, lambda v: min(v) >= least and len(set(v)) == len(v),
                    f"comma-separated distinct {what} >= {least}")(text)


def shot_list(text):
    """argparse type for '5,10' -> [5, 10]; shots must be >= 1."""
    return rank_list(text, 1, "shots")


positive_int = _argtype(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _argtype(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _argtype(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
nonnegative_float = _argtype(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction = _argtype(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
float_list = _argtype(_floats, lambda v: all(math.isfinite(a) and a >= 0 for a in v) and len(set(v)) == len(v),
                      "comma-separated distinct finite numbers >= 0")


def method_list(text):
    """argparse type for 'lore,pal' -> ['lore', 'pal'], registered names only."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct registered methods ({', '.join(METHODS)}), got {text!r}")
    return names


def add_sweep_args(parser, folder, script, *, method, k_list, alpha_list, iters, lr, fewshot_iters, fewshot_lr):
    """The flags train_basis.py and vary_fewshot.py share; the defaults are the dataset's recipe.
    Every registered method's own hyperparameters become flags --{name}-{hp} (method_hparams)."""
    # argparse takes '-1e4' for an option (only -1 and -1.5 look like numbers to it); a value that
    # reads as a number is a value, so --alpha-list -1e4 fails with the range error naming alpha
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|nan)$", re.I)
    parser.add_argument("--data", default=os.path.join(folder, "data"),
                        help="what prepare.py wrote (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(folder, "results", script),
                        help="output folder, written as a whole when the run ends (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--method", type=method_list, default=[method],
                        help=f"methods to fit, comma-separated, of: {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--k-list", type=rank_list, default=k_list,
                        help="ranks K, e.g. 0,1,2 (methods skip K below their smallest)")
    parser.add_argument("--alpha-list", type=float_list, default=alpha_list,
                        help="regularization strengths of the methods that use one, e.g. 0,1e4")
    recipe = parser.add_argument_group("the LoRe entries' steps and rates (the dataset recipe)")
    recipe.add_argument("--iters", type=positive_int, default=iters, help="basis training steps")
    recipe.add_argument("--lr", type=positive_float, default=lr, help="basis learning rate")
    recipe.add_argument("--fewshot-iters", type=positive_int, default=fewshot_iters,
                        help="steps fitting unseen users' weights")
    recipe.add_argument("--fewshot-lr", type=positive_float, default=fewshot_lr)
    for name, cls in METHODS.items():
        own = [hp for hp in cls.defaults if hp not in cls.recipe_hparams]
        group = parser.add_argument_group(f"method {name}") if own else None
        for hp in own:
            default = cls.defaults[hp]
            kind = positive_int if isinstance(default, int) else positive_float
            group.add_argument(f"--{name}-{hp}".replace("_", "-"), type=kind, default=default,
                               dest=f"{name}__{hp}", help=f"(default: %(default)s)")
    return parser


def method_hparams(args):
    """{method: {hyperparameter: value}} for the methods in args.method, from the flags."""
    hparams = {}
    for name in args.method:
        cls = METHODS[name]
        hparams[name] = {hp: getattr(args, hp) if hp in cls.recipe_hparams else getattr(args, f"{name}__{hp}")
                         for hp in cls.defaults}
    return hparams


def add_shots_args(parser, *, trials, shots, unit="pairs"):
    """The flags every vary_fewshot.py adds to add_sweep_args'."""
    parser.add_argument("--trials", type=positive_int, default=trials, help="draws of the shots per shot count")
    parser.add_argument("--shots", type=shot_list, default=shots, help=f"{unit} per unseen user, e.g. 5,10")
    return parser


def data_files_arg(text):
    """argparse type for 'split=PATH'."""
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
    parser.add_argument("--batch-tokens", type=positive_int, default=16384, help="padded tokens per forward pass")
    return parser


def config_of(args, **extra):
    """The resolved command-line config and the command itself, as saved beside a run's outputs."""
    return {**{k: v for k, v in vars(args).items()}, **extra, "command": " ".join(sys.argv)}


def start_run(args):
    """Seed everything and resolve the device; print both. -> the torch device."""
    set_seed(args.seed)
    device = resolve_device(args.device)
    print(f"seed {args.seed}, device {device}")
    return device


@contextlib.contextmanager
def run_folder(args, script, **extra):
    """The output folder of a run (args.out), written as a whole when the run succeeds, or not at all.

    Yields a staging folder beside --out to write every output into. When the block ends without
    error, config.json (config_of(args), the script's name and the time) is added and the staging
    folder replaces --out in one rename: the previous run's files go with it, so no file of an
    older run is left looking current. On an error or Ctrl-C the staging folder is removed and
    --out is untouched; a kill -9 leaves it to the next run, which removes it. While the run lasts
    it holds a lock on `.{out}.lock` beside --out: a second run into the same --out is refused
    (the OS drops the lock of a dead process, so a crash never leaves it stuck). A --out holding
    anything but an earlier run of the same script is refused: nothing else is ever replaced."""
    out = os.path.abspath(args.out)
    parent, base = os.path.split(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file, not a folder")
    with folder_lock(os.path.join(parent, f".{base}.lock"), f"--out {out}"):
        _recover_folder(parent, base)
        if os.path.isdir(out) and os.listdir(out):
            config = os.path.join(out, "config.json")
            owner = None
            try:
                owner = read_json(config).get("script") if os.path.isfile(config) else None
            except (InputError, AttributeError):
                pass
            if owner != script:
                raise InputError(f"--out {out} holds " + (f"the results of {owner}" if owner else
                                 "files that no run of this script wrote") +
                                 f"; {script} would replace them: pick another --out")
        staging = os.path.join(parent, f".{base}.partial-{os.getpid()}")
        os.makedirs(staging)
        try:
            yield staging
            write_json(os.path.join(staging, "config.json"),
                       {**config_of(args, **extra), "script": script,
                        "finished": datetime.datetime.now().isoformat(timespec="seconds")})
            old = os.path.join(parent, f".{base}.old-{os.getpid()}")
            if os.path.exists(out):
                os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"wrote {out}")


@contextlib.contextmanager
def folder_lock(path, what):
    """An exclusive lock on the file `path` for the duration of the block; InputError naming `what`
    if another process holds it. flock: released by the OS when its process ends, however it ends."""
    import fcntl
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"{what}: cannot write in {os.path.dirname(path)} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{what} is in use by another run (it holds {path}); wait for it to end "
                             f"or pick another folder") from None
        yield
    finally:
        os.close(fd)


def _recover_folder(parent, base):
    """Leftovers of a run killed inside run_folder (we hold the lock, so none is in use): unfinished
    staging folders go; a previous run moved aside but not replaced is put back."""
    out = os.path.join(parent, base)
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(f".{base}.partial-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(f".{base}.old-"):
            if os.path.exists(out):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, out)


def train_basis_main(args, script, title):
    """What every train_basis.py does with its recipe's flags: load the data, sweep the methods, and
    write results.json/.csv, accuracy_vs_rank.png, every fit's checkpoint and (synthetic data)
    oracle.json into --out, as a whole. -> the records."""
    device = start_run(args)
    data = load_data(args.data, device, fewshot_pairs=getattr(args, "fewshot_pairs", None))
    with run_folder(args, script, device=str(device)) as out:
        records = sweep(methods=args.method, K_list=args.k_list, alpha_list=args.alpha_list, v_ref=data.v_ref,
                        hparams=method_hparams(args), out_dir=out, seed=args.seed, **data.sets)
        save_results(records, out)
        oracle = _save_oracle(data, out)
        plot_accuracy_vs_rank(records, os.path.join(out, "accuracy_vs_rank.png"), title, hlines=oracle)
        _save_basis_reports(records, out, title)
    return records


def vary_fewshot_main(args, script, title):
    """What every vary_fewshot.py does with its recipe's flags: load the data, sweep the methods over
    the shot counts, and write results.json/.csv, accuracy_vs_shots.png and (synthetic data)
    oracle.json into --out, as a whole. -> the records."""
    device = start_run(args)
    data = load_data(args.data, device)
    pool = data.sets["unseen_fewshot"]
    largest = int(pool.counts().max()) if pool.group is None else None
    if largest is not None and max(args.shots) > largest:
        raise InputError(f"--shots {max(args.shots)} is more than any unseen user's pool of few-shot pairs "
                         f"(at most {largest}); draw a larger pool with prepare.py")
    with run_folder(args, script, device=str(device)) as out:
        records = sweep_shots(methods=args.method, K_list=args.k_list, alpha_list=args.alpha_list, shots=args.shots,
                              trials=args.trials, v_ref=data.v_ref, hparams=method_hparams(args), seed=args.seed,
                              seen_train=data.sets["seen_train"], unseen_fewshot=pool,
                              unseen_test=data.sets["unseen_test"])
        save_results(records, out)
        oracle = _save_oracle(data, out)
        plot_accuracy_vs_shots(records, os.path.join(out, "accuracy_vs_shots.png"), title,
                               hline=oracle and oracle["unseen_test"])
    return records


def _save_basis_reports(records, out, title):
    """The health reports sweep wrote beside the checkpoints, across K: basis_reports.csv, a figure,
    and each printed (with its loud warning when a basis has collapsed)."""
    paths = [os.path.join(out, f"{r['method']}_K{r['K']}" + ("" if r["alpha"] is None else f"_alpha{r['alpha']:g}")
                          + ".report.json") for r in records]
    reports = [read_json(p) for p in paths if os.path.exists(p)]
    if not reports:
        return
    import pandas as pd
    table = basis_report_records(reports)
    print("basis health (each fit's full report: its .report.json; utils.format_basis_report prints one):")
    print(pd.DataFrame(table).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for report in reports:
        if report["collapsed"]:
            print(format_basis_report(report))   # the whole report, with its WARNING line
    write_table(os.path.join(out, "basis_reports.csv"), table)
    plot_basis_reports(reports, os.path.join(out, "basis_health.png"), title)


def _save_oracle(data, out):
    oracle = oracle_accuracies(data)
    if oracle:
        write_json(os.path.join(out, "oracle.json"), oracle)
        print("oracle (each user's true linear reward): " + ", ".join(f"{k} {v:.4f}" for k, v in oracle.items()))
    return oracle


def save_results(records, out_dir, name="results"):
    """{name}.json and {name}.csv in out_dir, and a readable table on stdout."""
    import pandas as pd
    for record in records:
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise InputError(f"{_curve_label(record)}, K={record.get('K')}: {bad} is not a finite number")
    write_json(os.path.join(out_dir, f"{name}.json"), records)
    write_table(os.path.join(out_dir, f"{name}.csv"), records)
    print(pd.DataFrame(records).to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))


_SET_LABELS = {"seen_train": "seen users, train pairs", "seen_test": "seen users, held-out pairs",
               "unseen_fewshot": "unseen users, few-shot pairs", "unseen_test": "unseen users, held-out pairs"}


def _curve_label(record):
    alpha = "" if record.get("alpha") is None else f", alpha={record['alpha']:g}"
    return f"{record['method']}{alpha}"


def plot_accuracy_vs_rank(records, path, title="", hlines=None):
    """One panel per pair set: accuracy against K, a curve per (method, alpha) with the reported
    std as error bars. hlines: {set: accuracy} drawn dotted (e.g. an oracle's)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(SETS), figsize=(4.2 * len(SETS), 3.8), squeeze=False)
    curves = list(dict.fromkeys(_curve_label(r) for r in records))
    for ax, name in zip(axes[0], SETS):
        for i, label in enumerate(curves):
            rows = sorted((r for r in records if _curve_label(r) == label), key=lambda r: r["K"])
            ax.errorbar([r["K"] for r in rows], [r[name] for r in rows], yerr=[r[f"{name}_std"] for r in rows],
                        color=f"C{i}", marker="o", capsize=3, label=label)
        if name in (hlines or {}):
            ax.axhline(hlines[name], color="k", ls=":", label="oracle")
        ax.set(xlabel="K (lore K=0: the reference reward model)", ylabel="accuracy", title=_SET_LABELS[name])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    _save_figure(fig, path)


def plot_accuracy_vs_shots(records, path, title="", hline=None):
    """Unseen users' held-out accuracy against shots, a curve per (method, alpha, K) with a band of
    +- one std over trials; the accuracy on the shots themselves dashed; `hline` (e.g. an oracle's
    held-out accuracy) dotted."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(f"{_curve_label(r)}, K={r['K']}" for r in records):
        rows = sorted((r for r in records if f"{_curve_label(r)}, K={r['K']}" == label), key=lambda r: r["shots"])
        x = np.array([r["shots"] for r in rows])
        y = np.array([r["unseen_test"] for r in rows])
        s = np.array([r["unseen_test_std"] for r in rows])
        line, = ax.plot(x, y, marker="o", label=f"{label}: held-out")
        ax.fill_between(x, y - s, y + s, color=line.get_color(), alpha=0.2)
        ax.plot(x, [r["unseen_fewshot"] for r in rows], ls="--", color=line.get_color(), label=f"{label}: the shots")
    if hline is not None:
        ax.axhline(hline, color="k", ls=":", label="oracle: held-out")
    ax.set(xlabel="shots per unseen user", ylabel="accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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
# reward logit. Most conversations come in groups that differ only in their last message
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
