"""The command line every script shares: flags with checked types, a one-line error and exit 2
for bad input, and run folders whose outputs land together or not at all."""
import argparse
import contextlib
import datetime
import errno
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

import torch

from lore.active import SELECTIONS
from lore.checks import MAX_COUNT, MAX_RATE, MAX_SEED, InputError, check_hparam, resolve_device, set_seed
from lore.distributed import all_ranks, distributed, is_main_process, torchrun_env
from lore.extract import DEFAULT_MODEL
from lore.io import MANIFEST, read_metadata, run_record, write_json
from lore.methods import METHODS
from lore.recipes import load_recipe, recipe_path
from lore.stopping import STOPS

def command_line(main):
    """Wrap a script's main(args): bad input ends with a one-line message and exit code 2; Ctrl-C
    with one line and exit code 130 (run_folder has removed the run's unfinished outputs); an I/O
    error (ENOSPC, EFBIG, EBUSY, ENAMETOOLONG, EACCES, EROFS...) with one line naming the file and
    exit code 2: every file is written under a temporary name and every run into a staging folder,
    so nothing half-written is left looking complete."""
    def wrapped(args):
        SWAPPED.clear()
        try:
            return main(args)
        except InputError as e:
            _after_rank_zero()
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print(f"interrupted: the run had finished, {SWAPPED[-1]} holds its results" if SWAPPED else
                  "interrupted: nothing of this run was written to its output folder", file=sys.stderr)
            raise SystemExit(130)
        except OSError as e:   # disk full, read-only, busy, name too long...: what and where, one line
            if e.errno is None:
                raise
            _after_rank_zero()
            where = f"{e.filename}: " if e.filename else ""
            print(f"error: {where}{e.strerror or e} ({errno.errorcode.get(e.errno, e.errno)}); nothing of this "
                  f"run was left looking complete", file=sys.stderr)
            raise SystemExit(2)
    wrapped.__doc__, wrapped.__name__ = main.__doc__, main.__name__
    return wrapped


RANK_GRACE = 10.0   # seconds a torchrun rank > 0 waits for rank 0 to report an error before its own


def _after_rank_zero():
    """Under torchrun, a bad input is found by every rank alike: rank 0 reports it. A rank > 0 waits
    (RANK_GRACE) before reporting its own, and torchrun, seeing rank 0 exit, ends it first, silently
    (SIGTERM); an error of that rank alone is still printed, once the grace is over."""
    if torchrun_env()[0] > 0:
        time.sleep(RANK_GRACE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every script uses it: its module docstring (the exact commands, what it reads
    and writes) as the description, kept as written; a bad flag is one line and exit code 2."""

    def __init__(self, doc, **kwargs):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def _argtype(convert, check, expected):
    """An argparse type: convert(text), then check(value), else 'expected ..., got TEXT'."""

    def parse(text):
        try:
            value = convert(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    parse.__name__ = expected  # argparse names the type in its messages
    return parse


def _ints(text):
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(text)
    return values


def _floats(text):
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError(text)
    return values


def rank_list(text, least=0, what="ranks"):
    """argparse type for '0,1,2' -> [0, 1, 2]; every value >= least, none twice."""
    return _argtype(_ints, lambda v: min(v) >= least and len(set(v)) == len(v),
                    f"comma-separated distinct {what} >= {least}")(text)


def shot_list(text):
    """argparse type for '5,10' -> [5, 10]; shots must be >= 1."""
    return rank_list(text, 1, "shots")


positive_int = _argtype(int, lambda v: 1 <= v <= MAX_COUNT, f"an integer in [1, {MAX_COUNT:g}]")
nonnegative_int = _argtype(int, lambda v: 0 <= v <= MAX_COUNT, f"an integer in [0, {MAX_COUNT:g}]")
seed_int = _argtype(int, lambda v: 0 <= v <= MAX_SEED, "an integer in [0, 2**32)")
positive_float = _argtype(float, lambda v: math.isfinite(v) and 0 < v <= MAX_RATE, f"a finite number in (0, {MAX_RATE:g}]")
nonnegative_float = _argtype(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
fraction = _argtype(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
float_list = _argtype(_floats, lambda v: all(math.isfinite(a) and a >= 0 for a in v) and len(set(v)) == len(v),
                      "comma-separated distinct finite numbers >= 0")


def method_list(text):
    """argparse type for 'lore,pal' -> ['lore', 'pal'], registered names only."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct registered methods ({', '.join(METHODS)}), got {text!r}")
    return names


def add_sweep_args(parser, folder, script):
    """The flags train_basis.py and vary_fewshot.py share, their defaults the dataset's recipe
    ({folder}/recipe.json, lore.recipes): its section `script` and its baselines' settings. Every
    registered method's own hyperparameters become flags --{name}-{hp} (method_hparams); a
    train_basis recipe with fewshot_pairs adds --fewshot-pairs."""
    recipe = load_recipe(os.path.basename(folder))
    r = recipe[script]
    # argparse takes '-1e4' for an option (only -1 and -1.5 look like numbers to it); a value that
    # reads as a number is a value, so --alpha-list -1e4 fails with the range error naming alpha
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|nan)$", re.I)
    parser.add_argument("--data", default=os.path.join(folder, "data"),
                        help="what prepare.py wrote (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(folder, "results", script),
                        help="output folder, written as a whole when the run ends (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=seed_int, default=0)
    parser.add_argument("--method", type=method_list, default=list(r["method"]),
                        help=f"methods to fit, comma-separated, of: {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--k-list", type=rank_list, default=list(r["k_list"]),
                        help="ranks K, e.g. 0,1,2 (methods skip K below their smallest) (default: %(default)s)")
    parser.add_argument("--alpha-list", type=float_list, default=list(r["alpha_list"]),
                        help="regularization strengths of the methods that use one, e.g. 0,1e4 (default: %(default)s)")
    steps = parser.add_argument_group("the LoRe entries' steps and rates (the dataset recipe)")
    steps.add_argument("--iters", type=positive_int, default=r["iters"], help="basis training steps (default: %(default)s)")
    steps.add_argument("--lr", type=positive_float, default=r["lr"], help="basis learning rate (default: %(default)s)")
    steps.add_argument("--fewshot-iters", type=positive_int, default=r["fewshot_iters"],
                       help="steps fitting unseen users' weights (default: %(default)s)")
    steps.add_argument("--fewshot-lr", type=positive_float, default=r["fewshot_lr"], help="(default: %(default)s)")
    steps.add_argument("--stop", choices=STOPS, default=r.get("stop", "fixed"),
                       help="fixed: --iters steps (the paper's); early: stop when the loss on a held-out slice "
                            "of the seen users' pairs stops improving, --iters the cap (default: %(default)s)")
    steps.add_argument("--fewshot-stop", choices=STOPS, default=r.get("fewshot_stop", "fixed"),
                       help="fixed: --fewshot-iters steps (the paper's); early: the same rule on the unseen users' "
                            "own few-shot pairs (10%% held out from users with >= 10, else a tolerance on the "
                            "training loss), --fewshot-iters the cap (default: %(default)s)")
    if r.get("fewshot_pairs") is not None:
        parser.add_argument("--fewshot-pairs", type=positive_int, default=r["fewshot_pairs"],
                            help="the first n pairs of each unseen user's few-shot pool it fits on (default: %(default)s)")
    for name, cls in METHODS.items():
        own = [hp for hp in cls.defaults if hp not in cls.recipe_hparams]
        tuned = recipe.get("baselines", {}).get(name, {})
        unknown = sorted(set(tuned) - set(own))
        if unknown:
            raise InputError(f"{recipe_path(os.path.basename(folder))}: baselines.{name} has unknown "
                             f"hyperparameter(s) {unknown}")
        group = parser.add_argument_group(f"method {name}") if own else None
        for hp in own:
            group.add_argument(f"--{name}-{hp}".replace("_", "-"), type=hparam_type(cls, hp),
                               default=tuned.get(hp, cls.defaults[hp]), choices=cls.choices.get(hp),
                               dest=f"{name}__{hp}", help="(default: %(default)s)")
    return parser


def hparam_type(cls, hp):
    """The argparse type of a method's hyperparameter flag: the text converted by its default's kind,
    then checked by lore.checks.check_hparam, the check Method.__init__ makes in the API."""
    default, choices = cls.defaults[hp], cls.choices.get(hp)
    convert = str if choices else int if isinstance(default, int) else float

    def parse(text):
        try:
            return check_hparam(cls.name, hp, convert(text), default, choices, cls.limits.get(hp), cls.least.get(hp))
        except (ValueError, TypeError, InputError) as e:
            raise argparse.ArgumentTypeError(str(e) if isinstance(e, InputError) else f"got {text!r}") from None
    parse.__name__ = hp
    return parse


def method_hparams(args):
    """{method: {hyperparameter: value}} for the methods in args.method, from the flags."""
    hparams = {}
    for name in args.method:
        cls = METHODS[name]
        hparams[name] = {hp: getattr(args, hp) if hp in cls.recipe_hparams else getattr(args, f"{name}__{hp}")
                         for hp in cls.defaults}
    return hparams


def select_list(text):
    """argparse type for 'random,active' -> ['random', 'active']."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(n not in SELECTIONS for n in names) or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected distinct selections of {', '.join(SELECTIONS)}, got {text!r}")
    return names


def add_shots_args(parser, folder):
    """The flags every vary_fewshot.py adds to add_sweep_args', their defaults the dataset's recipe."""
    r = load_recipe(os.path.basename(folder))["vary_fewshot"]
    parser.add_argument("--trials", type=positive_int, default=r["trials"],
                        help="draws of the shots per shot count (default: %(default)s)")
    parser.add_argument("--shots", type=shot_list, default=list(r["shots"]),
                        help=f"{r['unit']} per unseen user, e.g. 5,10 (default: %(default)s)")
    parser.add_argument("--select", type=select_list, default=["random"],
                        help="how the shots are chosen, comma-separated: random (the paper's draw) and/or "
                             "active (each next question the most informative, lore.active) (default: random)")
    return parser


def check_shots(shots, pool):
    """--shots against the unseen users' few-shot pool (Pairs): a count no user can give is refused
    (a pool of groups, such as PRISM's dialogs, takes any count: a user gives all it has)."""
    largest = int(pool.counts().max()) if pool.group is None else None
    if largest is not None and max(shots) > largest:
        raise InputError(f"--shots {max(shots)} is more than any unseen user's pool of few-shot pairs "
                         f"(at most {largest}); draw a larger pool with prepare.py")


def data_files_arg(text):
    """argparse type for 'split=PATH'."""
    split, sep, path = text.partition("=")
    if not sep or not split or not path:
        raise argparse.ArgumentTypeError(f"expected split=PATH, got {text!r}")
    return split, path


class SplitFiles(argparse.Action):
    """--data-files SPLIT=PATH ...: a split given twice is an error (dict() of them would keep the last)."""

    def __call__(self, parser, namespace, values, option_string=None):
        splits = [split for split, _ in values]
        twice = next((s for s in splits if splits.count(s) > 1), None)
        if twice is not None:
            parser.error(f"{option_string} gives the split {twice!r} twice")
        setattr(namespace, self.dest, values)


def add_prepare_args(parser, folder):
    """The flags every prepare.py shares."""
    parser.add_argument("--out", default=os.path.join(folder, "data"), help="output folder (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="reward model: hub id or local folder")
    parser.add_argument("--data-files", type=data_files_arg, nargs="+", default=None, metavar="SPLIT=PATH", action=SplitFiles,
                        help="local .json/.jsonl/.parquet/.csv files in the hub's schema instead of the hub")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--batch-tokens", type=positive_int, default=16384, help="padded tokens per forward pass")
    return parser


def config_of(args, **extra):
    """The resolved command-line config and the command itself, as saved beside a run's outputs."""
    return {**{k: v for k, v in vars(args).items()}, **extra, "command": " ".join(sys.argv)}


def start_run(args):
    """Seed everything and resolve the device; print both. -> the torch device."""
    set_seed(args.seed)
    device = resolve_device(args.device)
    print(f"seed {args.seed}, device {device}")
    return device


def _record(out, script):
    return {"folder": out, "pid": os.getpid(), "script": script}


@contextlib.contextmanager
def run_folder(args, script, *, keep=(), keep_if=None, inputs=None, **extra):
    """The output folder of a run (args.out), written as a whole when the run succeeds, or not at all.

    Yields a staging folder beside --out to write every output into (None on torchrun ranks > 0, which
    only help an extraction). Before any work, under a lock on `.{out}.lock` beside --out (a second
    run into the same --out is refused at once; the OS drops the lock of a dead process):
      - what a killed run left is recovered (recover_folder): --out holds either the previous results
        or the new ones, never neither;
      - --out is refused when it is a file, a mount point, inside another run's folder (a data
        folder among them), or when it is or contains one of `inputs` (default: args.data);
      - every entry of an existing --out must be one this script wrote there (the folder's MANIFEST
        records who wrote what) or one of a script in `keep` (PRISM's prepare.py and
        generate-prism-embeddings.py share a folder); anything else (a user's file, another
        script's folder, a data folder) is refused, named, and nothing is touched;
        keep_if(staging, out) -> bool, when given, says at the end whether the kept entries still
        belong with the new ones (PRISM: made from the same examples); if not, they are dropped.
    When the block ends without error, config.json (config_of(args), the script's name, the time)
    and the MANIFEST are added, the kept scripts' entries are linked in, the ownership check is made
    again (something may have appeared in --out meanwhile) and the folder replaces --out (swap). On
    an error or Ctrl-C the staging folder is removed and --out is untouched."""
    if not is_main_process():   # torchrun: rank 0 owns the folder; the others only help embed
        yield None
        return
    out, parent, base = _out_path(args.out)
    inputs = [getattr(args, "data", None)] if inputs is None else inputs
    _check_out(out, [p for p in inputs if p])
    created = _missing_folders(parent)   # removed again when the run fails: a refusal leaves nothing behind
    try:
        with folder_lock(os.path.join(parent, f".{base}.lock"), f"--out {out}"):
            recover_folder(out)
            _check_owned(out, script, keep)
            _check_renamable(out)
            staging = os.path.join(parent, f".{base}.partial-{os.getpid()}")
            os.makedirs(staging)
            try:   # the record that makes the staging folder this run's (recover_folder reads it)
                write_json(os.path.join(staging, MANIFEST), {**_record(out, script), "entries": {}})
                yield staging
                write_json(os.path.join(staging, "config.json"),
                           {**config_of(args, **extra), "script": script,
                            "finished": datetime.datetime.now().isoformat(timespec="seconds")})
                entries = {name: script for name in os.listdir(staging) if name != MANIFEST}
                owned = _check_owned(out, script, keep)
                keeping = keep_if is None or not owned or keep_if(staging, out)
                for name, owner in owned.items():
                    if owner != script and name not in entries and keeping:   # a kept script's entry: linked
                        _link_tree(os.path.join(out, name), os.path.join(staging, name))
                        entries[name] = owner
                write_json(os.path.join(staging, MANIFEST),
                           {**_record(out, script), "complete": True, "entries": dict(sorted(entries.items()))})
                _swap(staging, out)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise
    print(f"wrote {out}")


@contextlib.contextmanager
def rank_run_folder(args, script, **extra):
    """run_folder for a script that torchrun may start: rank 0 holds the run folder (the lock, the
    all-or-nothing rename) and writes the outputs; the other ranks write into a temporary folder
    that is dropped, and print nothing. One process (no torchrun) is run_folder itself. When rank
    0 cannot open --out, every rank stops with that error instead of waiting for it."""
    rank, world, local_rank = distributed()
    if world == 1:
        with run_folder(args, script, **extra) as out:
            yield out
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)   # "cuda" is this rank's GPU
    if rank > 0:
        if not all_ranks(True, world, local_rank):
            raise InputError(f"--out {args.out}: rank 0 could not open it (its error says why)")
        with tempfile.TemporaryDirectory() as out, open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            yield out
        return
    with contextlib.ExitStack() as stack:
        try:
            out = stack.enter_context(run_folder(args, script, **extra))
        except BaseException:
            all_ranks(False, world, local_rank)
            raise
        all_ranks(True, world, local_rank)
        yield out


def cache_path(args, name):
    """A cache file that outlives failed runs (an embeddings file and its resumable shards): kept in
    `.{out}.cache/` beside --out, seeded from a copy of --out's own `name` when there is one, and
    copied into the run's outputs with link_into. Never a hard link: an edit of the data folder's
    file in place must not reach the cache (embed_conversations also checks the content's hash).
    Its name does not depend on the process, so torchrun ranks share it and a killed extraction
    resumes."""
    out, parent, base = _out_path(args.out)
    folder = os.path.join(parent, f".{base}.cache")
    path = os.path.join(folder, name)
    os.makedirs(folder, exist_ok=True)
    previous = os.path.join(out, name)
    if is_main_process():
        # the cache and --out's copy are this script's: an unreadable one (truncated, corrupt) holds
        # nothing to resume from, and is dropped rather than refused as a file of someone else's
        if os.path.isfile(path) and not _readable_safetensors(path):
            print(f"{path}: not a readable safetensors file; computing it again")
            os.remove(path)
        if not os.path.lexists(path) and os.path.isfile(previous) and _readable_safetensors(previous):
            _copy_file(previous, path)
    return path


def _readable_safetensors(path):
    try:
        read_metadata(path)
    except InputError:
        return False
    return True


def link_into(path, folder):
    """Copy the file `path` into `folder` (a copy, not a hard link: the output and the cache are
    edited apart). -> the copy's path."""
    target = os.path.join(folder, os.path.basename(path))
    _copy_file(path, target)
    return target


def _copy_file(src, dst):
    """shutil.copy2 (the contents and the modification time: a copy of an unchanged cache is the
    same file) under a temporary name renamed into place: a kill leaves no half file at dst."""
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _out_path(path):
    """-> (out, parent, base): --out with a symlink resolved (the link is kept and its target
    replaced, so the link and its target never disagree); `link/` is the link, as `link` is. A
    symlink loop, or a chain that ends in another link, is an InputError."""
    path = str(path)
    bare = path.rstrip(os.sep) or os.sep   # `link/` names the link's target folder: resolve the link itself
    if os.path.islink(bare):
        try:
            out = os.path.realpath(bare, strict=False)
            os.stat(bare)   # ELOOP on a loop; a dangling link (its target not yet made) is fine
        except FileNotFoundError:
            pass
        except OSError as e:
            raise InputError(f"--out {path}: cannot follow the symlink ({e.strerror})") from None
        if os.path.islink(out):
            raise InputError(f"--out {path}: a symlink loop (it never reaches a folder)")
    else:
        out = os.path.abspath(bare)
    parent, base = os.path.split(out)
    return out, parent, base


def _check_out(out, inputs):
    """--out as a place to write: not a file, not a mount point (a folder there cannot be replaced by a
    rename), a name the file system takes, not inside another run's folder, apart from the inputs."""
    parent, base = os.path.split(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file, not a folder")
    if os.path.ismount(out):
        raise InputError(f"--out {out} is a mount point, which cannot be replaced in one rename; "
                         f"pick a folder inside it")
    try:
        longest = os.pathconf(parent if os.path.isdir(parent) else "/", "PC_NAME_MAX")
    except OSError:
        longest = 255
    if len(os.fsencode(base)) + 30 > longest:   # the staging folder's name is base + 30 bytes at most
        raise InputError(f"--out: the name {base[:40]}... is too long ({len(base)} characters; at most "
                         f"{longest - 30} here)")
    folder = parent
    while True:
        if os.path.isfile(os.path.join(folder, MANIFEST)):
            raise InputError(f"--out {out} is inside {folder}, the output folder of another run, which "
                             f"would refuse (or replace) it: pick a folder outside it")
        if os.path.dirname(folder) == folder:
            break
        folder = os.path.dirname(folder)
    for path in inputs:   # (a --out inside a data folder is inside another run's folder: refused above)
        p = os.path.realpath(path)
        if p == out or p.startswith(out + os.sep):
            raise InputError(f"--out {out} contains the input {path}: the run would replace what it reads; "
                             f"pick another --out")


def _owners(out):
    """{entry: the script that wrote it} of a folder, from its MANIFEST ({} when there is none)."""
    entries = run_record(out).get("entries")
    return entries if isinstance(entries, dict) else {}


def _check_owned(out, script, keep):
    """InputError naming the first entry of --out that neither `script` nor a script in `keep` wrote
    there; -> {entry: owner} of the entries (to replace or to keep)."""
    if not os.path.isdir(out):
        return {}
    owners = _owners(out)
    found = {}
    for name in sorted(os.listdir(out), key=lambda n: (n.startswith("."), n)):
        if name == MANIFEST:
            continue
        owner = owners.get(name)
        if owner != script and owner not in keep:
            whose = (f"the output of {owner}" if owner else
                     "a file or folder that no run of " + script + " wrote there")
            raise InputError(f"--out {out} holds {name!r}, {whose}; {script} would replace it: move it "
                             f"away or pick another --out")
        found[name] = owner
    return found


def _link_tree(src, dst):
    """Hard-link a file, or a folder's files, from src to dst (copies across file systems)."""
    if os.path.isdir(src) and not os.path.islink(src):
        shutil.copytree(src, dst, copy_function=_link_or_copy, symlinks=True)
    else:
        _link_or_copy(src, dst)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


SWAPPED = []   # the --out folders this process's run has replaced (command_line's Ctrl-C message)


@contextlib.contextmanager
def no_interrupts():
    """SIGINT and SIGTERM held back for the block and raised again when it ends (in the main thread;
    elsewhere a no-op): a rename probe or a swap and its record are never cut in two by Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []   # (a handler, not a signal mask: torch's threads would take a masked signal)
    previous = {s: signal.signal(s, lambda n, _: caught.append(n)) for s in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(s) is not None}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if caught:
            signal.raise_signal(caught[0])   # now, to the handler in place again


def _check_renamable(out):
    """--out is replaced by renames at the end of the run: one that cannot be renamed (an immutable
    folder, another owner's folder under a sticky parent) is refused now, before any work. The probe
    renames it to its swap name `.{out}.old-PID` and straight back, signals held back in between (a
    kill -9 there leaves the leftover that recover_folder puts back)."""
    if not os.path.isdir(out):
        return
    parent, base = os.path.split(out)
    probe = os.path.join(parent, f".{base}.old-{os.getpid()}")
    with no_interrupts():
        try:
            os.rename(out, probe)
        except OSError as e:
            raise InputError(f"--out {out} cannot be renamed ({e.strerror}), so the run could not replace it at its "
                             f"end: make it renamable (its permissions, chattr -i) or pick another --out") from None
        os.rename(probe, out)


def _missing_folders(folder):
    """The folders that creating `folder` would make, deepest first."""
    missing = []
    while folder and not os.path.lexists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    return missing


def _swap(staging, out):
    """Replace --out by the finished staging folder so that a kill -9 at any instant leaves the
    previous results or the new ones recoverable: staging becomes `.{out}.ready-PID` (complete),
    --out moves to `.{out}.old-PID`, ready becomes --out, old is deleted. recover_folder finishes
    or undoes each intermediate state."""
    parent, base = os.path.split(out)
    ready = os.path.join(parent, f".{base}.ready-{os.getpid()}")
    old = os.path.join(parent, f".{base}.old-{os.getpid()}")
    with no_interrupts():   # Ctrl-C after the swap began: it completes, then the interrupt says so
        os.rename(staging, ready)
        try:
            if os.path.lexists(out):
                os.rename(out, old)
            os.rename(ready, out)
        except BaseException:
            if os.path.lexists(old) and not os.path.lexists(out):
                os.rename(old, out)
            shutil.rmtree(ready, ignore_errors=True)
            raise
        SWAPPED.append(out)
        shutil.rmtree(old, ignore_errors=True)


LEFTOVER = re.compile(r"\.(?P<base>.+)\.(?P<kind>partial|ready|old)-(?P<pid>[1-9][0-9]*)")


def leftovers(out):
    """{pid: {kind: path}} of the leftovers of runs into --out killed inside run_folder: siblings of
    --out named exactly `.{base}.{partial|ready|old}-{PID}` whose MANIFEST records --out as the folder
    they belong to (and, for a staging folder, PID as its writer; for a ready one, that it is
    complete). A name that only starts like one (`.r.old-1.partial-7` is `r.old-1`'s, not `r`'s), or
    a folder without the record, is another folder's, and is never touched."""
    parent, base = os.path.split(out)
    found = {}
    if not os.path.isdir(parent):
        return found
    for name in os.listdir(parent):
        m = LEFTOVER.fullmatch(name)
        path = os.path.join(parent, name)
        if m is None or m["base"] != base or os.path.islink(path) or not os.path.isdir(path):
            continue
        record = run_record(path)
        if record.get("folder") != out:
            continue
        kind, pid = m["kind"], int(m["pid"])
        if kind != "old" and (record.get("pid") != pid or (kind == "ready") != (record.get("complete") is True)):
            continue
        found.setdefault(pid, {})[kind] = path
    return found


def recover_folder(out):
    """Leftovers of runs killed inside run_folder (called under the lock, so none is in use; only
    those `leftovers` recognises): unfinished staging folders go; a finished one (ready) whose swap
    had not begun goes (--out still holds the previous results); one whose swap had begun (--out
    moved to old) becomes --out; a previous run moved aside (old) is deleted once --out exists, or
    put back where it does not. When --out appeared while a swap was unfinished, nothing is deleted:
    InputError naming both."""
    for pid, left in sorted(leftovers(out).items()):
        if "partial" in left:
            shutil.rmtree(left["partial"], ignore_errors=True)
        if "ready" in left and "old" in left:
            if os.path.lexists(out):
                raise InputError(f"--out {out} was created while the swap of a killed run was unfinished: its "
                                 f"previous results are in {left['old']}, its new ones in {left['ready']}; "
                                 f"move {out} away, then run again")
            os.rename(left["ready"], out)
            shutil.rmtree(left["old"], ignore_errors=True)
        elif "ready" in left:   # the swap had not begun: --out, if any, is the previous results
            if os.path.lexists(out):
                shutil.rmtree(left["ready"], ignore_errors=True)
            else:
                os.rename(left["ready"], out)
        elif "old" in left:
            if os.path.lexists(out):
                shutil.rmtree(left["old"], ignore_errors=True)
            else:
                os.rename(left["old"], out)


@contextlib.contextmanager
def folder_lock(path, what):
    """An exclusive lock on the file `path` for the duration of the block; InputError naming `what`
    if another process holds it. flock: released by the OS when its process ends, however it ends."""
    import fcntl
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"{what}: cannot write in {os.path.dirname(path)} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InputError(f"{what} is in use by another run (it holds {path}); wait for it to end "
                             f"or pick another folder") from None
        try:   # the holder before us removes the file as it lets go: a lock on a removed file is none
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)   # while still held: no run leaves a lock file behind, a refused one included
        os.close(fd)
