"""Training precision and the other Trainer settings that depend on the device, resolved from the device's facts.

``resolve`` is pure: it takes the requested settings (``train.precision``, ``train.tf32``,
``train.dataloader_workers``, ``train.pad_to_multiple_of``, whose types and names the config's schema checks:
agnews/settings.py) and a ``Device`` and returns the TrainingArguments keywords, so every branch runs in a test on
any machine. ``detect`` reads the facts (torch for CUDA, /proc/cpuinfo
through agnews/hardware.py for the CPU); ``for_config`` does both, once per run.

- ``auto``: bf16 where the device computes in bf16 (a card of the Ampere generation and newer; a CPU with
  AVX512-BF16 or AMX-BF16), else fp16 with loss scaling on CUDA and fp32 on a CPU. ``bf16`` and ``fp16`` are mixed
  precision (autocast; the weights stay float32, and the serving bundle is exported from a float32 copy).
- An explicit ``bf16`` or ``fp16`` that the device cannot run is a ``ConfigError``, not a silent fallback: ``fp16``
  on a CPU, and ``bf16`` on a card or a CPU without bf16.
- CUDA: TF32 matmuls on Ampere and newer (unless ``train.tf32=false``), pinned memory, DataLoader workers (kept
  alive across epochs), and batches padded to a multiple of 8. CPU: no pinning, no workers, no extra padding; bf16
  there is the Trainer's ``bf16`` with ``use_cpu`` (accelerate's ``torch.autocast("cpu", torch.bfloat16)``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from agnews import hardware
from agnews.errors import ConfigError
from agnews.names import DEVICE_TAG, PRECISION_TAG
from agnews.settings import TrainSettings

# What `train.pad_to_multiple_of: auto` pads to on CUDA: the tensor-core tile for half precision, and at most
# max_length / 8 distinct sequence lengths instead of one per length.
CUDA_PAD_MULTIPLE = 8


@dataclass(frozen=True)
class Device:
    """The facts about the training device that the settings depend on."""

    cuda: bool
    name: str  # the card's or the CPU's model name
    bf16: bool = False  # the card or CPU computes in bf16 natively (not emulated)
    tf32: bool = False  # the card has TF32 matmuls: CUDA compute capability 8.0 (Ampere) and newer
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability


@dataclass(frozen=True)
class Resolved:
    """The precision the run trains in, the padding multiple for the collator, and the TrainingArguments keywords."""

    precision: str
    device: Device
    pad_to_multiple_of: int | None
    trainer_kwargs: dict[str, Any]

    def tags(self) -> dict[str, str]:
        """What the train run records: the resolved precision and the device's name."""
        return {PRECISION_TAG: self.precision, DEVICE_TAG: self.device.name}


def detect() -> Device:
    """CUDA device 0, or the CPU where there is none or ``ACCELERATE_USE_CPU`` is set (as the Trainer does)."""
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes", "on")
    if use_cpu or not torch.cuda.is_available():
        cpu = hardware.cpu()
        return Device(cuda=False, name=cpu.model, bf16=cpu.bf16)
    capability = torch.cuda.get_device_capability(0)
    return Device(
        cuda=True,
        name=torch.cuda.get_device_name(0),
        bf16=torch.cuda.is_bf16_supported(including_emulation=False),
        tf32=torch.version.cuda is not None and capability >= (8, 0),  # not on ROCm, whose capability differs
        capability=capability,
    )


def _pad_multiple(setting: int | str | None, device: Device) -> int | None:
    if setting == "auto":
        return CUDA_PAD_MULTIPLE if device.cuda else None
    return setting if isinstance(setting, int) and setting > 0 else None  # 0 or null: no padding


def _resolve_cpu(requested: str, device: Device, pad: int | None) -> Resolved:
    if requested == "fp16":
        raise ConfigError(
            f"train.precision=fp16 needs a CUDA GPU, and this run trains on the CPU ({device.name}): use auto or fp32"
        )
    if requested == "bf16" and not device.bf16:
        raise ConfigError(
            f"train.precision=bf16: the CPU ({device.name}) has neither AVX512-BF16 nor AMX-BF16: "
            "use auto (fp32 there) or fp32"
        )
    precision = "bf16" if requested != "fp32" and device.bf16 else "fp32"
    # No pinning: pinned memory only helps copies to an accelerator (torch warns on every run without one).
    kwargs: dict[str, Any] = {"dataloader_pin_memory": False, "dataloader_num_workers": 0}
    if precision == "bf16":
        kwargs |= {"bf16": True, "use_cpu": True}  # the Trainer's bf16 on a CPU needs use_cpu
    return Resolved(precision, device, pad, kwargs)


def resolve(
    requested: str,
    device: Device,
    *,
    tf32: bool = True,
    workers: int = 4,
    pad_to_multiple_of: int | str | None = "auto",
) -> Resolved:
    """The settings for ``device``; raises ConfigError for a precision the device cannot run."""
    pad = _pad_multiple(pad_to_multiple_of, device)
    if not device.cuda:
        return _resolve_cpu(requested, device, pad)
    if requested == "bf16" and not device.bf16:
        raise ConfigError(
            f"train.precision=bf16: {device.name} (compute capability {device.capability[0]}.{device.capability[1]})"
            " does not support bf16: use fp16 or auto (fp16 there)"
        )
    precision = ("bf16" if device.bf16 else "fp16") if requested == "auto" else requested
    kwargs = {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "tf32": tf32 and device.tf32,
        "dataloader_pin_memory": True,
        "dataloader_num_workers": workers,
        "dataloader_persistent_workers": workers > 0,
    }
    return Resolved(precision, device, pad, kwargs)


def for_config(t: TrainSettings, device: Device | None = None) -> Resolved:
    """``resolve`` for the ``train`` config group on this machine's device (or ``device``)."""
    return resolve(
        t.precision,
        device or detect(),
        tf32=t.tf32,
        workers=t.dataloader_workers,
        pad_to_multiple_of=t.pad_to_multiple_of,
    )
