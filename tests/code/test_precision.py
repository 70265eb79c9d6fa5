"""train.precision and the device-dependent Trainer settings: the pure resolution for every kind of device, and on
this CPU the Trainer, collator and tags that a real run gets."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback, TrainingArguments

from agnews import hardware, precision
from agnews.config import PROJECT_ROOT, compose
from agnews.errors import ConfigError
from agnews.precision import CUDA_PAD_MULTIPLE, Device, detect, for_config, resolve
from agnews.tracking import step_run
from agnews.trainer import training_args
from agnews.training import train
from agnews.upload import upload

CPU = Device(cuda=False, name="Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz")  # AVX2, no AVX-512: bf16 is emulated
ZEN4 = Device(cuda=False, name="AMD EPYC 9R14 96-Core Processor", bf16=True)  # AVX512-BF16
SAPPHIRE_RAPIDS = Device(cuda=False, name="Intel(R) Xeon(R) Platinum 8488C", bf16=True)  # AMX-BF16
H100 = Device(cuda=True, name="NVIDIA H100 80GB HBM3", bf16=True, tf32=True, capability=(9, 0))
A100 = Device(cuda=True, name="NVIDIA A100-SXM4-40GB", bf16=True, tf32=True, capability=(8, 0))
T4 = Device(cuda=True, name="Tesla T4", capability=(7, 5))
V100 = Device(cuda=True, name="Tesla V100-SXM2-16GB", capability=(7, 0))
MI300 = Device(cuda=True, name="AMD Instinct MI300X", bf16=True, capability=(9, 4))  # ROCm: bf16, no TF32


@pytest.mark.parametrize(
    ("requested", "device", "precision", "tf32"),
    [
        ("auto", H100, "bf16", True),
        ("auto", A100, "bf16", True),
        ("auto", T4, "fp16", False),
        ("auto", V100, "fp16", False),
        ("auto", MI300, "bf16", False),
        ("bf16", H100, "bf16", True),
        ("fp16", H100, "fp16", True),
        ("fp16", T4, "fp16", False),
        ("fp32", H100, "fp32", True),
        ("fp32", T4, "fp32", False),
    ],
)
def test_cuda_resolution(requested: str, device: Device, precision: str, tf32: bool) -> None:
    resolved = resolve(requested, device, workers=3)
    assert resolved.precision == precision
    assert resolved.trainer_kwargs == {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",  # the Trainer's fp16 is mixed precision with a loss scaler
        "tf32": tf32,
        "dataloader_pin_memory": True,
        "dataloader_num_workers": 3,
        "dataloader_persistent_workers": True,
    }
    assert resolved.pad_to_multiple_of == CUDA_PAD_MULTIPLE
    assert resolved.tags() == {"precision": precision, "device": device.name}


@pytest.mark.parametrize(
    ("requested", "device", "precision"),
    [
        ("auto", CPU, "fp32"),
        ("fp32", CPU, "fp32"),
        ("auto", ZEN4, "bf16"),
        ("auto", SAPPHIRE_RAPIDS, "bf16"),
        ("bf16", ZEN4, "bf16"),
        ("fp32", SAPPHIRE_RAPIDS, "fp32"),
    ],
)
def test_cpu_trains_in_bf16_where_it_computes_in_it_without_pinning_workers_or_extra_padding(
    requested: str, device: Device, precision: str
) -> None:
    resolved = resolve(requested, device, workers=4)
    assert resolved.precision == precision
    # The Trainer's bf16 on a CPU is accelerate's torch.autocast("cpu", torch.bfloat16), and needs use_cpu.
    bf16 = {"bf16": True, "use_cpu": True} if precision == "bf16" else {}
    assert resolved.trainer_kwargs == {"dataloader_pin_memory": False, "dataloader_num_workers": 0, **bf16}
    assert resolved.pad_to_multiple_of is None
    assert resolved.tags() == {"precision": precision, "device": device.name}


@pytest.mark.parametrize(
    ("requested", "device", "message"),
    [
        ("bf16", CPU, "the CPU (Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz) has neither AVX512-BF16 nor AMX-BF16"),
        ("fp16", CPU, "train.precision=fp16 needs a CUDA GPU"),
        ("fp16", SAPPHIRE_RAPIDS, "train.precision=fp16 needs a CUDA GPU"),
        ("bf16", T4, "Tesla T4 (compute capability 7.5) does not support bf16"),
        ("bf16", V100, "use fp16 or auto"),
    ],
)
def test_a_precision_the_device_cannot_run_is_a_config_error(requested: str, device: Device, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(requested, device)


def test_tf32_can_be_turned_off_and_workers_zero_keeps_none_alive() -> None:
    kwargs = resolve("fp32", H100, tf32=False, workers=0).trainer_kwargs
    assert kwargs["tf32"] is False
    assert kwargs["dataloader_num_workers"] == 0 and kwargs["dataloader_persistent_workers"] is False


@pytest.mark.parametrize(
    ("setting", "device", "multiple"),
    [("auto", H100, 8), ("auto", CPU, None), (64, CPU, 64), (64, H100, 64), (None, H100, None), (0, H100, None)],
)
def test_pad_to_multiple_of(setting: object, device: Device, multiple: int | None) -> None:
    assert resolve("auto", device, pad_to_multiple_of=setting).pad_to_multiple_of == multiple


def test_cuda_keywords_are_training_arguments() -> None:
    """Every keyword that a CUDA run passes is a TrainingArguments field (a typo would fail only on a GPU)."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    for device in (H100, T4):
        assert set(resolve("auto", device).trainer_kwargs) <= fields


def test_config_defaults_and_the_seed_recipe() -> None:
    default = compose([]).train
    assert (default.precision, default.tf32, default.dataloader_workers, default.pad_to_multiple_of) == (
        "auto",
        True,
        4,
        "auto",
    )
    assert for_config(default, H100).precision == "bf16"
    # the seed's recipe trains as the seed did on any card: plain fp32, no TF32, no workers
    seed = for_config(compose(["train=seed_recipe"]).train, H100)
    assert seed.precision == "fp32"
    assert seed.trainer_kwargs["tf32"] is False and seed.trainer_kwargs["dataloader_num_workers"] == 0


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse2 {flags}

processor\t: 1
model name\t: {model}
flags\t\t: fpu sse2 {flags}
"""


@pytest.mark.parametrize(
    ("model", "flags", "bf16"),
    [
        ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "avx avx2 fma", False),
        ("Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "avx2 avx512f avx512_vnni", False),  # Cascade Lake
        ("AMD EPYC 9R14 96-Core Processor", "avx2 avx512f avx512_vnni avx512_bf16", True),  # Zen 4
        ("Intel(R) Xeon(R) Platinum 8488C", "avx2 avx512f amx_bf16 amx_tile amx_int8", True),  # Sapphire Rapids
    ],
)
def test_the_cpu_is_read_from_cpuinfo(model: str, flags: str, bf16: bool) -> None:
    cpu = hardware.parse_cpuinfo(CPUINFO.format(vendor="GenuineIntel", model=model, flags=flags))
    assert cpu.model == model and cpu.bf16 is bf16
    assert cpu.flags == set(flags.split()) - {"avx", "fma"}  # only the flags that matter are kept


def test_a_benchmark_records_the_cpu_it_ran_on() -> None:
    """bench/machine.py, which every bench/ result embeds: the CPU read as training reads it, and the torch build."""
    done = subprocess.run(
        [sys.executable, "bench/machine.py"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    machine = json.loads(done.stdout)
    cpu = hardware.cpu()
    assert machine["cpu"] == cpu.model and machine["cpu_bf16"] == cpu.bf16 == detect().bf16
    assert machine["cpu_flags"] == {flag: flag in cpu.flags for flag in hardware.FLAGS}
    assert machine["torch"] == torch.__version__ and machine["torch_cpu_capability"]
    assert 1 <= len(machine["cpus_usable"]) <= machine["cpu_count"] and len(machine["load_avg"]) == 3


def test_this_machine_is_detected_as_it_is() -> None:
    device = detect()
    assert device.cuda == torch.cuda.is_available()
    if not device.cuda:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        assert device.bf16 == bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))
        assert device.name in Path("/proc/cpuinfo").read_text()


def test_training_args_on_this_machine(tmp_path: Path) -> None:
    """The real TrainingArguments that a run here gets (on a CPU: bf16 where it computes in it, else fp32; no
    pinning, no workers)."""
    cfg = compose(["model=tiny"])
    resolved = for_config(cfg.train)
    args = training_args(cfg.train, cfg.seed, tmp_path, resolved)
    for key, value in resolved.trainer_kwargs.items():
        assert getattr(args, key) == value, key
    assert args.bf16 == (resolved.precision == "bf16") and args.fp16 == (resolved.precision == "fp16")


class Batches(TrainerCallback):
    """Keeps the sequence lengths of the training batches (drawn from the Trainer's own DataLoader), the args, and
    the dtypes that the model's output layer computes in during training."""

    def on_train_begin(self, args, state, control, train_dataloader=None, model=None, **kwargs):
        self.args = args
        self.lengths = [batch["input_ids"].shape[1] for batch in train_dataloader]
        self.dtypes: set[torch.dtype] = set()
        self.handle = model.classifier.register_forward_hook(lambda _, __, output: self.dtypes.add(output.dtype))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.handle.remove()
        self.weights = {parameter.dtype for parameter in model.parameters()}


@pytest.mark.integration
def test_a_run_resolves_once_records_its_precision_and_device_pads_as_asked_and_does_not_pin_on_a_cpu(
    make_cfg, agnews_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(
        f"data.source={agnews_dir}",
        "preset=test",
        "train.pad_to_multiple_of=8",
    )
    upload(cfg.data, cfg.storage)
    batches = Batches()
    detections: list[Device] = []

    def counted() -> Device:  # the real detect, counted: a run resolves its precision once and passes it down
        detections.append(detect())
        return detections[-1]

    monkeypatch.setattr(precision, "detect", counted)
    with warnings.catch_warnings(record=True) as caught, step_run(cfg, "train") as run:
        warnings.simplefilter("always")
        train(cfg, callbacks=[batches])
    assert len(detections) == 1
    resolved = for_config(cfg.train, detections[0])
    tags = MlflowClient(cfg.tracking.uri).get_run(run.info.run_id).data.tags
    assert {key: tags[key] for key in ("precision", "device")} == resolved.tags()
    assert len(batches.lengths) == 7 and all(length % 8 == 0 for length in batches.lengths), batches.lengths
    assert batches.args.dataloader_pin_memory == resolved.trainer_kwargs["dataloader_pin_memory"]
    # On a CPU with AVX512-BF16 or AMX-BF16 (as where this suite is developed) the Trainer computes in bf16 under
    # autocast, while the weights, which the serving bundle is exported from, stay float32.
    assert batches.dtypes == {torch.bfloat16 if resolved.precision == "bf16" else torch.float32}
    assert batches.weights == {torch.float32}
    if not resolved.device.cuda:
        assert not [w for w in caught if "pin_memory" in str(w.message)]
