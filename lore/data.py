"""The prepared data folder, the same for every dataset: write_data_folder writes it (every
prepare.py), load_data reads and checks it, once.

    embeddings.safetensors  {"embeddings": [E, F]}: one row per distinct conversation
    conversations.parquet   row (of the table), messages (JSON list of {"role", "content"})
    pairs.parquet           set (one of SETS), user, chosen, rejected (rows of the table), and where
                            they apply group (pairs drawn together: a PRISM dialog) and draw (the
                            rank of a few-shot pair in its user's random draw: the first n of them
                            are a uniform sample of n), plus the dataset's own columns
    v_ref.safetensors       {"v_ref": [F, 1]}: the reward model's head
    data.json               dataset, users {"seen": [...], "unseen": [...]} (the rows of W and
                            W_unseen), the pair counts, the prepare config, and the identity of the
                            embeddings and the hashes of the other files: written last, it is what
                            makes the folder complete, and load_data refuses files of another run
"""
import hashlib
import os
import weakref
from dataclasses import dataclass, replace

import numpy as np
import torch

from lore.checks import InputError, check_v_ref, short_repr, check_count, resolve_device
from lore.io import load_tensors, read_json, read_metadata, read_table, save_tensors, write_json, write_table
from lore.methods import per_user_accuracy
from lore.pairs import SETS, Pairs, first_nonfinite_row, index_dtype

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
    ids = lambda col, dtype=torch.long: torch.tensor(df[col].to_numpy(), dtype=dtype)
    groups = None if group is None else torch.tensor(
        df.groupby(["_u", group], sort=False).ngroup().to_numpy(), dtype=torch.long)
    rows = index_dtype(len(table))   # int32: half the bytes of every pass over the pairs' rows
    return Pairs(ids("_u"), len(users), table=table, chosen=ids("chosen", rows), rejected=ids("rejected", rows),
                 group=groups)


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
    identity: str = None   # sha256 of data.json: what checkpoints record as the data they were fitted on


_IDENTITIES = {}   # id(table) -> (weak reference to the table, identity): data_identity's lookup


def data_identity(pairs_or_table):
    """The identity (data.json's sha256) of the data folder whose table these Pairs (or this table)
    come from, as load_data loaded it; None for data built otherwise (the API's own tensors)."""
    table = getattr(pairs_or_table, "table", pairs_or_table)
    ref, identity = _IDENTITIES.get(id(table), (None, None))
    return identity if ref is not None and ref() is table else None


def load_data(folder, device=None, fewshot_pairs=None):
    """The four pair sets of a prepared data folder (see DATA_FILES), checked once, here: the files
    belong together, the table is finite, every pair points into it, every user has pairs.
    fewshot_pairs: keep only the first n drawn few-shot pairs of each unseen user (the recipe's
    few-shot size, where prepare.py drew a larger pool for vary_fewshot.py). -> Data."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"load_data: folder must be a path to a prepared data folder, got {short_repr(folder)}")
    device = resolve_device(device)
    if fewshot_pairs is not None:
        check_count(fewshot_pairs, "fewshot_pairs")
    info_path = os.path.join(folder, "data.json")
    info = read_data_info(folder)
    users = info["users"]
    for name, digest in info["files"].items():
        if _file_digest(os.path.join(folder, name)) != digest:
            raise InputError(f"{os.path.join(folder, name)} is not the file data.json was written with (changed "
                             f"or left by another run): rerun prepare.py")
    path = os.path.join(folder, "embeddings.safetensors")
    recorded = info["embeddings"]
    found = _embeddings_identity(path, content="sha256" in recorded)
    if found != recorded:
        what = "content" if {**found, "sha256": None} == {**recorded, "sha256": None} else "table"
        raise InputError(f"{path} is not the {what} data.json was written with (replaced or edited since, e.g. by "
                         f"another model or run): rerun prepare.py")
    if "sha256" not in recorded:
        print(f"{path}: data.json (an older prepare.py) records no hash of its content; checked its size "
              f"and header only")
    table = load_tensors(path, ["embeddings"])["embeddings"]
    if table.dim() != 2 or not table.is_floating_point():
        raise InputError(f"{path}: embeddings has shape {tuple(table.shape)} ({table.dtype}), expected float [rows, F]")
    bad = first_nonfinite_row(table)
    if bad is not None:
        raise InputError(f"{path}: row {bad} has NaN or inf")
    v_ref_path = os.path.join(folder, "v_ref.safetensors")
    try:
        v_ref = check_v_ref(load_tensors(v_ref_path, ["v_ref"])["v_ref"])
    except InputError as e:
        raise InputError(f"{v_ref_path}: {e}") from None
    if v_ref.shape[0] != table.shape[1]:
        raise InputError(f"{v_ref_path}: v_ref has {v_ref.shape[0]} features, the embeddings F={table.shape[1]}")
    path = os.path.join(folder, "pairs.parquet")
    df = read_table(path, ["set", "user", "chosen", "rejected"])
    _check_pairs_table(df, path, len(table))
    _check_users(df, users, path, info_path)
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
    identity = _file_digest(info_path)
    for key in [k for k, (ref, _) in _IDENTITIES.items() if ref() is None]:   # forget freed tables
        del _IDENTITIES[key]
    _IDENTITIES[id(table)] = (weakref.ref(table), identity)
    return Data(table, v_ref, sets, users, info, folder, identity)


def read_data_info(folder):
    """data.json of a prepared data folder, its structure checked (_check_info): what a script reads
    before load_data (the dataset's name, say) is checked as load_data checks it. -> the dict."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"a data folder must be a path to a prepared data folder, got {short_repr(folder)}")
    info_path = os.path.join(folder, "data.json")
    if not os.path.isfile(info_path):
        raise InputError(f"{folder}: no data.json, so not a prepared data folder (or its prepare.py did not "
                         f"finish): run prepare.py")
    info = read_json(info_path)
    _check_info(info, info_path)
    return info


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
    save_tensors(os.path.join(folder, "v_ref.safetensors"), {"v_ref": check_v_ref(v_ref)})
    write_table(os.path.join(folder, "pairs.parquet"), pairs)
    write_table(os.path.join(folder, "conversations.parquet"), pd.DataFrame(conversations))
    write_json(os.path.join(folder, "data.json"), {
        "dataset": dataset, "users": users,
        "pairs": {name: int((pairs["set"] == name).sum()) for name in SETS},
        "embeddings": _embeddings_identity(os.path.join(folder, "embeddings.safetensors")),
        "files": {name: _file_digest(os.path.join(folder, name)) for name in (*DATA_FILES, *files)},
        "config": config, **extra}, canonical=True)   # the same data, the same bytes: its hash is the identity
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


def _check_info(info, path):
    """data.json's structure: an object with dataset, users {"seen": [...], "unseen": [...]} (distinct
    ids, no user in both), embeddings and files (objects). -> users."""
    if not isinstance(info, dict):
        raise InputError(f"{path}: a JSON {type(info).__name__}, not an object: not written by prepare.py (rerun it)")
    for key, kind in (("dataset", str), ("users", dict), ("embeddings", dict), ("files", dict)):
        if key not in info:
            raise InputError(f"{path}: no {key!r}: not written by prepare.py (rerun it)")
        if not isinstance(info[key], kind):
            raise InputError(f"{path}: {key!r} is a {type(info[key]).__name__}, expected a JSON "
                             f"{'object' if kind is dict else 'string'} (rerun prepare.py)")
    users = info["users"]
    for group in ("seen", "unseen"):
        ids = users.get(group)
        if not isinstance(ids, list) or not ids or not all(isinstance(u, (str, int)) and not isinstance(u, bool)
                                                           for u in ids):
            raise InputError(f"{path}: users[{group!r}] must be a non-empty list of user ids, got {short_repr(ids)}")
        if len(set(ids)) != len(ids):
            twice = next(u for u in ids if ids.count(u) > 1)
            raise InputError(f"{path}: {group} user {twice!r} is listed twice")
    both = set(users["seen"]) & set(users["unseen"])
    if both:
        raise InputError(f"{path}: user {sorted(both, key=str)[0]!r} is both seen and unseen")
    if not all(isinstance(v, str) for v in info["files"].values()):
        raise InputError(f"{path}: 'files' must map file names to sha256 digests (rerun prepare.py)")
    return users


def _check_users(df, users, path, info_path):
    """data.json's user lists against pairs.parquet: each set's users are exactly its group's users
    (a user left out of data.json would silently lose its pairs; one added would have none)."""
    for name in SETS:
        group = "unseen" if name.startswith("unseen") else "seen"
        found = set(df.loc[df["set"] == name, "user"])
        listed = set(users[group])
        extra = sorted(found - listed, key=str)
        if extra:
            raise InputError(f"{path}: {name} has pairs of user {extra[0]!r}, which {info_path} does not list as "
                             f"a {group} user ({len(extra)} such users): the files do not belong together")


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


def _embeddings_identity(path, content=True):
    """What tells one embeddings file from another: its size, its header metadata (the extraction's
    fingerprint of inputs, model and settings; or the synthetic config) and the sha256 of its
    content (streamed: about 2 s per GB, 0.46 GB/s measured on a shared AMD EPYC core, the cost
    of reading the table once more at every load_data; an edit in place, such as a flipped sign,
    changes it)."""
    meta = read_metadata(path)
    identity = {"bytes": os.path.getsize(path), "metadata": meta}
    if content:
        identity["sha256"] = _file_digest(path)
    return identity
