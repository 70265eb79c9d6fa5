"""The ONNX int8 serving bundle: export and quantize it; run it through the Lambda's own predictor."""

from __future__ import annotations

import functools
import importlib.util
import json
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers.optimizer import optimize_model
from transformers import PreTrainedModel, PreTrainedTokenizerFast

PREDICTOR_FILE = Path(__file__).resolve().parent.parent / "lambda" / "predictor.py"


@functools.cache
def _predictor_module() -> ModuleType:
    """``lambda/predictor.py``, the one implementation of bundle inference (``lambda`` cannot be imported by name).

    Loaded on first use, so that importing this module needs nothing outside ``steps/``.
    """
    spec = importlib.util.spec_from_file_location("agnews_lambda_predictor", PREDICTOR_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_bundle(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    labels: list[str],
    max_length: int,
    batch_size: int,
    out_dir: Path,
    opset: int,
) -> Path:
    """Write ``model.int8.onnx``, ``tokenizer.json`` and ``config.json`` into ``out_dir``."""
    predictor = _predictor_module()
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = tokenizer(
        ["an example headline", "a longer example headline for the exporter"], padding=True, return_tensors="pt"
    )
    model = model.eval()
    attention = model.config._attn_implementation
    with tempfile.TemporaryDirectory() as tmp:
        fp32, fused = Path(tmp) / "model.onnx", Path(tmp) / "model.fused.onnx"
        # The eager attention graph is the one that onnxruntime's transformer optimizer fuses into its Attention op.
        model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (sample["input_ids"], sample["attention_mask"]),
                    str(fp32),
                    input_names=list(predictor.INPUTS),
                    output_names=[predictor.OUTPUT],
                    dynamic_axes={name: {0: "batch", 1: "sequence"} for name in predictor.INPUTS}
                    | {predictor.OUTPUT: {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
        finally:
            model.set_attn_implementation(attention)
        # Fuse embeddings, attention, layer norms and GELU into onnxruntime's transformer kernels (opt_level 0: these
        # fusions alone, so the graph names no operator domain beyond com.microsoft and runs on older runtimes too),
        # then quantize the fused graph, which runs faster on a CPU than the quantized plain export.
        optimize_model(
            str(fp32),
            model_type="bert",
            num_heads=model.config.num_attention_heads,
            hidden_size=model.config.hidden_size,
            opt_level=0,
        ).save_model_to_file(str(fused))
        # Shape inference gives the fused (com.microsoft) operators' outputs no type; they are float.
        quantize_dynamic(
            fused,
            out_dir / predictor.ONNX_FILE,
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    tokenizer.backend_tokenizer.save(str(out_dir / predictor.TOKENIZER_FILE))
    config = {
        "labels": list(labels),
        "max_length": max_length,
        "batch_size": batch_size,
        "pad_token": tokenizer.pad_token,
    }
    (out_dir / predictor.CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


def onnx_logits(bundle: Path, texts: list[str]) -> np.ndarray:
    """Logits of the bundle's int8 model for ``texts``, computed exactly as the Lambda computes them."""
    return _predictor_module().Predictor(bundle).logits(texts)
