"""A state file written by each agent version resumes with this one (OTA mid-rotation).

The device is brought to the point the fixture describes (a real rotation
stopped by SIGKILL after step 4), the fixture replaces the journal, and
`certrotate check` must finish the rotation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agentdevice import assert_rotated, fake_systemctl, new_device, run_agent, stop_after_step_4

FIXTURES = Path(__file__).parent.parent / "agent" / "fixtures"


@pytest.mark.timeout(180)
# The file rotations among tests/agent/fixtures (state-v2.json is a token rotation: a live one is resumed in
# test_agent_downgrade.py; state-v3.json is from a future agent, refused there).
@pytest.mark.parametrize("fixture", ["state-v1.json"])
def test_state_format_resumes(backend, tmp_path, fixture):
    device, old = new_device(backend, tmp_path, "dev-ota", device_values={"k": "v"})
    bin_dir = tmp_path / "bin"
    fake_systemctl(bin_dir)
    stop_after_step_4(device, "certs-1700000000", bin_dir=bin_dir)
    state = device / "var/sota/certrotate/state.json"
    state.write_bytes((FIXTURES / fixture).read_bytes())

    result = run_agent(device, "check", bin_dir=bin_dir)
    assert result.returncode == 0, result.stderr
    assert "resuming at step 5" in result.stderr
    assert_rotated(backend, device, old, device_values={"k": "v"}, local_values=None)
