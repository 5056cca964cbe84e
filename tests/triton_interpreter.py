"""Run a Triton-kernel script on the CPU through Triton's interpreter, in a subprocess.

The interpreter is chosen when kernels are defined, so it needs a fresh process. The script prints one
JSON object; a failure is reported with the script's own stderr.
"""
import json
import os
import subprocess
import sys


def run_interpreted(script: str, *args) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise AssertionError(f"interpreted script failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout)
