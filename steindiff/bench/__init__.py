"""The benchmark of the protocol: grid runner, summary and verdicts, reports."""

from .report import markdown, write_markdown, write_plots
from .runner import SCHEMA, merge_results, primary_metric, run_cost, run_grid, summarize, validate_grid, verdict

__all__ = ["SCHEMA", "merge_results", "primary_metric", "run_grid", "run_cost", "summarize", "validate_grid",
           "verdict", "markdown", "write_markdown", "write_plots"]
