"""Evaluate an exported jaxlin model: python eval.py --model DIR/export --tasks wikitext2,lambada [--limit N]."""

import argparse

from jaxlin.eval.runner import DEFAULT_TASKS, run


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (leave it out to score every document), got {value}")
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="export directory (config.json + model.safetensors)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="comma-separated, from: %(default)s")
    parser.add_argument("--limit", type=positive_int, help="score only the first N (>= 1) documents of each task")
    parser.add_argument("--output", help="write the results to this JSON file")
    parser.add_argument("--data_dir", help="data directory (default: $JAXLIN_DATA_DIR or ../shared/data)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="sequences per forward pass at the full context length (more when shorter)")
    parser.add_argument("--seq_len", type=int, help="context length (default: the model's block_size)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the config's)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(DEFAULT_TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {','.join(DEFAULT_TASKS)}")
    run(args.model, tasks, limit=args.limit, output=args.output, data_dir=args.data_dir,
        batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, progress=not args.no_progress)


if __name__ == "__main__":
    main()
