"""All six workloads in one run, sharing each side's server (one server process at a time).

    python benchmarks/workloads/run_all.py --shape llama2-7b --device cuda --scale full --out-dir benchmarks/results/workloads
    python benchmarks/workloads/run_all.py --only chain_summary,copilot ...   # a subset

Writes <workload>_<shape>.json per workload (each with the command and commit); then
``python benchmarks/report.py`` renders the table and the plots.
"""

from __future__ import annotations

import sys

import chain_summary
import copilot
import gpts
import map_reduce
import mixed
import multi_agent
from common import cli

WORKLOADS = [w.WORKLOAD for w in (chain_summary, map_reduce, copilot, gpts, multi_agent, mixed)]

if __name__ == "__main__":
    argv = sys.argv[1:]
    chosen = WORKLOADS
    if "--only" in argv:
        i = argv.index("--only")
        names = set(argv[i + 1].split(","))
        unknown = names - {w.name for w in WORKLOADS}
        if unknown:
            sys.exit(f"run_all.py: unknown workloads {sorted(unknown)}; they are {[w.name for w in WORKLOADS]}")
        chosen = [w for w in WORKLOADS if w.name in names]
        del argv[i : i + 2]
    sys.exit(cli(chosen, "workloads/run_all.py", argv))
