"""LoRe: personalized reward models by low-rank reward modeling (Bose et al., 2025).

User i's reward of a response with reward-model embedding phi is  phi^T V w_i:  V holds K shared
reward directions learned on top of a frozen reward model, w_i = softmax(W_i) is a point of the
simplex. A preference pair is one row x = phi(chosen) - phi(rejected), and the Bradley-Terry
probability that the chosen response wins is sigmoid(x^T V w_i / 100). A new user needs only w.

Shape alphabet, used in the comments of every tensor line that matters (here and in lore/):
    N  users (seen users; functions that see only unseen users call them N too)
    P  preference pairs, all users' packed together (row p belongs to user[p])
    F  features: the reward model's hidden size (4096 for Llama-3.1-8B)
    K  rank: number of shared reward directions, the columns of V
    Q  a method's per-user parameters (K simplex weights for LoRe): U [N, Q]
    D  a method's item features (K projections for LoRe)
    E  rows of an embedding table (one per distinct conversation)
    S  prompts;  R  responses per prompt;  M  reward models (PersonalLLM's 10 scorers)

This file is the method, top to bottom: the loss; the models LoRe, LoRe_regularized and
PersonalizeBatch and their fits; LoRe's entries in the method registry; the sweeps over K and
alpha; the reference API of the original code (its names, argument orders and defaults). What a
step reads and how steps run (lore.steps), torchrun (lore.distributed), and everything beyond the
method live in the package lore/, which never imports this file: import those names from there.
"""
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lore import active, distributed, io, pca, steps, stopping
from lore.basis import basis_report
from lore.checks import (InputError, check_alpha, check_matrix, check_model, check_v_ref, int_list, is_int,
                         resolve_device, seed_fit, short_repr)
from lore.data import data_identity
from lore.draws import choice_without_replacement
from lore.methods import (CONVERGED_FALL, METHODS, TEMPERATURE, LinearBasis, accuracy, check_fitted, checked_fit,
                          checked_fit_users, checkpoint_name, converged, featurize, get_method,
                          last_tenth_fall, per_user_accuracy, save_method, simplex, user_margins)
from lore.pairs import SETS, Pairs, pack

PRUNE_THRESHOLD = 1e-2   # LoRe_regularized drops directions no user weighs at least this much
STD_FACTOR = 0.25        # the reference reports std across users times 0.25


# ----------------------------------------------------------------------------------------------
# The loss and the models: LoRe, LoRe_regularized, PersonalizeBatch
# ----------------------------------------------------------------------------------------------

def bt_nll(s, weight):
    """sum_p weight_p * -log sigmoid(s_p / 100): the Bradley-Terry loss of all pairs at once."""
    return -(F.logsigmoid(s / TEMPERATURE) * weight).sum()


def user_mean_weights(pairs, by_user=False):
    """Each pair weighs 1 / (its user's pairs): every user weighs the same (LoRe's loss). -> [P];
    by_user: [N], the weight of each of user u's pairs (what the fused step reads: no [P] tensor)."""
    w = 1.0 / pairs.counts().float()                                               # [N]
    return w if by_user else w[pairs.user]                                         # [N] -> [P]: no [P] int64 temporary


def pair_mean_weights(pairs, by_user=False):
    """Each pair weighs 1 / (all pairs, every rank's for a shard): every pair weighs the same
    (LoRe_regularized's loss). -> [P]; by_user: [N], the same weight for every user."""
    n = distributed.sum_over_shards(torch.tensor(float(len(pairs)), dtype=torch.float64, device=pairs.device),
                                    pairs.shard)
    return torch.full((pairs.n_users if by_user else len(pairs),), 1.0 / n.item(), device=pairs.device)  # [N] or [P]


class FitModule(nn.Module):
    """An nn.Module whose train(X, ...) fits it to X and returns the fit, as the original's models
    do; train(mode) with a bool is still nn.Module's (eval() calls train(False)). Subclasses set
    n_users, n_features and device, and implement fit."""

    def train(self, X=True, *args):
        return super().train(X) if isinstance(X, bool) else self.fit(X, *args)

    def packed(self, X):
        """X (a list of [m_i, F] or Pairs) as checked Pairs of this model's users and F."""
        pairs = pack(X, "features", self.device)
        if pairs.n_users != self.n_users or pairs.n_features != self.n_features:
            raise InputError(f"the model was built for {self.n_users} users x F={self.n_features}, the "
                             f"data has {pairs.n_users} users x F={pairs.n_features}")
        return pairs


class LowRankModel(FitModule):
    """What LoRe and LoRe_regularized share: the basis V [F, K] and the seen users' logits W [N, K]
    as parameters, drawn on the CPU generator and then moved (the same seed gives the same start on
    any device), v_ref as a column, and init="svd"."""
    form = None   # how a step reads the pairs (lore.steps.training_rows); None: the cheaper by shapes

    def __init__(self, n_users, n_features, K, iters, device, init, draw_W, stop="fixed"):
        super().__init__()
        if stop not in stopping.STOPS:
            raise InputError(f"stop must be one of {', '.join(stopping.STOPS)}, got {stop!r}")
        self.device = resolve_device(device)
        self.n_users, self.n_features, self.K, self.iters, self.init = n_users, n_features, K, iters, init
        self.stop = stop
        self.W = nn.Parameter(draw_W(n_users, K).to(self.device))                  # [N, K]
        self.V = nn.Parameter(torch.randn(n_features, K).to(self.device))          # [F, K]

    def column(self, v_ref):
        """v_ref as an [F, 1] column of this model's F, on its device."""
        v = check_v_ref(v_ref)                                                     # [F, 1]
        if v.shape[0] != self.n_features:
            raise InputError(f"v_ref has {v.shape[0]} features but the pairs have F={self.n_features}")
        return v.to(self.device)

    def early_stop(self, pairs, weights):
        """-> (the pairs to train on, the EarlyStop or None): stop="fixed" trains on every pair for
        iters steps; stop="early" holds out a slice of every user's pairs (lore.stopping.holdout) and
        stops when their loss (weighed by `weights`, as the fit's) no longer falls, iters the cap."""
        if self.stop == "fixed":
            return pairs, None
        train, held = stopping.holdout(pairs)
        Xh, wh = steps.training_rows(held, self.form), weights(held)                # rows, [P_held]
        loss = lambda: steps.data_loss(Xh, bt_nll(user_margins(steps.as_rows(Xh).project(self.V), simplex(self.W),
                                                                held.user), wh))
        return train, stopping.EarlyStop(loss, [self.V, self.W])

    def start(self, pairs):
        """init="svd": V the top-K principal directions of the seen rows (lore.pca.principal_basis:
        oriented, scaled to a root-mean-square margin of TEMPERATURE) and W the logits of every
        user's least-squares simplex weights on them (margins fitted to TEMPERATURE): a function of
        the data alone, so every seed starts (and, full batch with stop="fixed", ends) at the same basis.
        init="random": the draws of __init__, untouched."""
        if self.init == "random":
            return
        if self.init != "svd":
            raise InputError(f"init must be 'random' or 'svd', got {self.init!r}")
        if pairs.shard:   # each process would start from the basis of its own users
            raise InputError("init=svd reads every seen user's pairs: run it in one process (not under torchrun)")
        with torch.no_grad():
            V = pca.principal_basis(pairs, self.K, TEMPERATURE)                        # [F, K]
            w = pca.least_squares_weights(pairs.project(V), pairs.user, pairs.n_users, TEMPERATURE)  # [N, K]
            self.V.copy_(V)
            self.W.copy_(w.clamp_min(1e-3).log())   # softmax(log w) = w; 1e-3 keeps the logits finite


class LoRe(LowRankModel):
    """Joint Adam on (V, W), full batch:
        sum_i mean_{x in X_i} -log sigmoid(x^T V w_i / 100) + alpha sum_j ||V_j - v_ref||^2
    (every user weighs the same). V, W ~ N(0, 1), or with init="svd" the deterministic start.
    train(X) -> (softmax(W) [N, K], V [F, K])."""

    def __init__(self, V_sft, alpha, num_classes, num_features, num_basis_vectors, num_iterations,
                 learning_rate, device=None, init="random", stop="fixed"):
        check_model(num_classes, num_features, num_basis_vectors, num_iterations, learning_rate, "LoRe")
        super().__init__(num_classes, num_features, num_basis_vectors, num_iterations, device, init, torch.randn, stop)
        self.alpha, self.learning_rate = check_alpha(alpha, "LoRe"), learning_rate
        self.v_ref = None if V_sft is None else self.column(V_sft)                # [F, 1]
        if self.v_ref is None and check_alpha(alpha, "LoRe"):
            raise InputError(f"LoRe with alpha = {alpha:g} pulls V towards V_sft: V_sft (v_ref) is needed")
        self.optimizer = steps.adam(self.parameters(), learning_rate, self.device)

    def regularizer(self):
        if self.alpha == 0:
            return torch.zeros((), device=self.device)
        return self.alpha * ((self.V - self.v_ref) ** 2).sum()   # [F, K] - [F, 1]: column by column

    def forward(self, X):
        """-> (nll, alpha * sum_j ||V_j - v_ref||^2) on X (a list of [m_i, F] or Pairs)."""
        pairs = self.packed(X)
        s = user_margins(pairs.project(self.V), simplex(self.W), pairs.user)       # [P]
        return bt_nll(s, user_mean_weights(pairs)), self.regularizer()

    def fuse_adam(self):
        """The fused step's Adam: torch's fused CPU kernel (one pass over W and V, not ~10), with the
        moments so far, so that a second train() goes on from them as on the torch path."""
        if not self.optimizer.defaults["fused"]:
            moments = self.optimizer.state
            self.optimizer = steps.adam(self.parameters(), self.learning_rate, self.device, fused=True)
            self.optimizer.state.update(moments)

    def fit(self, X):
        pairs, stop = self.early_stop(self.packed(X), user_mean_weights)
        self.start(pairs)
        X, user = steps.training_rows(pairs, self.form), pairs.user                # rows, [P]
        fused = steps.fuses(X, self.V)
        if fused:
            X = steps.banded(X, self.K)   # the pairs band by band of table rows, where the rows outgrow a cache
            self.fuse_adam()
        weight = user_mean_weights(pairs, by_user=fused)                           # [N] fused, else [P]
        steps.training_loop(self.iters, lambda: self.step(X, user, weight), self.device, f"LoRe K={self.K}", stop=stop)
        return distributed.gather_users(simplex(self.W).detach(), pairs), self.V.detach()

    def step(self, X, user, weight):
        """One Adam step on packed pairs: X [P, F] or TrainingRows, user [P]; weight [N] per user
        where the step is fused (CPU, table form: one pass that also takes the logits' softmax),
        else [P] per pair."""
        self.optimizer.zero_grad(set_to_none=True)
        if steps.fuses(X, self.V):
            nll = steps.fused_nll(X, self.V, self.W, weight)
        else:
            nll = bt_nll(steps.user_scores(X, self.V, simplex(self.W), user), weight)
        reg = self.regularizer()
        (nll + reg).backward()
        self.optimizer.step()
        return steps.data_loss(X, nll) + reg.detach()   # the loss of every rank's users


class LoRe_regularized(LowRankModel):
    """Alternating Adam (two optimizers, same lr): each step first updates W with V fixed on
        mean over all pairs of -log sigmoid(x^T V w_user / 100)      (every pair weighs the same)
    then V with W fixed on that loss + alpha_t * mean_j (1 - cos(V_j, v_ref)), alpha_t warmed up
    (0 for the first 20% of the steps, linear to alpha by 80%). W ~ U(0, 1), V ~ N(0, 1). After
    training, directions with max_i softmax(W)_ij < 1e-2 are dropped (the kept columns are not
    renormalized). init="svd": the deterministic start instead.
    train(X) -> (softmax(W)[:, kept] [N, K'], V[:, kept] [F, K'])."""

    def __init__(self, V_sft, alpha, num_classes, num_features, num_basis_vectors, num_iterations,
                 learning_rate, device=None, init="random", stop="fixed"):
        check_model(num_classes, num_features, num_basis_vectors, num_iterations, learning_rate, "LoRe_regularized")
        if V_sft is None:
            raise InputError("LoRe_regularized pulls V towards V_sft: V_sft (v_ref) is needed, got None")
        super().__init__(num_classes, num_features, num_basis_vectors, num_iterations, device, init, torch.rand, stop)
        self.alpha = check_alpha(alpha, "LoRe_regularized")
        self.v_ref_unit = F.normalize(self.column(V_sft), dim=0)                   # [F, 1]
        self.optimizer_W = steps.adam([self.W], learning_rate, self.device)
        self.optimizer_V = steps.adam([self.V], learning_rate, self.device)

    def alpha_at_step(self, step):
        start, end = int(0.2 * self.iters), int(0.8 * self.iters)
        if step < start:
            return 0.0
        if step >= end:
            return float(self.alpha)
        return float(self.alpha) * (step - start) / (end - start)

    def regularizer(self):
        """mean_j (1 - cos(V_j, v_ref))."""
        return (1 - (F.normalize(self.V, dim=0) * self.v_ref_unit).sum(0)).mean()

    def forward(self, X, alpha_curr=0.0):
        """-> (nll, alpha_curr * mean_j (1 - cos(V_j, v_ref))) on X (a list of [m_i, F] or Pairs)."""
        pairs = self.packed(X)
        nll = bt_nll(user_margins(pairs.project(self.V), simplex(self.W), pairs.user), pair_mean_weights(pairs))
        return nll, alpha_curr * self.regularizer()

    def fit(self, X):
        pairs, stop = self.early_stop(self.packed(X), pair_mean_weights)
        self.start(pairs)
        X, user, weight = steps.training_rows(pairs, self.form), pairs.user, pair_mean_weights(pairs)   # rows, [P], [P]
        alpha_t = torch.zeros((), device=self.device)   # a tensor, so that a CUDA graph sees it change
        steps.training_loop(self.iters, lambda: self.step(X, user, weight, alpha_t), self.device,
                      f"LoRe_regularized K={self.K}", before=lambda i: alpha_t.fill_(self.alpha_at_step(i)), stop=stop)
        W = distributed.gather_users(simplex(self.W).detach(), pairs)                          # [N, K]
        kept = W.max(dim=0).values >= PRUNE_THRESHOLD                              # [K]
        print(f"kept {int(kept.sum())}/{self.K} directions (max user weight >= {PRUNE_THRESHOLD})")
        return W[:, kept], self.V.detach()[:, kept]

    def step(self, X, user, weight, alpha_t):
        """Update W with V fixed, then V with the new W fixed. V is the same in both half-steps, so
        one projection serves both: one read of X forward, one in the V update's backward."""
        with torch.no_grad():
            Z = steps.as_rows(X).project(self.V)                                         # [P, K]
        self.optimizer_W.zero_grad(set_to_none=True)
        bt_nll(user_margins(Z, simplex(self.W), user), weight).backward()
        self.optimizer_W.step()
        self.optimizer_V.zero_grad(set_to_none=True)
        nll_V = bt_nll(steps.user_scores(X, self.V, simplex(self.W).detach(), user, Z), weight)
        reg = alpha_t * self.regularizer()   # alpha_t = 0 adds exactly nothing
        (nll_V + reg).backward()
        self.optimizer_V.step()
        return steps.data_loss(X, nll_V) + reg.detach()   # the loss of every rank's users


class PersonalizeBatch(FitModule):
    """Few-shot weights of new users with V fixed:
        sum_i mean_{x in X_i} -log sigmoid(x^T V softmax(w_i) / 100),  w_i ~ N(0, 1), Adam.
    X is projected onto V once (table-form Pairs: the table rows they use, see Pairs.project);
    every step then works in K dimensions. train(X, V) -> list of N simplex weights [K].
    form: None projects as Pairs.project does; "pairs" or "table" force that form (training_rows).
    stop: "fixed" (the paper's) num_iterations steps; "early" the stopping rule on the new users'
    own pairs (lore.stopping.fewshot_holdout: a held-out slice of them, or with under 10 pairs a
    user the training loss's tolerance), num_iterations the cap."""
    form = None

    def __init__(self, num_classes, num_features, num_basis_vectors, num_iterations, learning_rate,
                 device=None, stop="fixed"):
        super().__init__()
        check_model(num_classes, num_features, num_basis_vectors, num_iterations, learning_rate, "PersonalizeBatch")
        if stop not in stopping.STOPS:
            raise InputError(f"PersonalizeBatch: stop must be one of {', '.join(stopping.STOPS)}, got {stop!r}")
        self.device = resolve_device(device)
        self.n_users, self.n_features, self.K, self.iters = num_classes, num_features, num_basis_vectors, num_iterations
        self.stop = stop
        self.w = nn.Parameter(torch.randn(num_classes, num_basis_vectors).to(self.device))  # [N, K]
        self.optimizer = steps.adam(self.parameters(), learning_rate, self.device)

    def forward(self, X, V):
        pairs = self.packed(X)
        return bt_nll(user_margins(pairs.project(V.detach()), simplex(self.w), pairs.user), user_mean_weights(pairs))

    def fit(self, X, V=None):
        if V is None:
            raise InputError("PersonalizeBatch.train(X, V): the basis V [F, K] is needed (V is fixed, only w is fitted)")
        V = check_matrix(V, "V")                                                  # [F, K]
        if tuple(V.shape) != (self.n_features, self.K):
            raise InputError(f"PersonalizeBatch.train(X, V): V has shape {tuple(V.shape)}, expected "
                             f"[F, K] = [{self.n_features}, {self.K}]")
        V = V.detach().to(self.device, torch.float32)
        pairs, held, rule = self.packed(X), None, None
        if self.stop == "early":
            pairs, held, rule = stopping.fewshot_holdout(pairs)
        Z = self.projected(pairs, V)                                              # [P, K]
        user, weight = pairs.user, user_mean_weights(pairs)                       # [P], [P]
        stop = None
        if rule is not None:   # the held-out pairs' loss, or (rule train_loss) the training pairs' own
            Zh, uh, wh = (Z, user, weight) if held is None else (self.projected(held, V), held.user, user_mean_weights(held))
            stop = stopping.EarlyStop(lambda: bt_nll(user_margins(Zh, simplex(self.w), uh), wh), [self.w], rule=rule)
        steps.training_loop(self.iters, lambda: self.step(Z, user, weight), self.device, stop=stop)
        return list(simplex(self.w).detach())

    def projected(self, pairs, V):
        """The pairs' rows projected onto V once -> Z [P, K]."""
        with torch.no_grad():
            rows = pairs if self.form is None else steps.training_rows(pairs, self.form)
            return rows.project(V)                                                # [P, K]

    def step(self, Z, user, weight):
        """One Adam step on projected pairs Z = X V [P, K]."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = bt_nll(user_margins(Z, simplex(self.w), user), weight)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


# ----------------------------------------------------------------------------------------------
# LoRe's entries in the method registry (lore.methods; PAL, VPL: lore.baselines; pca: lore.pca)
# ----------------------------------------------------------------------------------------------

class LoReMethod(LinearBasis):
    """LoRe as run() fits it: the LoRe model (joint Adam on V and W, users weighed equally, alpha
    times the L2 pull of every column towards v_ref), new users by PersonalizeBatch (LinearBasis).
    U = the users' simplex weights w [N, K]. K = 0 is the reference reward model (V = v_ref, w = [1]
    for everyone); K = 1 is one learned direction, and new users get w = [1] (nothing to adapt)."""
    name, min_K, uses_alpha = "lore", 0, True
    defaults = {"iters": 1000, "lr": 0.5, "fewshot_iters": 500, "fewshot_lr": 0.1, "init": "random", "stop": "fixed",
                "fewshot_stop": "fixed"}
    # the paper's random start, or LowRankModel.start's deterministic one; the paper's fixed
    # iters, or the stopping rule (lore.stopping: a held-out slice of the seen pairs, iters the
    # cap); the same for the new users' fit (fewshot_iters the cap; PersonalizeBatch)
    choices = {"init": ("random", "svd"), "stop": stopping.STOPS, "fewshot_stop": stopping.STOPS}
    recipe_hparams = ("iters", "lr", "fewshot_iters", "fewshot_lr", "stop", "fewshot_stop")
    model, fewshot_model = LoRe, PersonalizeBatch
    # what lore.compare searches (K = 0 and 1 are the comparison's fixed rows reference and bt)
    search, search_space = "random", {
        "K": [2, 3, 4, 5, 6, 8], "alpha": [0.0, 1e-3, 1e-1], "iters": [stopping.FULL_BATCH_CAP], "stop": ["early"],
        "lr": ("log", 0.1, 1.0), "fewshot_iters": [stopping.FEWSHOT_CAP], "fewshot_lr": ("log", 0.03, 0.3),
        "fewshot_stop": ["early"]}

    def fit(self, pairs):
        if self.K == 0:
            if self.v_ref is None:
                raise InputError(f"{self.name} with K = 0 is the reference reward model: it needs v_ref")
            self.V = self.v_ref                                                    # [F, 1]
            return torch.ones(pairs.n_users, 1, device=self.device)
        if self.v_ref is None and self.alpha:
            raise InputError(f"{self.name} with alpha = {self.alpha:g} pulls V towards v_ref: it needs v_ref")
        model = self.model(self.v_ref, self.alpha, pairs.n_users, pairs.n_features, self.K,
                           self.hparams["iters"], self.hparams["lr"], self.device, self.hparams["init"],
                           self.hparams["stop"])
        W, self.V = model.train(pairs)                                             # [N, K'], [F, K']
        self.trainer = model   # its optimizer state, which checked_fit inspects
        return check_fitted(self, W, self.V)


class LoReRegularizedMethod(LoReMethod):
    """LoRe as run_regularized() fits it: the LoRe_regularized model (alternating Adam, pairs
    weighed equally, alpha_t times the cosine pull towards v_ref, warmed up; directions no user
    weighs >= 1e-2 pruned, so V may have K' < K columns), new users by PersonalizeBatch."""
    name, prunes = "lore_regularized", True
    defaults = {"iters": 20000, "lr": 0.5, "fewshot_iters": 500, "fewshot_lr": 0.5, "init": "random", "stop": "fixed",
                "fewshot_stop": "fixed"}
    model = LoRe_regularized
    search_space = {"K": [2, 3, 4, 5, 6, 8], "alpha": [0.0, 1e2, 1e4], "iters": [2000, 5000, 20000],
                    "lr": ("log", 0.1, 1.0), "fewshot_iters": [stopping.FEWSHOT_CAP], "fewshot_lr": ("log", 0.1, 1.0),
                    "fewshot_stop": ["early"]}

    def fit(self, pairs):
        if self.K > 0 and self.v_ref is None:
            raise InputError(f"{self.name} measures V against v_ref (the cosine pull): it needs v_ref")
        return super().fit(pairs)


# ----------------------------------------------------------------------------------------------
# Sweeps: every method over (alpha, K), on the four pair sets
# ----------------------------------------------------------------------------------------------

def sweep(*, K_list=None, seen_train=None, seen_test=None, unseen_fewshot=None, unseen_test=None, methods=("lore",),
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
    Every fit goes through checked_fit (a diverged or unmoved fit is an InputError); with out_dir
    its fit_report (hyperparameters, loss curves, convergence) is written as {checkpoint}.fit.json.
    -> one record per fit: method, K, alpha, then for each set its mean accuracy over users and
    `{set}_std`, the std across users times 0.25 (the reference's convention), then `converged`
    and `loss_fall` (fit_status)."""
    sets = distributed.shard_seen(_check_sets(dict(seen_train=seen_train, seen_test=seen_test,
                                                   unseen_fewshot=unseen_fewshot, unseen_test=unseen_test), device))
    if out_dir is not None:   # the ownership rule of --out: never another run's folder, nor a data folder
        io.check_not_owned(out_dir, "out_dir")
        io.check_folder_writable(out_dir, "out_dir")
    records, acc_ref = [], None
    if v_ref is not None and out_dir is not None:   # the reference model's accuracy, for the reports
        acc_ref = distributed.gather_users(per_user_accuracy(sets["seen_test"], check_v_ref(v_ref),
                                                  torch.ones(sets["seen_test"].n_users, 1)), sets["seen_test"])
    for method in _settings(methods, K_list, alpha_list, v_ref, hparams, sets["seen_train"]):
        if seed is not None:   # a setting's start depends on its name alone
            seed_fit(seed, method.name, method.K, method.alpha)
        U = checked_fit(method, sets["seen_train"])                                # [N, Q]
        U_new = checked_fit_users(method, sets["unseen_fewshot"])                  # [N', Q]
        record, acc = method.setting(), {}
        for name in SETS:
            acc[name] = distributed.gather_users(accuracy(method, sets[name], U if name.startswith("seen") else U_new),
                                      sets[name])                                  # [N]
            record.update({name: float(acc[name].mean()), f"{name}_std": STD_FACTOR * float(acc[name].std())})
        record.update(fit_status(method))
        print(f"{method}: " + "  ".join(f"{name} {record[name]:.4f}" for name in SETS)
              + ("" if record["steps"] is None else f"  {record['steps']} steps ({record['stopped']})")
              + ("" if record["fewshot_steps"] is None else
                 f", few-shot {record['fewshot_steps']} ({record['fewshot_stopped']})")
              + ("  NOT CONVERGED" if record["converged"] is False else ""))
        if out_dir is not None:
            save_method(os.path.join(out_dir, checkpoint_name(method)), method, data_identity(sets["seen_train"]),
                        W=U, W_unseen=U_new)
            io.write_json(os.path.join(out_dir, checkpoint_name(method, ".fit.json")), fit_report(method))
            if method.linear:
                io.write_json(os.path.join(out_dir, checkpoint_name(method, ".report.json")),
                           basis_report(method.V, U, v_ref, acc["seen_test"], acc_ref, method.setting()))
        records.append(record)
    return records


def fit_status(method):
    """What a record says of a checked fit's convergence: converged (False when its loss still fell
    by more than CONVERGED_FALL over its last tenth, None without a training loop) and loss_fall
    (that fall, relative); the stopping rule (stop), how the fit ended (stopped: fixed, early or
    cap), its optimizer steps and its passes over the training pairs; the same of the new users'
    fit (Method.fewshot_status). (Its seconds go in the fit
    report, beside the checkpoint: a record stays the same for the same seed.)"""
    fall, curve = last_tenth_fall(method.curve), method.curve or {}
    return {"converged": converged(method.curve), "loss_fall": fall, "stop": method.hparams.get("stop"),
            "stopped": curve.get("stopped"), "steps": curve.get("steps"), "passes": curve.get("passes"),
            **method.fewshot_status()}


def fit_report(method):
    """A checked fit's report, written beside its checkpoint: setting, hyperparameters, the loss
    curves of the fit and of the last new users' fit, and the convergence verdict."""
    return {**method.setting(), "hparams": method.hparams, **fit_status(method), "fit_seconds": method.fit_seconds,
            "converged_rule": "converged: stopped by the held-out rule before its cap (stop=early: lore.steps)"
                              if method.hparams.get("stop") == "early" else
                              f"converged: the mean loss over the last tenth of the steps is at most {CONVERGED_FALL:g} "
                              f"(relative) below its mean over the tenth before",
            "curve": method.curve, "fewshot_curve": method.fewshot_curve}


def sweep_shots(*, K_list=None, shots=None, trials=None, seen_train=None, unseen_fewshot=None, unseen_test=None,
                methods=("lore",),
                alpha_list=(0.0,), v_ref=None, hparams=None, device=None, seed=None, select=("random",)):
    """Accuracy of unseen users against the number of shots. For every method and (alpha, K): fit
    on the seen users; then for every way of choosing the shots in `select` and every shot count,
    `trials` times, choose `shots` of each unseen user's few-shot pairs, fit the users' parameters
    on them with the shared part fixed, and measure the accuracy on the chosen shots and on the
    held-out pairs. select: "random" (the paper's protocol: sample_shots, pairs or whole groups
    such as PRISM's dialogs) and/or "active" (lore.active: in rounds, each user's most informative
    next pair under a Laplace approximation of its posterior; one run of max(shots) rounds per
    trial gives every shot count, its selections nested). Item features are computed once per fit
    (featurize), so a trial costs fits in the method's small feature space.
    -> one record per (method, alpha, K, select, shots): unseen_fewshot and unseen_test, the mean
    over trials of the users' mean accuracy, and their `_std` over trials."""
    _check_trials(trials)
    shots = int_list(shots, "shots", least=1)
    select = active.check_select(select)
    sets = distributed.shard_seen(_check_sets(dict(seen_train=seen_train, unseen_fewshot=unseen_fewshot,
                                        unseen_test=unseen_test), device))
    pool = sets["unseen_fewshot"]
    if pool.group is None and max(shots) > int(pool.counts().max()):   # as --shots is checked (cli.check_shots)
        raise InputError(f"shots {max(shots)} is more than any unseen user's pool of few-shot pairs "
                         f"(at most {int(pool.counts().max())})")
    settings = _settings(methods, K_list, alpha_list, v_ref, hparams, sets["seen_train"])
    if "active" in select:
        for method in settings:   # refused before any fit
            active.check_active(method)
    records = []
    for method in settings:
        if seed is not None:   # a setting's start depends on its name alone
            seed_fit(seed, method.name, method.K, method.alpha)
        checked_fit(method, sets["seen_train"])
        pool, test = featurize(method, sets["unseen_fewshot"]), featurize(method, sets["unseen_test"])
        for how in select:
            acc = np.zeros((len(shots), 2, trials))                                # [shot counts, sets, trials]
            fits = [[None] * trials for _ in shots]   # each trial's few-shot fit (fewshot_status)

            def measure(n, chosen, U_new, t):
                acc[shots.index(n), :, t] = (accuracy(method, pool.select(chosen), U_new).mean(),
                                             accuracy(method, test, U_new).mean())
                fits[shots.index(n)][t] = method.fewshot_status()
            if how == "random":
                for n in tqdm(shots, desc=f"{method} shots", leave=False, disable=None):
                    for t in range(trials):
                        chosen = sample_groups(pool, n)                           # [P] bool
                        measure(n, chosen, checked_fit_users(method, pool.select(chosen)), t)
            else:   # one run of max(shots) rounds per trial: its selections are nested
                for t in tqdm(range(trials), desc=f"{method} active", leave=False, disable=None):
                    for n, chosen, U_new in active.active_shots(method, pool, max(shots)):
                        if n in shots:
                            measure(n, chosen, U_new, t)
            for n_shots, (few, held), fit in zip(shots, acc, fits):
                records.append({**method.setting(), "select": how, "shots": n_shots,
                                "unseen_fewshot": few.mean(), "unseen_fewshot_std": few.std(),
                                "unseen_test": held.mean(), "unseen_test_std": held.std(), **fewshot_trials(fit)})
                print(f"{method} {how} shots {n_shots:>4}: unseen_fewshot {few.mean():.4f} +- {few.std():.4f}"
                      f"  unseen_test {held.mean():.4f} +- {held.std():.4f}")
    return [{k: float(v) if isinstance(v, np.floating) else v for k, v in r.items()} for r in records]




def fewshot_trials(fits):
    """A shot count's few-shot fits over its trials (Method.fewshot_status each) -> fewshot_stop, the
    rules the early ones watched, their mean steps, and how many trials stopped at their cap
    (None: no loop)."""
    steps = [f["fewshot_steps"] for f in fits]
    return {"fewshot_stop": fits[0]["fewshot_stop"],
            "fewshot_rule": sorted({f["fewshot_rule"] for f in fits if f["fewshot_rule"] is not None}) or None,
            "fewshot_steps": None if None in steps else float(np.mean(steps)),
            "fewshot_at_cap": sum(f["fewshot_stopped"] == "cap" for f in fits)}


def _check_grid(K_list, alpha_list):
    """A sweep's grid: a list of integer K and a list of alpha >= 0 (a swapped argument, such as
    run()'s order given to run_few_shot_vary_shots, fails here with the name at fault)."""
    int_list(K_list, "K_list", least=0)
    if not isinstance(alpha_list, (list, tuple, np.ndarray)) or len(alpha_list) == 0:
        raise InputError(f"alpha_list must be a non-empty list of numbers >= 0, got {short_repr(alpha_list)}")
    for alpha in alpha_list:
        check_alpha(alpha, "alpha_list")


def _check_reference_data(data, N, N_unseen, device):
    """Pack the reference pipelines' per-user lists (checking them once) and check the user counts."""
    for name, n in (("N", N), ("N_unseen", N_unseen)):
        if not is_int(n):
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
    if not is_int(trials) or trials < 1:
        raise InputError(f"trials must be an integer >= 1, got {short_repr(trials)}")


def _check_sets(sets, device):
    """The pair sets as checked Pairs on one device, with one F, the seen sets with the same users
    and the unseen sets with the same users."""
    missing = [name for name, pairs in sets.items() if pairs is None]
    if missing:   # keywords with None defaults: a missing set is this error, not Python's TypeError
        raise InputError(f"{', '.join(missing)} must be given (the pair sets {', '.join(sets)}: Pairs or lists "
                         f"of per-user [m_i, F] tensors)")
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
        v_ref = check_v_ref(v_ref)                                                # [F, 1]
        if v_ref.shape[0] != seen_train.n_features:
            raise InputError(f"v_ref has {v_ref.shape[0]} features but the pairs have F={seen_train.n_features}")
    if max(K_list) > seen_train.n_features:   # checked before any fit: a [N, K] W of K >> F never fits
        raise InputError(f"K={max(K_list)} is more than the F={seen_train.n_features} features of the pairs: "
                         f"a basis has at most F directions")
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
    if seen_train.shard and any(not isinstance(m, LoReMethod) for m in settings):
        raise InputError(f"across torchrun processes only lore and lore_regularized train (their V's gradient "
                         f"is summed across ranks); run {', '.join(m for m in methods if m not in ('lore', 'lore_regularized'))} "
                         f"in one process")
    return settings


# ----------------------------------------------------------------------------------------------
# The reference API: the original pipelines, training and evaluation, by their positions
# ----------------------------------------------------------------------------------------------

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
    int_list(num_shots, "num_shots", least=1)
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
    V = check_matrix(V, "V")                                                      # [F, K]
    if V.shape[0] != pairs.n_features:
        raise InputError(f"V has shape {tuple(V.shape)} but the pairs have F={pairs.n_features}: V must be [F, K]")
    fitw = PersonalizeBatch(pairs.n_users, pairs.n_features, V.shape[1], num_iterations,
                            learning_rate, pairs.device)
    return fitw.train(pairs, V.to(pairs.device))


def _pack_basis_input(train_features, K, device):
    if not is_int(K) or K < 1:
        raise InputError(f"a basis needs K >= 1 directions, got K={K}")
    return pack(train_features, "train_features", device)


def eval_multiple(W_list, V_list, test_features):
    """Per-user accuracy of N users sharing one basis. W_list: [N, K] or a list of N weights [K];
    V_list: the basis [F, K] (or the seed's list of N references to it); test_features: a list of
    N tensors [m_i, F] or Pairs. Prints the mean and std; returns numpy [N]."""
    if isinstance(V_list, (list, tuple)):
        if len(V_list) == 0 or any(v is not V_list[0] and not torch.equal(v, V_list[0]) for v in V_list):
            raise InputError("eval_multiple evaluates users that share one basis V (V_list holds different ones)")
        V_list = V_list[0]
    V = check_matrix(V_list, "V")                                                 # [F, K]
    W = check_matrix(torch.stack([torch.as_tensor(w) for w in W_list])
                      if isinstance(W_list, (list, tuple)) else W_list, "W")       # [N, K]
    pairs = pack(test_features, "test_features", V.device)
    if W.shape != (pairs.n_users, V.shape[1]) or V.shape[0] != pairs.n_features:
        raise InputError(f"weights {tuple(W.shape)} and basis {tuple(V.shape)} do not fit {pairs.n_users} "
                         f"users with F={pairs.n_features}: need W [N, K] and V [F, K]")
    accuracies = per_user_accuracy(pairs, V, W)
    print(f"Average accuracy: {accuracies.mean():.4f}")
    print(f"Standard deviation of accuracy: {accuracies.std():.4f}")
    return accuracies


# ----------------------------------------------------------------------------------------------
# Sampling and simulation
# ----------------------------------------------------------------------------------------------

def sample_shots(train_features_unseen, shots):
    """Per user, `shots` random rows drawn without replacement (all rows when the user has fewer).
    Pairs with a `group` are sampled by group: `shots` groups per user, each with all its pairs.
    A list in gives a list out; Pairs in gives Pairs out. Kept rows stay in their original order."""
    shots = int_list([shots], "shots", least=1)[0]
    if isinstance(train_features_unseen, Pairs):
        return train_features_unseen.select(sample_groups(train_features_unseen, shots))
    pairs = pack(train_features_unseen, "train_features_unseen",
                 train_features_unseen[0].device if len(train_features_unseen) else None)
    return pairs.select(sample_groups(pairs, shots)).split()


def sample_groups(pairs, shots):
    """Bool mask [P] keeping `shots` random groups of every user (a group per pair by default)."""
    # rank each user's groups in a random order, keep rank < shots
    gid, owner = pairs.groups()                                                    # [P], [G]
    G = len(owner)
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


def simulate_pairs(reward_tensor, W, sample_percentage, per_user=None):
    """The pairs of simulated users as indices: per user, floor(sample_percentage * S) prompts drawn
    without replacement (NumPy's generator; per_user: that many instead), and on each the best
    minus the worst of its R responses under the user's mixture W [N, M] of the reward models'
    scores reward_tensor [S, R, M]. Only the drawn prompts are scored, users in chunks: memory
    grows with the pairs, not with users x prompts. -> dict of [P] long tensors: user, prompt,
    chosen and rejected (response r of prompt s is row s * R + r), draw (the pair's rank in its
    user's random draw)."""
    S, R, _ = np.shape(reward_tensor)
    idx = torch.as_tensor(_sample_prompts(len(W), S, sample_percentage, per_user))  # [N, m]
    chosen, rejected = simulate_choices(reward_tensor, W, idx)                    # [N, m]
    user = torch.arange(len(W)).repeat_interleave(idx.shape[1])                    # [P]
    prompt = idx.reshape(-1)                                                       # [P]
    return {"user": user, "prompt": prompt, "chosen": prompt * R + chosen.reshape(-1),
            "rejected": prompt * R + rejected.reshape(-1), "draw": torch.arange(idx.shape[1]).repeat(len(W))}


def simulate_choices(reward_tensor, W, idx=None):
    """Best and worst response of every prompt (or of prompts idx [N, m], each user its own) for
    every user: two [N, S] (or [N, m]) index tensors. Scores in float64 with the first index on
    ties (numpy's argmax/argmin convention); users in chunks so that [N, S, R] scores never exist
    at once."""
    rewards = torch.as_tensor(np.asarray(reward_tensor), dtype=torch.float64)      # [S, R, M]
    W = torch.as_tensor(np.asarray(W), dtype=torch.float64)                        # [N, M]
    best, worst = [], []
    chunk = 64 if idx is None else max(1, (1 << 10) // max(1, idx.shape[1]))   # [n, m, R, M] in cache: 3x faster
    for start in range(0, len(W), chunk):
        w = W[start:start + chunk]                                                 # [n, M]
        if idx is None:
            scores = torch.einsum("srm,nm->nsr", rewards, w)                       # [n, S, R]
        else:
            scores = (rewards[idx[start:start + chunk]] * w[:, None, None, :]).sum(-1)  # [n, m, R]
        best.append(scores.argmax(-1))
        worst.append(scores.argmin(-1))
    return torch.cat(best), torch.cat(worst)


def _sample_prompts(N, S, sample_percentage, per_user=None):
    m = int(sample_percentage * S) if per_user is None else per_user
    if m < 1 or m > S:
        raise InputError(f"sample_percentage={sample_percentage} of {S} prompts is 0 prompts per user" if per_user is None
                         else f"{per_user} prompts per user, but there are {S} prompts")
    return choice_without_replacement(N, S, m)   # np.random.choice(S, m, replace=False) N times, compiled


def generate_popupulation(alpha, N):
    """N users drawn from Dirichlet(alpha): [N, len(alpha)], rows on the simplex. (The seed's
    spelling; generate_population is the same function.)"""
    return np.random.dirichlet(alpha, N)



def every_pair(pool, block, row_scores, W):
    """PersonalLLM's `--candidates all`: every pair of the `block` responses (consecutive table rows
    s * block .. s * block + block - 1) of each prompt s in a user's pool, answered by the user's true
    reward row_scores[row] . W[user] (the better response chosen, the first on ties). pool: Pairs in
    table form, row_scores [E, M], W [N, M] -> Pairs, each user's candidates by prompt, checked."""
    if pool.X is not None:
        raise InputError("every_pair needs the table form of the pool (rows of the embedding table)")
    n_blocks = len(pool.table) // block + 1
    keys = torch.unique(pool.user.long() * n_blocks + pool.chosen // block)        # (user, prompt), sorted
    user, prompt = keys // n_blocks, keys % n_blocks
    a, b = torch.triu_indices(block, block, 1, device=pool.device)                 # [C]: the C pairs of a block
    user = user.repeat_interleave(len(a))                                          # [Q]
    ra = (prompt[:, None] * block + a).reshape(-1)                                 # [Q]
    rb = (prompt[:, None] * block + b).reshape(-1)
    Wu = W.to(pool.device, torch.float64)[user]                                    # [Q, M]
    scores = row_scores.to(pool.device, torch.float64)
    better_a = (scores[ra] * Wu).sum(-1) >= (scores[rb] * Wu).sum(-1)              # [Q]
    return Pairs(user, pool.n_users, table=pool.table, chosen=torch.where(better_a, ra, rb),
                 rejected=torch.where(better_a, rb, ra), checked=True)


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
    chosen, rejected = simulate_choices(reward_tensor, W)                         # [N, S]
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
