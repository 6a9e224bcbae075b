"""`python -m bench` (or `saliency-bench`): the Hydra app that runs an experiment (conf/config.yaml) and reports it.

`saliency-bench report|gallery|catalog|perf ARGS` runs `python -m bench.<command> ARGS`; anything else
is the experiment's Hydra overrides. A bad input ends the job with its one-line message (exit status 2),
not a traceback; Ctrl-C ends it after the completed cells are stored (exit status 130), and the same
command resumes.
"""
from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bench import config
from bench.config import CONF

log = logging.getLogger("bench")
COMMANDS = ("report", "gallery", "catalog", "perf")           # saliency-bench <command>: python -m bench.<command>


def hydra_target(argv: list[str]) -> str | None:
    """A message when the command line sets a `_target_` (or callbacks, logging factories) inside Hydra's own
    config: Hydra instantiates those itself before the run starts, so bench.checks.check_targets cannot see
    them. Hydra's config groups (`hydra/launcher=joblib`) stay allowed: they name YAML files, not code."""
    for arg in argv:
        if config.HYDRA_CODE.match(arg.split("=", 1)[0]):
            return (f"{arg.split('=', 1)[0]}: the command line may not set code in Hydra's own config (Hydra would "
                    "run it before the suite's checks); pick a Hydra config group instead, e.g. hydra/launcher=joblib")
    return config.hydra_code_in(config.search_dirs(argv) or [])


def unwritable_results_dir(argv: list[str]) -> str | None:
    """A message when the results folder (`results_dir=` on the command line, else conf/config.yaml's
    `results`) cannot be created or written: Hydra creates it before the run's own check, and would end
    in a traceback."""
    from bench.store import check_writable

    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("results_dir=")]
    try:
        check_writable(Path(given[-1] if given else "results").expanduser())
    except ValueError as e:
        return str(e)
    return None


def unknown_choice(argv: list[str]) -> str | None:
    """A message naming the available options when a command-line override picks a config that is neither
    in conf/ nor in a folder of `hydra.searchpath=[file://...]` (bench.config.unknown_choice)."""
    return config.unknown_choice(argv)


@hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from bench.run import identity, run                         # torch and the rest: after the CLI's checks

    hydra_cfg = HydraConfig.get()
    tag, overrides = hydra_cfg.runtime.choices.get("experiment"), list(hydra_cfg.overrides.task)
    try:
        out_dir = Path(hydra_cfg.runtime.output_dir) / identity(cfg, tag=tag, overrides=overrides)["name"]
        run(cfg, out_dir=out_dir, tag=tag, overrides=overrides)
    except ValueError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: completed cells are stored; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None


def cli(argv: list[str] | None = None) -> int:
    """The `saliency-bench` console script: a subcommand (COMMANDS), else an experiment as `python -m bench`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        result = importlib.import_module(f"bench.{argv[0]}").main(argv[1:])
        return result if isinstance(result, int) else 0
    if message := hydra_target(argv) or unknown_choice(argv) or unwritable_results_dir(argv):
        print(f"error: {message}", file=sys.stderr)
        return 2
    sys.argv[1:] = argv
    main()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
