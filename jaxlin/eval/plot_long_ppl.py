"""Plot loss by position from long_ppl results, several models on one figure.

    python -m jaxlin.eval.plot_long_ppl --out docs/long_ppl.png GLA=runs/a/long.json softmax=runs/b/long.json

Each JSON is a results file of `eval.py --tasks long_ppl --output FILE`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from jaxlin.plotting import labelled_files


def plot_long_ppl(runs: dict[str, dict], out: str | Path) -> None:
    """`runs`: label -> long_ppl results. Draws each model's loss curve over positions (a model with
    learned positions stops at its window) and marks each training length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, result in runs.items():
        curve = result["curve"]
        positions = np.sqrt((np.asarray(curve["start"]) + 1) * np.asarray(curve["end"]))  # 1-based, mid-range
        line, = ax.plot(positions, curve["loss"], label=f"{label} (window {result['window']})")
        ax.axvline(result["train_len"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token position in the window (dotted: training length)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Loss by position on long documents")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def read_long_ppl(path: str | Path) -> dict:
    """The long_ppl results of an eval.py JSON file; a ValueError when it has none."""
    report = json.loads(Path(path).read_text())
    result = report.get("results", {}).get("long_ppl")
    if result is None:
        raise ValueError(f"{path} has no long_ppl results: write one with eval.py --tasks long_ppl --output FILE")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot several models' loss by position (long_ppl) on one figure.")
    parser.add_argument("runs", nargs="+", metavar="LABEL=RESULTS_JSON")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    runs = {}
    for label, path in labelled_files(parser, args.runs, "eval.py results JSON").items():
        try:
            runs[label] = read_long_ppl(path)
        except ValueError as error:  # json.JSONDecodeError is one
            parser.error(str(error))
    plot_long_ppl(runs, args.out)


if __name__ == "__main__":
    main()
