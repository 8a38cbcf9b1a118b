"""Preference pairs in memory: Pairs packs every user's pairs into one matrix (or two row indices
into an embedding table) with the user of every pair, and pack checks them once.

The four pair sets, one vocabulary everywhere (records, CSV columns, data files, figures):
    seen_train      seen users' training pairs: the shared part and their weights are fitted here
    seen_test       seen users' held-out pairs (unseen prompts)
    unseen_fewshot  unseen users' few pairs: only their weights are fitted here, the shared part fixed
    unseen_test     unseen users' held-out pairs
"""
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from lore.checks import InputError, is_int, resolve_device

SETS = ("seen_train", "seen_test", "unseen_fewshot", "unseen_test")


def index_dtype(n):
    """The dtype of indices into n things: int32 (half the bytes a pass over them reads: 3.8 GB less
    at 10^7 users' chosen and rejected rows) where n fits, else int64."""
    return torch.int32 if n < 2**31 else torch.int64


def user_offsets(user, n_users):
    """offsets [N + 1] int64 of pairs sorted by user (user u's pairs are offsets[u]:offsets[u+1]),
    or None when the users are not in increasing order."""
    if len(user) > 1 and not bool((user[1:] >= user[:-1]).all()):
        return None
    offsets = torch.zeros(n_users + 1, dtype=torch.int64, device=user.device)
    torch.cumsum(torch.bincount(user, minlength=n_users), 0, out=offsets[1:])
    return offsets


def project_rows(X, V):
    """X V for X [P, F], V [F, K] -> [P, K], as F.linear: on CPU twice as fast as X @ V."""
    return F.linear(X, V.t().contiguous())


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
    `shard`: the pairs of one torchrun rank's users, n_users still all N (the users of the other
    ranks have no pairs here): training sums V's gradient across the ranks.
    """
    user: torch.Tensor                     # [P] int32 (index_dtype(N)) or long, pairs of a user are contiguous
    n_users: int
    X: torch.Tensor = None                 # [P, F] float32
    table: torch.Tensor = None             # [E, F] any float dtype (bfloat16 on disk)
    chosen: torch.Tensor = None            # [P] int32 (or long) rows of table
    rejected: torch.Tensor = None          # [P] int32 (or long) rows of table
    group: torch.Tensor = None             # [P] long, ids unique within a user
    featurized: object = None
    checked: bool = False
    shard: bool = False                    # this torchrun rank's users only (lore.distributed.shard_users)
    _offsets: torch.Tensor = field(default=None, init=False, repr=False, compare=False)  # offsets()' cache

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

    def offsets(self):
        """user_offsets of these pairs [N + 1] (None when the users are not sorted), computed once:
        a pass over [P] user indices that every step and every scoring would otherwise repeat."""
        if self._offsets is None:
            self._offsets = user_offsets(self.user, self.n_users)
        return self._offsets

    def groups(self):
        """Each pair's unit of sampling: its group (PRISM's dialog) where pairs come in groups, else
        the pair itself -> (gid [P], owner [G]): the unit of every pair, numbered by (user, group),
        and the user of every unit."""
        group = self.group if self.group is not None else torch.arange(len(self), device=self.device)
        user = self.user.long()                                                    # [P] like group
        _, gid = torch.unique(torch.stack([user, group]), dim=1, return_inverse=True)  # [P]
        owner = torch.zeros(int(gid.max()) + 1, dtype=torch.long, device=self.device).scatter_(0, gid, user)
        return gid, owner                                                          # [P], [G]

    def rows(self):
        """The [P, F] float32 difference matrix (materialized for the table form)."""
        if self.X is not None:
            return self.X
        return self.table[self.chosen].float() - self.table[self.rejected].float()  # [P, F]

    def project(self, V):
        """x_p^T V for every pair, without building [P, F] for the table form: only the table rows
        the pairs use are projected, in chunks of float32 rows (bounded temporaries)."""
        V = V.to(self.device, torch.float32)                                       # [F, K]
        if self.X is not None:
            return project_rows(self.X, V)                                         # [P, K]
        used, chosen, rejected = self.used_rows()                                  # [E'], [P], [P]
        T = torch.cat([project_rows(self.table[idx].float(), V) for idx in used.split(1 << 15)])  # [E', K]
        return T.index_select(0, chosen) - T.index_select(0, rejected)            # [P, K]

    def used_rows(self):
        """Table form: -> (used [E'] sorted table rows, every row some pair uses among them, chosen
        [P] and rejected [P] as positions in used). A mask over the table rather than a sort of 2P
        indices: O(E + P). Where the rows up to the last used one are fewer than the pairs (PersonalLLM's
        train split under many users: a response no user ranks best or worst is a row no pair uses,
        anywhere in the split), used is all of them, 0 .. E' - 1, and the positions are the rows
        themselves: chosen and rejected as they are, no [P] copies (3.8 GB at 10^7 users)."""
        mask = self.used_mask()                                                    # [E]
        used = torch.nonzero(mask).squeeze(1)                                      # [E']
        if len(used) == 0 or int(used[-1]) == len(used) - 1:
            return used, self.chosen, self.rejected
        if int(used[-1]) + 1 < len(self):   # the rows no pair uses below the last cost less than a remap
            return torch.arange(int(used[-1]) + 1, device=used.device), self.chosen, self.rejected
        position = (torch.cumsum(mask, 0) - 1).to(index_dtype(len(used)))          # [E] row -> position in used
        return used, position.index_select(0, self.chosen), position.index_select(0, self.rejected)

    def used_mask(self):
        """Table form: [E] bool, the table rows some pair uses. bincount reads int32 rows as they are
        (mask[rows] = True would copy them to int64)."""
        E = len(self.table)
        return (torch.bincount(self.chosen, minlength=E) + torch.bincount(self.rejected, minlength=E)) > 0  # [E]

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
        if any(t.device.type == "meta" for t in (features.user, features.X, features.table) if t is not None):
            raise InputError(f"{name}: the pairs are on the meta device (no values)")
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
            if x.device.type == "meta":
                raise InputError(f"{name}[{i}] is on the meta device (no values)")
            if x.dim() != 2 or x.shape[1] != n_features or not (x.is_floating_point() or len(x) == 0):
                raise InputError(f"{name}[{i}] has shape {tuple(x.shape)} ({x.dtype}): every user needs "
                                 f"float [pairs, F] with the same F (user 0 has F={n_features})")
        X = torch.cat([x.to(device, torch.float32) for x in features])              # [P, F]
        counts = torch.tensor([len(x) for x in features], device=device)
        user = torch.repeat_interleave(torch.arange(len(features), device=device, dtype=index_dtype(len(features))),
                                       counts)                                     # [P]
        pairs = Pairs(user, len(features), X=X)
    _check_pairs(pairs, name)
    return replace(pairs, checked=True)


def _check_pairs(pairs, name):
    if not is_int(pairs.n_users) or pairs.n_users <= 0:
        raise InputError(f"{name}: no users (n_users={pairs.n_users!r})")
    values = pairs.X if pairs.X is not None else pairs.table
    if not isinstance(values, torch.Tensor) or values.device.type == "meta" or pairs.user.device.type == "meta":
        raise InputError(f"{name}: the rows must be a tensor with values (not on the meta device)")
    if pairs.X is not None and pairs.X.dtype != torch.float32:
        raise InputError(f"{name}: X must be float32 (difference rows are trained in float32), got {pairs.X.dtype}: "
                         f"pass X.float()")
    if pairs.user.dim() != 1 or pairs.user.dtype not in (torch.int32, torch.long):
        raise InputError(f"{name}: user must be [P] user indices (int32 or long), got {tuple(pairs.user.shape)} "
                         f"{pairs.user.dtype}")
    if pairs.group is not None and (pairs.group.shape != pairs.user.shape or pairs.group.dtype != torch.long):
        raise InputError(f"{name}: group must be [P] long like user ({tuple(pairs.user.shape)}), got "
                         f"{tuple(pairs.group.shape)} {pairs.group.dtype}")
    if pairs.X is not None and len(pairs.X) != len(pairs.user):
        raise InputError(f"{name}: X has {len(pairs.X)} rows, user {len(pairs.user)}")
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
            if rows.dtype not in (torch.int32, torch.long) or rows.shape != pairs.user.shape:
                raise InputError(f"{name}: {side} must be [P] row indices (int32 or long), got {tuple(rows.shape)} "
                                 f"{rows.dtype}")
            bad = (rows < 0) | (rows >= E)
            if bad.any():
                p = int(torch.nonzero(bad)[0])
                raise InputError(f"{name}: pair {p} (user {int(pairs.user[p])}) has {side} row {int(rows[p])}, "
                                 f"outside the {E} rows of the embedding table")
    values = pairs.X if pairs.X is not None else pairs.table
    if values.dim() != 2 or not values.is_floating_point():
        raise InputError(f"{name}: the rows must be a float [rows, F] matrix, got {tuple(values.shape)} {values.dtype}")
    bad = first_nonfinite_row(values)
    if bad is not None:
        if pairs.X is not None:
            u = int(pairs.user[bad])
            where = f"user {u} has NaN or inf in its features (its pair {bad - int(pairs.counts()[:u].sum())})"
        else:
            where = f"embedding row {bad} has NaN or inf"
        raise InputError(f"{name}: {where}")


def first_nonfinite_row(values, chunk=1 << 14):
    """Index of the first row of [n, F] with a NaN or inf, or None. Per chunk, the largest |value|
    is finite unless some value is not (max propagates NaN): one read, no [n, F] temporary, and no
    sum that could overflow on finite values near the float32 maximum."""
    for start in range(0, len(values), chunk):
        block = values[start:start + chunk]
        if len(block) and not torch.isfinite(block.abs().amax()):
            return start + int(torch.nonzero(~torch.isfinite(block).all(dim=1))[0])
    return None
