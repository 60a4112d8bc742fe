"""Writing files and folders so that a crash never leaves a half-written one, and a user's folder is never deleted.

Files: `write_atomic` (and `write_json`) writes under a temporary name beside the destination and renames it into
place; the temporary file is removed if the write fails. `replace_files` moves the files of a finished temporary
folder into their destination folder one by one, each by a rename.

Folders: putting a folder that lorafa wrote into place without ever deleting what lorafa did not write.

A folder is written under a temporary name beside its destination and renamed into place. The destination may be
absent, an empty folder, or a previous folder of the same kind (recognised by `owned`); anything else is refused
before a byte is written, with the path and a few of its entries in the message. A previous folder is renamed aside,
the new one renamed in, and only then are the files of the old one that lorafa knows removed, one by one: a crash
leaves either the old folder or the new one at the destination, never a mixture and never nothing.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], fsync: bool = False) -> str:
    """Call `write(tmp)` for a temporary file in `path`'s folder (created if needed), then rename it to `path`.

    A reader sees the old file or the new one, never part of one; the temporary file is removed if `write` raises.
    With `fsync`, the file's data reach the disk before the rename (so a power loss cannot leave it empty).
    Returns the path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json(path: str | os.PathLike, data, indent: int | None = 2, fsync: bool = False) -> str:
    """`data` as JSON at `path`, atomically (`write_atomic`); values JSON cannot hold are written as str()."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=indent, default=str)

    return write_atomic(path, write, fsync=fsync)


def replace_files(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename each file of the folder `src` (written in full beforehand) into the folder `dst` (same file system),
    replacing the file of that name there; a reader of `dst` sees each file old or new, never part of one."""
    src, dst = os.fspath(src), os.fspath(dst)
    for name in os.listdir(src):
        if os.path.isfile(os.path.join(src, name)):
            os.replace(os.path.join(src, name), os.path.join(dst, name))


def _entries(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def check_destination(path: str | os.PathLike, owned: Callable[[str], bool], what: str, hint: str = "") -> None:
    """Raise unless `path` can take a new `what`: absent, an empty folder, or a previous one (`owned(path)`).

    Raises:
        FileExistsError: `path` is a file, a link, or a folder holding anything else; naming a few of its entries.
    """
    path = os.fspath(path)
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        entries = _entries(path)
        if not entries or owned(path):
            return
        shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
        raise FileExistsError(f"{path!r} is not empty and is not a {what} that lorafa wrote (it holds {shown}). "
                              f"lorafa never deletes a folder it did not write: give a new or empty folder{hint}.")
    kind = "a link" if os.path.islink(path) else "a file"
    raise FileExistsError(f"{path!r} is {kind}, not a folder: give a new or empty folder for the {what}{hint}.")


def remove_owned(path: str | os.PathLike, names: Iterable[str]) -> None:
    """Remove the files `names` from the folder `path`, then the folder if it is empty then (anything else in it,
    written by someone else meanwhile, is kept, and so is the folder)."""
    path = os.fspath(path)
    for name in names:
        file = os.path.join(path, name)
        if os.path.isfile(file) and not os.path.islink(file):
            os.remove(file)
    try:
        os.rmdir(path)
    except OSError:
        pass


def swap_in(tmp: str, path: str | os.PathLike, owned: Callable[[str], bool], known: Iterable[str], what: str,
            hint: str = "") -> None:
    """Rename the finished folder `tmp` to `path` (same file system); a previous `what` at `path` is replaced.

    Args:
        tmp: the folder just written (a sibling of `path`).
        owned: whether a folder is a previous `what` (checked again here, right before the swap).
        known: the file names a `what` holds; only these are removed from the previous folder.
    Raises:
        FileExistsError: as `check_destination`; `tmp` is left for the caller to remove.
    """
    path = os.fspath(path)
    check_destination(path, owned, what, hint)
    if not (os.path.isdir(path) and _entries(path)):
        os.replace(tmp, path)  # absent or empty; fails (and deletes nothing) if something appeared meanwhile
        return
    aside = os.path.join(os.path.dirname(os.path.abspath(path)), f".lorafa-previous-{uuid.uuid4().hex[:12]}")
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    remove_owned(aside, known)
