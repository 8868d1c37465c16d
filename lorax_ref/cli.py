"""Command line: ``python -m lorax_ref {transfer,inspect,random-adapter,verify}`` (also ``lorax-ref``).

Every subcommand is registered through :data:`SUBCOMMANDS`: a function ``add(subparsers)`` that adds its
parser and sets ``func`` (``func(args) -> int`` exit code) with ``parser.set_defaults``. The ``verify``
subcommand lives in :mod:`lorax_ref.conformance` (``add_verify_parser(subparsers)``) and is added only
when that module exists.

Errors: a bad input (unreadable or truncated file, bad JSON, missing or extra keys, shape mismatch,
NaN, refused adapter type, existing output) prints one line ``lorax_ref: error: ...`` on stderr and
exits with 1; ``--debug`` shows the traceback instead. Usage errors exit with 2 (argparse), Ctrl-C
with 130. Inputs are only ever opened for reading; the output directory appears only when complete.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable

PROG = "python -m lorax_ref"


def _float_or_none(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"the Φ threshold must be in [0, 1], got {value}")
    return value


def _strength(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < float("inf"):  # NaN and Inf would write a NaN / Inf adapter
        raise argparse.ArgumentTypeError(f"the strength must be a finite number >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")


# ---------------------------------------------------------------------------------------------------------
# transfer
# ---------------------------------------------------------------------------------------------------------

TRANSFER_HELP = """\
Transfer a LoRA (PEFT directory, kohya .safetensors) or a compact LoRA-X adapter trained on the
source base model onto the target base model, layer by layer, with the LoRA-X equations:
Eq. (3) U_t U_tᵀ ΔW V_t V_tᵀ for equal shapes, §4.2.2 for different shapes, an optional Eq. (4) gate.
Writes DIR/ with the adapter (PEFT: adapter_config.json + adapter_model.safetensors; kohya: the input
file name; LoRA-X: *.lorax.safetensors) and the report lorax_report.json / lorax_report.txt
(Φ_U, Φ_V, case, gate decision and kept energy ‖ΔW_t‖²/‖ΔW_s‖² per layer).
Base checkpoints: a packaged alias (minilm-l6, minilm-l6-int8, minilm-l3), a .safetensors or an .onnx
file; pickles (.bin/.ckpt/.pt) only with --allow-pickle.

Predict before you transfer: --dry-run runs the same checks and prints, per layer and in total, Φ_U, Φ_V,
the random level r/d of Φ, Δσ (relative change of the top-r singular values), the gate decision, the kept
energy expected for a LoRA-X update ((1/r) Σ_k a_k b_k with a_k = ‖U_tᵀ u_s,k‖², b_k = ‖V_tᵀ v_s,k‖²: about
Φ_U·Φ_V), the exact kept energy of the given adapter (‖U_tᵀ ΔW_s V_t‖²/‖ΔW_s‖², from its factors), a verdict
per layer and a one-line recommendation. It writes nothing (no --out needed; cached bases are read, never
written) and exits 0 whatever it recommends. Without --adapter it predicts from the bases alone, for every
weight both checkpoints share (or those matching --modules). Notebook 11 derives the numbers and the
recommended gate: --threshold 0.8 --side both (min of Φ_U and Φ_V).
"""


def add_transfer_parser(subparsers) -> argparse.ArgumentParser:
    """The ``transfer`` subcommand and its options (``--dry-run`` included)."""
    p = subparsers.add_parser("transfer", help="transfer an adapter to another base model",
                              description=TRANSFER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-base", required=True, metavar="S",
                   help="checkpoint the adapter was trained on (alias, .safetensors or .onnx)")
    p.add_argument("--target-base", required=True, metavar="T", help="checkpoint to transfer the adapter to")
    p.add_argument("--adapter", metavar="A",
                   help="PEFT adapter directory, kohya .safetensors, or compact LoRA-X .safetensors (required, except "
                        "with --dry-run: then the prediction comes from the bases alone)")
    p.add_argument("--out", metavar="DIR", help="output directory (must not exist unless --force); required, except "
                                               "with --dry-run, which writes nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="predict instead of transferring: Φ_U, Φ_V, gate, expected and exact kept energy and a "
                        "recommendation per layer and in total; writes nothing")
    p.add_argument("--modules", metavar="REGEX", default=None,
                   help="with --dry-run and no --adapter: predict for the source weights matching this regular "
                        "expression (default: every weight both checkpoints share, of width >= r)")
    p.add_argument("--rank", type=_positive_int, default=None, metavar="R",
                   help="LoRA-X rank r of the truncated bases U (m, r), V (n, r); default: the adapter's rank for a "
                        "LoRA-X adapter, else 320 (the paper's); must be <= min(m, n) of every layer")
    p.add_argument("--threshold", type=_float_or_none, default=None, metavar="TAU",
                   help="Eq. (4) gate: layers with Φ < TAU get no update (left out of the output); default: no gate "
                        "(ProLoRA uses 0.8)")
    p.add_argument("--side", choices=["u", "v", "both", "mean"], default="both",
                   help="which Φ the gate compares: left bases (u), right bases (v), min of both (both, default), mean")
    p.add_argument("--method", choices=["auto", "lorax", "copy", "mismatch"], default="auto",
                   help="auto (default): Eq. (3) for equal shapes, §4.2.2 for different; lorax: Eq. (3) only; "
                        "copy: Table 5 ablation U_t C_s V_tᵀ (no rotation); mismatch: §4.2.2 at any shapes")
    p.add_argument("--out-format", choices=["auto", "peft", "kohya", "lorax"], default="auto",
                   help="auto (default): same as the input; peft: any input; kohya: kohya input only; lorax: the "
                        "compact format (ΔΣ_{t←s} per layer + sha256 of the target)")
    p.add_argument("--layer-map", metavar="JSON",
                   help="JSON file {source weight name: target weight name} (without .weight) for targets whose "
                        "layers are named differently, e.g. a shallower model")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists (never an input)")
    p.add_argument("--ignore-base-hash", action="store_true",
                   help="apply a LoRA-X adapter to a source checkpoint whose sha256 differs from the one it records")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickled checkpoints/adapters, loaded with torch.load(weights_only=True)")
    p.add_argument("--cache-dir", metavar="D", default=None,
                   help="basis cache directory (default: $LORAX_CACHE_DIR/bases or ~/.cache/lorax_ref/bases)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached bases")
    p.add_argument("--fast", action="store_true",
                   help="compute bases with the certified fast path (lorax_ref.fast: within 5e-7 of the reference "
                        "SVD, which it falls back to per layer); measured 1.8-4.2x faster per layer 640 to 2048 wide with r <= width/4 (two recorded runs, 2 cores)")
    p.add_argument("--device", default=None,
                   help="torch device for the float64 computation (default: $LORAX_DEVICE, else cpu)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no table on stdout (with --dry-run: the recommendation only)")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout instead of the table")
    _common(p)
    p.set_defaults(func=cmd_transfer, parser=p)
    return p


def _methods(cache) -> str:
    """', fast: 3 mixed, 1 svd' when the fast path computed bases (svd = certificate failed, reference used)."""
    if not cache.fast or not cache.methods:
        return ""
    return ", fast: " + ", ".join(f"{n} {k}" for k, n in sorted(cache.methods.items()))


def _cache(args, inputs: list[Path], out: Path | None, read_only: bool = False):
    """The basis cache; refused inside an input (it would write subfolders into it) or inside ``out``.
    ``read_only`` (the dry run): entries are read, never written."""
    from .files.adapters import AdapterError
    from .files.output import check_not_an_input
    from .files.cache import BasisCache, default_cache_dir

    fast = bool(getattr(args, "fast", False))
    if args.no_cache:
        return BasisCache(None, enabled=False, fast=fast)
    root = Path(args.cache_dir or default_cache_dir()).expanduser()
    what = "--cache-dir" if args.cache_dir else "the basis cache directory ($LORAX_CACHE_DIR/bases or the default)"
    if read_only:
        return BasisCache(root, fast=fast, read_only=True)
    check_not_an_input(root, inputs, what=what, holds_inputs_ok=True)
    out = out.resolve()
    if root.resolve() == out or out in root.resolve().parents:
        raise AdapterError(f"{what} {root} lies inside --out {out}; choose a cache directory outside the output")
    return BasisCache(root, fast=fast)


def _inputs(adapter: str | None = None, bases: tuple = (), files: tuple = ()) -> list[Path]:
    """Every input path, however it was named: a packaged alias is its installed model directory (weights and
    config), a PEFT adapter named by one of its files is its directory. Nothing may write over or into them."""
    from .files.adapters import adapter_location
    from .files.checkpoints import PACKAGED_MODELS, packaged_file
    from .errors import LoraxInputError

    paths = [adapter_location(adapter)] if adapter is not None else []
    for spec in bases:
        if spec in PACKAGED_MODELS:
            model = PACKAGED_MODELS[spec]
            try:
                paths.append(packaged_file(model.dist, model.file).parent)
            except LoraxInputError:
                pass  # not installed: opening it fails with the install command
        if Path(spec).exists():
            paths.append(Path(spec))
    return paths + [Path(f) for f in files if f]


LAYER_MAP_MAX_BYTES = 64 << 20  # far above any real layer map (one short line per layer); never read /dev/zero


def _read_layer_map(spec: str) -> dict[str, str]:
    """--layer-map: a JSON object {source weight name: target weight name}, from a regular file."""
    from .files.adapters import AdapterError

    path = Path(spec)
    if not path.is_file():  # never read /dev/zero or a FIFO: it may not end
        raise AdapterError(f"--layer-map {spec!r} " + ("is not a regular file" if path.exists() else "does not exist"))
    if path.stat().st_size > LAYER_MAP_MAX_BYTES:
        raise AdapterError(f"--layer-map {spec!r} is {path.stat().st_size} bytes; a layer map is a small JSON object")
    try:
        layer_map = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{spec}: invalid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{spec}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not isinstance(layer_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in layer_map.items()):
        raise AdapterError(f"{spec}: expected a JSON object of strings {{source name: target name}}")
    return {k.removesuffix(".weight"): v.removesuffix(".weight") for k, v in layer_map.items()}


def _device(args):
    """--device, else $LORAX_DEVICE, else cpu (checked: a typo or an absent CUDA device is one clear line)."""
    from .device import parse_device

    if args.device:
        return parse_device(args.device, "--device")
    return parse_device(os.environ.get("LORAX_DEVICE") or "cpu", "$LORAX_DEVICE")


def cmd_transfer(args) -> int:
    """``transfer``: load, transfer, write the output directory atomically; returns the exit code."""
    from .files.adapters import REPORT_JSON, REPORT_TXT, AdapterError, load_adapter, save_adapter
    from .files.output import check_not_an_input, write_output_dir
    from .files.transfer import transfer_adapter
    from .files.checkpoints import open_checkpoint

    if args.dry_run:
        return cmd_dry_run(args)
    missing = [opt for opt, value in (("--adapter", args.adapter), ("--out", args.out)) if value is None]
    if missing:
        args.parser.error(f"the following arguments are required: {', '.join(missing)} (or pass --dry-run)")
    if args.modules is not None:
        args.parser.error("--modules applies only to --dry-run without --adapter")
    # everything cheap is checked before any expensive work
    out = Path(args.out)
    inputs = _inputs(args.adapter, (args.source_base, args.target_base), (args.layer_map,))
    check_not_an_input(out, inputs)
    if out.exists() and not args.force:
        raise AdapterError(f"output {out} already exists; pass --force to replace it")
    device = _device(args)
    layer_map = _read_layer_map(args.layer_map) if args.layer_map else None
    cache = _cache(args, inputs, out)

    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle)
    with open_checkpoint(args.source_base, allow_pickle=args.allow_pickle) as source, \
            open_checkpoint(args.target_base, allow_pickle=args.allow_pickle) as target:
        result = transfer_adapter(
            adapter, source, target, r=args.rank, threshold=args.threshold, side=args.side, method=args.method,
            out_format=args.out_format, layer_map=layer_map, cache=cache, ignore_base_hash=args.ignore_base_hash,
            device=device, progress=not args.quiet, target_name=args.target_base)
    report = result.report()
    report["command"] = ["transfer"] + [f"{k}={v}" for k, v in sorted(vars(args).items()) if k not in ("func", "parser")]
    table = result.table()

    def fill(tmp: Path) -> None:
        save_adapter(result.adapter, tmp)
        (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / REPORT_TXT).write_text(table + "\n")

    write_output_dir(out, fill, force=args.force, protect=inputs)
    if args.json:
        print(json.dumps(report, indent=2))
    elif not args.quiet:
        print(table)
        print(f"wrote {result.adapter.format} adapter to {out} "
              f"(bases: {cache.hits} cached, {cache.misses} computed{_methods(cache)})")
    return 0


def cmd_dry_run(args) -> int:
    """``transfer --dry-run``: the prediction of :func:`lorax_ref.predict.predict_transfer`; writes nothing.

    The checks of a real run come first (the options, the layers, and --out / --force when --out is given),
    so that a dry run that passes means the transfer's checks pass too."""
    from .files.adapters import AdapterError, load_adapter
    from .files.output import check_not_an_input
    from .files.checkpoints import open_checkpoint
    from .predict import predict_transfer

    if args.modules is not None and args.adapter is not None:
        args.parser.error("--modules selects weights only for a --dry-run without --adapter")
    inputs = _inputs(args.adapter, (args.source_base, args.target_base), (args.layer_map,))
    if args.out is not None:  # what the real run would refuse, refused now (nothing is written either way)
        check_not_an_input(Path(args.out), inputs)
        if Path(args.out).exists() and not args.force:
            raise AdapterError(f"output {args.out} already exists; pass --force to replace it")
    device = _device(args)
    layer_map = _read_layer_map(args.layer_map) if args.layer_map else None
    cache = _cache(args, inputs, None, read_only=True)
    adapter = load_adapter(args.adapter, allow_pickle=args.allow_pickle) if args.adapter is not None else None
    with open_checkpoint(args.source_base, allow_pickle=args.allow_pickle) as source, \
            open_checkpoint(args.target_base, allow_pickle=args.allow_pickle) as target:
        prediction = predict_transfer(
            adapter, source, target, r=args.rank, threshold=args.threshold, side=args.side, method=args.method,
            out_format=args.out_format, layer_map=layer_map, modules=args.modules, cache=cache,
            ignore_base_hash=args.ignore_base_hash, device=device, progress=not args.quiet)
    report = prediction.report()
    report["command"] = ["transfer"] + [f"{k}={v}" for k, v in sorted(vars(args).items()) if k not in ("func", "parser")]
    if args.json:
        print(json.dumps(report, indent=2))
    elif args.quiet:
        print("recommendation: " + report["summary"]["recommendation"])
    else:
        print(prediction.table())
        print(f"dry run: nothing written (bases: {cache.hits} cached, {cache.misses} computed{_methods(cache)})")
    return 0


# ---------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    """The ``inspect`` subcommand: describe an adapter file or a checkpoint."""
    p = subparsers.add_parser("inspect", help="summarise an adapter or a checkpoint",
                              description="Summarise an adapter (PEFT directory, kohya or LoRA-X .safetensors) or a "
                                          "base checkpoint (alias, .safetensors, .onnx): format, layers, ranks, "
                                          "scaling, dtype, sha256.")
    p.add_argument("file", metavar="FILE", help="adapter directory/file, checkpoint file or packaged alias")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled files (torch.load(weights_only=True))")
    p.add_argument("--all", action="store_true", help="list every layer, not only the first 20")
    _common(p)
    p.set_defaults(func=cmd_inspect)
    return p


def _is_adapter(path: Path) -> bool:
    """True for a PEFT directory or a safetensors file that is not a plain checkpoint."""
    from .files.adapters import LORAX_FORMAT, PEFT_CONFIG

    if path.is_dir() or path.name == PEFT_CONFIG:
        return True
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = list(f.keys())
    except Exception:
        return True  # let the adapter reader produce the error message
    return meta.get("format") == LORAX_FORMAT or any(
        ".lora_" in k or ".hada_" in k or ".lokr_" in k or k.endswith(".alpha") for k in keys)


def cmd_inspect(args) -> int:
    """``inspect``: print an adapter's or a checkpoint's summary (JSON with ``--json``); returns the exit code."""
    from .files.adapters import load_adapter
    from .files.checkpoints import open_checkpoint

    path = Path(args.file)
    if path.exists() and _is_adapter(path):
        info = load_adapter(path, allow_pickle=args.allow_pickle).summary()
        info["kind"] = "adapter"
    else:
        with open_checkpoint(args.file, allow_pickle=args.allow_pickle) as ck:
            keys = ck.keys()
            shapes = {k: tuple(ck.shape(k)) for k in keys}
            info = {
                "kind": "checkpoint",
                "path": str(ck.path),
                "sha256": ck.sha256,
                "format": Path(ck.path).suffix.lstrip("."),
                "layers": len(keys),
                "parameters_2d": sum(a * b for a, b in shapes.values()),
                "shapes": {"x".join(map(str, s)): n for s, n in sorted(
                    ((s, sum(1 for v in shapes.values() if v == s)) for s in set(shapes.values())),
                    key=lambda kv: -kv[1])},
                "modules": keys,
            }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    modules = info.pop("modules")
    for k, v in info.items():
        print(f"{k:>20}: {v}")
    shown = modules if args.all else modules[:20]
    print(f"{'modules':>20}: {len(modules)}")
    for m in shown:
        print(f"{'':>22}{m}")
    if len(shown) < len(modules):
        print(f"{'':>22}… {len(modules) - len(shown)} more (--all)")
    return 0


# ---------------------------------------------------------------------------------------------------------
# random-adapter (examples for the README and tests)
# ---------------------------------------------------------------------------------------------------------


def add_random_parser(subparsers) -> argparse.ArgumentParser:
    """The ``random-adapter`` subcommand: a seeded random adapter for a base checkpoint."""
    p = subparsers.add_parser(
        "random-adapter", help="write a seeded random adapter for a checkpoint (examples, tests)",
        description="Write a reproducible random adapter for the weights of BASE matching --modules: a plain LoRA "
                    "(peft/kohya, ‖ΔW‖_F = strength·‖W‖_F) or a LoRA-X adapter (lorax, ΔΣ = strength·σ_i·N(0,1) on "
                    "the top-rank singular values). Not a trained adapter: for trying the transfer.")
    p.add_argument("--base", required=True, help="checkpoint (alias, .safetensors or .onnx)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist unless --force)")
    p.add_argument("--format", choices=["peft", "kohya", "lorax"], default="peft")
    p.add_argument("--modules", default=r"attention\.self\.(query|value)",
                   help="regular expression selecting the weights to adapt (default: attention query and value)")
    p.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank (peft/kohya) or LoRA-X rank r (lorax)")
    p.add_argument("--strength", type=_strength, default=0.1, help="relative size of the update (default 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"], default="float32")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--cache-dir", metavar="D", default=None, help="basis cache directory (as for transfer)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached bases")
    _common(p)
    p.set_defaults(func=cmd_random)
    return p


def cmd_random(args) -> int:
    """``random-adapter``: write a seeded random adapter; returns the exit code."""
    import torch

    from .files.checkpoints import open_checkpoint
    from .files.adapters import AdapterError, save_adapter
    from .files.example import random_adapter
    from .files.output import check_not_an_input, write_output_dir

    inputs = _inputs(bases=(args.base,))
    check_not_an_input(args.out, inputs)
    if Path(args.out).exists() and not args.force:
        raise AdapterError(f"output {args.out} already exists; pass --force to replace it")
    cache = _cache(args, inputs, Path(args.out))
    with open_checkpoint(args.base) as ck:
        adapter = random_adapter(ck, args.format, args.modules, rank=args.rank, strength=args.strength,
                                 seed=args.seed, dtype=getattr(torch, args.dtype), base_name=args.base,
                                 cache=cache)
    write_output_dir(args.out, lambda tmp: save_adapter(adapter, tmp), force=args.force, protect=inputs)
    print(f"wrote a random {args.format} adapter ({len(adapter.layers)} layers, rank {args.rank}) to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------------------


def add_verify_parser(subparsers):
    """The ``verify`` subcommand of the conformance kit, when :mod:`lorax_ref.conformance` exists; without
    the kit's extra installed, a ``verify`` that says which one to install."""
    if importlib.util.find_spec("lorax_ref.conformance") is None:
        return None
    from .errors import LoraxInputError

    try:
        from . import conformance
    except ModuleNotFoundError as exc:
        missing = exc
        parser = subparsers.add_parser("verify", help=f"check an implementation (needs {_install_hint(exc, 'conformance')})")
        parser.add_argument("rest", nargs=argparse.REMAINDER)

        def refuse(args):
            raise LoraxInputError(f"verify needs {_install_hint(missing, 'conformance')}")

        parser.set_defaults(func=refuse)
        return parser
    return conformance.add_verify_parser(subparsers)


SUBCOMMANDS: list[Callable] = [add_transfer_parser, add_inspect_parser, add_random_parser, add_verify_parser]


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m lorax_ref`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="LoRA-X reference: transfer adapters between base models, inspect files.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"lorax_ref {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("lorax_ref: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # one clear line; the traceback only with --debug
        if debug:
            raise
        print(f"lorax_ref: error: {_describe(exc)}", file=sys.stderr)
        return 1


# The package each optional import comes from -> the pyproject extra that installs it.
EXTRA_OF = {"numpy": "files", "safetensors": "files", "tqdm": "files", "scipy": "conformance",
            "hypothesis": "conformance", "onnx": "real", "tokenizers": "real"}


def _install_hint(exc: ModuleNotFoundError, extra: str | None = None) -> str:
    """``pip install 'lorax_ref[extra]'`` for a missing optional package, else the bare message."""
    top = (exc.name or "").split(".")[0]
    extra = extra or EXTRA_OF.get(top)
    return f"{top}: pip install 'lorax_ref[{extra}]'" if extra else str(exc)


def _describe(exc: BaseException) -> str:
    from .errors import LoraxInputError

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, LoraxInputError):
        return text
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in EXTRA_OF:
        return f"this command needs {_install_hint(exc)}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or text}: {exc.filename}" if getattr(exc, "filename", None) else text
    if isinstance(exc, AssertionError):
        return f"internal check failed: {text} (please report this)"
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
