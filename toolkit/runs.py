"""The run directory: everything a training run produced, and all a later step needs from it.

    config.json        resolved training config, backbone spec, device plan, preprocessing
    labels.json        class names, index = model output
    model.safetensors  best weights: head.* (and backbone.* when the tail was unfrozen)
    metrics.json       val_accuracy, val_loss, best_epoch, train_seconds, images_skipped, ...
    history.csv        one row per epoch
    split.json         every training and validation file (path, sha1): evaluate never scores training images
    report.png         learning curves + confusion matrix
    state/             resume state: features cache, last checkpoint, progress

Every file is written atomically, so an interrupted run is either resumable or untouched.
"""

from __future__ import annotations

import csv
import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import atomic
from toolkit.backbones import BackboneSpec, get_spec
from toolkit.errors import RunDirError

MODEL_FILE = "model.safetensors"


class RunDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- creation and validation -------------------------------------------------------------
    @classmethod
    def open(cls, path: Path, *, require_model: bool = True) -> "RunDir":
        """Open an existing run; a missing or half-written one raises a RunDirError saying what to do."""
        run = cls(path)
        if not (run.path / "config.json").is_file():
            if (run.path / "manifest.json").is_file():  # an export bundle given where a run is needed
                raise RunDirError(f"{run.path} is an export bundle, not a run: pass the run it was exported from "
                                  "(its manifest.json names it: source_run).")
            raise RunDirError(
                f"{run.path} is not an edgetune run (no config.json): "
                f"train one with `edgetune train DATA --out {run.path}`."
            )
        if require_model and not (run.path / MODEL_FILE).is_file():
            raise RunDirError(
                f"{run.path} has no {MODEL_FILE}: training did not finish. "
                f"Resume it with `edgetune train --resume {run.path}`."
            )
        return run

    def write_config(self, config: dict[str, Any]) -> None:
        atomic.write_json(self.path / "config.json", config)

    def write_labels(self, labels: list[str]) -> None:
        atomic.write_json(self.path / "labels.json", labels)

    # -- reading -------------------------------------------------------------------------------
    def _json(self, name: str) -> Any:
        try:
            return json.loads((self.path / name).read_text())
        except FileNotFoundError:
            raise RunDirError(f"{self.path / name} is missing: the run is incomplete; retrain it.") from None
        except json.JSONDecodeError as e:
            raise RunDirError(f"{self.path / name} is corrupt ({e.msg}): retrain the run.") from None

    @property
    def config(self) -> dict[str, Any]:
        return self._json("config.json")

    @property
    def labels(self) -> list[str]:
        return self._json("labels.json")

    @property
    def metrics(self) -> dict[str, Any]:
        return self._json("metrics.json")

    @property
    def spec(self) -> BackboneSpec:
        return get_spec(self.config["train"]["backbone"])

    @contextmanager
    def _reading_model(self):
        try:
            yield str(self.path / MODEL_FILE)
        except Exception as e:  # safetensors raises its own error types for truncated files
            raise RunDirError(f"{self.path / MODEL_FILE} cannot be read ({e}): retrain the run.") from None

    def model_state(self) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        with self._reading_model() as path:
            return load_file(path)

    def model_keys(self) -> list[str]:
        """Tensor names of model.safetensors from its header alone (no tensor is read)."""
        from safetensors import safe_open

        with self._reading_model() as path, safe_open(path, framework="np") as f:
            return list(f.keys())

    # -- writing results -----------------------------------------------------------------------
    def write_model(self, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        write_safetensors(self.path / MODEL_FILE, tensors, metadata)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        atomic.write_json(self.path / "metrics.json", metrics)

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        atomic.write_text(self.path / "history.csv", buf.getvalue())

    # -- models --------------------------------------------------------------------------------
    @property
    def has_backbone_weights(self) -> bool:
        """True when model.safetensors carries backbone.* tensors (an --unfreeze tail, adapt's
        AdaBN statistics): the backbone is then not the pretrained one."""
        return any(k.startswith("backbone.") for k in self.model_keys())

    @property
    def int8_backbone(self) -> Path | None:
        """The quantized backbone the head was trained on (--backbone-precision int8), else None.

        Only a frozen backbone counts: a run that fine-tuned its tail trained in torch fp32.
        """
        if self.config["train"].get("backbone_precision") != "int8":
            return None
        if self.has_backbone_weights:
            return None
        from toolkit.learners import INT8_BACKBONE

        path = self.path / INT8_BACKBONE
        if not path.is_file():
            raise RunDirError(
                f"{path} is missing: this run's head was trained on that int8 backbone and is wrong without "
                f"it. Restore the file or retrain the run (`edgetune train --backbone-precision int8`)."
            )
        return path

    def build_head(self):
        """The trained head as a torch module: backbone features in, logits out."""
        import torch

        from toolkit.heads import head_from_config

        state = {k[len("head."):]: torch.from_numpy(v) for k, v in self.model_state().items() if k.startswith("head.")}
        prior = state.get("prior.weight")
        head = head_from_config(self.config["train"], self.spec.feature_dim, len(self.labels),
                                **({"prior_classes": int(prior.shape[0])} if prior is not None else {}))
        head.load_state_dict(state)
        return head.eval()

    def head_tensors(self) -> dict[str, np.ndarray]:
        """The trained head's tensors by state-dict name (feature_mean, layers.1.weight, ...)."""
        return {k[len("head."):]: v for k, v in self.model_state().items() if k.startswith("head.")}

    def numpy_head(self):
        """The trained head as a numpy function (features -> logits): no torch needed."""
        from toolkit.heads import numpy_head

        return numpy_head(self.head_tensors(), self.config["train"]["head"])

    def build_classifier(self):
        """The trained classifier as one torch module: float32 NCHW RGB 0-255 in, logits out.

        This is the source model every exporter converts and checks parity against, with the fp32
        backbone: for a run trained on an int8 backbone (`int8_backbone`), int8 exports use that
        backbone instead and check against the run-dir model (exporters.parity.reference_logits).
        """
        import torch

        from toolkit.backbones import create_backbone
        from toolkit.convert import with_normalization

        spec = self.spec
        state = {k: torch.from_numpy(v) for k, v in self.model_state().items()}
        backbone = create_backbone(spec.name)
        tail = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        if tail:
            from toolkit.learners import load_tail

            load_tail(backbone, tail)
        return with_normalization(torch.nn.Sequential(backbone, self.build_head()), spec).eval()


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save

    data = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic.write_bytes(path, save(data, metadata=metadata))


def read_safetensors(path: Path, *, with_metadata: bool = False):
    """Tensors of a safetensors file, and its string metadata when asked."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        return (tensors, f.metadata() or {}) if with_metadata else tensors
