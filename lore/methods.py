"""The method interface and its registry: a Method is a shared part fitted on the seen users plus
per-user parameters, METHODS maps a name to its class (utils registers LoRe's entries, lore.baselines
PAL and VPL), and the evaluation every method shares (item features computed once, margins,
accuracies) and its checkpoints."""
import json
from dataclasses import replace

import torch
import torch.nn.functional as F

from lore.checks import InputError, _check_alpha, _check_v_ref, _is_int, resolve_device
from lore.io import load_tensors, read_metadata, save_tensors
from lore.pairs import project_rows

def simplex(W):
    """User logits -> user weights on the simplex. The only place the softmax is taken."""
    return F.softmax(W, dim=-1)


def mix(Z, W, user):
    """s_p = z_p . w_user(p), each pair's reward margin under its own user's weights.
    Z [P, K] projections x^T V, W [N, K], user [P] -> [P]."""
    return (Z * W.index_select(0, user)).sum(-1)   # backward: index_add, not a sort-based index_put



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


METHODS = {}   # name -> Method subclass, by name: utils registers lore and lore_regularized, lore.baselines pal, vpl


def register(cls):
    """Add a Method subclass to METHODS under its name; a class decorator. A new method is one
    subclass and this one line."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not isinstance(cls.name, str):
        raise InputError(f"register takes a Method subclass with a name, got {cls!r}")
    entries = sorted({**METHODS, cls.name: cls}.items())   # by name: one order wherever they are listed
    METHODS.clear()
    METHODS.update(entries)
    return cls


def get_method(name):
    """The class registered as `name`; InputError listing the registered names otherwise."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return METHODS[name]


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



def per_user_accuracy(pairs, V, W):
    """Accuracy of every user of a linear basis at once: pairs (Pairs), V [F, K], W [N, K] -> numpy [N].
    Pairs are scored in chunks: beyond the pairs themselves, memory does not grow with their number."""
    V, W = V.to(pairs.device, torch.float32), W.to(pairs.device, torch.float32)   # [F, K], [N, K]
    if pairs.X is None:
        used, chosen, rejected = pairs.used_rows()                                 # [E'], [P], [P]
        T = _chunked(lambda rows: project_rows(rows.float(), V), pairs.table, used)  # [E', K]
    hits = torch.zeros(pairs.n_users, dtype=torch.long, device=pairs.device)      # [N]
    for start in range(0, len(pairs), CHUNK):
        part = slice(start, start + CHUNK)
        Z = (project_rows(pairs.X[part], V) if pairs.X is not None
             else T.index_select(0, chosen[part]) - T.index_select(0, rejected[part]))  # [chunk, K]
        hits += _hits(mix(Z, W, pairs.user[part]) > 0, pairs.user[part], pairs.n_users)
    return (hits.double() / pairs.counts().double()).cpu().numpy()


CHUNK = 1 << 16   # pairs scored at once: bounded [CHUNK, D] temporaries however many pairs there are


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
        used, chosen, rejected = pairs.used_rows()                                 # [E'], [P], [P]
        Z = _chunked(method.item_features, pairs.table, used)                      # [E', D]
        return replace(pairs, table=Z, chosen=chosen, rejected=rejected, featurized=method)


def pair_features(method, pairs):
    """-> (Zc, Zr): the item features [P, D] of every pair's chosen and rejected response; for the
    difference form (linear methods) Zc are the features of x and Zr is None."""
    pairs = featurize(method, pairs)
    if pairs.X is not None:
        return pairs.X, None
    return pairs.table[pairs.chosen], pairs.table[pairs.rejected]


def pair_margins(method, pairs, U):
    """reward(chosen) - reward(rejected) of every pair under its own user's parameters U [N, U] -> [P]."""
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
    pairs = featurize(method, pairs)
    U = U.to(pairs.device, torch.float32)
    with torch.no_grad():
        for start in range(0, len(pairs), CHUNK):
            part = slice(start, start + CHUNK)
            Zc, Zr = pair_features(method, pairs.select(part))
            Uu = U.index_select(0, pairs.user[part])                               # [chunk, U]
            m = method.reward(Zc, Uu)
            yield part, (m if Zr is None else m - method.reward(Zr, Uu))


def _hits(correct, user, n_users):
    return torch.bincount(user[correct], minlength=n_users)                        # [N]


def _chunked(fn, rows, index=None, chunk=1 << 15):
    """fn over [n, F] rows (or rows[index]) in chunks, so no [n, F] float32 copy of a bf16 table exists."""
    n = len(rows) if index is None else len(index)
    parts = [fn(rows[i:i + chunk] if index is None else rows[index[i:i + chunk]]) for i in range(0, n, chunk)]
    return torch.cat(parts)


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
