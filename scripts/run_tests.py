"""``make test``: the whole suite, the notebooks checked under two sets of other numerics side by side.

    python scripts/run_tests.py [pytest arguments]

* process 1: ``pytest tests notebooks --nbval``, notebook kernels under the numerics set ``other1``;
* process 2, at the same time: ``pytest notebooks --nbval`` under ``other2`` (see notebooks/conftest.py: it
  leaves out the two real-encoder notebooks), and the test files of ``SECOND``, which process 1 leaves out so
  that both end at about the same time.

Each set is one draw of "another machine" and flags fragile digits the other may miss. Both processes
run with one BLAS thread, so they share two cores without contention. Process 2's output follows process 1's. The exit
status is 0 only when both pass. With ``LORAX_NBVAL_NUMERICS`` set, only process 1 runs, under that set.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBVAL = ["--nbval", "--nbval-current-env", "--nbval-sanitize-with", "notebooks/sanitize.cfg"]
# Balanced on measurements from a fresh clone on an idle 2-core machine: with test_dry_run here as well, process 1
# took 410 s and process 2 496 s; test_dry_run takes about 45 s. The second set leaves out notebooks 07-08.
SECOND = ["tests/test_conformance.py", "tests/test_peft_interop.py", "tests/test_site.py"]
NO_TESTS_COLLECTED = 5  # pytest's exit status when a -k/-m selection leaves nothing to run


# Two processes on two cores: each gets one BLAS/OpenMP thread (a user's own setting wins). Two
# multi-threaded BLAS pools on two cores spin against each other and run several times slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def pytest(args: list[str], numerics: str, **kw) -> subprocess.Popen:
    env = {**ONE_THREAD, **os.environ, "LORAX_NBVAL_NUMERICS": numerics}
    return subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=ROOT, env=env, **kw)


def main(extra: list[str]) -> int:
    chosen = os.environ.get("LORAX_NBVAL_NUMERICS")
    if chosen:
        return pytest(["tests", "notebooks", *NBVAL, *extra], chosen).wait()
    skip = [f"--ignore={path}" for path in SECOND]
    first = pytest(["tests", "notebooks", *skip, *NBVAL, *extra], "other1")
    with tempfile.TemporaryFile("w+") as log:
        second = pytest([*SECOND, "notebooks", *NBVAL, "-q", *extra], "other2", stdout=log, stderr=subprocess.STDOUT)
        rc1, rc2 = first.wait(), second.wait()
        log.seek(0)
        print("\n======== " + ", ".join(SECOND) + " and the notebooks again, under the second set of other numerics "
              "(other2) ========", flush=True)
        sys.stdout.write(log.read())
    if rc2 == NO_TESTS_COLLECTED and extra:
        rc2 = 0  # the selection matched no notebook cell
    print(f"\nunit tests + notebooks (other1): {'passed' if rc1 == 0 else f'FAILED ({rc1})'};  "
          f"{len(SECOND)} test files + notebooks (other2): {'passed' if rc2 == 0 else f'FAILED ({rc2})'}")
    return rc1 or rc2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
