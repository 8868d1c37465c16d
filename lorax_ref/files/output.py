"""Writing an output directory without ever harming an input: atomic creation, replacement only with ``force``,
refusal of any path that is, holds or lies inside an input."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterable

from .adapters import AdapterError

__all__ = ["check_not_an_input", "write_output_dir"]



def check_not_an_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike], what: str = "--out",
                       holds_inputs_ok: bool = False) -> None:
    """Refuse a path we write to that is an input, lies inside an input directory, or (unless
    ``holds_inputs_ok``) contains an input. Paths are compared resolved, so symlinks and ``..`` cannot hide one."""
    path = Path(path).resolve()
    for p in inputs:
        p = Path(p).resolve()
        inside = p.is_dir() and p in path.parents
        if path == p or inside or (not holds_inputs_ok and path in p.parents):
            verb = "lies inside the input" if inside and holds_inputs_ok else "would overwrite the input"
            raise AdapterError(f"{what} {path} {verb} {p}; choose a path outside the inputs")


# Scratch directories of our own naming, beside the output: .<out name>.lorax-tmp-<host>-<pid>-<token>
# (being filled) and .<out name>.lorax-old-<host>-<pid>-<token> (an output being replaced under --force).
_SCRATCH = re.compile(r"^\.(?P<name>.+)\.lorax-(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]+$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", socket.gethostname())[:40] or "host"


def _scratch(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.lorax-{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        return True
    return True


def _clean_stale_scratch(parent: Path) -> None:
    """Remove what killed runs (kill -9, power loss) left beside their output: only directories named by
    :func:`_scratch`, made on this host by a process that no longer exists. A replaced output whose
    replacement never arrived is put back instead."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for p in entries:
        m = _SCRATCH.match(p.name)
        if not m or m["host"] != _host() or _pid_alive(int(m["pid"])) or p.is_symlink() or not p.is_dir():
            continue
        if m["kind"] == "old":
            try:
                _rename_noreplace(p, parent / m["name"])
                continue
            except OSError:
                pass  # the output exists: this is the old copy it replaced
        shutil.rmtree(p, ignore_errors=True)


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - no C library to load (then a plain rename is used)
    _LIBC = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError when ``dst`` exists, whatever it is.

    A plain rename silently replaces an empty directory, so on Linux this is ``renameat2(RENAME_NOREPLACE)``,
    one atomic step. Where that is missing, a check then a rename: between the two only an empty directory
    made by someone else could be replaced (a non-empty one makes the rename fail), so nothing is lost.
    """
    fn = getattr(_LIBC, "renameat2", None) if _LIBC is not None else None
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if fn(-100, os.fsencode(src), -100, os.fsencode(dst), 1) == 0:  # AT_FDCWD, RENAME_NOREPLACE
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS):  # EINVAL: this file system lacks RENAME_NOREPLACE
            raise OSError(err, os.strerror(err), str(dst))  # EEXIST becomes FileExistsError
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _places() -> list[tuple[Path, str]]:
    places = [(Path.cwd().resolve(), "the current directory")]
    try:
        places.append((Path.home().resolve(), "your home directory"))
    except (RuntimeError, KeyError):  # no home directory known
        pass
    return places


def write_output_dir(out: str | os.PathLike, fill, force: bool = False, protect: Iterable[Path] = ()) -> Path:
    """Create directory ``out`` atomically: ``fill(tmp_dir)`` writes into a scratch sibling, renamed when done.

    * an interrupted or failing ``fill`` leaves nothing at ``out`` or beside it (the scratch directory is
      removed; one left by a killed run is removed by the next run that writes into the same folder);
    * the rename is the claim: it fails if ``out`` exists, so of two runs writing the same new ``out``
      exactly one wins and the other fails, replacing nothing;
    * an existing ``out`` is replaced only with ``force``, and never when it is, holds or lies inside one
      of ``protect`` (the inputs);
    * directories are created with the user's umask.
    """
    out = Path(out).resolve()
    check_not_an_input(out, protect)
    for place, where in _places():  # --out . --force would otherwise replace the directory you work in
        if out == place or out in place.parents:
            raise AdapterError(f"output {out} is {where} or holds it; choose a new directory")
    if out.exists() and not force:
        raise AdapterError(f"output {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise AdapterError(f"output {out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_scratch(out.parent)
    tmp = _scratch(out, "tmp")
    os.mkdir(tmp)  # mode 0o777 & ~umask (tempfile.mkdtemp would force 0o700)
    try:
        fill(tmp)
        try:
            _rename_noreplace(tmp, out)
        except FileExistsError:
            if not force:
                raise AdapterError(f"output {out} appeared while this run was writing it (another run?); "
                                   "it was left as it is; pass --force to replace it") from None
            old = _scratch(out, "old")
            os.rename(out, old)  # a fresh name: nothing is replaced; a failure below puts it back
            try:
                _rename_noreplace(tmp, out)
            except OSError:
                _rename_noreplace(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


