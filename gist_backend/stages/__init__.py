"""The stages of a compute, in the order ``compute`` runs them (each resumable; see ``compute``).

    prepare.py      read and tokenise the pool and validation files; the example tables; unique ids
    checkpoints.py  the adapter states to take gradients at: warmup epochs, a given adapter, or a fresh init
    passes.py       gradient passes: validation gradients → subspace, geometry, sketch; the pool in shards
    merge.py        shards → the run's arrays and LESS scores, handed to ``runs.write_run``
"""
