"""Reading a results folder: the tidy view of its runs (view.py), REPORT.md (report.py) and the
figures (plots/). Nothing here trains; any results folder, yours or a colleague's, can be read."""

from .view import ExperimentView, RunView, load_view

__all__ = ["ExperimentView", "RunView", "load_view"]
