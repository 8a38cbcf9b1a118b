"""Embedding extraction: phi(conversation) and v_ref from a reward model.

phi(conversation) is the reward model's final hidden state (after the final norm) at the last token
of the chat-templated conversation, and v_ref is its scoring head, so phi @ v_ref is the model's own
reward logit. Most conversations come in groups that differ only in their last message (a prompt
with a chosen and a rejected reply, PersonalLLM's 8 responses, a PRISM history with several
replies): a group is packed into one row, its shared token prefix once and then every reply, and a
block mask lets each reply see the prefix and itself only, with positions restarting after the
prefix, so that each reply is encoded exactly as if alone while the prefix is encoded once. Work is
cut into shards written as they finish, so an interrupted run resumes where it stopped, and shards
can be spread over processes with torchrun.
"""
import contextlib
import hashlib
import json
import os
import shutil
from array import array

import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError
from tqdm.auto import tqdm

from lore.checks import InputError, resolve_device
from lore.distributed import all_ranks, barrier, distributed, is_main_process
from lore.io import first_line, open_safetensors, hub_reachable, load_tensors, read_json, save_tensors, write_json

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
        # The load report lists score.weight as unexpected: the base model has no head, as intended;
        # the report and the loading bar are not printed (stderr ends with a script's one error line)
        with quiet_transformers():
            model = AutoModel.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation,
                                              local_files_only=offline)
    except Exception as e:  # transformers and safetensors raise many types for a config or weights they cannot read
        raise InputError(f"could not load reward model {source}: {first_line(e)}") from e
    return model.to(device).eval(), tokenizer


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings, load reports and progress bars off for the block (errors still raise):
    library noise on stderr is not to come before a script's one error line."""
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def model_features(model_name_or_path=DEFAULT_MODEL):
    """F of a reward model's embeddings (its config's hidden_size), read from its config.json alone,
    so that a checkpoint of another F is refused before anything is embedded."""
    source, offline = _locate(model_name_or_path)
    from transformers import AutoConfig
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError... for a config it cannot read
        raise InputError(f"could not read the config of reward model {source}: {first_line(e)}") from None
    F = getattr(config, "hidden_size", None)
    if not isinstance(F, int) or F < 1:
        raise InputError(f"the config of reward model {source} has no hidden_size (the F of its embeddings)")
    return F


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
    with open_safetensors(path) as f:
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
    rank, world, local_rank = distributed()
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
        barrier(world, local_rank)  # the shard folder is this run's
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

        barrier(world, local_rank)  # every shard is on disk
        if rank == 0:
            metadata = {"model": name, "n": str(len(ids)), "dtype": str(dtype).removeprefix("torch."),
                        "fingerprint": fingerprint}
            _merge(parts, len(shards), len(seqs), inverse, out_path,
                   {**metadata, "contents": contents} if contents is not None else metadata)
        barrier(world, local_rank)  # the final file is on disk
        return load_tensors(out_path, ["embeddings"])["embeddings"]
    finally:
        _unlock(lock, out_path)


def embed_now(conversations, model, tokenizer, *, texts=False, batch_tokens=16384):
    """The embeddings of embed_conversations computed in memory, nothing read or written: for a
    server that scores requests as they arrive (lore.reward). Prefix sharing and packing as there.
    conversations: lists of {"role", "content"}, rendered with the chat template; with texts=True
    plain strings instead, tokenized as they are (OpenRLHF's queries, already rendered by the
    policy). -> [n, F] float32 on the CPU, in input order."""
    if len(conversations) == 0:
        raise InputError("no conversations to embed")
    if texts:
        ids = tokenizer(list(conversations))["input_ids"]
        conversations = [[text] for text in conversations]   # one group: the prefix is what they share
        if any(len(seq) == 0 for seq in ids):
            raise InputError("a text tokenizes to no tokens")
    else:
        ids = _chat_token_ids(tokenizer, conversations)
    seqs, inverse, shards = _plan(ids, conversations, batch_tokens, shard_size=len(ids))
    out = torch.empty(len(seqs), model.config.hidden_size)                         # [distinct, F]
    for shard in shards:
        for batch in _batches(shard, seqs, batch_tokens):
            out[[u for _, us in batch for u in us]] = _embed_batch(model, batch, seqs).float().cpu()
    return out[inverse]                                                            # [n, F]


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


def _load_tokenizer(source, offline):
    from transformers import AutoTokenizer
    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(source, local_files_only=offline)
    except Exception as e:  # transformers raises OSError, ValueError, TypeError... for a missing or broken tokenizer
        text = " ".join(str(e).split())   # transformers' message lists the files it looked for on more lines
        text = text if len(text) <= 400 else text[:400] + "..."
        raise InputError(f"could not load the tokenizer of {source}: {type(e).__name__}: {text}") from e


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
            error = InputError(f"{lock_path}: cannot create the lock file ({first_line(e)})")
            break
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            error = InputError(f"{out_path}: another run is using it (it holds {lock_path}); "
                               f"wait for it to finish or choose another path")
        if error is not None or not _same_file(lock, lock_path):  # not ours, or deleted by the run that just ended
            lock.close()
            lock = None
    if not all_ranks(error is None, world, local_rank):
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
        table = load_tensors(out_path, ["embeddings"])["embeddings"]
    except InputError as e:
        if is_main_process():
            print(f"{e}; computing it again")
        return None
    if "sha256" in metadata and table_digest(table) != metadata["sha256"]:   # edited in place since
        if is_main_process():
            print(f"{out_path}: its table is not the one it was written with (edited since); computing it again")
        return None
    return table


def table_digest(table):
    """sha256 of a tensor's bytes: what a cache records of its content, so that an edit is seen."""
    return hashlib.sha256(table.contiguous().view(torch.uint8).numpy()).hexdigest()


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
        with open_safetensors(path) as f:
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
    table = distinct[torch.tensor(inverse)]   # [n, F]
    save_tensors(out_path, {"embeddings": table}, {**metadata, "F": str(distinct.shape[1]), "sha256": table_digest(table)})
    shutil.rmtree(parts)
