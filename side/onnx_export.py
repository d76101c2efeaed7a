"""A classifier folder as one ONNX file, for serving without torch (ONNX Runtime, Triton): scripts/export_onnx.py writes
it, bench.py --ort times it. Written from our own model, so every head exports (cls, mean, max, label attention, with
or without a layer mix).

GraphLogits   what the graph computes: predict.py's logits (calibration temperature included) from the tokenizer's
    tensors
input_names / refusal   the graph's inputs (token_type_ids for BERT only), and what a graph cannot hold
export_onnx / quantize_int8 / ort_session   the fp32 file, its dynamic int8 copy, and a session on the CPU

torch.onnx.export (the TorchScript exporter, opset 17) and onnxruntime's quantizer are dev dependencies: imported
where used, never by the labelling path.
"""
import logging
import warnings

import torch
import torch.nn as nn

from side.calibrate import KEY  # the calibration temperature in config.json
from side.hf import BertConfig

OPSET = 17


class GraphLogits(nn.Module):
    """The folder's logits, divided by its calibration temperature as predict.py divides them: the model's own pool
    (encode, its LayerMix if it has one, pool_tokens) and head, padded, with batch and length dynamic."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        temperature = model.config.hf.get(KEY, 1.0)
        self.register_buffer("temperature", torch.as_tensor(temperature, dtype=torch.float32), persistent=False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        m = self.model
        pooled = m.pool(input_ids, attention_mask, token_type_ids, None, None, None)
        return m.head(pooled) / self.temperature


def input_names(config):
    """The tokenizer's tensors the model reads: BERT has token types, ModernBERT has none."""
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if isinstance(config, BertConfig) else [])


def refusal(config):
    """Why the folder cannot be one graph of one row per text (None: it can)."""
    strategy = (config.long_document or {}).get("strategy", "head")
    if strategy.startswith("windows_"):
        return (f"this model reads a long document as overlapping windows ({strategy}) and combines their predictions; "
                "a graph of one sequence per text cannot hold that: label with predict.py, or retrain with --long-docs "
                "head, tail or head_tail")
    return None


def export_onnx(model, path):
    """The fp32 graph of model (an EncoderClassifier in eval mode, fp32, on the CPU) at path: inputs input_names,
    output logits [batch, labels], batch and length dynamic."""
    names = input_names(model.config)
    example = tuple(torch.ones(2, 8, dtype=torch.long) for _ in names)
    axes = {n: {0: "batch", 1: "length"} for n in names}
    axes["logits"] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python ints taken from shapes (the length checks)
        torch.onnx.export(GraphLogits(model).eval(), example, path, input_names=names, output_names=["logits"],
                          opset_version=OPSET, dynamo=False, dynamic_axes=axes)


def quantize_int8(fp32_path, int8_path):
    """ONNX Runtime's dynamic int8 quantization of the weights (per output channel, as predict.py --int8's)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice to pre-process the graph first
    quantize_dynamic(fp32_path, int8_path, per_channel=True, weight_type=QuantType.QInt8)


def ort_session(path, threads=0):
    """An ONNX Runtime session on the CPU (threads 0: its default)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
