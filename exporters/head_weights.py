"""int8 exports keep the head's activations in float but store its weights compressed.

The head (linear, or linear-ReLU-linear) is left out of activation quantization: a sliver of the
compute, and int8 logits would round near-ties. Its weights in float32, though, were a fifth of an
int8 file with the MLP head (1280 x 256: 1.3 MB of 6.1), which put the file at 0.34x the fp32 ONNX.
So the hidden layers' weights (the MLP's first layer, the prior head's ImageNet classifier) are
stored in int8 with one scale per output row (symmetric, like the backbone's) and the logits
layers' (those whose output reaches a model output through additions only) in fp16, both turned
back to float32 in the graph: int8
there moved caltech50's logistic-regression logits enough to flip one more val image of 500 (0.4
-> 0.6 points, over the budget), fp16's 2^-11 relative rounding did not. Files are back under 0.3x.
"""

from __future__ import annotations

import numpy as np


def int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, scale float32) with w ~= q * scale[:, None]: one symmetric scale per row."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=1) / 127.0
    scale[scale == 0] = 1.0  # an all-zero row: any scale; q is 0
    q = np.clip(np.round(w / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


# Per head layout, the weights that write the logits (through additions only): fp16 in a compressed
# head; every other weight (the MLP's hidden layer, the prior head's ImageNet classifier) int8 rows.
LOGITS_WEIGHTS = {"linear": ("layers.1.weight",), "mlp": ("layers.4.weight",),
                  "prior": ("layers.1.weight", "prior_out.weight")}


def as_compressed(tensors: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """The head's tensors (state-dict names, weights (out, in)) as a compressed head computes them:
    what `learn` fits is rounded so, so that its numpy head and the rewritten int8 bundle agree
    exactly. Compressing the rounded weights again gives the same int8 rows and fp16 values."""
    out = dict(tensors)
    for name, w in tensors.items():
        if not name.endswith(".weight"):
            continue
        if name in LOGITS_WEIGHTS[kind]:
            out[name] = np.asarray(w, np.float32).astype(np.float16).astype(np.float32)
        else:
            q, scale = int8_rows(w)
            out[name] = q.astype(np.float32) * scale[:, None]
    return out


def _onnx_logits_layers(g) -> set[str]:
    """Names of the nodes whose output reaches a graph output through Add nodes only."""
    producer = {o: n for n in g.node for o in n.output}
    found, todo = set(), [o.name for o in g.output]
    while todo:
        node = producer.get(todo.pop())
        if node is None:
            continue
        if node.op_type in ("Gemm", "MatMul"):
            found.add(node.name or node.output[0])
        elif node.op_type == "Add":
            todo.extend(node.input)
    return found


def compress_onnx_head(model) -> int:
    """In place: the float weight of every Gemm / MatMul (the head's; the backbone's convs are QDQ
    already) becomes an int8 initializer + per-row DequantizeLinear, or, for a layer that writes
    the logits, an fp16 initializer + Cast. Returns how many were compressed."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    layers = [n for n in g.node if n.op_type in ("Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits
              and inits[n.input[1]].data_type == TensorProto.FLOAT and len(inits[n.input[1]].dims) == 2]
    logits_layers = _onnx_logits_layers(g)
    decode = []
    for node in layers:
        name = node.input[1]
        w = numpy_helper.to_array(inits[name])
        g.initializer.remove(inits[name])
        if (node.name or node.output[0]) in logits_layers:
            g.initializer.append(numpy_helper.from_array(w.astype(np.float16), f"{name}_fp16"))
            decode.append(helper.make_node("Cast", [f"{name}_fp16"], [name], name=f"{name}_Cast", to=TensorProto.FLOAT))
            continue
        # Rows are output channels: Gemm(transB=1) holds W as (out, in); MatMul and Gemm(transB=0) as (in, out).
        rows_out = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        q, scale = int8_rows(w if rows_out else w.T)
        g.initializer.extend([numpy_helper.from_array(q if rows_out else np.ascontiguousarray(q.T), f"{name}_int8"),
                              numpy_helper.from_array(scale, f"{name}_scale"),
                              numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero_point")])
        decode.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                       [name], name=f"{name}_DequantizeLinear", axis=0 if rows_out else 1))
    for i, node in enumerate(decode):  # inputs are initializers only: first in topological order
        g.node.insert(i, node)
    return len(layers)


def _openvino_logits_layers(model) -> set[str]:
    """Friendly names of the MatMuls whose output reaches a model result through Add ops only."""
    found, todo = set(), [r.input_value(0).get_node() for r in model.get_results()]
    while todo:
        node = todo.pop()
        if node.get_type_name() == "MatMul":
            found.add(node.get_friendly_name())
        elif node.get_type_name() == "Add":
            todo.extend(v.get_node() for v in node.input_values())
    return found


def openvino_int8_weight(q: np.ndarray, scale: np.ndarray, name: str):
    """Constant(int8 `q`) -> Convert -> Multiply(`scale`, broadcast over q's rows or channels): the
    weight decompression OpenVINO keeps in int8 in memory and folds into a float weight when it
    cannot run the layer on int8 weights."""
    import openvino.opset13 as ops

    return ops.multiply(ops.convert(ops.constant(q, name=f"{name}/int8"), "f32"), ops.constant(scale, name=f"{name}/scale"))


def compress_openvino_head(model) -> int:
    """In place: the float constant weight of every MatMul (the head's; the backbone's convolutions
    are quantized already) becomes Constant(int8) -> Convert -> Multiply(per-row scale), the weight
    decompression OpenVINO keeps in int8 in memory, or, for a layer that writes the logits,
    Constant(fp16) -> Convert. Returns how many were compressed."""
    import openvino.opset13 as ops

    layers = [op for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"
              and op.input_value(1).get_node().get_type_name() == "Constant"
              and op.input_value(1).get_node().get_element_type().is_real()
              and len(op.input_value(1).get_shape()) == 2]
    logits_layers = _openvino_logits_layers(model)
    for op in layers:
        source = op.input_value(1).get_node()
        w, name = source.get_data().astype(np.float32), source.get_friendly_name()
        if op.get_friendly_name() in logits_layers:
            weight = ops.convert(ops.constant(w.astype(np.float16), name=f"{name}/fp16"), "f32")
        else:
            transposed = op.get_attributes().get("transpose_b", False)  # (out, in) when transposed
            q, scale = int8_rows(w if transposed else w.T)
            if transposed:
                scale = scale.reshape(-1, 1)
            else:
                q, scale = np.ascontiguousarray(q.T), scale.reshape(1, -1)
            weight = openvino_int8_weight(q, scale, name)
        op.input(1).replace_source_output(weight.output(0))
    if any(op.get_friendly_name() not in logits_layers for op in layers):
        # OpenVINO's CPU plugin would otherwise quantize the activations of a MatMul with int8
        # weights on the fly (in groups of 32): the head would then compute in int8 after all.
        # Runtime options in the model's rt_info apply wherever the file is compiled.
        model.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    return len(layers)
