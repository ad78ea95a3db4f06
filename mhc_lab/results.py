"""Results in a notebook: a results folder as tidy pandas DataFrames.

    from mhc_lab import results
    r = results.load("results/divergence")
    r.runs          # one row per run: the summary row, stability after warmup
    r.metrics       # one row per run and logged step
    r.probes        # one row per run, probe and layer, with every gain column
    r.hres(run_id)  # H_res arrays (peak and final probe) of one run

The implementation, and what every column means, is mhc_lab/analysis/frames.py. pandas is an
optional extra: pip install -e ".[pandas]".
"""

from __future__ import annotations

from .analysis.frames import PandasMissing, Results, load

__all__ = ["PandasMissing", "Results", "load"]
