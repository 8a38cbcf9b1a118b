"""Baselines: PAL and VPL, entries of METHODS beside LoRe.

Two published personalized reward models, re-implemented on the same frozen reward-model
embeddings as LoRe so that the sweeps compare them on equal terms. Neither is linear in phi, so both
need the table form of Pairs (both embeddings of every pair). Their defaults are the originals'
recipes; each names its source: PAL = RamyaLab/pluralistic-alignment @ fcfc03c, VPL =
WEIRDLabUW/vpl_llm @ fdfdfa7 (file:line). Both train as the originals do, by minibatch: a step
is one batch of pairs drawn across users, gathered from the table in one go (no loop over users
or pairs inside a step). Steps run eagerly on every device (no CUDA graph: the last batch of an
epoch is smaller and VPL's learning rate follows a schedule).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from lore.checks import InputError, is_int
from lore.methods import Method, pair_features, simplex
from lore.steps import training_loop
from lore.stopping import FEWSHOT_CAP, STOPS, EarlyStop, capped, checked_every, fewshot_holdout, holdout

PAL_LOGIT_SCALE_INIT = math.log(1 / 0.07)   # pal_rm_b/learner.py:54 (CLIP's initial temperature)
PAL_MAX_SCALE = 100.0                       # exp(logit_scale) is clamped here: pal_rm_b/learner.py:141-142
VPL_SLOPE = 0.2                             # LeakyReLU(0.2) in every MLP: vae_utils.py:21,23,78,80
VPL_ANNEAL_BASELINE = 0.1                   # the KL weight's annealing starts at 10%: vae_utils.py:171
VPL_MIN_STD = math.exp(-0.5)                # the posterior's log-variance is clamped to [-1, 1]: vae_utils.py:143
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
        if hp in method.choices:   # a string of its choices, checked by check_hparam
            continue
        ok = is_int(v) if is_int(method.defaults[hp]) else \
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or v <= 0:
            kind = "an integer" if is_int(method.defaults[hp]) else "a number"
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


class RowAdam:
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
        "stop": "fixed",       # the original's: `epochs` passes; "early": lore.stopping's rule, `steps` the cap
        "steps": 20000,        # the cap of stop="early" (optimizer steps; or CAP_PASSES passes if more)
        "fewshot_stop": "fixed",   # the original's fewshot_epochs; "early": lore.stopping's few-shot rule, those the cap
    }
    choices = {"stop": STOPS, "fewshot_stop": STOPS}

    limits = {"dim": 1 << 16}   # a [F, dim] and two [dim, dim] layers: 2**16 is already 16 GB
    least = {"dim": 2}          # unit-norm features of dim 1 are +-1: most pairs' margins are exactly 0
    # what lore.compare searches: the papers' recipe was tuned on ~100x more pairs per user, so the
    # per-user and few-shot rates and epochs get room; widths kept <= 128 for 2-core searches
    search, search_space = "random", {
        "K": [2, 3, 4, 5, 6, 8], "dim": [64, 128], "batch_size": [16, 32, 64],
        "lr": ("log", 1e-4, 3e-3), "proto_lr": ("log", 1e-3, 5e-2), "w_lr": ("log", 5e-3, 0.2),
        "fewshot_epochs": [FEWSHOT_CAP], "fewshot_lr": ("log", 5e-3, 0.2),   # fewshot_stop early: the cap
        "weight_decay": ("log", 1e-2, 10.0),   # the L2 on f: 3 beats 0.01 on 15 pairs a user (PersonalLLM/recipe.json)
        "stop": ["early"], "fewshot_stop": ["early"]}   # the fits' lengths: the stopping rule's (lore.stopping)

    def __init__(self, K, alpha=None, v_ref=None, device=None, **hparams):
        super().__init__(K, alpha, v_ref, device, **hparams)
        _check_positive(self)

    def _build(self, n_features):
        """The shared part, drawn on the CPU generator then moved (same seed, same start on any device)."""
        d, self.n_features = self.hparams["dim"], n_features
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
        self.w_adam.step(active.index_fill_(0, pairs.user[idx].long(), True))   # index_fill_ wants int64
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
        self.w_adam = RowAdam(self.W, h["w_lr"])

    def fit(self, pairs):
        h, B = self.hparams, self.hparams["batch_size"]
        train, held = holdout(pairs) if h["stop"] == "early" else (pairs, None)
        self.start(train)
        batches = iter(())

        def step():   # shuffled batches, the last one smaller (the original's DataLoader, datamodule.py:49)
            nonlocal batches
            idx = next(batches, None)
            if idx is None:
                batches = iter(torch.randperm(len(train)).to(self.device).split(B))
                idx = next(batches)
            return self.step(train, idx)
        stop = None if held is None else EarlyStop(lambda: self.held_out_loss(held),
                                                   [*self.f.parameters(), self.P, self.logit_scale, self.W],
                                                   checked_every(len(held), B))
        per_epoch = math.ceil(len(train) / B)
        total = capped(h["steps"], per_epoch) if stop else h["epochs"] * per_epoch
        training_loop(total, step, self.device, str(self), stop=stop, per_step=B / len(train), graph=False,
                      windowed=True)
        return simplex(self.W).detach()

    def held_out_loss(self, held):
        """The mean loss of the held-out pairs (the stopping rule's), in chunks."""
        return sum(self.loss(held, idx) * len(idx) for idx in torch.arange(len(held), device=self.device).split(4096)) / len(held)

    def fit_users(self, pairs):
        """New users' W, the shared part fixed: fewshot_epochs epochs in which every user takes one
        AdamW step per pair (stop="fixed", the original's), or lore.stopping's few-shot rule
        (fewshot_stop="early": fewshot_holdout), fewshot_epochs epochs the cap."""
        _need_table(self, pairs)
        if self.K == 1:
            return torch.ones(pairs.n_users, 1, device=self.device)
        h = self.hparams
        train, held, rule = fewshot_holdout(pairs) if h["fewshot_stop"] == "early" else (pairs, None, None)
        D, user = self.fewshot_rows(train), train.user                            # [P, d], [P]
        W = torch.randn(train.n_users, self.K).to(self.device).requires_grad_()   # [N, K]
        adam = RowAdam(W, h["fewshot_lr"])
        m = int(train.counts().max())
        slots, s = None, 0

        def before(i):   # a fresh order of every user's pairs at each epoch
            nonlocal slots, s
            s = i % m
            if s == 0:
                slots = _user_slots(train, shuffle=True)                          # [N, m]

        def step():
            # step s of the epoch: every user with an s-th pair takes one AdamW step on it
            p = slots[:, s]                                                       # [N]
            active = p >= 0
            margin = (D[p.clamp(min=0)] * self._ideal_points(simplex(W))).sum(-1)   # [N]
            # the original's loss is a mean over its batch of 4 pairs: the same gradient scale
            loss = -(F.logsigmoid(margin) * active).sum() / h["batch_size"]
            loss.backward()
            adam.step(active)
            return loss.detach()
        stop = None
        if rule is not None:   # the held-out pairs' mean loss, or (rule train_loss) the training pairs'
            Dh, uh = (D, user) if held is None else (self.fewshot_rows(held), held.user)
            loss = lambda: -F.logsigmoid((Dh * self._ideal_points(simplex(W)).index_select(0, uh)).sum(-1)).mean()
            stop = EarlyStop(loss, [W], rule=rule)
        training_loop(h["fewshot_epochs"] * m, step, self.device, before=before, stop=stop, per_step=1 / m,
                      graph=False, windowed=True)
        return simplex(W).detach()

    def fewshot_rows(self, pairs):
        """scale * (f(chosen) - f(rejected)) of the pairs, the new users' fit's rows -> [P, d]."""
        Zc, Zr = pair_features(self, pairs)                                       # [P, d] each
        with torch.no_grad():
            return self._scale() * (Zc - Zr)                                      # [P, d]; scale frozen too

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
    The original's latent has 512 dimensions; with K = 3 its norm sqrt(K) is small beside the
    embeddings and its std floor drowns it, so three knobs (the original's values by default) make
    it explicit: min_std the std floor, z_gain the reward network's z = z_gain * z, score_z
    "sphere" scores users with the mean rescaled to norm sqrt(K), as in training.

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
        "stop": "fixed",       # the original's: `epochs` passes; "early": lore.stopping's rule, `steps` the cap
        "steps": 20000,        # the cap of stop="early" (optimizer steps, or CAP_PASSES passes if more; the cosine schedule spans it)
        "min_std": VPL_MIN_STD,   # the posterior's std floor: log_var clamped to [-1, 1] (vae_utils.py:143)
        "z_gain": 1.0,         # z's norm, in units of sqrt(K): z rescaled to norm sqrt(latent_dim) (vae_utils.py:117)
        "score_z": "mean",     # the latent a user is scored with: the posterior mean (vae_utils.py:152-153), or
                               # "sphere": the mean rescaled to the norm z had in training
    }
    choices = {"stop": STOPS, "score_z": ("mean", "sphere")}

    # warmup is a fraction of the steps; hidden a layer width ([2F, hidden], [hidden, hidden] layers)
    limits = {"warmup": 1.0, "hidden": 1 << 16, "min_std": math.exp(0.5)}   # min_std: log_var is clamped to <= 1
    search, search_space = "random", {   # what lore.compare searches (widths <= 128 for 2-core searches)
        "K": [2, 3, 4, 5, 6, 8], "hidden": [64, 128], "duplicates": [1, 2, 4],
        "batch_size": [32, 64], "lr": ("log", 1e-4, 1e-2), "weight_decay": ("log", 1e-3, 30.0),
        # a latent loud and sharp enough to be heard beside the embeddings (PersonalLLM/recipe.json)
        "z_gain": [10.0], "min_std": ("log", 0.02, 0.1), "score_z": ["sphere"],
        "stop": ["early"]}   # the fit's length is the stopping rule's (lore.stopping), steps its cap

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
        return net.mean(out).clamp(-1, 1), net.log_var(out).clamp(2 * math.log(self.hparams["min_std"]), 1)

    def _score_z(self, mean):
        """The latent a user is scored with, from its posterior mean [n, K] (score_z)."""
        return F.normalize(mean, dim=-1) * math.sqrt(self.K) if self.hparams["score_z"] == "sphere" else mean

    def _reward(self, hd, z):
        """Reward network on the item's first-layer product hd [n, H] and the latent z [n, K] -> [n]."""
        net = self.net
        z = self.hparams["z_gain"] * z                                            # [n, K]
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

    def steps_per_epoch(self, pairs):
        return math.ceil(len(pairs) * self.hparams["duplicates"] / self.hparams["batch_size"])

    def start(self, pairs, total=None):
        """A fresh model and its optimizer and schedule for a fit on pairs of `total` steps (None:
        `epochs` epochs); -> steps per epoch."""
        _need_table(self, pairs, fitting=True)
        self._build(pairs.n_features)
        h = self.hparams
        named = list(self.net.named_parameters())
        self.optimizer = optim.AdamW([
            {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": h["weight_decay"]},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}],
            lr=h["lr"], betas=(0.9, 0.999), eps=1e-8)                             # transformers' AdamW defaults
        per_epoch = self.steps_per_epoch(pairs)
        total = total or h["epochs"] * per_epoch
        warm = int(h["warmup"] * total)

        def lr_factor(s):   # transformers' get_cosine_schedule_with_warmup
            if s < warm:
                return s / max(1, warm)
            return max(0.0, 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
        self.schedule = optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor)
        return per_epoch

    def fit(self, pairs):
        h, B = self.hparams, self.hparams["batch_size"]
        train, held = holdout(pairs) if h["stop"] == "early" else (pairs, None)
        early = held is not None
        # stop="early": the cosine schedule spans the cap, so that stopping never depends on it
        per_epoch = self.start(train, capped(h["steps"], self.steps_per_epoch(train)) if early else None)
        total = capped(h["steps"], per_epoch) if early else h["epochs"] * per_epoch
        drawn = {"target": torch.zeros(0), "b": 0, "step": 0}
        self.net.train()

        def step():
            if drawn["b"] >= len(drawn["target"]):   # a new epoch: targets and contexts drawn again
                drawn["target"], drawn["context"] = self.draw_epoch(train)
                drawn["b"] = 0
            b, i = drawn["b"], drawn["step"]
            target, context = drawn["target"][b:b + B], drawn["context"][b:b + B]
            eps = torch.randn(len(target), self.K).to(self.device)               # [B, K]
            drawn["b"], drawn["step"] = b + B, i + 1
            return self.step(train, target, context, eps, i)
        stop = None
        if early:
            # every user's context: its first context_max training pairs, fixed for every check
            context = _user_slots(train, shuffle=False)[:, :h["context_max"]]     # [N, C]
            stop = EarlyStop(lambda: self.held_out_loss(train, held, context), list(self.net.parameters()),
                             checked_every(len(held) * h["duplicates"], B))
        training_loop(total, step, self.device, str(self), stop=stop, per_step=B / (len(train) * h["duplicates"]),
                      graph=False, windowed=True)
        return self.fit_users(pairs)

    def held_out_loss(self, train, held, context):
        """The stopping rule's loss: -log sigmoid of the held-out pairs' margins, each user encoded
        (the posterior mean, as when scoring) from its context [N, C] of training pairs."""
        mask, c = context >= 0, context.clamp(min=0)                              # [N, C]
        hc, = self._first_layers(train.table[train.chosen[c]], "c")               # [N, C, H]
        hr, = self._first_layers(train.table[train.rejected[c]], "r")
        z = self._score_z(self._encode(hc, hr, mask)[0])[held.user]               # [P_held, K]
        hd, = self._first_layers(held.table[torch.cat([held.chosen, held.rejected])], "d")   # [2 P_held, H]
        r = self._reward(hd, z.repeat(2, 1))
        return -F.logsigmoid(r[:len(held)] - r[len(held):]).mean()

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
        return self._score_z(torch.cat(means))                                    # [N, K]

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

