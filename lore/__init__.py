"""Everything beyond the method, one module per concern. utils.py (the method) imports these and
re-exports their public names; none of them imports utils. Imports run down this list, never up
(tests/test_layout.py checks that this drawing is the real one):

    reward     a personalized reward in use, learned online     -> extract, active, methods, checks
    results    records as JSON/CSV/printed tables, figures      -> data, basis, methods, pairs, io, checks
    pca        the closed-form basis pca, registered            -> methods, pairs, checks
    data       the prepared data folder: write it, load it      -> methods, pairs, io, checks
    compare    validation users, equal-budget search, CIs       -> methods, checks
    cli        flags, exit codes, run folders                   -> extract, active, methods, io, checks
    basis      a basis' health report, interpretation, scoring  -> extract, methods, pairs, checks
    extract    reward-model embeddings: batched, resumable      -> io, checks
    baselines  PAL and VPL, registered beside LoRe              -> methods, checks
    active     active selection of a new user's pairs           -> methods, pairs, checks
    methods    the Method interface, METHODS, evaluation        -> pairs, io, checks
    pairs      Pairs: every user's pairs packed, checked once   -> checks
    io         safetensors, JSON, Parquet files; hub splits     -> checks
    checks     InputError, devices, seeds, validators           -> (none)
"""
