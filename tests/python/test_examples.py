"""The runnable examples run and agree with the reference (they exit non-zero otherwise)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_mini_vllm_example_matches_reference():
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "mini_vllm.py")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all results match the reference" in r.stdout
