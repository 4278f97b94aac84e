"""Facts about this machine for result files: versions, CPU, threads, GPU, load."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

__all__ = ["load_average", "machine"]


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none): others' work skews timings."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine() -> dict[str, Any]:
    """Python, torch, CPU model, threads and GPU name of this machine."""
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
