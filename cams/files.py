"""Atomic writes: every file cubcam writes appears whole under its final name, or not at all.

A plain ``open(path, "wb")`` truncates the previous file first, so a disk that fills half-way leaves neither the old
file nor the new one; a temporary file in ``$TMPDIR`` moved over the target is no better when ``$TMPDIR`` is another
file system (the move is then a copy in place). Here the temporary file sits next to the target (same directory,
hence the same file system), is flushed and ``fsync``'d, then ``os.replace``'d over it, which POSIX makes atomic.
A failed write removes its temporary file and raises :class:`WriteFailed`, whose message names the path and the
free space left there: one line a user can act on. A process killed mid-write (SIGKILL, a power cut) cannot remove
its own: the temporary file's name holds its writer's process id, and the next write in that folder removes those
whose writer is gone (never one a live process is writing).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


class WriteFailed(OSError):
    """A write that did not happen; the previous file (if any) is intact. ``errno`` is the cause's."""

    def __str__(self) -> str:
        return str(self.strerror)


def free_space(folder: str | Path) -> str:
    """``"12.3 MB free"`` on the file system holding ``folder`` (or ``"free space unknown"``)."""
    try:
        free = float(shutil.disk_usage(folder).free)
    except OSError:
        return "free space unknown"
    units = ["B", "kB", "MB", "GB", "TB"]
    while free >= 1000 and len(units) > 1:
        free /= 1000
        units.pop(0)
    return f"{free:.1f} {units[0]} free"


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[IO[bytes]]:
    """A binary file object whose contents replace ``path`` when the block ends without an exception.

    The parent folders are created. The new file keeps the permissions of the file it replaces (a new one gets
    0o644), not ``mkstemp``'s 0o600.

    Raises:
        WriteFailed: when the data could not be written (a full disk, a read-only folder); nothing of it is left.
    """
    path = Path(path)
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent)
        descriptor, temporary = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}{PID_END}", suffix=PARTIAL, dir=path.parent
        )
        with os.fdopen(descriptor, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o644)
        os.replace(temporary, path)
        temporary = None
    except (OSError, RuntimeError) as error:  # RuntimeError: torch.save's answer to a full disk
        cause = _os_error(error)
        if cause is None or isinstance(error, WriteFailed):
            raise
        _discard(temporary)  # first, so that the free space reported is what there is without it
        temporary = None
        reason = cause.strerror or str(cause)
        raise WriteFailed(cause.errno, f"could not write {path}: {reason} ({free_space(path.parent)})") from error
    finally:
        _discard(temporary)


PARTIAL = ".partial"
PID_END = "-"  # a temporary file is .<target name>.<writer's pid>-<random>.partial


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the temporary files in ``folder`` whose writer process no longer exists; returns them."""
    removed = []
    for candidate in folder.glob(f".*{PARTIAL}"):
        pid = _writer(candidate.name)
        if pid is None or _alive(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another writer's cleanup was first
            candidate.unlink()
            removed.append(candidate)
    return removed


def _writer(name: str) -> int | None:
    """The writer's process id in a temporary file's name, or None where the name is not one of ours."""
    head = name[: -len(PARTIAL)].rpartition(PID_END)[0]  # .<target>.<pid>
    digits = head.rpartition(".")[2]
    return int(digits) if digits.isdigit() else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _discard(temporary: str | None) -> None:
    """Remove a temporary file that did not become its target (if there is one)."""
    if temporary is not None:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind ``error``: itself, or one it was raised while handling (``torch.save``'s zip writer
    answers a full disk with a RuntimeError of its own, raised from the OSError)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``Path.write_bytes``, atomically (see :func:`atomic_open`)."""
    with atomic_open(path) as file:
        file.write(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """``Path.write_text`` (UTF-8), atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_with(path: str | Path, writer: Callable[[IO[bytes]], object]) -> Path:
    """Atomically write what ``writer(file)`` writes to a binary file object (``torch.save``, ``Image.save``,
    ``Figure.savefig`` all take one)."""
    with atomic_open(path) as file:
        writer(file)
    return Path(path)
