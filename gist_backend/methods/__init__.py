"""The selection methods, each the math of one paper stated once next to its code.

    gist.py        GIST: task subspace by SVD of validation gradients, coordinates, alignment scores
    geometry.py    spectrum and off-diagonal coupling of the validation gradients (the dashboard's diagnostics)
    projection.py  seeded SRHT random projection d → p (LESS/G2IS sketches)
    adam.py        Adam preconditioning from a saved optimizer state (LESS/G2IS training features)
    less.py        LESS: cosine of sketches, sub-task mean then max
    g2is.py        G2IS: PCA "core knowledge" and the conflict-free gradient-graph walk
"""
