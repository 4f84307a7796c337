"""afmrl.cli.end_launched_process: a launched rank leaves with exit code 0 even when a thread is inside torch at exit.

The script below is the abort CI saw at the end of a finished DDP rank, made certain: a daemon thread runs torch
matmuls (the GIL released) while the main thread returns, so the thread takes the GIL back during the interpreter's
teardown and CPython's thread kill aborts the process. The same script in a launched rank (``WORLD_SIZE`` set, as
torchrun and accelerate set it) must exit 0 and still do what Python's exit does first: stop idle executor workers,
join other threads, run atexit handlers, flush buffered output.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    import torch
    from afmrl.cli import end_launched_process

    torch.set_num_threads(1)
    a = torch.randn(600, 600)

    def matmuls():
        while True:
            torch.mm(a, a)

    def worker():
        time.sleep(0.3)
        print("worker joined", flush=True)

    threading.Thread(target=matmuls, daemon=True).start()
    threading.Thread(target=worker).start()
    pool = ThreadPoolExecutor(max_workers=1)
    pool.submit(int).result()  # an idle executor worker that nobody shuts down
    atexit.register(lambda: print("atexit ran"))
    sys.stdout.write("buffered, not flushed\\n")
    time.sleep(0.2)
    end_launched_process()
    """
)


def run(tmp_path, env):
    script = tmp_path / "exit.py"
    script.write_text(SCRIPT, encoding="utf-8")
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PYTHONUNBUFFERED")}
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
    )


@pytest.mark.skipif(sys.version_info >= (3, 14), reason="CPython 3.14 hangs such threads instead of killing them")
def test_outside_a_launch_the_interpreter_exits_as_usual_and_the_torch_thread_aborts_it(tmp_path):
    proc = run(tmp_path, {})
    assert proc.returncode != 0, "the control no longer aborts: this Python's teardown may be safe now"
    assert "terminate called" in proc.stderr


def test_a_launched_rank_exits_zero_after_what_python_does_first(tmp_path):
    proc = run(tmp_path, {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})  # what torchrun sets in a rank
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert out == ["buffered, not flushed", "worker joined", "atexit ran"]  # all written, in Python's exit order
    assert "terminate called" not in proc.stderr
