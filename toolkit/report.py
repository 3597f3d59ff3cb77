"""The run's PNG report: the head-selection CV table (or, with --unfreeze, learning curves) and
the validation confusion matrix."""

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
    if history and "head" in history[0]:
        ax_cv, ax_cm = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2, 1]})
        _cv_table(ax_cv, history)
    else:
        ax_loss, ax_acc, ax_cm = fig.subplots(1, 3)
        _curves(ax_loss, ax_acc, history)
    ax_cm.imshow(confusion, cmap="Blues")
    ticks = np.arange(len(classes))
    ax_cm.set_xticks(ticks, classes, rotation=45, ha="right")
    ax_cm.set_yticks(ticks, classes)
    ax_cm.set(xlabel="predicted", ylabel="true", title="Confusion (val)")
    thresh = confusion.max() / 2 if confusion.size else 0
    if len(classes) <= 20:  # numbers in 50x50 cells are unreadable
        for (i, j), v in np.ndenumerate(confusion):
            ax_cm.text(j, i, str(v), ha="center", va="center", color="white" if v > thresh else "black")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic.write_bytes(path, buf.getvalue())


def _cv_table(ax, rows: list[dict[str, Any]], limit: int = 14) -> None:
    """Best setting of each head first (the selection), then the rest of the CV table."""
    ax.axis("off")
    cells = [[r["head"], ", ".join(f"{k}={v}" for k, v in r["options"].items()), f"{r['accuracy']:.4f}", f"{r['std']:.4f}", f"{r['fit_seconds']:.2f}"]
             for r in rows[:limit]]
    table = ax.table(cellText=cells, colLabels=["head", "options", "CV accuracy", "std", "fit s/fold"],
                     loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.2)
    for j in range(5):
        table[1, j].set_facecolor("#d8f0d8")  # the winner
    more = f" (best {limit} of {len(rows)})" if len(rows) > limit else ""
    ax.set_title(f"Head selection: k-fold CV on the training features{more}")


def _curves(ax_loss, ax_acc, history: list[dict[str, Any]]) -> None:
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train (smoothed, mixup)")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["val_accuracy"] for h in history], color="tab:green")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy")
    ax_acc.grid(alpha=0.3)
