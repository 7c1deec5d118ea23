"""A first-order model of the train step on N GPUs, from the compiled step's collectives (a model, not a
measurement).

Compute: the global batch stays the config's; each GPU runs batch / N sequences at the measured one-GPU time
per sequence (micro-batches of the measured size while there are enough, fewer sequences after).
Communication: each collective moves its full buffer F (a gather's result, a reduce-scatter's input, an
all-reduce's buffer) around a ring of N GPUs at `bandwidth` bytes/s per GPU and direction:

    all-reduce 2 (N-1)/N F,   all-gather, reduce-scatter, all-to-all (N-1)/N F,   collective-permute F.

Collectives inside the accumulation loop run once per micro-batch, the others once per step. Latency,
contention and the optimizer's own time are left out. Without overlap the step is compute + communication;
with perfect overlap, the larger of the two.
"""

from __future__ import annotations

LINKS = {"NVLink 450 GB/s": 450e9, "InfiniBand 50 GB/s": 50e9}
_RING = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: (n - 1) / n,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1.0 if n > 1 else 0.0,
}


def full_bytes(c) -> int:
    """The buffer a ring moves for collective `c` (a `jaxlin.train.collectives.Collective`)."""
    return c.operand_bytes if c.kind == "reduce-scatter" else c.bytes


def traffic(collectives, accumulation: int) -> tuple[dict, dict]:
    """({kind: bytes once per step}, {kind: bytes per micro-batch}) from a step of `accumulation` micro-batches."""
    per_step, per_micro = {}, {}
    for c in collectives:
        if c.count is None:
            raise ValueError(f"{c.kind} in {c.computation} runs inside a loop of unknown trip count")
        target, times = (per_micro, c.count / accumulation) if c.in_loop and accumulation > 1 else (per_step, c.count)
        target[c.kind] = target.get(c.kind, 0) + full_bytes(c) * times
    return per_step, per_micro


def comm_seconds(per_step: dict, per_micro: dict, micro_batches: float, n: int, bandwidth: float) -> float:
    total = {k: per_step.get(k, 0) + micro_batches * per_micro.get(k, 0) for k in set(per_step) | set(per_micro)}
    return sum(_RING[k](n) * b for k, b in total.items()) / bandwidth


def predict(collectives, *, accumulation: int, batch: int, micro_per_gpu: int, step_s: float, gpus: int,
            bandwidth: float) -> dict:
    """Predicted step on `gpus` GPUs for a global `batch` of sequences; `step_s`: one GPU's measured time for
    one micro-batch of `micro_per_gpu` sequences; `collectives` compiled with `accumulation` micro-batches."""
    per_step, per_micro = traffic(collectives, accumulation)
    per_gpu = batch / gpus
    micro_batches = max(1.0, per_gpu / micro_per_gpu)
    compute = per_gpu / micro_per_gpu * step_s
    comm = comm_seconds(per_step, per_micro, micro_batches, gpus, bandwidth) if gpus > 1 else 0.0
    one_gpu = batch / micro_per_gpu * step_s
    no_overlap, overlap = compute + comm, max(compute, comm)
    return {"gpus": gpus, "compute_s": compute, "comm_s": comm, "step_s": no_overlap, "step_overlap_s": overlap,
            "speedup": one_gpu / no_overlap, "speedup_overlap": one_gpu / overlap}


def predict_table(collectives, *, accumulation: int, batch: int, micro_per_gpu: int, step_s: float,
                  gpus=(2, 8, 64), links=LINKS) -> list[dict]:
    return [{"link": name, **predict(collectives, accumulation=accumulation, batch=batch, micro_per_gpu=micro_per_gpu,
                                     step_s=step_s, gpus=n, bandwidth=bw)}
            for name, bw in links.items() for n in gpus]


def format_predictions(rows: list[dict]) -> str:
    lines = ["| link | GPUs | compute ms | communication ms | step ms (no overlap) | speedup | "
             "step ms (overlap) | speedup |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['link']} | {r['gpus']} | {r['compute_s'] * 1e3:.0f} | {r['comm_s'] * 1e3:.0f} | "
                     f"{r['step_s'] * 1e3:.0f} | {r['speedup']:.1f}x | {r['step_overlap_s'] * 1e3:.0f} | "
                     f"{r['speedup_overlap']:.1f}x |")
    return "\n".join(lines)
