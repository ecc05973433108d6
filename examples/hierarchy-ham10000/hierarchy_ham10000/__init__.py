"""HAM10000 disease stages for hierarchy (an example third-party plugin distribution).

* :mod:`hierarchy_ham10000.benign_vs_malignant` -- benign vs malignant (mel, bcc, akiec).
* :mod:`hierarchy_ham10000.lesion_type` -- the 7 HAM10000 diagnosis (``dx``) classes.

Each module is registered through its own ``hierarchy.stages`` entry point (see pyproject.toml).
"""
