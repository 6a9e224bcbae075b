"""Hydra callbacks: a run or a whole multirun ends with its report."""
from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ReportCallback(Callback):
    """Write the leaderboard and figures of everything below `results_dir` once the job(s) end.

    With `gallery` (default true) the report also holds, for every run, the gallery of maps and
    the MPRT grid, drawn from the maps the run kept in the store (bench.keep); no model is loaded.
    A run that kept none (an older runner) is logged and left out of them, never fails the report.
    Figures are PNG; `report_pdf: true` adds a PDF twin of each (for papers).
    """

    def _report(self, config: DictConfig) -> None:
        if not config.get("report", True):
            return
        from bench.report import write_report                      # matplotlib only when a report is due
        try:
            write_report(config.results_dir, gallery=bool(config.get("gallery", True)),
                         pdf=bool(config.get("report_pdf", False)))
        except ValueError as e:                                     # e.g. every job failed: nothing to report
            log.error("no report: %s", e)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._report(config)
