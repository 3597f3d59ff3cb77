"""int8 exports keep the head's activations in float but store its weights in int8.

The head (linear, or linear-ReLU-linear) is left out of activation quantization: a sliver of the
compute, and int8 logits would round near-ties. Its weights in float, though, were a fifth of an
int8 file with the MLP head (1280 x 256 in fp32: 1.3 MB of 6.1), which put the file at 0.34x the
fp32 ONNX. Stored as int8 with one scale per output row (symmetric, like the backbone's weights)
and dequantized to float in the graph, they change a logit by at most ~0.4% of its row's largest
weight contribution, and the file is back under 0.3x. The parity check measures the result.
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


def onnx_int8_head(model) -> int:
    """Replace the float weight of every Gemm / MatMul (the head's; the backbone's convs are QDQ
    already) by an int8 initializer and a per-row DequantizeLinear, in place. Returns how many."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done, dq_nodes = 0, []
    for node in g.node:
        if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        if w.dtype != np.float32 or w.ndim != 2:
            continue
        # Rows are output channels: Gemm(transB=1) holds W as (out, in); MatMul and Gemm(transB=0) as (in, out).
        rows_out = node.op_type == "Gemm" and any(a.name == "transB" and a.i == 1 for a in node.attribute)
        q, scale = int8_rows(w if rows_out else w.T)
        if not rows_out:
            q = np.ascontiguousarray(q.T)
        name = node.input[1]
        g.initializer.remove(inits[name])
        g.initializer.extend([numpy_helper.from_array(q, f"{name}_int8"),
                              numpy_helper.from_array(scale, f"{name}_scale"),
                              numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{name}_zero_point")])
        dq_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                         [name], name=f"{name}_DequantizeLinear", axis=0 if rows_out else 1))
        done += 1
    for i, dq in enumerate(dq_nodes):  # initializer-only inputs: first in topological order is always right
        g.node.insert(i, dq)
    return done


def openvino_int8_head(model) -> int:
    """Replace the float constant weight of every MatMul (the head's; the backbone's convolutions
    are quantized already) by Constant(int8) -> Convert -> Multiply(per-row scale), the weight
    decompression pattern OpenVINO keeps in int8 in memory, in place. Returns how many."""
    import openvino.opset13 as ops

    done = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        source = op.input_value(1).get_node()
        if source.get_type_name() != "Constant" or not source.get_element_type().is_real():
            continue
        w = source.get_data().astype(np.float32)
        if w.ndim != 2:
            continue
        transposed = op.get_attributes().get("transpose_b", False)  # (out, in) when transposed
        q, scale = int8_rows(w if transposed else w.T)
        if not transposed:
            q, scale_shape = np.ascontiguousarray(q.T), (1, len(scale))
        else:
            scale_shape = (len(scale), 1)
        name = source.get_friendly_name()
        weight = ops.multiply(ops.convert(ops.constant(q, name=f"{name}/int8"), "f32"),
                              ops.constant(scale.reshape(scale_shape), name=f"{name}/scale"))
        op.input(1).replace_source_output(weight.output(0))
        done += 1
    if done:
        # OpenVINO's CPU plugin would otherwise quantize the activations of a MatMul with int8
        # weights on the fly (in groups of 32): the head would then compute in int8 after all.
        # Runtime options in the model's rt_info apply wherever the file is compiled.
        model.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
    return done
