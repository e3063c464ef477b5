"""Quality against the number of model calls: the resumable sweep over rows x NFE (fastsample.sweep), or a whole
plan of sweeps.

    fastsample sweep --plan plans/fmnist-large.json          # every committed table (make results)
    fastsample sweep --plan plans/fmnist-large.json --only main-rmse
    fastsample sweep --model fmnist-large --metric rmse --nfe 5 8 --num 500 --seed 1 \\
        --schedulers unipc3 diffusers-unipc learned/fmnist-large/unipc3-nfe{nfe} \\
        'diffusers.UniPCMultistepScheduler{"solver_order": 2}' --out results/x.jsonl --table results/x.md
    fastsample sweep --model testbed --nfe 5 10 20 --num 512     # exact testbed: trajectory error
    accelerate launch scripts/fid_sweep.py ...                              # shards across processes / GPUs

A row is a name (see fastsample.sweep: ours, diffusers-*, and <base>:dc, :learned, :<spacing>, :teleport<F>), a
save_pretrained folder ("{nfe}" stands for the cell's NFE), or a class of diffusers or fastsample.solvers followed by
its keyword arguments as JSON.  Sample i starts from the noise of generator (seed, i), so a cell's samples do not
depend on the batch size or the process count.  Each finished cell is written to the JSONL at once, atomically; a
rerun skips finished cells (matched by a key of the model's weights, the row's config, NFE, count, seed and metric).
"""
from __future__ import annotations

from pathlib import Path

from fastsample import cli, commands
from fastsample.sweep import DEFAULT_SCHEDULERS, render, run_plan, run_sweep, schedulers


def arguments(p):
    p.add_argument("--plan", default=None, help="a plan file (JSON blocks, see fastsample.sweep.load_plan)")
    p.add_argument("--only", nargs="+", default=None, help="with --plan: run only these blocks")
    p.add_argument("--model", default="fmnist-large", help="a zoo model or 'testbed'")
    p.add_argument("--metric", default=None, help="fid or rmse on a zoo model (default fid); trajectory_error or "
                   "rmse on the testbed (default trajectory_error)")
    p.add_argument("--schedulers", nargs="+", default=list(DEFAULT_SCHEDULERS),
                   help=f"rows: from {', '.join(schedulers())}; variants fitted for the model (unipc3:dc, "
                   "<base>:learned[-<fit>], <base>:teleport<F>); scheduler folders; or Class{json kwargs}")
    p.add_argument("--nfe", type=cli.integer(1), nargs="+", default=[5, 6, 8, 10, 15, 20])
    p.add_argument("--num", type=cli.integer(2), default=5000, help="samples a cell")
    p.add_argument("--batch-size", type=cli.integer(1), default=250)
    p.add_argument("--floor-nfe", type=cli.integer(1), default=None, help="add the converged floor: UniPC-3 at this many NFE")
    p.add_argument("--reference-steps", type=cli.integer(2), default=200, help="rmse: steps of the converged UniPC-3 solve")
    p.add_argument("--out", type=cli.output("file", (".jsonl",)), default=None, help="JSONL (default results/<model>.jsonl)")
    p.add_argument("--plot", type=cli.output("file", (".png",)), default=None, help="PNG to render")
    p.add_argument("--table", type=cli.output("file", (".md",)), default=None, help="markdown table to write")


def _log(line):
    print(line, flush=True)


def full_float32():
    """cuDNN would otherwise run float32 convolutions in TF32 on Ampere and later GPUs: keep every cell full float32,
    so a GPU sweep differs from a CPU one by float32 round-off only."""
    import torch

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def plan(path, only, p):
    """Run a plan's blocks (``only``: these alone); a bad plan is the parser's error."""
    full_float32()
    try:
        run_plan(path, only, log=_log)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))


def run(args, p):
    if args.plan:
        return plan(args.plan, args.only, p)
    full_float32()
    from accelerate import Accelerator

    acc = Accelerator()
    out = Path(args.out or f"results/{args.model}.jsonl")
    try:
        records = run_sweep(args.model, args.schedulers, args.nfe, args.num, out, args.seed, args.batch_size,
                            args.floor_nfe, acc.device, acc, log=_log, metric=args.metric,
                            reference_steps=args.reference_steps)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if acc.is_main_process and (args.plot or args.table):
        print(render(records, args.plot, args.table))


def main(argv=None):
    return commands.standalone(__name__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
