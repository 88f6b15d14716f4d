"""Atomic writes, cbtm's own temporaries, and content hashing.

Every artifact is written to a temporary sibling named ``.<name>.cbtm-tmp-<pid>-<random>`` and renamed into
place; a directory being replaced is first moved aside to ``.<name>.cbtm-old-<pid>-<ns>``. Only names of that
form are ever cleaned up (`clean_stale_temporaries`), and only when the process that wrote them is gone, so
cbtm never deletes a file it did not write, nor the temporary of a cbtm process that is still running.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from ground.errors import UserInputError

_OURS = re.compile(r"^\..+\.cbtm-(tmp|old)-(\d+)-[^/]*$")


def temp_prefix(path: Path) -> str:
    """The prefix of a temporary sibling of ``path`` written by this process."""
    return f".{Path(path).name}.cbtm-tmp-{os.getpid()}-"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling (fsynced) and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``final`` only if the block succeeds.

    The old directory (if any) is moved aside first and deleted after the new one is in place, so a
    reader that already opened files from the old directory keeps working on them.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final), dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.cbtm-old-{os.getpid()}-{time.monotonic_ns()}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(root: Path) -> list[Path]:
    """Remove the temporaries that cbtm processes no longer running left below ``root``; return them.

    Only names written by `atomic_write_bytes` / `atomic_dir` (``.<name>.cbtm-tmp-<pid>-*`` and
    ``.<name>.cbtm-old-<pid>-*``) are touched, and only when process ``pid`` is gone.
    """
    removed = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            match = _OURS.match(name)
            if not match or _alive(int(match.group(2))):
                continue
            path = Path(dirpath) / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
        dirnames[:] = [d for d in dirnames if not _OURS.match(d)]
    return removed


# ---------------------------------------------------------------------------------------------- hashing
def read_json(path: Path) -> Any:
    """The JSON value stored at ``path``. A file that is not valid UTF-8 JSON raises ValueError naming it (json's
    own message gives a line and column but no file); a missing one, OSError."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged: not valid JSON ({type(exc).__name__})") from exc


def hash_json(obj: Any) -> str:
    """sha256 of a JSON-serialisable object with sorted keys (stable across runs)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 hex digest of one file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_path(path: Path, ignore: tuple[str, ...] = ()) -> str | None:
    """Content hash of a file or a directory tree (relative names + bytes); None if it does not exist.

    Hidden files and folders (cbtm's temporaries, caches) are not part of the content.
    """
    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        rel = file.relative_to(path).as_posix() if path.is_dir() else file.name
        if rel.startswith(".") or "/." in rel or file.name in ignore:
            continue
        h.update(rel.encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


MODEL_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")
MODEL_JSON = ("config.json", "generation_config.json")


def model_files(model_dir: Path) -> dict[str, dict]:
    """{name: {"size": bytes, "sha256": hex}} of the files that define a saved model (weights and config),
    as recorded in the manifest and checked when the model is loaded."""
    model_dir = Path(model_dir)
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file()
                   and (p.name in MODEL_JSON or p.name.endswith(MODEL_FILE_SUFFIXES)))
    return {name: {"size": (model_dir / name).stat().st_size, "sha256": file_sha256(model_dir / name)}
            for name in names}


_USER_FIXABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def user_fixable(exc: BaseException) -> bool:
    """True for an OSError that retrying cannot fix (permissions, a read-only or full file system)."""
    return isinstance(exc, OSError) and exc.errno in _USER_FIXABLE


def check_writable(directory: Path, what: str) -> None:
    """Raise UserInputError (one line) unless a file can be created in ``directory`` (created if missing)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=temp_prefix(directory / "probe"), dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        if not user_fixable(exc):
            raise
        raise UserInputError(f"cannot write {what} in {directory} ({exc.strerror}): fix its permissions or free "
                             "space, then run the same command again") from exc
