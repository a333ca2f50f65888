"""This repository's own older releases, taken from its git history (OTA rollback tests)."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The last release whose agent knew only journal schema 1 (tests/agent/test_journal.py's too).
OLDER_RELEASE = "de0428c"


def older_agent_package(directory: Path) -> Path:
    """OLDER_RELEASE's agent/certrotate, unpacked under ``directory``; skips the test, saying
    why, where there is no git or no such history (a source tarball, a shallow clone)."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLDER_RELEASE, "agent/certrotate"],
                                 capture_output=True)
    except FileNotFoundError:
        pytest.skip(f"no git here to take the agent of {OLDER_RELEASE} from history")
    if archive.returncode != 0:
        pytest.skip(f"{REPO} has no git history with {OLDER_RELEASE} (a source tarball, a shallow "
                    f"clone?): {archive.stderr.decode().strip()[:200]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(directory, filter="data")
    return directory / "agent/certrotate"
