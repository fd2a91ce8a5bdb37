"""Training curves and confusion matrices as PNG files (matplotlib, headless)."""

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("Plots need matplotlib: pip install matplotlib") from error
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_history(history, path):
    """Loss and accuracy per epoch, training and validation, from `History.history`."""
    plt = _pyplot()
    metrics = [m for m in ("loss", "accuracy") if m in history]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        epochs = np.arange(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], label="training")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(plt, fig, path)


def plot_history_csv(log_path, path):
    """plot_history from a keras.callbacks.CSVLogger file (all epochs of resumed runs)."""
    import csv

    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    history = {key: [float(row[key]) for row in rows] for key in (rows[0] if rows else {}) if key != "epoch"}
    return plot_history(history, path)


def confusion_matrix(y_true, y_pred, num_classes):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def plot_confusion_matrix(y_true, y_pred, class_names, path):
    plt = _pyplot()
    matrix = confusion_matrix(y_true, y_pred, len(class_names))
    size = max(4, 0.5 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(class_names) <= 30:
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center",
                    color="white" if count > matrix.max() / 2 else "black", fontsize=8)
    return _save(plt, fig, path)


def plot_erf(erf_map, path, title=None):
    """An effective receptive field (`tasks.erf.effective_receptive_field`) as a
    heatmap like the paper's figure: the map min-max scaled to [0, 1], RdYlGn."""
    plt = _pyplot()
    values = np.asarray(erf_map, dtype="float64")
    low, high = values.min(), values.max()
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    image = ax.imshow(scaled, cmap="RdYlGn", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(plt, fig, path)


def plot_resolution(rows, reference_size, path):
    """Top-1 relative to `reference_size` against the input size (the paper's
    resolution-adaptability figure), from `tasks.evaluate.resolution_sweep` rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label in dict.fromkeys(row.get("model", "Sequencer") for row in rows):
        mine = [row for row in rows if row.get("model", "Sequencer") == label]
        ax.plot([r["image_size"] for r in mine], [r["relative_top1"] for r in mine], marker="o", label=label)
    ax.axvline(reference_size, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("input resolution (px)")
    ax.set_ylabel(f"top-1 relative to {reference_size} px")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)

