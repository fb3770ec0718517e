"""Write a folder's files all or nothing: a build that fails half-way leaves its output folder as it was."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path


def write_through_staging(write):
    """Wrap `write(out_dir, ...)` so that it writes into a temporary folder next to out_dir (the same filesystem, so
    the files move by rename), and its files move into out_dir only when it returns. On an error the temporary
    folder is removed and out_dir is untouched; other files already in out_dir are kept."""

    @functools.wraps(write)
    def wrapper(out_dir, *args, **kwargs):
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
        try:
            result = write(staging, *args, **kwargs)
            out_dir.mkdir(exist_ok=True)
            for path in sorted(staging.iterdir()):
                os.replace(path, out_dir / path.name)
            return result
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return wrapper
