"""From the parts' raw JSON to the summaries, PNGs and README tables (no measuring here).

``BUILDERS[figure](raws, results_dir) -> (summary, markdown)``: ``raws`` maps each part of
the figure to its raw JSON (None if it did not run); the PNGs are written next to the JSON.
Every number in the markdown comes from the JSON; the paper's from ``_shared``.
"""

from __future__ import annotations

from benchmarks.paper.report_figures import figure3, figure5
from benchmarks.paper.report_table1 import table1

TITLES = {"table1": "Paper: Table 1", "figure3": "Paper: Figure 3 and 4", "figure5": "Paper: Figure 5"}
BUILDERS = {"table1": table1, "figure3": figure3, "figure5": figure5}
