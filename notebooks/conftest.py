"""Strict nbval under *other numerics*: a stored digit that passes here passes on any CPU.

The committed outputs are made by ``make notebooks`` with this machine's own numerics. Every notebook
kernel that ``pytest --nbval`` starts gets, instead:

* every matrix decomposition's input perturbed by a seeded relative 1e-15 (:mod:`lorax_ref.testing.perturb`,
  installed by an IPython start-up file): a few units of float64 rounding, the size of the differences between machines;
* other code paths for torch's kernels (``ATEN_CPU_CAPABILITY=default``) and for MKL's BLAS
  (``MKL_ENABLE_INSTRUCTIONS=SSE4_2``; in the second set also its compatible path, ``MKL_CBWR=COMPATIBLE``,
  except in the two real-encoder notebooks, ``NO_CBWR``),
  and one BLAS thread;
* an empty ``LORAX_CACHE_DIR``: regenerable artefacts (the fine-tuned model) are rebuilt in this run,
  so no output depends on what an earlier run left behind.

A notebook that prints more digits than its computation fixes fails here, on the machine of the author,
instead of on a user's. ``LORAX_NBVAL_NUMERICS=other1|other2|native`` picks the set (``native``: this
machine's own numerics).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Two independent draws of "another machine"; each flags fragile digits that the other may miss (measured on
# outputs known to be fragile: the kernel switches alone flipped some, MKL's compatible LAPACK path others).
# `make test` runs both, side by side; LORAX_NBVAL_NUMERICS picks one (default "other1") or "native".
NUMERICS = {
    "other1": {"LORAX_PERTURB": "1e-15:1", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "other2": {"LORAX_PERTURB": "1e-15:2", "ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
               "MKL_CBWR": "COMPATIBLE"},
}
# MKL's compatible path runs float64 matrix products about 2.5 times slower. Where a notebook is mostly such
# products (fine-tuning and scoring a real encoder: 340 s instead of 140 s of a `make test` under other2) it keeps
# the rest of the second set; those notebooks' fragile digits were flagged by the kernel switches of the first.
NO_CBWR = {"07_real_layers.ipynb", "08_real_task.ipynb"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
STARTUP = "from lorax_ref.testing.perturb import install_from_env\ninstall_from_env()\n"


def _kernel_env(tmp: Path, numerics: str) -> dict[str, str]:
    ipython = tmp / "ipython"
    startup = ipython / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-lorax-perturb.py").write_text(STARTUP)
    (tmp / "cache").mkdir()
    return {**NUMERICS[numerics], **ONE_THREAD, "IPYTHONDIR": str(ipython), "LORAX_CACHE_DIR": str(tmp / "cache")}


_SESSION_ENV: dict[str, str] = {}


def pytest_configure(config):
    numerics = os.environ.get("LORAX_NBVAL_NUMERICS", "other1")
    if numerics == "native":
        return
    if numerics not in NUMERICS:
        raise pytest.UsageError(f"LORAX_NBVAL_NUMERICS={numerics!r}: use one of {[*NUMERICS, 'native']}")
    tmp = Path(tempfile.mkdtemp(prefix="lorax-nbval-"))
    _SESSION_ENV.update(_kernel_env(tmp, numerics))
    _SESSION_ENV["LORAX_NBVAL_NUMERICS"] = numerics
    config.add_cleanup(lambda: shutil.rmtree(tmp, ignore_errors=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    """Only the kernel gets the other numerics: it is started (and copies os.environ) in this setup."""
    env = dict(_SESSION_ENV)
    drop = {"MKL_CBWR"} & env.keys() if Path(str(item.fspath)).name in NO_CBWR else set()
    saved = {k: os.environ.get(k) for k in env}
    for k in drop:
        del env[k]
        os.environ.pop(k, None)
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pytest_report_header(config):
    if not _SESSION_ENV:
        return "notebooks: native numerics (LORAX_NBVAL_NUMERICS=native)"
    knobs = " ".join(f"{k}={v}" for k, v in _SESSION_ENV.items() if k not in ("IPYTHONDIR", "LORAX_CACHE_DIR"))
    return f"notebooks: kernels run with other numerics: {knobs}, an empty LORAX_CACHE_DIR"
