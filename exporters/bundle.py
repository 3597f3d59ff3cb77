"""The bundle: manifest.json beside the model, and the same facts embedded in the model itself.

A robot needs only the bundle folder: the manifest says which runtime runs the model, what goes
in (size, layout, range, colour, preprocessing) and what comes out (labels). The model file
carries the same keys (ONNX metadata_props, OpenVINO rt_info under "edgetune") so a model copied
on its own still says what it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit import __version__, atomic
from toolkit.convert import save_ir
from toolkit.runtime import MANIFEST
from toolkit.train import preprocessing_record

# Training metrics worth carrying into the export (the rest stays in the run).
_METRIC_KEYS = ("val_accuracy", "val_loss", "best_epoch", "epochs_run", "n_train", "n_val", "per_class_accuracy")


def make_manifest(run, exporter, model_file: str, *, parity: dict[str, Any], static_batch: int | None,
                  extra_files: list[str] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    cfg, spec, metrics = run.config, run.spec, run.metrics
    return {
        "format": exporter.name,
        "runtime": exporter.runtime,
        "precision": exporter.effective_precision,
        "model": model_file,
        "files": sorted({model_file, *(extra_files or [])}),
        "labels": run.labels,
        "input": {"name": "image", "size": spec.input_size, "layout": "NCHW", "dtype": "float32",
                  "range": "0-255", "color": "RGB", "batch": static_batch},
        "outputs": ["logits", "probabilities"],
        # Always the current rule (what predict and the Predictor apply), not the run's old record.
        "preprocessing": preprocessing_record(spec),
        "backbone": cfg.get("backbone", spec.to_json()),
        "head": cfg["train"]["head"],
        "source_run": str(Path(run.path).resolve()),
        "edgetune_version": __version__,
        "training_metrics": {k: metrics[k] for k in _METRIC_KEYS if k in metrics},
        "export_parity": parity,
        **(extra or {}),
    }


def flat_metadata(manifest: dict[str, Any]) -> dict[str, str]:
    """The manifest as string key/values (what ONNX metadata_props and rt_info hold)."""
    return {k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in manifest.items()
            if k not in ("files",)}


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    atomic.write_json(Path(out_dir) / MANIFEST, manifest)


def embed_onnx(model_path: Path, manifest: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({f"edgetune.{k}": v for k, v in flat_metadata(manifest).items()})
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    atomic.write_bytes(model_path, model.SerializeToString())


def embed_openvino(xml_path: Path, manifest: dict[str, Any]) -> None:
    import openvino as ov

    xml_path = Path(xml_path)
    model = ov.Core().read_model(str(xml_path))
    for key, value in flat_metadata(manifest).items():
        model.set_rt_info(value, ["edgetune", key])
    save_ir(model, xml_path)


def read_embedded(model_path: Path) -> dict[str, str]:
    """The edgetune keys embedded in an ONNX model or OpenVINO IR (for tests and `benchmark`)."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        import onnx

        model = onnx.load(str(model_path), load_external_data=False)
        return {p.key[len("edgetune."):]: p.value for p in model.metadata_props if p.key.startswith("edgetune.")}
    import openvino as ov

    model = ov.Core().read_model(str(model_path))
    if not model.has_rt_info(["edgetune"]):
        return {}
    keys = model.get_rt_info(["edgetune"]).astype(dict)
    return {k: model.get_rt_info(["edgetune", k]).astype(str) for k in keys}
