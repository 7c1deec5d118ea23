"""Where a run reports: metrics.jsonl, TensorBoard events, a loss-curve PNG.

Several runs on one plot: python -m jaxlin.train.metrics --out cmp.png gla=runs/a/metrics.jsonl softmax=...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
from tensorboardX import SummaryWriter

from jaxlin.plotting import labelled_files


class MetricsLog:
    """One JSON object per logged step in `workdir/metrics.jsonl`, mirrored to TensorBoard (`workdir/tb`).

    On resume, records past the restored step are dropped: the resumed run writes them again, identically.
    """

    def __init__(self, workdir: Path, resume_step: int):
        self.path = Path(workdir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        kept = [r for r in self.read(self.path) if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tb = SummaryWriter(str(Path(workdir) / "tb"))

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: it is rewritten on resume
                continue
        return records

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()

    def plot(self, out: Path) -> None:
        if self.enabled:
            plot_runs({"": self.read(self.path)}, out)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()


def plot_runs(runs: dict[str, list[dict]], out: Path) -> None:
    """Train (thin line) and validation (dots) loss against step for each labelled run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, records in runs.items():
        prefix = f"{label} " if label else ""
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if train:
            (line,) = ax.plot(*zip(*train), label=f"{prefix}train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label=f"{prefix}validation loss", color=line.get_color() if train else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Plot the loss curves of several runs on one figure.")
    parser.add_argument("runs", nargs="+", metavar="LABEL=METRICS_JSONL")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    runs = {label: MetricsLog.read(path) for label, path in labelled_files(parser, args.runs, "metrics.jsonl").items()}
    plot_runs(runs, Path(args.out))


if __name__ == "__main__":
    main()
