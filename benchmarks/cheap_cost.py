"""The cheap study's step costs, measured again with the code as it is now.

``acnet reproduce --preset cheap`` measures each form's training step against the baseline's
once, at the start of the study, and keeps it in ``docs/results/cheap/cost_bench.json``: those
ratios fixed the study's equal-compute epochs, so they stay. This measures the same thing (the
same models, batch, input and repeats, one torch thread as each study run had) into another
directory, to see what the code at hand costs. Run it with nothing else on the machine.

    python benchmarks/cheap_cost.py --out benchmarks/round4/cheap_cost
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from acnet.experiments import cheap


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True,
                    help="directory for cost_bench.json (must not hold one)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the study's runs: 1)")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / cheap.COST_BENCH).exists():
        ap.error(f"{out / cheap.COST_BENCH} exists: measure into a new directory")
    out.mkdir(parents=True, exist_ok=True)
    ratios = cheap.measure_costs(cheap.CHEAP, out, threads=args.threads, device="cpu")
    print(json.dumps({m: {f: round(r, 2) for f, r in rs.items()} for m, rs in ratios.items()},
                     indent=1))


if __name__ == "__main__":
    main()
