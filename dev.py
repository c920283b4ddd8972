#!/usr/bin/env python3
"""Set up a virtual environment in .venv if needed, then run the demo, the tests or another command.

    python3 dev.py demo      # embedded Postgres, the server and one experiment, end to end
    python3 dev.py test      # the whole test suite
    python3 dev.py iiq ...   # any iiq command, inside the environment

Only the Python standard library is needed to run this file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".iiq-installed"


def _requirements_hash() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_environment() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"iiq needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    if STAMP.exists() and STAMP.read_text() == _requirements_hash():
        return
    print("installing iiq and its dependencies into .venv (first run only) ...", flush=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(_requirements_hash())


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    ensure_environment()
    command, rest = argv[0], argv[1:]
    if command == "demo":
        args = [str(BIN / "iiq"), "demo", *rest]
    elif command == "test":
        # The tests find their fixtures relative to the checkout.
        os.chdir(ROOT)
        args = [str(BIN / "python"), "-m", "pytest", *rest]
    elif command == "iiq":
        args = [str(BIN / "iiq"), *rest]
    else:
        args = [str(BIN / command), *rest]
    # Replace this process, so that signals from a supervisor (SIGTERM) reach iiq itself and
    # relative paths (IIQ_DATA_DIR, PYTHONPATH) keep the caller's working directory.
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
