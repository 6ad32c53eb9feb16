"""Output paths named on a command line (`fastcore5 demo --plots`, `python -m bench --out`,
`python -m bench --host --json`), checked before any work starts so a typo costs seconds, not a
training run."""
from __future__ import annotations

import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path cannot be created or written; the message is one line naming the option."""


def writable_folder(path: str | Path, option: str) -> Path:
    """``path`` as a folder that exists and accepts new files (created, with its parents, if
    missing); OutputPathError naming ``option`` otherwise."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option} {path}: exists and is not a folder")
    _create_and_try_writing(folder, option, path)
    return folder


def writable_file(path: str | Path, option: str) -> Path:
    """``path`` as a file that can be written (its folder created, with its parents, if missing;
    the file itself is not created); OutputPathError naming ``option`` otherwise."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise OutputPathError(f"{option} {path}: is a folder; name a file")
    if file.parent.exists() and not file.parent.is_dir():
        raise OutputPathError(f"{option} {path}: {file.parent} exists and is not a folder")
    _create_and_try_writing(file.parent, option, path)
    return file


def _create_and_try_writing(folder: Path, option: str, shown: str | Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputPathError(f"{option} {shown}: cannot write there ({err.strerror or err})") from None
