"""Each benchmark configuration in its own process, and that process's peak resident memory (Linux /proc): shared
by attention.py and t5_memory.py."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last `reset_peak`) of this process, in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def run_child(script: str, argv: list[str], child_args: list[str], label: str, timeout: float) -> dict | None:
    """Run ``script *argv --child *child_args OUT`` in a fresh Python process and return the JSON it wrote to OUT;
    ``None`` (reported on stderr with ``label``) when it fails or runs past ``timeout`` seconds."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out_path = handle.name
    cmd = [sys.executable, script, *argv, "--child", *child_args, out_path]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            print(f"  {label} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        return json.loads(Path(out_path).read_text())
    except subprocess.TimeoutExpired:
        print(f"  {label} timed out after {timeout:.0f} s", file=sys.stderr)
        return None
    finally:
        Path(out_path).unlink(missing_ok=True)
