"""Reproduces the measurements of Jain et al. (2018) with jaxmt: ``PYTHONPATH=. python benchmarks/paper.py``.

Table 1 (batched GEMMs against time-only, space-only and cuBLAS), Figures 3 and 4 (ResNet-50
and MobileNetV2 latency per co-located tenant count, per-tenant spread) and Figure 5 (tenants
resident on one GPU). Writes ``benchmarks/results/paper_*.json`` and ``paper_*.png`` and the
"Paper: ..." sections of ``benchmarks/README.md``. ``--help`` lists the options; the parts
live in ``benchmarks/paper/``.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.paper.driver import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
