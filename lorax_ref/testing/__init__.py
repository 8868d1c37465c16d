"""Test support shared by the test suite, the conformance kit and the notebooks.

:mod:`.oracles`: independent numpy/scipy oracles, the numpy ↔ torch pair and one relative error (no
hypothesis needed); :mod:`.strategies`: hypothesis strategies of well-posed layers; :mod:`.perturb`: the
"other numerics" of the notebook check.
"""
