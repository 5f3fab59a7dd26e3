"""Classification metrics, computed by scikit-learn so that they match what other tools report.

"f1" is always the macro F1 (every class weighs the same, what Banking77 papers report); the
support-weighted F1 is reported beside it as "f1_weighted". Accuracy, both F1s and the loss are
computed on validation during training and on test at the end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

F1_DEFINITION = "f1 = macro F1 (unweighted mean over classes); f1_weighted = support-weighted F1"
# Metrics where lower is better; every other metric (accuracy, f1, ...) is maximized.
LOWER_IS_BETTER = ("loss", "perplexity")


def lower_is_better(metric: str) -> bool:
    """The direction of a metric from its name, as the HF Trainer decides it for metric_for_best_model."""
    return any(word in metric for word in LOWER_IS_BETTER)


def classification_metrics(labels: Any, predictions: Any) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(labels, predictions, average="weighted", zero_division=0)),
    }


def predicted_classes(logits: Any) -> np.ndarray:
    logits = logits[0] if isinstance(logits, tuple) else logits  # some heads also return hidden states
    return np.asarray(logits).argmax(axis=-1)


def compute_metrics(eval_prediction: Any) -> dict[str, float]:
    """For the HF Trainer: an EvalPrediction (logits, label ids) -> accuracy, f1, f1_weighted."""
    return classification_metrics(eval_prediction.label_ids, predicted_classes(eval_prediction.predictions))


def per_class_report(labels: Any, predictions: Any, names: list[str]) -> dict[str, Any]:
    """precision/recall/F1/support per class name, plus the averages (sklearn's classification_report)."""
    from sklearn.metrics import classification_report

    return classification_report(
        labels, predictions, labels=list(range(len(names))), target_names=names, output_dict=True, zero_division=0
    )


def plot_confusion_matrix(labels: Any, predictions: Any, names: list[str], path: Path, title: str) -> None:
    """Rows = true class, columns = predicted class. Cell values are printed only where they stay legible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    many = len(names) > 20
    size = max(6.0, 0.22 * len(names) + 4)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        labels, predictions, labels=list(range(len(names))), display_labels=names, ax=ax, colorbar=many,
        include_values=not many, xticks_rotation="vertical", cmap="Blues",
    )
    ax.set_title(title)
    ax.tick_params(labelsize=6 if many else 9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
