"""Everything beyond the method (utils.py), one module per concern. Import a name from the module
that defines it (`from lore.data import load_data`, `from lore import cli`); none of these imports
utils. Imports run down this list, never up (tests/test_layout.py checks that this drawing is the
real one):

    baselines    PAL and VPL                                               -> checks, methods, steps, stopping
    steps        what a training step reads, its autograd, Adam, the loop  -> checks, distributed, fused, methods, pairs
    reward       a personalized reward in use, learned online   -> active, checks, extract, methods
    scoring      new users' weights from a few pairs; rewards of responses -> checks, extract, methods, pairs
    results      records as JSON/CSV/printed tables, figures              -> basis, checks, data, io, methods, pairs
    pca          the closed-form basis pca                                 -> checks, methods, stopping
    data         the prepared data folder: write it, load it               -> checks, io, methods, pairs
    compare      validation users, equal-budget search, CIs                -> checks, methods
    cli          flags, exit codes, run folders                            -> active, checks, distributed, extract, io, methods, recipes, stopping
    recipes      each dataset's recipe ({dataset}/recipe.json)             -> checks, io, stopping
    extract      reward-model embeddings: batched, resumable               -> checks, distributed, io
    distributed  torchrun: process group, shards of users, collectives     -> (none)
    basis        a basis' health report and interpretation                 -> checks
    active       active selection of a new user's pairs                    -> checks, methods
    methods      the Method interface, the registry METHODS, evaluation    -> checks, fused, io, pairs
    pairs        Pairs: every user's pairs packed, checked once            -> checks
    fused        the pair work of a step and scoring in one pass (CPU, C)  -> (none)
    draws        NumPy's legacy draws without replacement, compiled (C)    -> fused
    io           safetensors, JSON, Parquet files; hub splits              -> checks
    stopping     the one stopping rule: held-out slice, patience           -> checks, distributed
    checks       InputError, devices, seeds, validators                    -> (none)
"""
import os
import sys


def _interrupted(kind, value, tb, previous=sys.excepthook):
    """Ctrl-C before a script's main runs (while torch imports, or argparse parses): one line, not
    a traceback; Python then ends the process by SIGINT (exit status 130)."""
    if issubclass(kind, KeyboardInterrupt):
        print("interrupted: nothing of this run was written", file=sys.stderr)
    else:
        previous(kind, value, tb)


# only for this project's scripts (python PersonalLLM/prepare.py ...): a program that imports lore
# keeps its own hook
_script = (getattr(sys, "argv", None) or [""])[0]
if os.path.isfile(_script) and os.path.realpath(_script).startswith(
        os.path.dirname(os.path.dirname(os.path.realpath(__file__))) + os.sep):
    sys.excepthook = _interrupted
