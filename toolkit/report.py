"""The run's PNG report: learning curves and the validation confusion matrix."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import atomic


def write_report(path: Path, history: list[dict[str, Any]], confusion: np.ndarray, classes: list[str], *, title: str) -> None:
    # A bare Figure on the Agg canvas: no pyplot, so no global backend switch and no window.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc, ax_cm = fig.subplots(1, 3)
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (smoothed, mixup)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    ax_acc.grid(alpha=0.3)
    ax_cm.imshow(confusion, cmap="Blues")
    ticks = np.arange(len(classes))
    ax_cm.set_xticks(ticks, classes, rotation=45, ha="right")
    ax_cm.set_yticks(ticks, classes)
    ax_cm.set(xlabel="predicted", ylabel="true", title="Confusion (val)")
    thresh = confusion.max() / 2 if confusion.size else 0
    for (i, j), v in np.ndenumerate(confusion):
        ax_cm.text(j, i, str(v), ha="center", va="center", color="white" if v > thresh else "black")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic.write_bytes(path, buf.getvalue())
