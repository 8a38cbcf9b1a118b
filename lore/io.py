"""Files: safetensors, JSON, JSON lines, Parquet and CSV, each written atomically (a temporary name
renamed into place) and read with errors that name the file, the line or the column at fault; the
datasets' splits from local files or the Hugging Face hub."""
import contextlib
import functools
import json
import os
import socket
from urllib.parse import urlparse

from huggingface_hub import constants as hf_constants
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from lore.checks import InputError

def save_tensors(path, tensors, metadata=None):
    """safetensors, written under a temporary name and renamed: a crash never leaves half a file. The
    header is re-serialized with sorted keys because safetensors writes it from a hash map whose order
    changes from one process to the next, and a resumed run must give identical bytes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    blob = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8:8 + n]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode()
    with _atomic(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(blob[:8])
            f.write(header.ljust(n))  # the same length: safetensors pads its header with spaces
            f.write(memoryview(blob)[8 + n:])


@contextlib.contextmanager
def _atomic(path):
    """Yields a temporary name beside `path`, renamed to `path` when the block ends without error and
    removed when it fails (disk full, Ctrl-C): no half-written file is left, under either name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


MANIFEST = ".lore-run.json"   # in every folder a run wrote: {"entries": {name: the script that wrote it}}
# and the record of whose it is: {"folder": --out, "pid": the writing process, "script": its script}


def run_record(folder):
    """A folder's MANIFEST as a dict ({} when there is none or it is unreadable)."""
    path = os.path.join(folder, MANIFEST)
    try:
        record = read_json(path) if os.path.isfile(path) else {}
    except InputError:
        record = {}
    return record if isinstance(record, dict) else {}


def owning_run(path):
    """The folder of another run's outputs that `path` is or lies in (a folder with a MANIFEST: a data
    folder, a results folder), or None. The staging folder this process is writing is its own."""
    folder = os.path.realpath(path)
    while True:
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            record = run_record(folder)
            if not (record.get("pid") == os.getpid() and not record.get("complete")):
                return folder
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)


def check_not_owned(path, what):
    """The ownership rule of --out for any other output path (the API's out_dir, --embeddings): a
    path in another run's folder is refused, since that run's records would no longer describe it."""
    owner = owning_run(path)
    if owner is not None:
        where = "is" if os.path.realpath(path) == owner else "is inside"
        raise InputError(f"{what} {path} {where} {owner}, the output folder of another run (its records would "
                         f"no longer describe its files): pick a path outside it")


def check_folder_writable(path, what):
    """A folder that files can be written into (created if need be), checked before any work:
    InputError naming `what` when it is a file, or cannot be created or written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{what} {path} is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise InputError(f"{what} {path}: cannot create it ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{what} {path}: cannot write in it (permission denied)")


def load_tensors(path, keys=()):
    """-> dict of tensors; InputError naming the file when it is missing or unreadable (truncated,
    corrupt, not safetensors), or when one of `keys` is missing."""
    with open_safetensors(path) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise InputError(f"{path}: missing tensor(s) {missing}")
    return tensors


def read_metadata(path):
    """The string metadata in a safetensors file's header; InputError naming a missing or unreadable file."""
    with open_safetensors(path) as f:
        return f.metadata() or {}


def open_safetensors(path):
    """safe_open(path), which checks the header and that the file is as long as the header says: a
    missing, truncated or corrupt file is an InputError naming it."""
    from safetensors import SafetensorError
    if os.path.isdir(path):
        raise InputError(f"{path} is a folder, not a safetensors file")
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def first_line(e):
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def write_json(path, obj, canonical=False):
    """JSON, atomically. canonical: keys sorted, so that the same content gives the same bytes (a
    dict from safetensors' header, such as an embeddings file's metadata, has no stable order)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _atomic(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=canonical)


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
    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(records)
    with _atomic(path) as tmp:
        df.to_parquet(tmp, index=False) if path.endswith(".parquet") else df.to_csv(tmp, index=False)


def write_parquet(path, tables):
    """An iterable of pyarrow Tables of one schema as one Parquet file, a row group (or more) per
    table as it comes, atomically: a table built in chunks (10^7 users' pairs) is never whole in
    memory. Strings are dictionary-encoded on disk (Parquet's default), read back as strings. -> rows."""
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rows, writer = 0, None
    with _atomic(path) as tmp:
        try:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows += table.num_rows
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise InputError(f"{path}: no rows to write")
    return rows


def parquet_batches(path, columns, batch_rows=1 << 20, dictionary=()):
    """Parquet -> (its schema, an iterator of pyarrow RecordBatches of `columns`, batch_rows rows at
    most), read column by column without pandas: the string columns named in `dictionary` come as
    DictionaryArrays (integer codes into their distinct values, no Python string per row).
    InputError naming the file when it is missing or unreadable, or a column is missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}")
        strings = [c for c in dictionary if pa.types.is_string(schema.field(c).type)
                   or pa.types.is_large_string(schema.field(c).type)]
        # pre_buffer=False: with it on, iter_batches keeps every row group's buffers it has read until the
        # iterator ends (arrow's allocated bytes grew to 0.36 GB over 10^6 users' pairs.parquet, 67 MB without)
        file = pq.ParquetFile(path, read_dictionary=strings, pre_buffer=False)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from None

    def batches():
        try:
            yield from file.iter_batches(batch_size=batch_rows, columns=list(columns))
        except (pa.ArrowException, OSError) as e:
            raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    return schema, batches()


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
        raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}")
    return df


def load_splits(hub_id, splits, data_files=None, config=None):
    """{split: datasets.Dataset} from local files (data_files: {split: path to .json/.jsonl/.parquet/.csv})
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
            kind = "parquet" if path.endswith(".parquet") else "csv" if path.endswith(".csv") else "json"
            if path.endswith((".json", ".jsonl")):
                _check_json_rows(path)
            datasets.disable_progress_bars()   # a bar on stderr before an error line is not one line
            if kind == "parquet" and _parquet_rows(path) == 0:  # datasets cannot build a split of no rows
                out[split] = datasets.Dataset.from_pandas(read_table(path), preserve_index=False)
                continue
            try:   # its own "Failed to load JSON ..." log lines would come before the one error line
                with _quiet_datasets():
                    out[split] = datasets.load_dataset(kind, data_files={split: path}, split=split)
            except Exception as e:  # datasets raises many types for unreadable files
                raise InputError(f"{path}: cannot read it as {kind} ({first_line(e)})")
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


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' log lines (it logs an error before raising it) off for the block: the error is raised
    and reported once, in one line."""
    from datasets.utils import logging as ds_logging
    level = ds_logging.get_verbosity()
    ds_logging.set_verbosity(ds_logging.CRITICAL + 1)
    try:
        yield
    finally:
        ds_logging.set_verbosity(level)


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
        raise InputError(f"{path}: cannot read it as parquet ({first_line(e)})") from None


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
