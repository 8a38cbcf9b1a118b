"""A personalized reward in use: user u's reward of a (prompt, response) is phi^T V w_u, phi the
frozen reward model's embedding of the conversation (lore.extract) and V the checkpoint's basis.

PersonalReward is the reward function of an RLHF run (TRL's contract: reward(prompts, completions,
**columns) -> list of floats, the user arriving as a column) and the engine of tools/serve.py. It
learns each user online, answer by answer:

The model of a user (lore.active's): its free parameters theta [D] (LoRe: the logits of its simplex
weights, w = softmax(theta)), a Gaussian prior N(mu, variance I), and Bradley-Terry answers,
P(chosen wins) = sigmoid(s m(theta)), s = bt_scale, m the pair's margin.
- The prior (what a user with no answers gets): mu = log of w_bar, the mean of the seen users'
  weights W stored in the checkpoint (softmax(mu) = w_bar: the population's average reward), and
  the method's variance (free_prior: 1). A checkpoint without W: free_prior's mean (uniform w).
- The weights after n answers: the posterior mode (MAP), found by Fisher scoring from mu: each step
  solves H d = gradient with H = I / variance + sum_p lambda_p g_p g_p^T, the precision of
  lore.active's Laplace approximation (g_p = dm_p/dtheta, lambda_p = s^2 sigmoid'(s m_p)). It starts
  from mu every time, so a user's weights are a function of its answers alone (to TOLERANCE): refitting the stored
  answers after a restart gives them again, and all users refit at once (vectorized over users).
- The next question: among all pairs of the candidate responses, the one whose answer adds the
  most information, log(1 + lambda g^T H^-1 g) at the mode (lore.active.information).

Embeddings of repeated texts come from a bounded LRU cache; texts not in it are embedded by one
worker thread, which takes every request queued while its previous forward ran in one batch
(lore.extract.embed_now), so concurrent callers share forwards.
"""
import hashlib
import json
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future

import torch

from lore.active import check_active, fisher_weight, information, margin_gradients, posterior_precision
from lore.checks import InputError, resolve_device
from lore.extract import embed_now, load_reward_model
from lore.methods import load_method, method_features, simplex

FIT_STEPS = 50          # Fisher scoring steps from the prior at most ...
TOLERANCE = 1e-10       # ... stopping once no user's step is longer (in logits)
HALVINGS = 30           # step halvings at most before a user's step is given up
MAX_BATCH = 256         # conversations per forward of the embedding worker
MAX_USER_CHARS = 128    # a user id
ROLES = ("system", "user", "assistant")


class EmbeddingCache:
    """At most `size` embeddings [F] by key, least recently used dropped first; thread-safe."""

    def __init__(self, size):
        self.size, self.hits, self.misses = size, 0, 0
        self.items, self.lock = OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.items.get(key)
            if value is None:
                self.misses += 1
                return None
            self.hits += 1
            self.items.move_to_end(key)
            return value

    def put(self, key, value):
        if self.size == 0:
            return
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def stats(self):
        return {"size": len(self.items), "capacity": self.size, "hits": self.hits, "misses": self.misses}


class User:
    """One user's answers (their item features, float64) and its posterior: theta [D], H [D, D]."""

    def __init__(self, theta, H):
        self.Zc, self.Zr, self.theta, self.H = [], [], theta, H
        self.asked = set()   # the answered pairs, as {chosen key, rejected key}: not asked again
        self.lock = threading.Lock()


class PersonalReward:
    """phi^T V w_user for any user, learned online. Build it with from_checkpoint (or from a method
    of load_method and a loaded reward model). Thread-safe: one user's updates are serialized."""

    def __init__(self, method, model, tokenizer, *, checkpoint_tensors=None, cache_size=4096,
                 batch_tokens=16384):
        F = method_features(method)
        if F is None or not method.linear:
            raise InputError(f"method {method.name} has no basis V: a personalized reward needs a linear method "
                             f"(lore, lore_regularized, pca)")
        check_active(method)
        probe = torch.randn(3, method.V.shape[1], generator=torch.Generator().manual_seed(0))
        if not torch.allclose(simplex(method.free_parameters(simplex(probe).to(method.device))).cpu(),
                              simplex(probe), atol=1e-5):
            raise InputError(f"method {method.name}: its user parameters are not the simplex weights of its free "
                             f"parameters, which this reward assumes")
        zc, zr = torch.randn(2, 3, method.V.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        theirs = margin_gradients(method, probe.double(), zc, zr)
        if not all(torch.allclose(a, b, atol=1e-8) for a, b in zip(theirs, simplex_margins(probe.double(), zc - zr))):
            raise InputError(f"method {method.name}: its margin is not (zc - zr) . softmax(theta), which this reward "
                             f"computes in closed form")
        if model.config.hidden_size != F:
            raise InputError(f"the reward model {model.name_or_path} gives F={model.config.hidden_size}, the "
                             f"checkpoint was fitted on F={F}: use the reward model its data was embedded with")
        if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
            raise InputError(f"cache_size must be an integer >= 0, got {cache_size!r}")
        self.method, self.model, self.tokenizer = method, model, tokenizer
        self.batch_tokens, self.K = batch_tokens, method.V.shape[1]
        mean, self.variance = method.free_prior()
        W = (checkpoint_tensors or {}).get("W")
        if W is not None and self.K > 1:   # the seen users' mean weight, a point of the simplex
            mean = method.free_parameters(W.float().mean(0, keepdim=True).to(method.device))[0]
        self.prior_mean = mean.double().cpu()                                       # [D]
        self.prior_precision = torch.eye(len(mean), dtype=torch.float64) / self.variance   # [D, D]
        self.prior_weights = simplex(self.prior_mean)                               # [K]
        self.users, self.users_lock = {}, threading.Lock()
        self.cache = EmbeddingCache(cache_size)
        self.forwards = self.embedded = 0   # the worker's batches and the conversations in them
        self.work = queue.Queue()
        self.worker = threading.Thread(target=self._embed_loop, daemon=True, name="lore-embed")
        self.worker.start()

    @classmethod
    def from_checkpoint(cls, checkpoint, model_name_or_path, device=None, **kwargs):
        """A checkpoint of train_basis.py ({method}_K{K}[_alpha{a}].safetensors; its method must be
        registered: import utils first for LoRe's entries) and the reward model its data was
        embedded with (hub id or local folder)."""
        device = resolve_device(device)
        method, tensors = load_method(checkpoint, device)
        model, tokenizer = load_reward_model(model_name_or_path, device)
        return cls(method, model, tokenizer, checkpoint_tensors=tensors, **kwargs)

    # ------------------------------------------------------------------ embeddings

    def embed(self, conversations, texts=False):
        """[n, F] float32: each conversation's embedding, from the cache or the embedding worker."""
        keys = [("text", c) if texts else key_of(c) for c in conversations]
        out, missing = [self.cache.get(k) for k in keys], {}
        for i, k in enumerate(keys):
            if out[i] is None:
                missing.setdefault(k, []).append(i)
        if missing:
            future = Future()
            todo = [conversations[rows[0]] for rows in missing.values()]
            self.work.put((todo, texts, future))
            for (k, rows), phi in zip(missing.items(), future.result()):
                phi = phi.clone()   # its own storage: a view would keep the whole batch alive in the cache
                self.cache.put(k, phi)
                for i in rows:
                    out[i] = phi
        return torch.stack(out)                                                     # [n, F]

    def _embed_loop(self):
        """The one thread that runs the reward model: every request queued meanwhile in one batch
        per kind (chat conversations, raw texts)."""
        while True:
            jobs = [self.work.get()]
            if jobs[0] is None:   # close()
                return
            while sum(len(j[0]) for j in jobs) < MAX_BATCH:
                try:
                    job = self.work.get_nowait()
                except queue.Empty:
                    break
                if job is None:   # close() after this batch
                    self.work.put(None)
                    break
                jobs.append(job)
            for texts in (False, True):
                batch = [j for j in jobs if j[1] is texts]
                if not batch:
                    continue
                try:
                    phi = embed_now([c for j in batch for c in j[0]], self.model, self.tokenizer, texts=texts,
                                    batch_tokens=self.batch_tokens)                 # [n, F]
                except Exception as e:   # handed to the callers, which raise it; the worker lives on
                    for j in batch:
                        j[2].set_exception(e)
                    continue
                self.forwards += 1
                self.embedded += len(phi)
                start = 0
                for conversations, _, future in batch:
                    future.set_result(phi[start:start + len(conversations)])
                    start += len(conversations)

    def features(self, conversations, texts=False):
        """The method's item features of conversations, [n, D] float64."""
        phi = self.embed(conversations, texts)                                      # [n, F]
        with torch.no_grad():
            return self.method.item_features(phi.to(self.method.device)).double().cpu()

    # ------------------------------------------------------------------ users

    def weights(self, user):
        """-> (w [K] the user's simplex weights, number of answers); the prior for a user with none."""
        state = self.users.get(check_user(user)) if user is not None else None
        if state is None:
            return self.prior_weights.clone(), 0
        return simplex(state.theta), len(state.Zc)

    def user_ids(self):
        return list(self.users)

    def _user(self, user):
        with self.users_lock:
            if user not in self.users:
                self.users[user] = User(self.prior_mean.clone(), self.prior_precision.clone())
            return self.users[user]

    def add_preference(self, user, prompt, chosen, rejected, store=None):
        """One answer of `user`: of the two responses to `prompt` (string or messages) it prefers
        `chosen` (string or messages). Its weights are refitted at once from all its answers ->
        (w [K], number of answers). store(user, prompt, chosen, rejected), when given, runs under
        the user's lock before the weights change (the server commits the answer there): if it
        raises, nothing changes."""
        user = check_user(user)
        pair = [conversation(prompt, chosen, "chosen"), conversation(prompt, rejected, "rejected")]
        zc, zr = self.features(pair)
        state = self._user(user)
        with state.lock:
            if store is not None:
                store(user, prompt, chosen, rejected)
            state.asked.add(frozenset(map(key_of, pair)))
            state.Zc.append(zc)
            state.Zr.append(zr)
            Zc, Zr = torch.stack(state.Zc), torch.stack(state.Zr)                   # [P, D]
            theta, H = self.fit(Zc, Zr, torch.zeros(len(Zc), dtype=torch.long), 1)
            state.theta, state.H = theta[0], H[0]
            return simplex(state.theta), len(state.Zc)

    def restore(self, answers):
        """Every user's answers at once, in order (a database's, after a restart): a list of
        (user, prompt, chosen, rejected). Replaces what the users had; one fit for all users."""
        if not answers:
            return
        users = list(dict.fromkeys(check_user(a[0]) for a in answers))
        index = {u: i for i, u in enumerate(users)}
        pairs = [conversation(a[1], a[k], name) for a in answers for k, name in ((2, "chosen"), (3, "rejected"))]
        Z = self.features(pairs)                                                    # [2P, D]
        Zc, Zr = Z[0::2], Z[1::2]                                                   # [P, D]
        user = torch.tensor([index[a[0]] for a in answers])                         # [P]
        theta, H = self.fit(Zc, Zr, user, len(users))
        with self.users_lock:
            for i, u in enumerate(users):
                state = User(theta[i], H[i])
                state.Zc, state.Zr = list(Zc[user == i]), list(Zr[user == i])
                self.users[u] = state
            for p, a in enumerate(answers):
                self.users[a[0]].asked.add(frozenset(map(key_of, pairs[2 * p:2 * p + 2])))

    def fit(self, Zc, Zr, user, n_users):
        """The posterior mode of every user and its precision: Zc, Zr [P, D] item features of the
        answers' chosen and rejected responses (float64), user [P] in 0..N-1 -> (theta [N, D],
        H [N, D, D]). Fisher scoring from the prior mean, all users at once: each step solves
        H d = gradient and is halved, user by user, until that user's objective falls (H is
        positive definite, so d descends); it stops when no user's step exceeds TOLERANCE (at most
        FIT_STEPS steps)."""
        X, s, n = Zc - Zr, self.method.bt_scale, n_users                            # [P, D]
        everything = torch.ones(len(user), dtype=torch.bool)

        def objective(theta):   # the negative log posterior of every user [N]
            m, _ = simplex_margins(theta[user], X)
            prior = ((theta - self.prior_mean) ** 2).sum(1) / (2 * self.variance)
            return prior.index_add(0, user, torch.nn.functional.softplus(-s * m))

        theta = self.prior_mean.expand(n, -1).clone()                               # [N, D]
        value = objective(theta)
        for _ in range(FIT_STEPS):
            m, g = simplex_margins(theta[user], X)                                  # [P], [P, D]
            H = posterior_precision(fisher_weight(self.method, m), g, user, n, self.variance, everything)
            push = (s * torch.sigmoid(-s * m))[:, None] * g                         # [P, D]: the answers' pull
            gradient = (theta - self.prior_mean) / self.variance - torch.zeros_like(theta).index_add_(0, user, push)
            move = torch.linalg.solve(H, gradient)                                  # [N, D]
            scale = torch.ones(n, 1, dtype=theta.dtype)
            for _ in range(HALVINGS):
                trial = theta - scale * move
                new = objective(trial)
                worse = new > value
                if not worse.any():
                    break
                scale[worse] /= 2
            scale[worse] = 0    # no descent found in HALVINGS halvings: that user stays
            theta, value = theta - scale * move, torch.where(worse, value, new)
            if (scale * move).norm(dim=1).max() < TOLERANCE:   # every user has converged
                break
        m, g = simplex_margins(theta[user], X)                                      # the precision at the mode
        return theta, posterior_precision(fisher_weight(self.method, m), g, user, n, self.variance, everything)

    # ------------------------------------------------------------------ rewards and questions

    def rewards(self, users, conversations, texts=False):
        """rewards [n] (floats): conversation c scored for users[c] (None: the prior)."""
        Z = self.features(conversations, texts)                                     # [n, D]
        weights = {u: self.weights(u)[0] for u in set(users)}
        W = torch.stack([weights[u] for u in users]).double()                      # [n, K]
        with torch.no_grad():
            return self.method.reward(Z, W).tolist()

    def __call__(self, prompts, completions, user=None, **kwargs):
        """TRL's reward-function contract: prompts, completions (strings, or lists of messages in
        TRL's conversational format) -> one float per completion. user: None (every completion
        scored with the prior), one user id, or one per completion (TRL passes a dataset's columns
        as lists; None entries get the prior). Other columns (kwargs) are ignored."""
        if not isinstance(prompts, (list, tuple)) or not isinstance(completions, (list, tuple)) \
                or len(prompts) != len(completions):
            raise InputError(f"prompts and completions must be lists of one length, got "
                             f"{type(prompts).__name__} and {type(completions).__name__}")
        n = len(completions)
        users = [user] * n if user is None or isinstance(user, (str, int)) else list(user)
        if len(users) != n:
            raise InputError(f"user has {len(users)} entries for {n} completions")
        users = [None if u is None else str(u) for u in users]   # TRL columns may hold integer ids
        return self.rewards(users, [conversation(p, c, "completion", empty_response=True)
                                    for p, c in zip(prompts, completions)])

    def next_question(self, user, prompt, responses):
        """The pair (i, j), i < j, of the responses to `prompt` whose answer tells the most about
        `user` under its current posterior -> (i, j, information in nats). Ties: the first pair."""
        if not isinstance(responses, (list, tuple)) or len(responses) < 2:
            raise InputError("responses must be a list of at least 2 responses")
        user = check_user(user)
        candidates = [conversation(prompt, r, f"responses[{k}]") for k, r in enumerate(responses)]
        Z = self.features(candidates)                                               # [R, D]
        state = self.users.get(user)
        theta, H = (self.prior_mean, self.prior_precision) if state is None else (state.theta, state.H)
        i, j = torch.triu_indices(len(responses), len(responses), 1)                # [Q] each
        m, g = simplex_margins(theta.expand(len(i), -1), Z[i] - Z[j])               # [Q], [Q, D]
        info = information(fisher_weight(self.method, m), g, torch.zeros_like(i), H[None])   # [Q]
        if state is not None:   # a pair answered before is asked again only when every pair was
            keys = [key_of(c) for c in candidates]
            asked = torch.tensor([frozenset((keys[a], keys[b])) in state.asked for a, b in zip(i.tolist(), j.tolist())])
            if not asked.all():
                info = info.masked_fill(asked, float("-inf"))
        best = int(torch.argmax(info))   # the first of the largest
        return int(i[best]), int(j[best]), float(info[best])

    def close(self):
        """Stop the embedding worker once the batches queued before are done."""
        self.work.put(None)
        self.worker.join()


def simplex_margins(theta, X):
    """The margins m = x . softmax(theta) of pairs x = zc - zr [P, D] and their gradients in theta,
    g = w * (x - m) (w = softmax(theta) [P, D]): lore.active.margin_gradients of the LoRe entries
    in closed form, without torch.func's per-call cost (checked equal at construction)."""
    w = simplex(theta)                                                             # [P, D]
    m = (X * w).sum(-1)                                                            # [P]
    return m, w * (X - m[:, None])                                                 # [P], [P, D]


def check_user(user):
    """A user id: a non-empty string of at most MAX_USER_CHARS printable characters."""
    if not isinstance(user, str) or not user or len(user) > MAX_USER_CHARS or not user.isprintable():
        raise InputError(f"user must be a non-empty printable string of at most {MAX_USER_CHARS} characters, "
                         f"got {_shown(user)}")
    return user


def key_of(conversation):
    """A conversation's key in the cache and in a user's answered pairs."""
    return json.dumps(conversation, sort_keys=True)


def model_identity(model):
    """What identifies a reward model's weights, cheaply: its name, a hash of its config and of the
    first 4096 values of every parameter (a hash of all 16 GB of an 8B model would take minutes)."""
    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return {"model": str(model.name_or_path), "weights": h.hexdigest()}


def conversation(prompt, response, name="response", empty_response=False):
    """A prompt (string: one user message; or a list of messages) and a response (string: one
    assistant message; or messages, TRL's conversational completions) -> one list of messages.
    Empty texts are refused, except a response with empty_response (a policy may stop at once)."""
    return messages(prompt, "user", "prompt") + messages(response, "assistant", name, empty_response)


def messages(value, role, name, empty=False):
    if isinstance(value, str):
        if not value and not empty:
            raise InputError(f"{name} is empty")
        return [{"role": role, "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"{name} must be a non-empty string or list of messages, got {_shown(value)}")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str) \
                or not (m["content"] or empty):
            raise InputError(f"{name}: every message needs a role in {list(ROLES)} and a non-empty string "
                             f"content, got {_shown(m)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _shown(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
