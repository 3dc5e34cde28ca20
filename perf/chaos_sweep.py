"""Chaos, longer than the suite's: ``clsuite sweep`` over 2 strategies x 2 seeds SIGKILLed at random moments (seeded)
and restarted, 50 times by default; prints the kills, restarts, time, and whether the records ended identical to an
uninterrupted sweep's with no temporary file, lock or checkpoint left. The logic is tests/test_chaos.py's.

    python perf/chaos_sweep.py [--kills 50] [--seed 0] [--spread 2.0] [--work DIR]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from test_chaos import run_chaos  # noqa: E402  (also sets one torch thread, as the suite does)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread", type=float, default=2.0,
                    help="kill delays are uniform in [0, spread x uninterrupted time / kills] after the first lock")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-sweep-"))
    f = run_chaos(work, args.kills, args.seed, args.spread, log=print)
    print(f"kills {f['kills']}, restarts {f['restarts']}, rounds {f['rounds']}, {f['seconds']:.0f} s "
          f"(uninterrupted in-process sweep {f['uninterrupted_seconds']:.1f} s); records identical: {f['identical']}; "
          f"nothing left behind: {f['clean']}")
    for p in f["problems"]:
        print(f"problem: {p}")
    sys.exit(0 if f["identical"] and f["clean"] else 1)


if __name__ == "__main__":
    main()
