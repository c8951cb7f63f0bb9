"""Every script in `scripts/` starts: `--help` imports it and everything it imports (other scripts included) and
parses its arguments, so a function removed from one module cannot leave a benchmark that no longer runs."""

import glob
import os
import subprocess
import sys

import pytest

SCRIPTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "scripts", "*.py")))


def test_every_script_is_listed():
    assert len(SCRIPTS) >= 15 and any(path.endswith("bench_preference.py") for path in SCRIPTS)


@pytest.mark.slow  # about 6 s a script (importing torch and transformers): run once, on the lowest versions
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_starts(script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "usage" in done.stdout.lower()
