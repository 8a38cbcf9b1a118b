"""The command line every script shares: flags with checked types, a one-line error and exit 2
for bad input, and run folders whose outputs land together or not at all."""
import argparse
import contextlib
import datetime
import math
import os
import re
import shutil
import sys

from lore.active import SELECTIONS
from lore.checks import InputError, resolve_device, set_seed
from lore.extract import DEFAULT_MODEL
from lore.io import read_json, write_json
from lore.methods import METHODS

def command_line(main):
    """Wrap a script's main(args): bad input ends with a one-line message and exit code 2; Ctrl-C
    with one line and exit code 130 (run_folder has removed the run's unfinished outputs)."""
    def wrapped(args):
        try:
            return main(args)
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)
        except KeyboardInterrupt:
            print("interrupted: nothing of this run was written to its output folder", file=sys.stderr)
            raise SystemExit(130)
    wrapped.__doc__, wrapped.__name__ = main.__doc__, main.__name__
    return wrapped


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


positive_int = _argtype(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _argtype(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _argtype(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
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


def add_sweep_args(parser, folder, script, *, method, k_list, alpha_list, iters, lr, fewshot_iters, fewshot_lr):
    """The flags train_basis.py and vary_fewshot.py share; the defaults are the dataset's recipe.
    Every registered method's own hyperparameters become flags --{name}-{hp} (method_hparams)."""
    # argparse takes '-1e4' for an option (only -1 and -1.5 look like numbers to it); a value that
    # reads as a number is a value, so --alpha-list -1e4 fails with the range error naming alpha
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$|^-(inf|nan)$", re.I)
    parser.add_argument("--data", default=os.path.join(folder, "data"),
                        help="what prepare.py wrote (default: %(default)s)")
    parser.add_argument("--out", default=os.path.join(folder, "results", script),
                        help="output folder, written as a whole when the run ends (default: %(default)s)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--method", type=method_list, default=[method],
                        help=f"methods to fit, comma-separated, of: {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--k-list", type=rank_list, default=k_list,
                        help="ranks K, e.g. 0,1,2 (methods skip K below their smallest)")
    parser.add_argument("--alpha-list", type=float_list, default=alpha_list,
                        help="regularization strengths of the methods that use one, e.g. 0,1e4")
    recipe = parser.add_argument_group("the LoRe entries' steps and rates (the dataset recipe)")
    recipe.add_argument("--iters", type=positive_int, default=iters, help="basis training steps")
    recipe.add_argument("--lr", type=positive_float, default=lr, help="basis learning rate")
    recipe.add_argument("--fewshot-iters", type=positive_int, default=fewshot_iters,
                        help="steps fitting unseen users' weights")
    recipe.add_argument("--fewshot-lr", type=positive_float, default=fewshot_lr)
    for name, cls in METHODS.items():
        own = [hp for hp in cls.defaults if hp not in cls.recipe_hparams]
        group = parser.add_argument_group(f"method {name}") if own else None
        for hp in own:
            default, flag = cls.defaults[hp], f"--{name}-{hp}".replace("_", "-")
            if isinstance(default, str):   # a string hyperparameter takes one of its class' choices
                group.add_argument(flag, choices=cls.choices[hp], default=default, dest=f"{name}__{hp}",
                                   help="(default: %(default)s)")
                continue
            kind = positive_int if isinstance(default, int) else positive_float
            group.add_argument(flag, type=kind, default=default, dest=f"{name}__{hp}", help="(default: %(default)s)")
    return parser


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


def add_shots_args(parser, *, trials, shots, unit="pairs"):
    """The flags every vary_fewshot.py adds to add_sweep_args'."""
    parser.add_argument("--trials", type=positive_int, default=trials, help="draws of the shots per shot count")
    parser.add_argument("--shots", type=shot_list, default=shots, help=f"{unit} per unseen user, e.g. 5,10")
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


def add_prepare_args(parser, folder):
    """The flags every prepare.py shares."""
    parser.add_argument("--out", default=os.path.join(folder, "data"), help="output folder (default: %(default)s)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="reward model: hub id or local folder")
    parser.add_argument("--data-files", type=data_files_arg, nargs="+", default=None, metavar="SPLIT=PATH",
                        help="local .json/.jsonl/.parquet files in the hub's schema instead of the hub")
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


@contextlib.contextmanager
def run_folder(args, script, **extra):
    """The output folder of a run (args.out), written as a whole when the run succeeds, or not at all.

    Yields a staging folder beside --out to write every output into. When the block ends without
    error, config.json (config_of(args), the script's name and the time) is added and the staging
    folder replaces --out in one rename: the previous run's files go with it, so no file of an
    older run is left looking current. On an error or Ctrl-C the staging folder is removed and
    --out is untouched; a kill -9 leaves it to the next run, which removes it. While the run lasts
    it holds a lock on `.{out}.lock` beside --out: a second run into the same --out is refused
    (the OS drops the lock of a dead process, so a crash never leaves it stuck). A --out holding
    anything but an earlier run of the same script is refused: nothing else is ever replaced."""
    out = os.path.abspath(args.out)
    parent, base = os.path.split(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file, not a folder")
    with folder_lock(os.path.join(parent, f".{base}.lock"), f"--out {out}"):
        _recover_folder(parent, base)
        if os.path.isdir(out) and os.listdir(out):
            config = os.path.join(out, "config.json")
            owner = None
            try:
                owner = read_json(config).get("script") if os.path.isfile(config) else None
            except (InputError, AttributeError):
                pass
            if owner != script:
                raise InputError(f"--out {out} holds " + (f"the results of {owner}" if owner else
                                 "files that no run of this script wrote") +
                                 f"; {script} would replace them: pick another --out")
        staging = os.path.join(parent, f".{base}.partial-{os.getpid()}")
        os.makedirs(staging)
        try:
            yield staging
            write_json(os.path.join(staging, "config.json"),
                       {**config_of(args, **extra), "script": script,
                        "finished": datetime.datetime.now().isoformat(timespec="seconds")})
            old = os.path.join(parent, f".{base}.old-{os.getpid()}")
            if os.path.exists(out):
                os.rename(out, old)
            os.rename(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    print(f"wrote {out}")


@contextlib.contextmanager
def folder_lock(path, what):
    """An exclusive lock on the file `path` for the duration of the block; InputError naming `what`
    if another process holds it. flock: released by the OS when its process ends, however it ends."""
    import fcntl
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise InputError(f"{what}: cannot write in {os.path.dirname(path)} ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"{what} is in use by another run (it holds {path}); wait for it to end "
                             f"or pick another folder") from None
        yield
    finally:
        os.close(fd)


def _recover_folder(parent, base):
    """Leftovers of a run killed inside run_folder (we hold the lock, so none is in use): unfinished
    staging folders go; a previous run moved aside but not replaced is put back."""
    out = os.path.join(parent, base)
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(f".{base}.partial-"):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(f".{base}.old-"):
            if os.path.exists(out):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, out)
