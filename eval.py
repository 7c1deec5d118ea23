"""Evaluate an exported jaxlin model: python eval.py --model DIR/export [--tasks wikitext2,lambada] [--limit N].

The default tasks are the linear-attention papers' zero-shot table; `--tasks long_ppl` scores loss by
position on long documents."""

import argparse
import os
import sys

from jaxlin.errors import UserError
from jaxlin.eval.long_ppl import DEFAULT_WINDOW
from jaxlin.eval.runner import DEFAULT_TASKS, run
from jaxlin.eval.tasks import TASKS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="export directory (config.json + model.safetensors)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated, from: {','.join(TASKS)} (default: all but long_ppl)")
    parser.add_argument("--limit", type=int,
                        help="score only the first N documents of each task (long_ppl: N windows; N >= 1)")
    parser.add_argument("--output", help="write the results to this JSON file")
    parser.add_argument("--data_dir", help="data directory (default: $JAXLIN_DATA_DIR or ../shared/data)")
    parser.add_argument("--batch_size", type=int, default=32,
                        help="sequences per forward pass at the full context length (more when shorter)")
    parser.add_argument("--seq_len", type=int, help="context length (default: the model's block_size)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the config's)")
    parser.add_argument("--long_ppl_len", type=int,
                        help=f"long_ppl: tokens per window, each read in one pass (default {DEFAULT_WINDOW}; a "
                             f"model with learned positions reads block_size)")
    parser.add_argument("--long_docs", help="long_ppl: a folder of .txt documents (default: DATA_DIR/long_books)")
    parser.add_argument("--plot", help="long_ppl: PNG of loss by position (default: beside --output)")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--verbose", action="store_true", help="show the traceback of errors too "
                        "(also JAXLIN_TRACEBACK=1)")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {','.join(TASKS)}")
    if not tasks:
        parser.error(f"--tasks is empty; choose from {','.join(TASKS)}")
    for name in ("limit", "batch_size", "seq_len", "long_ppl_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}" + (" (leave it out to score everything)"
                                                                   if name == "limit" else ""))
    long_options = [f"--{n}" for n in ("long_ppl_len", "long_docs", "plot") if getattr(args, n) is not None]
    if long_options and "long_ppl" not in tasks:
        parser.error(f"{', '.join(long_options)} only apply to long_ppl: add it to --tasks")
    try:
        run(args.model, tasks, limit=args.limit, output=args.output, data_dir=args.data_dir,
            batch_size=args.batch_size, seq_len=args.seq_len, dtype=args.dtype, progress=not args.no_progress,
            long_ppl_len=args.long_ppl_len or DEFAULT_WINDOW, long_docs=args.long_docs, plot=args.plot)
    except UserError as error:  # a bad export or missing data: one line, unless the traceback is asked for
        if args.verbose or os.environ.get("JAXLIN_TRACEBACK", "") not in ("", "0"):
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
