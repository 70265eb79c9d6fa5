"""The CPU's model name and the instruction-set flags that training speed depends on, read from /proc/cpuinfo.

One home for that reading: the training precision (agnews/precision.py) asks whether the CPU computes in bf16,
and the benchmarks (bench/machine.py) record what they ran on. Torch-free, so it is cheap to import.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

# The flags that decide how fast this CPU trains and serves (Linux's names in /proc/cpuinfo).
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8")
# Either one means bf16 matmuls run natively (AMD Zen 4+, Intel Cooper Lake and Sapphire Rapids+), not emulated.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Cpu:
    """The CPU's model name and which of ``FLAGS`` it has."""

    model: str
    flags: frozenset[str] = frozenset()

    @property
    def bf16(self) -> bool:
        """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16)."""
        return bool(self.flags & BF16_FLAGS)


def parse_cpuinfo(text: str) -> Cpu:
    """The first processor's model name and flags in /proc/cpuinfo's text (x86 Linux writes both per processor)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor() or platform.machine()
    return Cpu(model=model, flags=frozenset(fields.get("flags", "").split()) & frozenset(FLAGS))


@functools.cache
def cpu() -> Cpu:
    """This machine's CPU; without /proc/cpuinfo (macOS, Windows) the platform's name and no flags."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        text = ""
    return parse_cpuinfo(text)
