"""The command line: ``python -m lorax_ref verify module_or_file.py:function --equation LABEL``."""
from __future__ import annotations

import argparse
import json
import sys

from ..errors import LoraxInputError
from ..registry import slug
from .calling import Convention
from .kit import check
from .precision import DEFAULT_MAX_EXAMPLES, DEFAULT_TIMEOUT, PRECISIONS
from .specs import signatures


VERIFY_HELP = """\
Check your own implementation of one LoRA-X equation against the reference: golden cases plus
hypothesis property checks with independent numpy expectations. Prints one row per check (for a
failure: the smallest failing input, observed and expected values) and a verdict that tells a
convention mismatch (numpy vs torch, V vs Vh) or a formula that is right at a lower precision
(float32, float16, bfloat16) from a wrong formula. Exit code 0 when every check passes, 1 otherwise
(also for a file that cannot be loaded, a candidate that hangs or ends its process).

Your function is called like the reference function of the equation (--list shows the signatures),
with float64 torch tensors by default (--framework numpy for numpy arrays, --bases Vh for right
bases given as (r, n), --dtype float32 to check a float32 implementation at float32 tolerances).
It runs in a separate Python process: its output goes to stderr, never into the report or --json.
"""


def add_verify_parser(subparsers) -> argparse.ArgumentParser:
    """Adds ``verify`` to the ``python -m lorax_ref`` subcommands (called by :mod:`lorax_ref.cli`)."""
    p = subparsers.add_parser("verify", help="check your own implementation of an equation (conformance kit)",
                              description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", nargs="?", metavar="MODULE_OR_FILE:FUNCTION",
                   help="e.g. my_lorax.py:transfer or my_package.lorax:transfer")
    p.add_argument("--equation", "-e", metavar="LABEL",
                   help="equation label, slug or reference function name (see --list), e.g. eq3, 'Eq. (4)'")
    p.add_argument("--list", action="store_true", help="list the equations and the signature each expects, then exit")
    p.add_argument("--framework", choices=["torch", "numpy"], default="torch", help="inputs as torch tensors (default) or numpy arrays")
    p.add_argument("--bases", choices=["V", "Vh"], default="V", help="right bases as V (n, r) (default) or Vh (r, n)")
    p.add_argument("--dtype", choices=list(PRECISIONS), default="float64",
                   help="precision of the inputs and of the tolerances (default float64; bfloat16 needs torch)")
    p.add_argument("--device", default="cpu", help="torch device for the inputs (default cpu)")
    p.add_argument("--max-examples", type=int, default=DEFAULT_MAX_EXAMPLES, metavar="N",
                   help=f"hypothesis examples per property (default {DEFAULT_MAX_EXAMPLES})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds per call before the candidate counts as hung (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--golden", metavar="FILE", default=None, help="another golden file (default: the packaged one)")
    p.add_argument("--no-golden", action="store_true", help="skip the golden cases")
    p.add_argument("--no-diagnose", action="store_true", help="do not re-run failures under other conventions and precisions")
    p.add_argument("--json", action="store_true", help="print the result as JSON (nothing else on stdout)")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    p.set_defaults(func=run_verify)
    return p


def run_verify(args) -> int:
    """The ``verify`` subcommand: 0 when every check passes, 1 otherwise.

    The candidate runs in a child process (:class:`_Subprocess`), so nothing it does — print, exit,
    crash, hang — can reach this process's stdout or exit code: 0 comes only from a passing result.
    """
    if args.list:
        for label, sig in signatures().items():
            print(f"{slug(label):<24} {label}")
            print(f"{'':<24}   candidate{sig}")
        return 0
    if not args.target or not args.equation:
        raise LoraxInputError("verify needs MODULE_OR_FILE:FUNCTION and --equation LABEL (see --list)")
    convention = Convention(framework=args.framework, bases=args.bases, device=args.device, dtype=args.dtype)
    golden: bool | str = False if args.no_golden else (args.golden or True)
    result = check(args.target, args.equation, convention, max_examples=args.max_examples, timeout=args.timeout,
                   golden=golden, diagnose=not args.no_diagnose)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(str(result))
    sys.stdout.flush()
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    """``python -m lorax_ref.conformance ...`` — the same as ``python -m lorax_ref verify ...``."""
    parser = argparse.ArgumentParser(prog="python -m lorax_ref.conformance")
    sub = parser.add_subparsers(dest="command")
    add_verify_parser(sub)
    args = parser.parse_args(["verify", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run_verify(args)
    except LoraxInputError as exc:
        if args.debug:
            raise
        print(f"lorax_ref: error: {exc}", file=sys.stderr)
        return 1
