"""Time the report phase of a results folder, per phase (issue 19: at most 5 s for the default run).

``python -m bench.perf_report RESULTS_DIR [--repeat N] [--pdf] [--profile FILE]`` writes the report as the run's
callback does (`write_report(..., gallery=True)`, PNG only unless --pdf) into a temporary folder and prints, per
repeat, wall and CPU seconds of: the report's imports (first repeat only: bench.report, matplotlib, bench.figures,
after bench.run's, which a run has made before its callback runs),
load (bench.results.load), tables (bench.tables.compute), figures (the figures of the tables), gallery (the
gallery and MPRT grids of every run, from the maps it kept), and the rest (Markdown, LaTeX, CSV, Parquet, page). CPU seconds (`time.process_time`) stand for a quiet machine's wall
time on a loaded one: the report runs on one thread. `--profile FILE` also saves a cProfile of the last repeat.
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PHASES = {"load": "load", "tables": "compute", "figures": "_figures", "gallery": "_draw_kept"}   # -> bench.report's
INSIDE = {"gallery": "figures"}                   # a phase timed inside another: left out of that one's time


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def measure(root: str | Path, *, pdf: bool = False, profile: str | None = None) -> dict[str, tuple[float, float]]:
    """Write the report of `root` once into a temporary folder; (wall, cpu) seconds per phase and in total."""
    import bench.report as report

    spent: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    originals = {name: getattr(report, name) for name in PHASES.values()}

    def timed(phase: str, function):
        def call(*args, **kwargs):
            w, c = _clock()
            try:
                return function(*args, **kwargs)
            finally:
                w2, c2 = _clock()
                spent[phase][0] += w2 - w
                spent[phase][1] += c2 - c
        return call

    try:
        for phase, name in PHASES.items():
            setattr(report, name, timed(phase, originals[name]))
        with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()):
            profiler = cProfile.Profile() if profile else None
            w, c = _clock()
            if profiler:
                profiler.enable()
            report.write_report(root, out, gallery=True, **({"pdf": True} if pdf else {}))   # a default run's report
            if profiler:
                profiler.disable()
                profiler.dump_stats(profile)
            w2, c2 = _clock()
    finally:
        for name, function in originals.items():
            setattr(report, name, function)
    total = (w2 - w, c2 - c)
    for inner, outer in INSIDE.items():
        spent[outer] = [a - b for a, b in zip(spent[outer], spent[inner])]
    rest = (total[0] - sum(v[0] for v in spent.values()), total[1] - sum(v[1] for v in spent.values()))
    return {**{k: tuple(v) for k, v in spent.items()}, "rest": rest, "total": total}


def main(argv: list[str] | None = None) -> None:
    """CLI: ``python -m bench.perf_report RESULTS_DIR [--repeat N] [--pdf] [--profile FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m bench.perf_report", description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", help="a folder `python -m bench` wrote its runs to")
    parser.add_argument("--repeat", type=int, default=3, help="reports to write (the first pays the imports)")
    parser.add_argument("--pdf", action="store_true", help="also the PDF twins, as `report_pdf: true`")
    parser.add_argument("--profile", default=None, help="save a cProfile of the last repeat to this file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or not Path(args.results_dir).is_dir():
        parser.exit(2, "error: need an existing RESULTS_DIR and --repeat >= 1\n")
    w0, _ = _clock()
    import bench.run  # noqa: F401 - what a run has imported when its callback writes the report (torch, ...)
    w, c = _clock()
    import matplotlib
    matplotlib.use("Agg")
    import bench.figures  # noqa: F401 - what the report imports when it draws
    import bench.report  # noqa: F401
    w2, c2 = _clock()
    print(f"imports: wall {w2 - w:.2f} s, cpu {c2 - c:.2f} s (the report's own, after the run's: {w - w0:.1f} s)")
    for i in range(args.repeat):
        phases = measure(args.results_dir, pdf=args.pdf, profile=args.profile if i == args.repeat - 1 else None)
        print(f"report {i + 1}: " + ", ".join(f"{k} {wall:.2f}/{cpu:.2f}" for k, (wall, cpu) in phases.items())
              + " s (wall/cpu)")


if __name__ == "__main__":
    main()
