"""The method interface and its registry: a Method is a shared part fitted on the seen users plus
per-user parameters, METHODS maps a name to its class (utils registers LoRe's entries, lore.baselines
PAL and VPL), and the evaluation every method shares (item features computed once, margins,
accuracies) and its checkpoints."""
import contextlib
import importlib
import json
import math
import os
import sys
import time
from collections.abc import MutableMapping
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from lore import fused
from lore.checks import MAX_COUNT, InputError, check_alpha, check_v_ref, is_int, check_hparam, resolve_device
from lore.io import load_tensors, read_metadata, save_tensors
from lore.pairs import project_rows

TEMPERATURE = 100.0   # a pair's Bradley-Terry logit is its margin / 100: part of the method, not a tuning knob


def simplex(W):
    """User logits -> user weights on the simplex. The only place the softmax is taken."""
    return F.softmax(W, dim=-1)


def user_margins(Z, W, user):
    """s_p = z_p . w_user(p), each pair's reward margin under its own user's weights.
    Z [P, K] projections x^T V, W [N, K], user [P] -> [P]."""
    return (Z * W.index_select(0, user)).sum(-1)   # backward: index_add, not a sort-based index_put



class Method:
    """A way to personalize a reward, the value of an entry of METHODS. User i's reward of a
    response with embedding phi is reward(item_features(phi), u_i): a shared part (this object,
    fitted on the seen users) and per-user parameters u_i (a row of U [N, Q]), which a new user
    fits from a few pairs with the shared part fixed. A new method is one subclass and one entry;
    the sweeps, the scripts, the checkpoints and the evaluation then work for it unchanged.

    Class attributes:
        name        its key in METHODS
        defaults    hyperparameter -> default (ints, floats, or strings listed in choices). Each
                    one is a flag --{name}-{hp} of every script (hyphens for underscores), except
                    those in recipe_hparams; lore.checks.check_hparam checks every value, for the
                    flags and the API alike: ints in [1, limit], floats finite in (0, limit]
        choices     hyperparameter -> its allowed string values (for string-valued ones)
        limits      hyperparameter -> its largest value (default MAX_COUNT / MAX_RATE), e.g. a
                    fraction's 1 or a layer width that must fit in memory
        least       integer hyperparameter -> its smallest value (default 1), e.g. a width below
                    which every fit is degenerate
        prunes      whether a fit may drop directions (V then has fewer than K columns)
        recipe_hparams  those read from the dataset recipe's --iters --lr --fewshot-iters
                    --fewshot-lr (the LoRe entries' step counts and rates)
        min_K       the smallest K it takes; sweeps skip smaller K (K = 0, the reference reward
                    model, is LoRe's convention)
        uses_alpha  whether alpha means something for it; if not, a sweep fits it once per K and
                    its records carry alpha None
        search, search_space   how lore.compare searches it: "random" or "grid", over
                    {hp: [choices] or ("log", lo, hi)} with K (and alpha) among the hps
        linear      reward(item_features(phi), u) is linear in phi without offset, so difference
                    rows x = phi(chosen) - phi(rejected) (the seed's list format) suffice; other
                    methods need the table form of Pairs (both embeddings of every pair)

    Methods to implement; Pairs reach them checked (pack / load_data), on self.device:
        fit(pairs) -> U [N, Q]        fit the shared part and the seen users' parameters
        fit_users(pairs) -> U [N, Q]  new users' parameters, shared part fixed; pairs may be
                                      featurized (see featurize): use pair_features(self, pairs)
        item_features(rows) -> [n, D] user-independent features of embeddings rows [n, F]
        reward(Z, U) -> [n]           reward of item features Z [n, D] for the users U [n, Q]
        state() -> {name: tensor}     the shared part, saved in checkpoints; load_state(tensors)
    Optional, for active selection of new users' pairs (lore.active; a method without them is
    refused there): free_parameters(U) -> [N, D] the parameters fit_users optimizes, free_margin(
    theta [D], zc, zr) -> the margin of one pair (differentiable in theta, for torch.func),
    free_prior -> (mean [D], variance) of a Gaussian prior on theta, bt_scale: the Bradley-Terry
    probability of a pair is sigmoid(bt_scale * margin).
    Randomness comes from torch's global generator: seed it (set_seed) for repeatable fits.
    """
    name, defaults, min_K, uses_alpha, linear = None, {}, 1, False, False
    search, search_space = "random", {}
    curve = fewshot_curve = None   # the last checked fit's loss curves (checked_fit, checked_fit_users)
    fit_seconds = fewshot_seconds = None   # and their wall-clock seconds
    recipe_hparams = ()   # hyperparameters read from the recipe's --iters --lr --fewshot-iters --fewshot-lr
    choices, limits, least, prunes = {}, {}, {}, False
    n_features = None     # F of the embeddings the shared part was built for (set by a fit or load_state)

    def __init__(self, K, alpha=None, v_ref=None, device=None, **hparams):
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise InputError(f"method {self.name}: unknown hyperparameter(s) {unknown}; it has {sorted(self.defaults)}")
        if not is_int(K) or not self.min_K <= K <= MAX_COUNT:
            raise InputError(f"method {self.name}: K must be an integer >= {self.min_K}, got {K!r}")
        self.K, self.device = int(K), resolve_device(device)
        self.alpha = check_alpha(alpha, self.name) if self.uses_alpha else None
        self.hparams = {hp: check_hparam(self.name, hp, value, self.defaults[hp], self.choices.get(hp),
                                         self.limits.get(hp), self.least.get(hp))
                        for hp, value in {**self.defaults, **hparams}.items()}
        self.v_ref = None if v_ref is None else check_v_ref(v_ref).to(self.device)   # [F, 1]

    def __repr__(self):
        alpha = f", alpha={self.alpha:g}" if self.uses_alpha else ""
        return f"{self.name}(K={self.K}{alpha})"

    def setting(self):
        """What names a fit: the method, K and alpha (None when it does not use alpha)."""
        return {"method": self.name, "K": self.K, "alpha": self.alpha}

    def fewshot_status(self):
        """What a record says of the last new users' fit (checked_fit_users): its rule (fewshot_stop:
        fixed or early), how it ended (fewshot_stopped: fixed, early or cap), what the early rule
        watched (fewshot_rule: held_out, or train_loss when no new user had 10 pairs; None for
        fixed) and its steps. All None for a fit without a loop: VPL's encoder, K <= 1."""
        curve = self.fewshot_curve or {}
        return {"fewshot_stop": self.hparams.get("fewshot_stop"), "fewshot_stopped": curve.get("stopped"),
                "fewshot_rule": curve.get("rule"), "fewshot_steps": curve.get("steps")}


class LinearBasis(Method):
    """A method whose shared part is a basis V [F, K] and whose users are points w of the simplex:
    user i's reward of phi is phi^T V w_i (LoRe's entries and pca). U = the simplex weights [N, K].
    New users are fitted as LoRe fits them: its few-shot model (utils.PersonalizeBatch, found
    through the registry) on the pairs projected onto V once. Subclasses implement fit."""
    linear = True
    bt_scale = 1.0 / TEMPERATURE   # active selection: P(chosen wins) = sigmoid(margin / 100)
    fewshot_model = None           # the few-shot fit's nn.Module; None: the lore entry's
    V = None                       # [F, K], set by fit or load_state

    def fit_users(self, pairs):
        K = self.V.shape[1]
        if K <= 1:   # one direction: nothing to adapt
            return torch.ones(pairs.n_users, K, device=self.device)
        # the pairs with their rows projected once: x^T V [P, K], or (table form) the used rows' [E', K]
        projected = replace(featurize(self, pairs), featurized=None)
        model = self.fewshot_model or get_method("lore").fewshot_model
        fewshot = model(pairs.n_users, K, K, self.hparams["fewshot_iters"], self.hparams["fewshot_lr"], self.device,
                        stop=self.hparams.get("fewshot_stop", "fixed"))
        W = torch.stack(fewshot.train(projected, torch.eye(K, device=self.device)))   # the projected rows' basis
        return check_fitted(self, W)

    def item_features(self, rows):
        return project_rows(rows.float(), self.V)                                  # [n, K]

    def reward(self, Z, U):
        return (Z * U).sum(-1)                                                     # [n]

    def state(self):
        return {"V": self.V}

    def load_state(self, tensors):
        self.V = tensors["V"].to(self.device, torch.float32)

    # active selection (lore.active): a user's free parameters are its logits, the fit's own
    def free_parameters(self, U):
        return U.clamp_min(1e-12).log()   # [N, K]: softmax(log w) = w

    def free_margin(self, theta, zc, zr):
        return ((zc - zr) * simplex(theta)).sum(-1)

    def free_prior(self):
        return torch.zeros(self.V.shape[1], device=self.device), 1.0   # the few-shot fit's start, N(0, I)


def check_fitted(method, *tensors):
    """A fit that diverged (a learning rate too large) gives NaN; say so rather than report it."""
    if not all(torch.isfinite(t).all() for t in tensors):
        raise InputError(f"{method}: the fit diverged (NaN or inf in the fitted parameters); lower the "
                         f"learning rate (hyperparameters {method.hparams})")
    if any(t.shape[-1] == 0 for t in tensors):
        raise InputError(f"{method}: every direction was pruned (no user weighs any enough to keep it)")
    return tensors[0]


class Registry(MutableMapping):
    """name -> Method subclass, listed by name. The project's own entries are written down here as
    "module.Class" and imported the first time they are asked for, so that importing any module
    gives the same METHODS whatever was imported before (utils defines LoRe's entries and imports
    this module, so this module cannot import utils at its top). register() adds a class of yours."""

    def __init__(self, entries):
        self._entries = dict(entries)

    def __getitem__(self, name):
        entry = self._entries[name]
        if isinstance(entry, str):   # "module.Class", imported once
            module, cls = entry.rsplit(".", 1)
            entry = self._entries[name] = getattr(importlib.import_module(module), cls)
        return entry

    def __setitem__(self, name, cls):
        self._entries[name] = cls

    def __delitem__(self, name):
        del self._entries[name]

    def __iter__(self):
        return iter(sorted(self._entries))   # by name: one order wherever they are listed

    def __len__(self):
        return len(self._entries)


# The registry: a new method is one class and one line here (or one register() call of yours).
METHODS = Registry({
    "lore": "utils.LoReMethod",                          # LoRe as run() fits it
    "lore_regularized": "utils.LoReRegularizedMethod",   # LoRe as run_regularized() fits it
    "pal": "lore.baselines.PAL",
    "pca": "lore.pca.PCA",
    "vpl": "lore.baselines.VPL",
})


def register(cls):
    """Add a Method subclass of yours to METHODS under its name; a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(cls.name, str):
        raise InputError(f"register takes a Method subclass with a name, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def get_method(name):
    """The class registered as `name`; InputError listing the registered names otherwise."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


def checkpoint_name(fit, suffix=".safetensors"):
    """The file a fit is saved as, {method}_K{K}[_alpha{a}].safetensors, and its companions
    ({checkpoint}.fit.json, .report.json: suffix) -- fit: a Method or a record of a sweep."""
    setting = fit.setting() if isinstance(fit, Method) else fit
    alpha = "" if setting["alpha"] is None else f"_alpha{setting['alpha']:g}"
    return f"{setting['method']}_K{setting['K']}{alpha}{suffix}"


def save_method(path, method, data=None, **users):
    """A fitted method's shared part and the users' parameters (e.g. W=..., W_unseen=...) in one
    safetensors file; the metadata names the method, K, alpha, the hyperparameters, every tensor's
    shape, and `data`: the identity of the data folder it was fitted on (lore.data.data_identity),
    which the tools compare with the --data they are given."""
    tensors = {**method.state(), **users}
    meta = {"method": method.name, "K": str(method.K), "alpha": json.dumps(method.alpha),
            "hparams": json.dumps(method.hparams),
            "shapes": json.dumps({k: list(v.shape) for k, v in sorted(tensors.items())})}
    if data is not None:
        meta["data"] = data
    save_tensors(path, tensors, meta)


def load_method(path, device=None, data=None, allow_other_data=False):
    """-> (method, tensors): the Method saved by save_method, ready to fit new users and score, and
    every tensor of the file (the users' parameters among them). Checked: the metadata (the method's
    own hyperparameter checks), the tensors against it (the shapes recorded, a basis V of max(K, 1)
    columns, or at most that for a method that prunes; users' parameters with V's columns); with
    `data` (a Data of load_data), that it was fitted on that folder: a checkpoint of another one is
    refused, or with allow_other_data used with a warning on stderr."""
    if not isinstance(allow_other_data, bool):   # "no" is truthy: only True allows
        raise InputError(f"allow_other_data must be True or False, got {allow_other_data!r}")
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a checkpoint file ({{method}}_K{{K}}[_alpha{{a}}].safetensors)")
    meta = read_metadata(path)
    missing = [k for k in ("method", "K", "alpha", "hparams") if k not in meta]
    if missing:
        raise InputError(f"{path}: not a checkpoint of a method (its metadata lacks {missing})")
    cls = get_method(meta["method"])
    try:
        hparams, alpha, K = json.loads(meta["hparams"]), json.loads(meta["alpha"]), int(meta["K"])
        if not isinstance(hparams, dict):
            raise TypeError(f"hparams is {type(hparams).__name__}, not an object")
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: unreadable checkpoint metadata ({e})") from None
    try:
        method = cls(K, alpha, None, device, **hparams)
    except InputError as e:
        raise InputError(f"{path}: checkpoint metadata: {e}") from None
    tensors = load_tensors(path)
    _check_checkpoint(path, method, meta, tensors)
    try:
        method.load_state({k: v.to(method.device) for k, v in tensors.items()})
    except (KeyError, RuntimeError, ValueError, IndexError) as e:
        raise InputError(f"{path}: not a checkpoint of {method.name}: its tensors do not load "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if data is not None and method_features(method) not in (None, data.table.shape[1]):
        # even with allow_other_data: another F is no data the method can score at all
        raise InputError(f"{path}: {method.name} was fitted on F={method_features(method)} features, "
                         f"{data.folder} has F={data.table.shape[1]}: a checkpoint of another reward model's data")
    if data is not None:
        _check_checkpoint_data(path, meta.get("data"), data, allow_other_data)
    return method, tensors


def _check_checkpoint(path, method, meta, tensors):
    """Shapes over metadata: the recorded shapes, V's columns against K, the users' columns against V."""
    if "shapes" in meta:
        try:
            shapes = json.loads(meta["shapes"])
        except ValueError:
            raise InputError(f"{path}: unreadable checkpoint metadata (shapes)") from None
        actual = {k: list(v.shape) for k, v in tensors.items()}
        if shapes != actual:
            bad = sorted(k for k in set(shapes) | set(actual) if shapes.get(k) != actual.get(k))[0]
            raise InputError(f"{path}: tensor {bad} has shape {actual.get(bad)}, its metadata says {shapes.get(bad)}")
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise InputError(f"{path}: {k} has NaN or inf values")
    V = tensors.get("V")
    if method.linear or "V" in tensors:
        if V is None:
            raise InputError(f"{path}: no tensor V (the basis of {method.name})")
        columns = max(method.K, 1)
        if V.dim() != 2 or V.shape[1] > columns or (not method.prunes and V.shape[1] != columns):
            raise InputError(f"{path}: V has shape {tuple(V.shape)}, but its metadata says K={method.K} "
                             f"({'at most ' if method.prunes else ''}{columns} columns)")
        for key in ("W", "W_unseen"):
            if key in tensors and (tensors[key].dim() != 2 or tensors[key].shape[1] != V.shape[1]):
                raise InputError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, V {tuple(V.shape)}: "
                                 f"their columns disagree")


def _check_checkpoint_data(path, fitted_on, data, allow_other_data):
    """A checkpoint used with the data folder it was fitted on, or InputError (a warning with
    allow_other_data). A checkpoint that records no data folder cannot be checked: a warning."""
    if fitted_on == data.identity:
        return
    if fitted_on is None:
        print(f"warning: {path} does not record the data folder it was fitted on (an older checkpoint); "
              f"make sure it is {data.folder}'s", file=sys.stderr)
        return
    message = (f"{path} was fitted on another data folder (data.json {fitted_on[:12]}), not on {data.folder} "
               f"(data.json {data.identity[:12]})")
    if not allow_other_data:
        raise InputError(f"{message}: its users and rows would not match; pass --allow-other-data to use it anyway")
    print(f"warning: {message}; used anyway (--allow-other-data)", file=sys.stderr)


def per_user_accuracy(pairs, V, W):
    """Accuracy of every user of a linear basis at once: pairs (Pairs), V [F, K], W [N, K] -> numpy [N].
    Pairs are scored in chunks: beyond the pairs themselves, memory does not grow with their number.
    Table form on the CPU with the users sorted: the table rows projected once and every pair scored
    in one fused pass (lore.fused.pair_hits)."""
    V, W = V.to(pairs.device, torch.float32), W.to(pairs.device, torch.float32)   # [F, K], [N, K]
    offsets = pairs.offsets() if pairs.X is None and fused.usable(V) else None
    if pairs.X is None:
        if offsets is not None and len(pairs.table) <= len(pairs) and fused.reads(pairs.table):
            # every table row projected, read once as it is stored (no remap of 2P indices to the used rows)
            T, chosen, rejected = fused.project(pairs.table, V), pairs.chosen, pairs.rejected  # [E, K], [P], [P]
        else:
            T, chosen, rejected = row_values(lambda rows: project_rows(rows.float(), V), pairs, every_row=True)
        if offsets is not None:
            return fused.pair_hits(T, W, chosen, rejected, offsets, accuracy=True).numpy()  # [N]
    hits = torch.zeros(pairs.n_users, dtype=torch.long, device=pairs.device)      # [N]
    for start in range(0, len(pairs), CHUNK):
        part = slice(start, start + CHUNK)
        Z = (project_rows(pairs.X[part], V) if pairs.X is not None
             else T.index_select(0, chosen[part]) - T.index_select(0, rejected[part]))  # [chunk, K]
        hits += _hits(user_margins(Z, W, pairs.user[part]) > 0, pairs.user[part], pairs.n_users)
    return (hits.double() / pairs.counts().double()).cpu().numpy()


CHUNK = 1 << 16   # pairs scored at once: bounded [CHUNK, D] temporaries however many pairs there are


def featurize(method, pairs, every_row=False):
    """The pairs with their rows replaced by the method's item features, computed once (project
    once where the shared part is fixed): the table form keeps the rows its pairs use, as [E', D]
    with the indices remapped; the difference form (linear methods only) becomes [P, D]. Fitting
    new users and evaluating then run in the method's small feature space.
    every_row (scoring): where the table has no more rows than there are pairs, the features stay
    [E, D] (the same values at the used rows, zeros at the others, never read) so that the pairs
    keep their own indices: no [P] remap (1.6 GB at 10^7 users' seen-test pairs)."""
    if pairs.featurized is method:
        return pairs
    if pairs.featurized is not None:
        raise InputError(f"these pairs hold the item features of {pairs.featurized}, not of {method}")
    with torch.no_grad():
        if pairs.X is not None:
            if not method.linear:
                raise InputError(f"method {method.name} needs both embeddings of every pair (the table form of Pairs)")
            return replace(pairs, X=chunked(method.item_features, pairs.X), featurized=method)     # [P, D]
        Z, chosen, rejected = row_values(method.item_features, pairs, every_row)  # [E' or E, D], [P], [P]
        return replace(pairs, table=Z, chosen=chosen, rejected=rejected, featurized=method)


def row_values(fn, pairs, every_row=False):
    """fn of the table rows table-form pairs use, in chunks -> (T [E', D], chosen [P], rejected [P]
    as positions in T). every_row, where the table has no more rows than there are pairs: T [E, D]
    holds the same values at the used rows and zeros at the others (never read), and chosen and
    rejected are the pairs' own (no [P] remap)."""
    if every_row and len(pairs.table) <= len(pairs):
        used = torch.nonzero(pairs.used_mask()).squeeze(1)                         # [E']
        T = chunked(fn, pairs.table, used)                                        # [E', D]
        return T.new_zeros(len(pairs.table), T.shape[1]).index_copy_(0, used, T), pairs.chosen, pairs.rejected
    used, chosen, rejected = pairs.used_rows()                                     # [E'], [P], [P]
    return chunked(fn, pairs.table, used), chosen, rejected


def pair_features(method, pairs):
    """-> (Zc, Zr): the item features [P, D] of every pair's chosen and rejected response; for the
    difference form (linear methods) Zc are the features of x and Zr is None."""
    pairs = featurize(method, pairs)
    if pairs.X is not None:
        return pairs.X, None
    return pairs.table[pairs.chosen], pairs.table[pairs.rejected]


def pair_margins(method, pairs, U):
    """reward(chosen) - reward(rejected) of every pair under its own user's parameters U [N, Q] -> [P]."""
    return torch.cat([m for _, m in _margin_chunks(method, pairs, U)])             # [P]


def accuracy(method, pairs, U):
    """Every user's accuracy: the fraction of its pairs with a positive margin (ties count as
    wrong) -> numpy [N]. Streams the pairs in chunks: memory does not grow with their number."""
    hits = torch.zeros(pairs.n_users, dtype=torch.long, device=pairs.device)      # [N]
    for part, m in _margin_chunks(method, pairs, U):
        hits += _hits(m > 0, pairs.user[part], pairs.n_users)
    return (hits.double() / pairs.counts().double()).cpu().numpy()


def _margin_chunks(method, pairs, U):
    """-> (slice, margins [chunk]) over the pairs, CHUNK at a time, item features computed once."""
    pairs = featurize(method, pairs, every_row=True)
    U = U.to(pairs.device, torch.float32)
    with torch.no_grad():
        for start in range(0, len(pairs), CHUNK):
            part = slice(start, start + CHUNK)
            Zc, Zr = pair_features(method, pairs.select(part))
            Uu = U.index_select(0, pairs.user[part])                               # [chunk, Q]
            m = method.reward(Zc, Uu)
            yield part, (m if Zr is None else m - method.reward(Zr, Uu))


def _hits(correct, user, n_users):
    return torch.bincount(user[correct], minlength=n_users)                        # [N]


def chunked(fn, rows, index=None, chunk=1 << 15):
    """fn over [n, F] rows (or rows[index]) in chunks, so no [n, F] float32 copy of a bf16 table exists."""
    n = len(rows) if index is None else len(index)
    parts = [fn(rows[i:i + chunk] if index is None else rows[index[i:i + chunk]]) for i in range(0, n, chunk)]
    return torch.cat(parts)


def method_features(method):
    """F of a fitted method's shared part: the rows of V [F, K] (LoRe's entries, pca), or the
    n_features its network was built for (PAL, VPL); None before a fit."""
    V = getattr(method, "V", None)
    return V.shape[0] if V is not None else getattr(method, "n_features", None)


def method_basis(method):
    """The basis V [F, K] of a fitted linear method (LoRe's entries; K = 0 gives V = v_ref, one
    column); InputError for a method without one."""
    V = getattr(method, "V", None)
    if V is None:
        raise InputError(f"method {method.name} has no basis V to read (the basis tools read LoRe's V)")
    return V


# ----------------------------------------------------------------------------------------------
# Loss curves and the checked fit: the one place every method's fit goes through
# ----------------------------------------------------------------------------------------------

CURVE_POINTS = 100      # a fit's loss is kept at ~this many evenly spaced steps
CONVERGED_FALL = 0.01   # "not converged": the last tenth's mean loss > 1% below the tenth before's
_RECORDING = []         # a stack of lists: the curves of the loops run inside recording()


@contextlib.contextmanager
def recording():
    """Collect the LossCurve of every training loop run inside the block -> the list of them."""
    curves = []
    _RECORDING.append(curves)
    try:
        yield curves
    finally:
        _RECORDING.pop()


class LossCurve:
    """The loss of a training loop of `total` steps at ~CURVE_POINTS evenly spaced steps (the first
    and the last always among them). windowed=False keeps the loss of those very steps (full-batch
    loops: the loss of a step is the whole objective); windowed=True keeps the mean of the steps
    since the previous point (minibatch loops, whose single-batch losses are noisy). add() takes a
    loss tensor and never synchronizes a GPU: values are read once, in result()."""

    def __init__(self, total, windowed=False, at=None):
        n = min(CURVE_POINTS, total)
        self.total, self.windowed = total, windowed
        self.at = set(np.linspace(0, total - 1, n).round().astype(int).tolist()) if total else set()
        if at is not None:   # the given steps (an early-stopped loop's checks) and the last
            self.at = set(at) | {total - 1} if total else set()
        self.steps, self.values, self.sum, self.count = [], [], None, 0
        self.info = {}   # what the loop adds: steps, passes, stopped, the held-out checks (lore.steps)
        if _RECORDING:
            _RECORDING[-1].append(self)

    def add(self, i, loss, last=False):
        """The loss tensor of step i (0-based); a copy is kept where needed (a CUDA graph's output
        is overwritten by the next replay). last: the loop ends here, keep it (an early stop)."""
        if self.windowed:
            loss = loss.detach().float()
            self.sum, self.count = (loss if self.sum is None else self.sum + loss), self.count + 1
            if i in self.at or last:
                self.steps.append(i)
                self.values.append(self.sum / self.count)
                self.sum, self.count = None, 0
        elif i in self.at or last:
            self.steps.append(i)
            self.values.append(loss.detach().float().clone())

    def result(self):
        """{"step": [...], "loss": [...], "windowed": bool} (plain numbers, JSON-ready)."""
        loss = torch.stack(self.values).cpu().tolist() if self.values else []
        return {"step": list(self.steps), "loss": loss, "windowed": self.windowed, **self.info}


def last_tenth_fall(curve):
    """How much the loss still fell over the fit's last tenth: (A - B) / |A| with B the mean of the
    recorded losses in the last tenth of the steps and A their mean in the tenth before it (means,
    so that a minibatch fit's noise does not decide). None without a curve of >= 2 points."""
    if not curve or len(curve["step"]) < 2:
        return None
    steps, loss = np.asarray(curve["step"], dtype=float), np.asarray(curve["loss"], dtype=float)
    t = steps / steps[-1]
    last, before = t > 0.9, (t > 0.8) & (t <= 0.9)
    if not before.any():   # a short curve: the point before the last tenth
        before = np.arange(len(t)) == max(0, int(np.flatnonzero(last)[0]) - 1)
    a, b = loss[before].mean(), loss[last].mean()
    return float((a - b) / max(abs(a), 1e-12))


def converged(curve):
    """An early-stopped fit (stop="early"): True when the rule stopped it, False when it ran to its
    cap. A fixed one: False when the loss still fell by more than CONVERGED_FALL over the last
    tenth. None without a curve."""
    if curve and curve.get("stopped") in ("early", "cap"):
        return curve["stopped"] == "early"
    fall = last_tenth_fall(curve)
    return None if fall is None else bool(fall <= CONVERGED_FALL)


def _fit_label(method):
    return f"{method} with {method.hparams}"


def _check_finite(method, what, tensors, hint="lower the learning rate(s)"):
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            raise InputError(f"{_fit_label(method)}: {what} (NaN or inf in {name}); {hint}")


def _optimizer_state(method):
    """The tensors of the optimizers a fit kept (on the method or its `trainer`, the model it
    trained): an Adam second moment that overflowed to inf (a gradient above ~1e19 in float32:
    alpha so large that the steps underflow) makes those steps 0 for good."""
    found = {}
    for owner in (method, getattr(method, "trainer", None)):
        for name, opt in vars(owner).items() if owner is not None else ():
            if isinstance(opt, torch.optim.Optimizer):
                for i, state in enumerate(opt.state.values()):
                    found.update({f"{name}'s {k} ({i})": v for k, v in state.items() if torch.is_tensor(v)})
    return found


def checked_fit(method, pairs):
    """method.fit(pairs) -> U, with the fit's loss curve kept as method.curve ({"step", "loss"}, or
    None for a fit without a training loop, such as LoRe's K = 0) and the fit refused (InputError
    naming the method and its hyperparameters) when it diverged or did not move: NaN or inf in the
    loss, the parameters, the optimizer's state, U or the rewards of the training pairs; or a loss
    that never went below its first value (alpha or a scale so
    large that the Adam steps underflow to nothing, or rates far too small). Every sweep and search
    fits through here. method.fit_seconds: the fit's wall-clock seconds."""
    start = time.perf_counter()
    with recording() as curves:
        U = method.fit(pairs)
    method.fit_seconds = time.perf_counter() - start
    method.curve = max((c.result() for c in curves), key=lambda c: len(c["step"]), default=None)
    _check_finite(method, "the fit diverged", {"U": U, **method.state()})
    _check_finite(method, "the fit stalled", _optimizer_state(method),
                  "a gradient above ~1e19 overflowed Adam's second moment, so those steps are 0 for good: "
                  "alpha or the data's scale is far too large")
    # parameters can be finite and the rewards not (huge weights: inf - inf, 0 / 0): score some pairs
    sample = pairs.select(torch.arange(min(len(pairs), 4096), device=pairs.device))
    margins = pair_margins(method, sample, U)                                       # [<= 4096]
    _check_finite(method, "the fit diverged", {"the rewards of its training pairs": margins})
    if not margins.any():
        raise InputError(f"{_fit_label(method)}: the fit collapsed (every reward margin of its training pairs "
                         f"is 0: the rewards are constant); lower the learning rate(s)")
    differ = (sample.rows() != 0).any(1)   # [<= 4096]: pairs whose two responses differ (not a tie of the data)
    tied = int(((margins == 0) & differ).sum())
    if 2 * tied > int(differ.sum()):   # a reward that cannot tell most responses apart is no fit to report
        raise InputError(f"{_fit_label(method)}: a degenerate fit (its rewards tie {tied} of the {int(differ.sum())} "
                         f"sampled training pairs whose responses differ: margins exactly 0); a wider model or "
                         f"other hyperparameters")
    loss = method.curve["loss"] if method.curve else []
    if not all(math.isfinite(v) for v in loss):
        step = method.curve["step"][next(i for i, v in enumerate(loss) if not math.isfinite(v))]
        raise InputError(f"{_fit_label(method)}: the fit diverged (the loss is NaN or inf at step {step}); "
                         f"lower the learning rate(s)")
    # a full-batch loss is the objective itself; a minibatch fit's first batches may simply be easy
    if len(loss) >= 2 and not method.curve["windowed"] and min(loss[1:]) >= loss[0]:
        raise InputError(f"{_fit_label(method)}: the fit did not move (its loss never went below its first "
                         f"value {loss[0]:.6g}): alpha or a scale so large that the steps underflow, or "
                         f"learning rates too small")
    return U


def checked_fit_users(method, pairs):
    """method.fit_users(pairs) -> U, its loss curve kept as method.fewshot_curve (None without a
    loop), refused (InputError) when U is NaN or inf; method.fewshot_seconds its seconds."""
    start = time.perf_counter()
    with recording() as curves:
        U = method.fit_users(pairs)
    method.fewshot_seconds = time.perf_counter() - start
    method.fewshot_curve = max((c.result() for c in curves), key=lambda c: len(c["step"]), default=None)
    _check_finite(method, "fitting new users diverged", {"U": U})
    return U

