"""Running one benchmark configuration in a fresh interpreter, so that peaks of memory, thread
pools and ISA limits do not bleed from one configuration into the next.

The parent calls :func:`spawn` with a JSON-able job; the bench script, started with
``--worker <job>``, runs it and calls :func:`report` with the result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PREFIX = "RESULT "


def report(result: dict) -> None:
    """Worker side: hand ``result`` to the parent (one marked line on stdout)."""
    print(_PREFIX + json.dumps(result), flush=True)


def spawn(script: str, job: dict, env: dict, timeout: float) -> dict:
    """Run ``script --worker <job>`` in a fresh interpreter; its result, or ``{"error": ...}``
    naming the exit status and the last error line."""
    cmd = [sys.executable, str(Path(script).resolve()), "--worker", json.dumps(job)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(_PREFIX)]
    if done.returncode or not lines:
        stderr = done.stderr.strip().splitlines() or ["no output"]
        errors = [line.strip() for line in stderr if "Error" in line or "Exception" in line]
        tail = (errors or stderr)[-1].replace("|", "/")[:160]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1][len(_PREFIX):])
