"""Bundle model surgery, torch-free: the backbone's features out of an exported model, and the same
model with a new head.

Every exported classifier ends in the head: features (N, D) -> (x - feature_mean) * feature_inv_std
-> linear (or linear-ReLU-linear) -> "logits" -> softmax -> "probabilities". The features are the
input of that standardisation (ONNX: the Sub whose constant is `*feature_mean`; OpenVINO, which
folds the Sub into a Multiply-Add: the output of the last global-average ReduceMean). Cutting
there gives the bundle's own backbone, int8 or fp32, on its own runtime; replacing everything
after it gives the same backbone with a new head, so only the head's weights change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from toolkit.errors import EdgetuneError

FEATURES = "features"


# -- ONNX ------------------------------------------------------------------------------------------


def _onnx_feature_tensor(graph) -> str:
    inits = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Sub" and len(node.input) == 2 and node.input[1] in inits \
                and node.input[1].endswith("feature_mean"):
            return node.input[0]
    raise EdgetuneError("The ONNX model has no edgetune head (no feature standardisation): export it with "
                        "`edgetune export` to use it here.")


def _onnx_head_nodes(graph, feature: str) -> set[int]:
    """Indices of every node downstream of the feature tensor (the head, softmax included)."""
    reached, head = {feature}, set()
    for i, node in enumerate(graph.node):  # ONNX nodes are topologically sorted
        if any(x in reached for x in node.input):
            head.add(i)
            reached.update(node.output)
    return head


def _needed(nodes: list, outputs: set[str]) -> list:
    """The nodes that `outputs` depend on (the old head's int8 weight dequantization does not)."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]


def onnx_features_model(model_path: Path) -> bytes:
    """The ONNX model with its feature tensor as an extra output named "features"."""
    import onnx
    from onnx import helper

    model = onnx.load(str(model_path))
    feature = _onnx_feature_tensor(model.graph)
    model.graph.node.append(helper.make_node("Identity", [feature], [FEATURES], name="edgetune_features"))
    model.graph.output.append(helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def _attach_onnx_head(g, feature: str, tensors: dict[str, np.ndarray], kind: str) -> list:
    """Head nodes reading `feature` (standardise, linear, linear-ReLU-linear or linear + prior
    branch, softmax) with their weights as initializers of `g`; `g`'s outputs become "logits" and
    "probabilities"."""
    import onnx
    from onnx import helper, numpy_helper

    prefix = "edgetune.head."
    weights = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    nodes = [helper.make_node("Sub", [feature, prefix + "feature_mean"], ["head/centered"]),
             helper.make_node("Mul", ["head/centered", prefix + "feature_inv_std"], ["head/standardized"])]
    if kind == "linear":
        nodes.append(helper.make_node("Gemm", ["head/standardized", prefix + "layers.1.weight", prefix + "layers.1.bias"],
                                      ["logits"], transB=1))
    elif kind == "prior":
        nodes += [helper.make_node("Gemm", ["head/standardized", prefix + "layers.1.weight", prefix + "layers.1.bias"],
                                   ["head/feature_logits"], transB=1),
                  helper.make_node("Gemm", ["head/standardized", prefix + "prior.weight", prefix + "prior.bias"],
                                   ["head/prior_logits"], transB=1),
                  helper.make_node("Softmax", ["head/prior_logits"], ["head/prior"], axis=1),
                  helper.make_node("Gemm", ["head/prior", prefix + "prior_out.weight"], ["head/prior_votes"], transB=1),
                  helper.make_node("Add", ["head/feature_logits", "head/prior_votes"], ["logits"])]
    else:
        nodes += [helper.make_node("Gemm", ["head/standardized", prefix + "layers.1.weight", prefix + "layers.1.bias"],
                                   ["head/hidden"], transB=1),
                  helper.make_node("Relu", ["head/hidden"], ["head/hidden_relu"]),
                  helper.make_node("Gemm", ["head/hidden_relu", prefix + "layers.4.weight", prefix + "layers.4.bias"],
                                   ["logits"], transB=1)]
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1))
    g.initializer.extend([numpy_helper.from_array(v, prefix + k) for k, v in weights.items()])
    n_classes = int(weights["layers.4.bias" if kind == "mlp" else "layers.1.bias"].shape[0])
    batch = g.output[0].type.tensor_type.shape.dim[0]
    del g.output[:]
    for name in ("logits", "probabilities"):
        out = helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [None, n_classes])
        out.type.tensor_type.shape.dim[0].CopyFrom(batch)
        g.output.append(out)
    return nodes


def onnx_with_head(model_path: Path, out_path: Path, tensors: dict[str, np.ndarray], kind: str, *,
                   compress: bool = False) -> None:
    """Write the ONNX model with its head replaced by `tensors` (state-dict names, fp32); compress:
    its weights stored as an int8 export stores them (exporters.head_weights)."""
    import onnx

    model = onnx.load(str(model_path))
    g = model.graph
    feature = _onnx_feature_tensor(g)
    head = _onnx_head_nodes(g, feature)
    keep = _needed([n for i, n in enumerate(g.node) if i not in head], {feature})
    used = {x for n in keep for x in n.input}
    old_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(old_inits)
    nodes = _attach_onnx_head(g, feature, tensors, kind)
    del g.node[:]
    g.node.extend(keep + nodes)
    del g.value_info[:]  # stale shapes of the old head
    if compress:
        from exporters.head_weights import compress_onnx_head

        compress_onnx_head(model)
    onnx.checker.check_model(model)
    from toolkit import atomic

    atomic.write_bytes(out_path, model.SerializeToString())


def onnx_classifier(backbone_path: Path, tensors: dict[str, np.ndarray], kind: str, *, batch: int | None = None):
    """An onnx.ModelProto: the backbone ONNX (image -> features) followed by the head `tensors`,
    the graph torch.onnx writes for the whole classifier, built without torch. `batch` fixes the
    batch dimension (static-shape exports); None keeps the backbone's dynamic one."""
    import onnx

    model = onnx.load(str(backbone_path))
    g = model.graph
    if batch is not None:
        for v in (*g.input, *g.output):
            v.type.tensor_type.shape.dim[0].dim_value = batch
    # The backbone's output tensor is renamed: "features" is the name onnx_features_model gives
    # the extra output it adds to a bundle.
    old, feature = g.output[0].name, "backbone/features"
    for node in g.node:
        node.output[:] = [feature if o == old else o for o in node.output]
        node.input[:] = [feature if i == old else i for i in node.input]
    g.node.extend(_attach_onnx_head(g, feature, tensors, kind))
    del g.value_info[:]
    onnx.checker.check_model(model)
    return model


# -- OpenVINO ----------------------------------------------------------------------------------------


def _ov_feature_output(model, feature_dim: int):
    pools = [op for op in model.get_ordered_ops() if op.get_type_name() == "ReduceMean"]
    for op in reversed(pools):
        shape = op.output(0).get_partial_shape()
        if shape.rank.is_static and shape.rank.get_length() == 2 and shape[1].is_static \
                and shape[1].get_length() == feature_dim:
            return op.output(0)
    raise EdgetuneError(f"The OpenVINO model has no global-pool output of {feature_dim} features: export it with "
                        "`edgetune export` to use it here.")


def openvino_features_model(model_path: Path, feature_dim: int):
    import openvino as ov

    model = ov.Core().read_model(str(model_path))
    model.add_outputs([_ov_feature_output(model, feature_dim)])
    model.outputs[-1].get_tensor().set_names({FEATURES})
    return model


def openvino_with_head(model_path: Path, out_xml: Path, tensors: dict[str, np.ndarray], kind: str,
                       feature_dim: int, *, compress: bool = False) -> None:
    """Write the IR with its head replaced (head constants fp32, or with compress as an int8 export
    stores them: exporters.head_weights; the backbone's stay as they are)."""
    import openvino as ov

    from toolkit.convert import save_ir

    model = ov.Core().read_model(str(model_path))
    classifier = openvino_classifier(model, _ov_feature_output(model, feature_dim), tensors, kind)
    if compress:
        from exporters.head_weights import compress_openvino_head

        compress_openvino_head(classifier)
    save_ir(classifier, out_xml)


def openvino_classifier(model, features, tensors: dict[str, np.ndarray], kind: str):
    """An openvino.Model: `model`'s inputs, its `features` output (N, D) through the head built
    from `tensors` (state-dict names; constants fp32), outputs "logits" and "probabilities"."""
    import openvino as ov
    import openvino.opset13 as ops

    def const(name: str):
        return ops.constant(np.ascontiguousarray(tensors[name], np.float32), name=f"edgetune.head.{name}")

    standardized = ops.multiply(ops.subtract(features, const("feature_mean")), const("feature_inv_std"))
    x = ops.add(ops.matmul(standardized, const("layers.1.weight"), False, True), const("layers.1.bias"))
    if kind == "mlp":
        x = ops.add(ops.matmul(ops.relu(x), const("layers.4.weight"), False, True), const("layers.4.bias"))
    elif kind == "prior":
        prior = ops.softmax(ops.add(ops.matmul(standardized, const("prior.weight"), False, True), const("prior.bias")), 1)
        x = ops.add(x, ops.matmul(prior, const("prior_out.weight"), False, True))
    logits = x.output(0)
    probs = ops.softmax(logits, 1).output(0)
    logits.get_tensor().set_names({"logits"})
    probs.get_tensor().set_names({"probabilities"})
    return ov.Model([ops.result(logits), ops.result(probs)], model.get_parameters(), "edgetune_classifier")


# -- both --------------------------------------------------------------------------------------------


def feature_runner(model_path: Path, runtime: str, *, device: str = "CPU", feature_dim: int,
                   batch: int | None = None, with_logits: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """float32 NCHW 0-255 -> (N, D) features from the bundle's own backbone on its own runtime;
    with_logits: (N, D + C), the model's own logits after the features, from the same pass."""
    if runtime == "onnxruntime":
        from devices.ort_probe import import_onnxruntime

        ort = import_onnxruntime()

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(onnx_features_model(model_path), opts, providers=[device])
        name = session.get_inputs()[0].name
        outputs = [FEATURES, "logits"] if with_logits else [FEATURES]
        return lambda x: np.concatenate(session.run(outputs, {name: x}), axis=1)
    if runtime == "openvino":
        from devices.openvino_compile import compile_model
        from toolkit.runtime import PipelinedInfer

        model = openvino_features_model(model_path, feature_dim)
        compiled = compile_model(model, device, batch=batch, exact=True)  # f32: verification compares in f32
        outputs = [compiled.output(FEATURES)] + ([compiled.output("logits")] if with_logits else [])
        return PipelinedInfer(compiled, static_batch=batch, outputs=outputs)
    raise EdgetuneError(f"No feature extraction for runtime '{runtime}'.")
