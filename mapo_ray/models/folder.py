"""The model folder a job names, as a worker on some node of the cluster finds it."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def model_folder_here(path: str | os.PathLike, who: str) -> Path:
    """``path``, once it is a folder on the machine this runs on.

    The job driver resolves the model to a folder on its own machine (the tiny model's
    cache, a hub download) and hands that path to every worker; a worker on another
    machine finds it only on storage that both mount at the same path. Without this check
    ``from_pretrained`` would take the missing path for a hub id and say something else.

    Raises FileNotFoundError naming ``who``, this machine and the path.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{who} on {socket.gethostname()}: the model folder {folder} is not on this machine; on several "
            "machines it must be on storage every node mounts at the same path (MAPO_RAY_CACHE for tiny-vl, "
            "HF_HOME for a hub model)"
        )
    return folder
