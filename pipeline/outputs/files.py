"""Output files written atomically, and what a killed run leaves behind.

Every file is written to a hidden temporary name in the same directory and renamed onto the final
path only when it is complete (:func:`atomic_output`), so an interrupted or failed run never leaves a
truncated file behind and the previous output stays intact. :func:`clean_partials` removes the
temporary files of runs that died; :func:`name_length_problem` says, before any frame renders, whether
a path (and its temporary name) fits the file system's limits.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OutputError", "atomic_output", "clean_partials", "is_frame_file", "name_length_problem"]

# `.{name}.partial-{pid}-{token}{suffix}`: the greedy `.+` backtracks to the last ".partial-", so
# names that themselves contain ".partial-" still parse; the pid is what clean_partials checks.
_PARTIAL_RE = re.compile(r"\..+\.partial-(?P<pid>\d+)-[0-9a-f]+(?:\.[^.]+)?")
FRAME_RE = re.compile(r"frame_(?P<index>\d+)\.png")


class OutputError(OSError):
    """An output file could not be written completely (the old one, if any, is kept)."""


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary file is ``.{name}.partial-{pid}-{random}{suffix}`` in the same directory: the
    same directory so that ``os.replace`` is an atomic rename on one filesystem, the real suffix
    so that writers choosing a format by extension (Pillow, ffmpeg) still do. The body must
    create the file. On success it is fsynced, renamed, and the directory fsynced, so after a
    crash either the old or the new file is there, complete. On any exception, including
    KeyboardInterrupt, the temporary file is deleted and the exception re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_partial_name(path.name, str(os.getpid()), secrets.token_hex(_TOKEN_BYTES)))
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        # BaseException on purpose: Ctrl-C mid-render must not leave a partial file around.
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


_TOKEN_BYTES = 4
# The longest pid a temporary name can carry: pids are 32-bit numbers (Linux caps them at 2**22, but
# the check must not depend on which pid a later run gets).
_PID_DIGITS = len(str(2**32))


def _partial_name(name: str, pid: str, token: str) -> str:
    return f".{name}.partial-{pid}-{token}{Path(name).suffix}"


def name_length_problem(
    path: Path, kind: str, frames: int = 1, *, limits: dict[str, tuple[str, int, int]] | None = None
) -> str | None:
    """Why ``path`` cannot be written as a ``kind`` output for its length alone, or None if it can.

    Checked before rendering, since the file system refuses a long name only when the output is
    written, after every frame has rendered. Each folder still to be made and the file's own name,
    once ``atomic_output`` has added its temporary prefix and suffix (with the longest possible
    pid), must fit NAME_MAX, and the whole temporary path PATH_MAX; both are asked of the nearest
    folder that exists (a folder made inside it is on the same file system), 255 and 4096 where it
    cannot say. A frames folder's files are ``frame_NNNNN.png`` inside it, for ``frames`` frames.
    ``limits`` memoises the folder look-ups over many paths (one dict per check of a scene).
    """
    path_text = os.fspath(path)
    file = os.path.join(path_text, f"frame_{max(frames - 1, 0):05d}.png") if kind == "frames" else path_text
    parent, name = os.path.split(file)
    existing, name_max, path_max = _limits(parent, {} if limits is None else limits)
    for component in [*parent[len(existing) :].split(os.sep), name]:
        if component and _name_units(component) > name_max:
            return f"'{_shorten(component)}' is {_name_units(component)} bytes long; this file system allows {name_max} per name"
    partial = _partial_name(name, "9" * _PID_DIGITS, "f" * 2 * _TOKEN_BYTES)
    if _name_units(partial) > name_max:
        extra = _name_units(partial) - _name_units(name)
        return (
            f"'{_shorten(name)}' is {_name_units(name)} bytes long, and {extra} more while it is written "
            f"(a temporary name beside it); this file system allows {name_max} per name, so at most "
            f"{name_max - extra} for this name"
        )
    full = _name_units(os.path.join(parent, partial))
    if full >= path_max:  # PATH_MAX counts the terminating NUL
        return (
            f"its full path is {full} bytes long while it is written; this file system allows {path_max - 1}"
        )
    return None


def _name_units(name: str) -> int:
    # What the limits count: bytes on POSIX, UTF-16 code units on Windows.
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        return len(name.encode("utf-16-le", "surrogatepass")) // 2
    return len(os.fsencode(name))


def _shorten(name: str, keep: int = 30) -> str:
    return name if len(name) <= 2 * keep + 3 else f"{name[:keep]}...{name[-keep:]}"


def _limits(folder: str, memo: dict[str, tuple[str, int, int]]) -> tuple[str, int, int]:
    """(nearest existing folder of ``folder``, its NAME_MAX, its PATH_MAX); 255 and 4096 where unknown."""
    if folder in memo:
        return memo[folder]
    found: tuple[str, int, int]
    try:
        found = (folder, _pathconf(folder, "PC_NAME_MAX", 255), _pathconf(folder, "PC_PATH_MAX", 4096))
    except (FileNotFoundError, NotADirectoryError):
        up = os.path.dirname(folder)
        found = (folder, 255, 4096) if up == folder else _limits(up, memo)
    except OSError as exc:
        # A name too long to look up has its parent looked up instead; anything else (no permission
        # to search the folder, say) is left to the write itself, under the usual limits.
        long = exc.errno == errno.ENAMETOOLONG
        found = _limits(os.path.dirname(folder), memo) if long else (folder, 255, 4096)
    memo[folder] = found
    return found


def _pathconf(folder: str, name: str, default: int) -> int:
    """``os.pathconf``, or ``default`` where the system cannot say; raises OSError if ``folder`` is not there."""
    try:
        value = os.pathconf(folder, name)
    except (ValueError, AttributeError):  # a name the system does not know; no pathconf (Windows)
        return default
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return default
        raise
    return value if value and value > 0 else default


def _fsync_path(path: Path) -> None:
    # Writers (ffmpeg, Pillow) write by name and close the file themselves, so flush what the OS
    # holds by reopening it; without this a power cut after the rename can leave an empty file.
    # O_RDWR rather than O_RDONLY because fsync on a read-only handle fails on Windows.
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Directories cannot be opened on Windows; there the
    # rename is as durable as the filesystem makes it, which is the best we can do.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def clean_partials(directory: Path) -> list[Path]:
    """Remove leftover ``.*.partial-{pid}-*`` files in ``directory`` whose process is gone.

    A killed run (SIGKILL, power cut) cannot clean up after itself; its temporary files are
    removed here. Files whose pid is a live process are kept, because they may belong to a
    renderer writing into the same directory right now. (A recycled pid only makes this keep a
    stale file a little longer; pids from another machine on a shared filesystem are not told
    apart.) Returns the removed paths; a missing directory yields ``[]``.
    """
    directory = Path(directory)
    removed: list[Path] = []
    try:
        entries = sorted(directory.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _PARTIAL_RE.fullmatch(entry.name)
        if match is None or entry.is_dir() or _pid_alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            # Another process cleaning the same directory got there first.
            continue
        removed.append(entry)
    return removed


def is_frame_file(name: str) -> bool:
    """Whether ``name`` is one of the ``frame_NNNNN.png`` files a frames output consists of."""
    return FRAME_RE.fullmatch(name) is not None


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process; when unsure, say yes (keeping a file is safe)."""
    if pid <= 0:
        # We never write such pids, and os.kill(0, ...) would signal our own process group.
        return False
    if os.name == "nt":  # pragma: no cover - exercised on Windows only
        return _pid_alive_windows(pid)
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only, nothing is sent
    except ProcessLookupError:
        return False
    except OSError:
        # PermissionError: it exists but belongs to another user.
        return True
    return True


def _pid_alive_windows(pid: int) -> bool:  # pragma: no cover - exercised on Windows only
    # os.kill(pid, 0) on Windows sends CTRL_C_EVENT instead of probing, so ask the kernel.
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    process_query_limited_information = 0x1000
    still_active = 259
    error_access_denied = 5
    handle = kernel32.OpenProcess(process_query_limited_information, False, pid)
    if not handle:
        return kernel32.GetLastError() == error_access_denied
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True
        return code.value == still_active
    finally:
        kernel32.CloseHandle(handle)
