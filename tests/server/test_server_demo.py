"""`make demo` (ci/demo.py) runs a real rotation end to end and leaves nothing running."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[2] / "ci/demo.py"


@pytest.mark.timeout(300)
def test_demo_rotates_and_cleans_up():
    try:
        import certrotate.cli  # noqa: F401
    except ImportError as err:
        pytest.skip(f"the agent (agent/, package certrotate) is not installed: {err}")
    result = subprocess.run([sys.executable, str(DEMO), "--keep"], capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "gateway with the new certificate: HTTP 200" in out
    assert "gateway with the old certificate: HTTP 403" in out
    assert re.search(r"^certs-\d+ ", out, re.M)
    assert "CertRotationCompleted() -> Succeed" in out
    assert "DEVICE_PUBKEY_CHANGE" in out
    factory = Path(re.search(r"factory PKI created in (\S+);", out)[1])
    try:
        assert not (factory / "endpoints.json").exists()  # removed by the server on its way out
        pid = int(re.search(r"\(pid (\d+)", (factory.parent / "factory-server.log").read_text())[1])
        assert not Path(f"/proc/{pid}").exists(), "the demo left its server running"
    finally:
        shutil.rmtree(factory.parent, ignore_errors=True)
