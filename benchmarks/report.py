"""The benchmark report's command line (the top of the stack: tables.py, then targets.py, then
readme_block.py, each importing only what is below it).

    python benchmarks/report.py                      # print the report, write the plots
    python benchmarks/report.py --write-readme       # ... and rewrite README.md's marked block
    python benchmarks/report.py --results DIR --readme PATH --no-plot
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.readme_block import main

    raise SystemExit(main())
