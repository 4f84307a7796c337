"""One line naming the machine a benchmark ran on, for the docs it writes (timings mean little without it)."""

import os
import platform
from pathlib import Path


def describe_machine() -> str:
    import faiss
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {cores} usable cores (load average {load:.1f} at start: the cores are shared), "
        f"{platform.system()} {platform.machine()}, Python {platform.python_version()}, torch "
        f"{torch.__version__} ({torch.get_num_threads()} thread(s), CPU), faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} thread(s)), transformers {transformers.__version__}, trl {trl.__version__}"
    )
