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
from lore.io import (load_tensors, parquet_batches, read_json, read_metadata, save_tensors, write_json, write_parquet,
                     write_table)
from lore.methods import per_user_accuracy
from lore.pairs import SETS, Pairs, first_nonfinite_row, index_dtype

DATA_FILES = ("pairs.parquet", "conversations.parquet", "v_ref.safetensors")
PAIR_BATCH = 1 << 20   # rows of pairs.parquet read at a time: its columns are never whole in memory


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
    table = table.to(device)
    sets = {name: replace(pairs.to(device), checked=True)   # the table and the indices were checked here
            for name, pairs in read_pairs(os.path.join(folder, "pairs.parquet"), users, table, info_path,
                                          fewshot_pairs).items()}
    print(f"{folder}: {info['dataset']}, {len(users['seen'])} seen and {len(users['unseen'])} unseen users; "
          + ", ".join(f"{name} {len(p)} pairs" for name, p in sets.items()))
    identity = _file_digest(info_path)
    for key in [k for k, (ref, _) in _IDENTITIES.items() if ref() is None]:   # forget freed tables
        del _IDENTITIES[key]
    _IDENTITIES[id(table)] = (weakref.ref(table), identity)
    return Data(table, v_ref, sets, users, info, folder, identity)


def read_pairs(path, users, table, info_path="data.json", fewshot_pairs=None):
    """pairs.parquet -> {set: Pairs} (table form, on table's device, users in the order of
    users["seen"] / users["unseen"], each user's pairs in the file's order), checked: known sets,
    integer rows inside the table, every pair's user listed (info_path: where the lists come from,
    for the error), every listed user with pairs. Read PAIR_BATCH rows at a time, column by column:
    sets and users as dictionary codes mapped to positions (id_index: one hash table), rows into
    preallocated [P] arrays; no Python object per pair or per user. fewshot_pairs: keep the unseen
    users' first n drawn few-shot pairs (the draw column). The errors name the row of the file (0-based)
    or the user."""
    import pyarrow as pa
    folder = os.path.dirname(path)
    schema, _ = parquet_batches(path, ["set", "user", "chosen", "rejected"])      # the file and its columns
    batches = parquet_batches(path, ["set"], PAIR_BATCH, dictionary=["set"])[1]
    known = id_index(SETS)
    counts, start = np.zeros(len(SETS), np.int64), 0
    for batch in batches:                       # pass 1: the sets, checked, and their sizes
        code = id_positions(batch.column(0), known)                                # [b]
        bad = np.flatnonzero(code < 0)
        if len(bad):
            raise InputError(f"{path}: row {start + bad[0]}: set {batch.column(0)[int(bad[0])].as_py()!r} is not "
                             f"one of {', '.join(SETS)}")
        counts += np.bincount(code, minlength=len(SETS))
        start += batch.num_rows
    for column in ("chosen", "rejected"):
        kind = schema.field(column).type
        if not pa.types.is_integer(kind):
            values = pa.concat_arrays([b.column(0) for b in parquet_batches(path, [column])[1]])
            i = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) if values.null_count else 0
            raise InputError(f"{path}: row {i}: {column} must hold integer rows of the embedding table, got "
                             f"{values[i].as_py()!r} ({kind})")
    groups = {name: "unseen" if name.startswith("unseen") else "seen" for name in SETS}
    listed = {group: id_index(users[group]) for group in ("seen", "unseen")}
    numpy_dtype = lambda n: np.int32 if index_dtype(n) == torch.int32 else np.int64   # half the bytes of every pass
    rows = numpy_dtype(len(table))
    out = {name: {"user": np.empty(n, numpy_dtype(len(users[groups[name]]))), "chosen": np.empty(n, rows),
                  "rejected": np.empty(n, rows), "group": [], "n": 0} for name, n in zip(SETS, counts.tolist())}
    unlisted = {name: set() for name in SETS}
    columns = ["set", "user", "chosen", "rejected"] + [c for c in ("draw", "group") if c in schema.names]
    start = 0
    for batch in parquet_batches(path, columns, PAIR_BATCH, dictionary=["set", "user"])[1]:   # pass 2
        code = id_positions(batch.column("set"), known)                            # [b]
        sides = {}
        for column in ("chosen", "rejected"):
            values = batch.column(column)
            if values.null_count:
                i = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
                raise InputError(f"{path}: row {start + i}: {column} must hold integer rows of the embedding table, "
                                 f"got None ({values.type})")
            sides[column] = values.to_numpy()                                      # [b]
            outside = np.flatnonzero((sides[column] < 0) | (sides[column] >= len(table)))
            if len(outside):
                i = int(outside[0])
                raise InputError(f"{path}: row {start + i}: {column} {sides[column][i]} is outside the {len(table)} "
                                 f"rows of embeddings.safetensors")
        position = {}
        for k, name in enumerate(SETS):
            take = np.flatnonzero(code == k)                                       # [b_s] this set's rows
            if not len(take):
                continue
            group = groups[name]
            if group not in position:
                position[group] = id_positions(batch.column("user"), listed[group])  # [b]
            user = position[group][take]
            if (user < 0).any():   # checked before any user without pairs: the files do not belong together
                unlisted[name].update(batch.column("user").take(take[user < 0]).to_pylist())
            if name == "unseen_fewshot" and fewshot_pairs is not None and "draw" in columns:
                keep = batch.column("draw").to_numpy(zero_copy_only=False)[take] < fewshot_pairs
                take, user = take[keep], user[keep]
            part, n = out[name], out[name]["n"]
            part["user"][n:n + len(take)] = user
            for column in ("chosen", "rejected"):
                part[column][n:n + len(take)] = sides[column][take]
            if "group" in columns:
                part["group"].append(batch.column("group").take(take))
            part["n"] = n + len(take)
        start += batch.num_rows
    for name in SETS:
        if unlisted[name]:
            extra = sorted(unlisted[name], key=str)
            raise InputError(f"{path}: {name} has pairs of user {extra[0]!r}, which {info_path} does not list as a "
                             f"{groups[name]} user ({len(extra)} such users): the files do not belong together")
    sets = {}
    for name in SETS:
        if name == "unseen_fewshot" and fewshot_pairs is not None and "draw" not in columns:
            raise InputError(f"{folder}: pairs.parquet has no draw column, so no first {fewshot_pairs} few-shot pairs")
        part, ids = out.pop(name), users[groups[name]]   # this set's arrays, referenced only here from now on
        n = part["n"]
        for column in ("user", "chosen", "rejected"):
            part[column] = part[column][:n]
        # torch.bincount reads int32 users as they are (np.bincount would copy them to int64: 1.9 GB at 10^7 users)
        missing = np.flatnonzero(torch.bincount(torch.from_numpy(part["user"]), minlength=len(ids)).numpy() == 0)
        if len(missing):
            first = min((ids[i] for i in missing), key=str)
            raise InputError(f"{folder}: {name}: user {first!r} has no pairs ({len(missing)} users without pairs)")
        order = None if n < 2 or _sorted(part["user"]) else np.argsort(part["user"], kind="stable")   # [P] int64
        if order is not None:   # a user's pairs together, in the file's order; one column copied at a time
            for column in ("user", "chosen", "rejected"):
                part[column] = part[column][order]
        user, chosen, rejected = part.pop("user"), part.pop("chosen"), part.pop("rejected")
        group = None
        if part["group"]:
            values = pa.concat_arrays(part["group"]) if n else pa.array([], schema.field("group").type)
            if values.null_count == 0:   # pairs drawn together, numbered by (user, group) in order of appearance
                import pandas as pd
                values = values.to_pandas() if order is None else values.to_pandas().iloc[order]
                group = torch.tensor(pd.DataFrame({"u": user, "g": values.to_numpy()}).groupby(
                    ["u", "g"], sort=False).ngroup().to_numpy(), dtype=torch.long)
        sets[name] = Pairs(torch.from_numpy(user), len(ids), table=table, chosen=torch.from_numpy(chosen),
                           rejected=torch.from_numpy(rejected), group=group)
    return sets


def _sorted(values, chunk=1 << 24):
    """Whether values [n] never decrease, chunk by chunk: no [n] bool temporary (0.47 GB at 10^7 users' train pairs)."""
    n = len(values) - 1   # the pairs (i, i + 1) to compare
    return all((values[i + 1:min(i + chunk, n) + 1] >= values[i:min(i + chunk, n)]).all() for i in range(0, n, chunk))


def id_index(ids):
    """A list of distinct user ids (data.json's) as a pandas Index: its hash table is built once, on
    the first lookup, and serves every batch after (pyarrow's index_in would hash all 10^7 ids again
    at every call: 3 s each)."""
    import pandas as pd
    return pd.Index(ids)


def id_positions(values, listed):
    """The position in `listed` (an id_index) of every value of `values` (a pyarrow array, dictionary-
    encoded or not) -> [n] int64, -1 where it is null or not listed. A string never equals an integer.
    A dictionary's distinct values are looked up once, then its codes index them."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if pa.types.is_dictionary(values.type):
        found = np.append(id_positions(values.dictionary, listed), -1)            # [distinct + 1]
        codes = pc.fill_null(values.indices, len(values.dictionary)).to_numpy()    # [n], null -> the -1
        return found[codes]
    return listed.get_indexer(np.asarray(values.to_numpy(zero_copy_only=False))).astype(np.int64)


def pair_tables(folder, pairs, users):
    """pairs.parquet's content as checked pyarrow Tables, counted per set into the dict returned
    beside them: a DataFrame as one table, checked before anything is written; an iterable of tables
    (prepare.py's chunks of users) checked as each comes. -> (tables, counts {set: pairs})."""
    import pandas as pd
    import pyarrow as pa
    known, counts = id_index(SETS), dict.fromkeys(SETS, 0)
    listed = {group: id_index(users[group]) for group in ("seen", "unseen")}

    def checked(tables):
        for part in tables:
            code = id_positions(part.column("set").combine_chunks(), known)        # [b]
            bad = np.flatnonzero(code < 0)
            if len(bad):
                raise InputError(f"{folder}: pair set {part.column('set')[int(bad[0])].as_py()!r} is not one of {SETS}")
            user = part.column("user").combine_chunks().dictionary_encode()       # each distinct id looked up once
            for k, name in enumerate(SETS):
                group = "unseen" if name.startswith("unseen") else "seen"
                take = np.flatnonzero(code == k)
                if len(take) and (id_positions(user.take(take), listed[group]) < 0).any():
                    raise InputError(f"{folder}: {name} has pairs of users that are not {group} users")
                counts[name] += len(take)
            yield part

    if isinstance(pairs, pd.DataFrame):
        return list(checked([pa.Table.from_pandas(pairs, preserve_index=False)])), counts
    return checked(pairs), counts


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
    last. pairs: a DataFrame with the columns set, user, chosen, rejected (+ group, draw, ...), or an
    iterable of pyarrow Tables with those columns, written as they come (row groups; prepare.py's
    chunks of users);
    conversations: a DataFrame with row and messages; files: the dataset's own files already
    written in the folder, hashed like DATA_FILES; extra: more items for data.json."""
    import pandas as pd
    tables, counts = pair_tables(folder, pairs, users)
    save_tensors(os.path.join(folder, "v_ref.safetensors"), {"v_ref": check_v_ref(v_ref)})
    write_parquet(os.path.join(folder, "pairs.parquet"), tables)
    write_table(os.path.join(folder, "conversations.parquet"), pd.DataFrame(conversations))
    write_json(os.path.join(folder, "data.json"), {
        "dataset": dataset, "users": users,
        "pairs": counts,
        "embeddings": _embeddings_identity(os.path.join(folder, "embeddings.safetensors")),
        "files": {name: _file_digest(os.path.join(folder, name)) for name in (*DATA_FILES, *files)},
        "config": config, **extra}, canonical=True)   # the same data, the same bytes: its hash is the identity
    print(f"{folder}: " + ", ".join(f"{name} {counts[name]} pairs" for name in SETS)
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
