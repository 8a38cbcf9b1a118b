"""Everything beyond the method, one module per concern. utils.py (the method) imports these and
re-exports their public names; none of them imports utils. Imports run down this list, never up:

    results    records as JSON/CSV/printed tables, figures      -> basis, data, io, pairs, checks
    cli        flags, exit codes, run folders                   -> active, extract, methods, io, checks
    data       the prepared data folder: write and load it      -> methods, pairs, io, checks
    basis      a basis' health, its interpretation, scoring     -> extract, methods, pairs, checks
    baselines  PAL and VPL, registered in methods.METHODS       -> methods, checks
    pca        the closed-form basis pca, registered            -> methods, pairs, checks
    active     active selection of new users' pairs             -> methods, pairs, checks
    extract    reward-model embeddings (batched, resumable)     -> io, checks
    methods    the Method interface, METHODS, shared evaluation -> io, checks
    pairs      Pairs: every user's pairs packed, checked once   -> checks
    io         safetensors / JSON / Parquet files, hub splits   -> checks
    checks     InputError, devices, seeds, validators
"""
