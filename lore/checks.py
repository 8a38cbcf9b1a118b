"""Checks shared by the API and the command line: the one error type, devices, seeds, and the
validators of numbers, lists and matrices that every entry point uses before any work starts."""
import hashlib
import json
import math
import os
import random

import numpy as np
import torch


class InputError(ValueError):
    """Bad input. The message names the file, the user or the shape at fault; scripts exit with 2."""


def resolve_device(device=None):
    """None means CUDA when available, else CPU. A device this machine does not have is an InputError
    (torch would only fail at the first tensor moved there, after files were read or written)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"--device {device}: not a device (expected cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif resolved.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device}: MPS is not available on this machine")
    elif resolved.type != "cpu":
        raise InputError(f"--device {device}: not supported (expected cpu, cuda or cuda:N)")
    return resolved


def set_seed(seed):
    """Seed every generator the project draws from (Python, NumPy, torch) and make CUDA kernels
    deterministic, so the same seed gives the same numbers on the same device."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def seed_from_key(seed, *key):
    """A 63-bit seed from (seed, key...), the same on every machine: what seeds a fit, a draw or a
    split by its name, so that its numbers do not depend on what ran before it."""
    digest = hashlib.sha256(json.dumps([seed, *key], default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_fit(seed, *key):
    """Seed torch's generator from (seed, key...): a fit's start does not depend on what ran before.
    seed: the user's, checked as --seed is (an integer in [0, 2**32))."""
    check_seed(seed)
    torch.manual_seed(seed_from_key(seed, *key))


def is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_alpha(alpha, what):
    if alpha is None:
        return 0.0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.number)) \
            or not math.isfinite(alpha) or alpha < 0:
        raise InputError(f"{what}: alpha must be a finite number >= 0, got {alpha!r}")
    return float(alpha)


def check_v_ref(v_ref):
    """v_ref as float32 [F, 1]: a [F] vector or an [F, 1] / [1, F] matrix, finite; nothing else is
    reshaped (a [F/2, 2] matrix is an error, not a column)."""
    v = torch.as_tensor(v_ref)
    if v.device.type == "meta":
        raise InputError("v_ref is on the meta device (no values)")
    if not v.is_floating_point():
        raise InputError(f"v_ref must be a float tensor, got {v.dtype}")
    if v.dim() == 2 and v.shape[0] == 1:
        v = v.T
    if v.dim() == 1:
        v = v[:, None]
    if v.dim() != 2 or v.shape[1] != 1:
        raise InputError(f"v_ref has shape {tuple(torch.as_tensor(v_ref).shape)}: expected [F], [F, 1] or [1, F]")
    if not torch.isfinite(v).all():
        raise InputError(f"v_ref has NaN or inf (row {int(torch.nonzero(~torch.isfinite(v))[0, 0])})")
    return v.float()


def check_matrix(M, name):
    """A 2-D finite float tensor (NumPy arrays are taken as they are), else InputError naming it."""
    M = torch.as_tensor(M)
    if M.device.type == "meta":
        raise InputError(f"{name} is on the meta device (no values)")
    if M.dim() != 2 or not M.is_floating_point():
        raise InputError(f"{name} must be a 2-D float matrix, got shape {tuple(M.shape)} of {M.dtype}")
    if not torch.isfinite(M).all():
        raise InputError(f"{name} has NaN or inf")
    return M.float()


def short_repr(value):
    """repr for messages: a tensor or a long list is named by its type and shape, not printed."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else f"a {type(value).__name__} of length {len(value)}"


def int_list(values, what, least):
    """[int] from a non-empty list of integers >= least; what: 'K_list' or 'shots'."""
    item = what.removesuffix("_list")
    if not isinstance(values, (list, tuple, np.ndarray)) or len(values) == 0:
        raise InputError(f"{what} must be a non-empty list of integers, got {short_repr(values)}")
    for v in values:
        if not is_int(v):
            raise InputError(f"{what} must be a list of integers, got {list(values)!r} ({v!r} is not an integer)")
        if v < least:
            raise InputError(f"{item} must be >= {least}, got {what}={list(values)!r}")
    if len(set(int(v) for v in values)) != len(values):   # as the flags: a repeat would be a second, wrong record
        twice = next(v for v in values if list(values).count(v) > 1)
        raise InputError(f"{what} must not repeat a value, got {list(values)!r} ({twice} twice)")
    return [int(v) for v in values]


# Bounds shared by the flags (lore.cli) and the API (Method.__init__, the sweeps): one set of checks.
MAX_SEED = 2**32 - 1   # NumPy's seeds are 32-bit
MAX_COUNT = 10**9      # steps, epochs, sizes: larger ones never finish or never fit in memory
MAX_RATE = 1e6         # rates and weights: larger ones overflow float32 steps (1e39 is inf)


def check_seed(seed, what="seed"):
    """An integer seed in [0, 2**32): NumPy refuses others (after files were read)."""
    if not is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise InputError(f"{what} must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def check_hparam(owner, hp, value, default, choices=None, limit=None, least=None):
    """One hyperparameter of a method (owner: its name), by its default's kind: a string one must be
    one of `choices`; an integer one an integer in [least or 1, limit or MAX_COUNT]; a float one a
    finite number in (0, limit or MAX_RATE]. -> the value; InputError naming the method and hyperparameter."""
    where = f"method {owner}: {hp}"
    if isinstance(default, str) and not choices:
        raise InputError(f"{where} is a string hyperparameter: its class must list its values in choices")
    if choices:
        if not isinstance(value, str) or value not in choices:
            raise InputError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if is_int(default):
        top, bottom = limit or MAX_COUNT, least or 1
        if not is_int(value) or not bottom <= value <= top:
            raise InputError(f"{where} must be an integer in [{bottom}, {top:g}], got {short_repr(value)}")
        return int(value)
    return check_rate(value, where, limit or MAX_RATE)


def check_rate(value, what, limit=MAX_RATE):
    """A learning rate or step size: a finite number in (0, limit]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)) \
            or not math.isfinite(value) or not 0 < value <= limit:
        raise InputError(f"{what} must be a finite number in (0, {limit:g}], got {short_repr(value)}")
    return float(value)


def check_count(value, what, least=1, limit=MAX_COUNT):
    """A step count or size: an integer (not a bool, not 2.5) in [least, limit]."""
    if not is_int(value) or not least <= value <= limit:
        raise InputError(f"{what} must be an integer in [{least}, {limit:g}], got {short_repr(value)}")
    return int(value)


def check_tensor(x, name, dim=None, features=None):
    """A float tensor with real values (not on the meta device), of `dim` dimensions and `features`
    columns when given, not empty, finite. -> the tensor; InputError naming it otherwise."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{name} must be a tensor, got {short_repr(x)}") from None
    if x.device.type == "meta":
        raise InputError(f"{name} is on the meta device (no values)")
    if not x.is_floating_point():
        raise InputError(f"{name} must be a float tensor, got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise InputError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise InputError(f"{name} is empty (shape {tuple(x.shape)})")
    if features is not None and x.shape[-1] != features:
        raise InputError(f"{name} has {x.shape[-1]} features, expected F={features}")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} has NaN or inf")
    return x


def check_model(n_users, n_features, K, iters, learning_rate, what):
    """A model's sizes, step count and rate, checked as the flags check them: integers >= 1 (0 steps
    or a 0 rate would return the random start as a fit) and a rate in (0, MAX_RATE]."""
    for value, name in ((n_users, "num_classes"), (n_features, "num_features"), (K, "num_basis_vectors"),
                        (iters, "num_iterations")):
        check_count(value, f"{what}: {name}")
    check_rate(learning_rate, f"{what}: learning_rate")
