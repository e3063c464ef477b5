"""Quality against the number of model calls: a resumable sweep over schedulers x NFE (fastsample.sweep).

    python scripts/fid_sweep.py --model fmnist-large --nfe 5 6 8 10 15 20 --num 5000 --floor-nfe 200 \\
        --out results/fmnist-large.jsonl --plot results/fmnist-large.png --table results/fmnist-large.md
    python scripts/fid_sweep.py --model testbed --nfe 5 10 20 --num 512     # exact testbed: trajectory error
    accelerate launch scripts/fid_sweep.py ...                              # shards across processes / GPUs

Sample i starts from the noise of generator (seed, i), so a cell's samples do not depend on the batch size or the
process count.  Each finished cell is appended to the JSONL at once; a rerun skips finished cells.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fastsample.sweep import DEFAULT_SCHEDULERS, SCHEDULERS, read_records, render, run_sweep


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fmnist-large", help="a zoo model or 'testbed'")
    p.add_argument("--schedulers", nargs="+", default=list(DEFAULT_SCHEDULERS), help=f"from {', '.join(SCHEDULERS)}")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 15, 20])
    p.add_argument("--num", type=int, default=5000, help="samples a cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--floor-nfe", type=int, default=None, help="add the converged floor: UniPC-3 at this many NFE")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSONL (default results/<model>.jsonl)")
    p.add_argument("--plot", default=None, help="PNG to render")
    p.add_argument("--table", default=None, help="markdown table to write")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    acc = Accelerator()
    out = Path(args.out or f"results/{args.model}.jsonl")
    try:
        run_sweep(args.model, args.schedulers, args.nfe, args.num, out, args.seed, args.batch_size, args.floor_nfe,
                  acc.device, acc, log=lambda line: print(line, flush=True))
    except ValueError as e:
        p.error(str(e))
    if acc.is_main_process and (args.plot or args.table):
        print(render(read_records(out), args.plot, args.table))


if __name__ == "__main__":
    main()
