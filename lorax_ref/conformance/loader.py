"""Loading a candidate from a target ``"file.py:function"`` or ``"module:function"``."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..errors import LoraxInputError
from .calling import _one_line


def _parse_target(target: str) -> tuple[str, str, bool]:
    """``(module or file, attribute, is_file)`` of ``"pkg.module:func"`` / ``"path/to/file.py:func"``."""
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr:
        raise LoraxInputError(f"{target!r}: expected MODULE_OR_FILE:FUNCTION, e.g. my_lorax.py:transfer")
    path = Path(where)
    is_file = where.endswith(".py") or path.is_file()
    if is_file and not path.is_file():
        raise LoraxInputError(f"{where}: no such file")
    return where, attr, is_file


def _exec(load: Callable[[], Any], where: str):
    """Run an import; whatever it raises or exits with becomes one LoraxInputError line."""
    try:
        return load()
    except LoraxInputError:
        raise
    except SystemExit as exc:
        raise LoraxInputError(f"{where} called sys.exit({exc.code!r}) while being imported; a candidate's module must "
                              f"not end the process") from None
    except Exception as exc:  # noqa: BLE001 — the user's module failed to import: say so in one line
        raise LoraxInputError(f"importing {where} failed: {type(exc).__name__}: {_one_line(exc)}") from None


def load_candidate(target: str) -> Callable:
    """``"pkg.module:func"`` or ``"path/to/file.py:func"`` (``func`` may be dotted: ``Class.method``).

    Anything the module raises or a ``sys.exit`` at import is a :class:`LoraxInputError`.
    """
    where, attr, is_file = _parse_target(target)
    if is_file:
        path = Path(where)
        name = path.stem if path.stem.isidentifier() and path.stem not in sys.modules else (
            "_lorax_candidate_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12])
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # let the file import its neighbours
        sys.modules[name] = module
        try:
            _exec(lambda: spec.loader.exec_module(module), where)
        except LoraxInputError:
            sys.modules.pop(name, None)
            raise
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())

        def load():
            try:
                return importlib.import_module(where)
            except ModuleNotFoundError as exc:
                raise LoraxInputError(f"cannot import module {where!r}: {exc}") from None
        try:
            module = _exec(load, where)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoraxInputError(f"{where} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoraxInputError(f"{target} is a {type(obj).__name__}, not a function")
    return obj
