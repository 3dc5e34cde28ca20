"""Spread of the Hutchinson trace estimate (the Hessian trace of ``--sharpness cheap``, 5 samples) on a saved model.

Prints the per-sample terms zᵀHz, their mean and standard deviation, and the standard error of a 5-sample
estimate, on the first n training rows of a task (the rows ``--sharpness`` uses).

    python perf/hutchinson_spread.py --checkpoint runs/smollm2-sharp/smollm2-bbc/naive/seed0.model \\
        --stream smollm2-bbc --task bbc_topics --n 8 --samples 20
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

from clsuite import flatness as fl
from clsuite.errors import UserError
from clsuite.reports.landscape import find_task, fixed_batch_loss
from clsuite.sharpness import TRACE_SAMPLES
from clsuite.streams import load_stream


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="a save_pretrained directory (e.g. a run's seed<k>.model)")
    ap.add_argument("--stream", required=True)
    ap.add_argument("--task", required=True, help="a task of the stream with a train split")
    ap.add_argument("--n", type=int, default=8, help="first n training rows")
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    stream = load_stream(a.stream)
    task = find_task(stream, a.task)  # a clear error for a misspelt name
    net, loss_fn, params, _ = fixed_batch_loss(stream, task, a.checkpoint, task.train, a.n)
    t0 = time.perf_counter()
    terms = fl.hutchinson_samples(net, loss_fn, params, samples=a.samples, seed=a.seed)
    seconds = time.perf_counter() - t0
    sd = statistics.stdev(terms)
    print("terms:", " ".join(f"{x:.0f}" for x in terms))
    print(f"mean {statistics.fmean(terms):.1f}, sd {sd:.1f} over {len(terms)} samples "
          f"({seconds / len(terms):.1f} s each)")
    print(f"standard error of a {TRACE_SAMPLES}-sample trace (--sharpness cheap): {sd / math.sqrt(TRACE_SAMPLES):.1f}; "
          f"of the {len(terms)}-sample mean: {sd / math.sqrt(len(terms)):.1f}")


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
