"""Mixed-precision FP16 ONNX: float16 convolutions and matmuls, float32 where half precision breaks.

Kept in float32: the I/O (the runtime always feeds float32), the sinusoidal timestep embedding (sin/cos of t up to
T-1 = 999 need more than float16's 11-bit mantissa), every normalisation (the dynamo export's GroupNorm pattern
Reshape -> InstanceNormalization -> Reshape -> Mul -> Add, whose variance overflows), softmax and reductions.
TensorRT 11 is strongly typed only, so these precisions are what the engine will run.
"""

from __future__ import annotations

import warnings

import onnx
from onnx import TensorProto
from onnxconverter_common import float16

from runtime.errors import DDPMError

FP32_OPS = ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization", "Softmax",
            "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Pow", "Sqrt", "Exp",
            "Resize", "Range", "CumSum", "TopK"]


def _fp32_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of nodes to keep in float32 beyond FP32_OPS: the timestep embedding up to sin/cos, and the
    Reshape/Mul/Add around each InstanceNormalization that make up a GroupNorm."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: set[str] = set()

    def ancestors(node: onnx.NodeProto) -> None:
        if node.name in keep:
            return
        keep.add(node.name)
        for i in node.input:
            if i in producer:
                ancestors(producer[i])

    def follow(node: onnx.NodeProto, op_types: list[str]) -> None:
        for op in op_types:
            nxt = [c for c in consumers.get(node.output[0], []) if c.op_type == op]
            if len(nxt) != 1:
                return
            node = nxt[0]
            keep.add(node.name)

    for node in graph.node:
        if node.op_type in ("Sin", "Cos"):
            ancestors(node)
        elif node.op_type == "InstanceNormalization":
            keep.add(node.name)
            if node.input[0] in producer and producer[node.input[0]].op_type == "Reshape":
                keep.add(producer[node.input[0]].name)
            follow(node, ["Reshape", "Mul", "Add"])
    return sorted(keep)


def convert_to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of an FP32 graph with float32 inputs/outputs and the float32 islands described above."""
    if any(not n.name for n in model.graph.node):
        raise DDPMError("FP16 conversion needs named nodes; re-export the FP32 model with ddpm-export")
    if model.functions:
        raise DDPMError("FP16 conversion needs a graph without local functions; re-export with ddpm-export")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the converter edits its argument in place
    with warnings.catch_warnings():  # "number truncated to 1e-07" for every tiny weight: expected, not news
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(copy, keep_io_types=True, op_block_list=FP32_OPS,
                                                node_block_list=_fp32_nodes(model.graph))
    fp32_weights = {i.name: i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT}
    return _remove_round_trips(half, fp32_weights)


def _cast_to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


def _remove_round_trips(model: onnx.ModelProto, fp32_weights: dict[str, TensorProto]) -> onnx.ModelProto:
    """Undo the converter's lossy detours into float16 between float32 nodes.

    The converter casts every blocked node's output to float16 and back for the next blocked node, and stores
    weights of blocked nodes in float16 behind a Cast: the timestep embedding's sin(t * freq) with t near 999
    loses whole radians that way. A Cast to float32 of a float16 Cast's output reads the Cast's input instead; a
    Cast to float32 of a float16 weight becomes the original float32 weight. Dead nodes and weights are dropped.
    """
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    weights = {i.name: i for i in graph.initializer}
    keep_nodes, new_weights = [], []
    for node in graph.node:
        if node.op_type == "Cast" and _cast_to(node) == TensorProto.FLOAT:
            src = node.input[0]
            if src in weights and weights[src].data_type == TensorProto.FLOAT16 and src in fp32_weights:
                restored = TensorProto()
                restored.CopyFrom(fp32_weights[src])
                restored.name = node.output[0]
                new_weights.append(restored)
                continue
            inner = producer.get(src)
            if inner is not None and inner.op_type == "Cast" and _cast_to(inner) == TensorProto.FLOAT16:
                node.input[0] = inner.input[0]
        keep_nodes.append(node)
    graph.initializer.extend(new_weights)
    outputs = {o.name for o in graph.output}
    while True:  # drop nodes and weights nothing reads any more
        used = {i for n in keep_nodes for i in n.input} | outputs
        alive = [n for n in keep_nodes if any(o in used for o in n.output)]
        if len(alive) == len(keep_nodes):
            break
        keep_nodes = alive
    del graph.node[:]
    graph.node.extend(keep_nodes)
    unused = [i for i in graph.initializer if i.name not in used]
    for weight in unused:
        graph.initializer.remove(weight)
    used_values = used | {o for n in keep_nodes for o in n.output}
    stale = [v for v in graph.value_info if v.name not in used_values]
    for value in stale:
        graph.value_info.remove(value)
    return model
