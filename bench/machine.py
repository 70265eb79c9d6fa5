"""What a benchmark ran on, written into each result beside its figures.

    from machine import machine   # in a bench/ script
    result["machine"] = machine()

The CPU's model and flags come from agnews/hardware.py (the reading the training precision uses too); the rest
is what makes a figure comparable: the cores this process may use, the load average, and the torch build.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
from typing import Any

from agnews.hardware import FLAGS, cpu


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch() -> dict[str, Any]:
    """torch's version, the CPU kernels it dispatches to, its threads, and the GPU if there is one."""
    if importlib.util.find_spec("torch") is None:
        return {}
    import torch

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
    }


def machine() -> dict[str, Any]:
    """The machine's facts as a JSON-able dict: CPU model and flags, cores, load, Python and library builds."""
    this = cpu()
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": this.model,
        "cpu_flags": {flag: flag in this.flags for flag in FLAGS},
        "cpu_bf16": this.bf16,
        "cpu_count": os.cpu_count(),
        "cpus_usable": sorted(usable) if usable is not None else None,
        "load_avg": list(os.getloadavg()),
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        **_torch(),
    }


if __name__ == "__main__":
    print(json.dumps(machine(), indent=2))
