"""TensorRT readiness without TensorRT: are all ops of a graph parsable by TensorRT's ONNX parser, and is only the
batch dimension dynamic? Lets a CPU-only export host catch what would otherwise fail later on the GPU host.
"""

from __future__ import annotations

from typing import Any

import onnx

from ddpm_export.onnx_io import BATCH_DIM, default_opset

# The operators marked "Y" (supported) in onnx-tensorrt's docs/operators.md for TensorRT 10.0
# (https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md, commit 96e7811 of 2024-06-17), which
# supports opsets 9 to 20 of the default ONNX domain. Per-type restrictions in that table are not checked here.
TRT_ONNX_OPS = frozenset((
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh", "AveragePool",
    "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant", "ConstantOfShape",
    "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DeformConv", "DepthToSpace", "DequantizeLinear", "Div",
    "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather",
    "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "Greater",
    "GreaterOrEqual", "GridSample", "GroupNormalization", "HardSigmoid", "HardSwish", "Hardmax", "Identity", "If",
    "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu",
    "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LpPool", "MatMul", "Max", "MaxPool",
    "Mean", "MeanVarianceNormalization", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero", "Not",
    "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QuantizeLinear", "RNN", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum",
    "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "Round", "ScaledTanh", "Scan",
    "Scatter", "ScatterElements", "ScatterND", "Selu", "Shape", "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size",
    "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan",
    "Tanh", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"
))
TRT_OPSET_RANGE = (9, 20)


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def tensorrt_readiness(model: onnx.ModelProto) -> dict[str, Any]:
    """Unsupported ops, the opset, and any dynamic dimension other than the batch, for validation.json."""
    used = {(n.domain or "ai.onnx", n.op_type) for n in model.graph.node}
    unsupported = sorted(f"{d}::{op}" if d != "ai.onnx" else op for d, op in used
                         if d != "ai.onnx" or op not in TRT_ONNX_OPS)
    opset = default_opset(model)
    other_dynamic = {v.name: _dims(v) for v in list(model.graph.input) + list(model.graph.output)
                     if any(isinstance(d, str) or d == 0 for d in _dims(v)[1:]) or _dims(v)[:1] != [BATCH_DIM]}
    opset_ok = opset is not None and TRT_OPSET_RANGE[0] <= opset <= TRT_OPSET_RANGE[1]
    return {
        "ready": not unsupported and not other_dynamic and opset_ok,
        "op_types": sorted(op for _, op in used),
        "unsupported_ops": unsupported,
        "opset": opset,
        "opset_supported": opset_ok,
        "non_batch_dynamic_io": other_dynamic,
        "reference": "onnx-tensorrt docs/operators.md, TensorRT 10.0",
    }
