"""Output folders named on a command line (`fastcore5 demo --plots`, `python -m bench --out`),
checked before any work starts so a typo costs seconds, not a training run."""
from __future__ import annotations

import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output folder cannot be created or written; the message is one line naming the option."""


def writable_folder(path: str | Path, option: str) -> Path:
    """``path`` as a folder that exists and accepts new files (created, with its parents, if
    missing); OutputPathError naming ``option`` otherwise."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise OutputPathError(f"{option} {path}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise OutputPathError(f"{option} {path}: cannot write there ({err.strerror or err})") from None
    return folder
