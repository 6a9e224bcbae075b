"""Where the config tree is: the one place that knows.

The YAMLs live in the repository's top-level `conf/`; the wheel ships the same files as the
package data `bench/conf/` (pyproject maps one onto the other). `CONF` is the installed copy when
there is one, else the checkout's. A user's own YAML folders join through Hydra's search path
(`hydra.searchpath=[file:///path/to/conf]`); `search_dirs` reads it from a command line, `entries`
lists a group's names across the suite's tree and those folders, and `unknown_choice` is the name
check that the CLI and bench.api make before Hydra composes. `derive_seeds` fills in the seeds of the
methods and metrics that leave theirs to the run (`seed: null`), for the runner and bench.api.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.resources
import re
from pathlib import Path
from typing import Any, Iterator, Sequence

GROUPS = ("dataset", "model", "method", "metric", "experiment")
# keys of Hydra's own config that name code: Hydra builds them itself, before the suite's checks run
HYDRA_CODE = re.compile(r"^[+~]*hydra[./].*(_target_|callbacks|job_logging|hydra_logging)")
_PACKAGE = re.compile(r"^#\s*@package\s+(\S+)", re.M)
SEEDED = ("method", "metric")   # the groups whose entries' `seed: null` follows the run's seed (derive_seeds)


def conf_dir() -> Path:
    """The suite's config tree: `bench/conf` where the package is installed from a wheel, else `conf/`
    at the top of the checkout that `bench` is imported from."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ValueError(f"no conf/config.yaml next to {package} (installed: bench/conf, checkout: ../conf): the "
                     "installation is incomplete; reinstall saliency-bench (pip install .)")


CONF = conf_dir()


def _folder(entry: str) -> Path | None:
    """The folder a search-path entry names: file://PATH (relative to the working directory, as Hydra
    takes it) or pkg://package.sub (the package's own folder); None for what Hydra alone can read."""
    if entry.startswith("file://"):
        return Path(entry[len("file://"):]).expanduser()
    if entry.startswith("pkg://"):
        try:                                                    # Hydra imports the package too, to read it
            return Path(str(importlib.resources.files(entry[len("pkg://"):].replace("/", "."))))
        except (ImportError, TypeError, ValueError):
            return None
    return None


def search_dirs(argv: Sequence[str]) -> list[Path] | None:
    """The folders of `hydra.searchpath=[...]` on a command line, in order (empty when it sets none);
    None when one cannot be read here (a pkg:// that does not import), so callers leave names to Hydra."""
    given = [ov.value() for ov in parsed(argv) if ov.get_key_element() == "hydra.searchpath"]
    if not given:
        return []
    if not isinstance(given[0], list):                         # Hydra refuses it with its own message
        return None
    folders = [_folder(str(entry)) for entry in given[0]]      # the first one counts, as in Hydra
    return None if None in folders else folders                # type: ignore[return-value]


def parsed(argv: Sequence[str]) -> list[Any]:
    """Hydra's own parse of the command-line overrides, one by one: flags (-m, --cfg job) and what does
    not parse are left out (Hydra reports a syntax error itself)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), []
    for arg in argv:
        try:
            out += parser.parse_overrides([arg])
        except Exception:                                       # noqa: BLE001 - not an override
            continue
    return out


def entries(group: str, search: Sequence[Path] = ()) -> dict[str, Path]:
    """name -> YAML of every entry of config group `group` in the suite's tree and the search folders;
    on a name in both, the suite's own wins, as Hydra appends the search path after the primary config."""
    found: dict[str, Path] = {}
    for folder in (CONF, *search):
        for path in sorted((Path(folder) / group).glob("*.yaml")):
            found.setdefault(path.stem, path)
    return dict(sorted(found.items()))


def unknown_name(group: str, names: Sequence[str], search: Sequence[Path] = ()) -> str | None:
    """A message naming the available entries when one of `names` is not an entry of config group `group`
    (the suite's tree and the `search` folders); None when all are."""
    available = entries(group, search)
    for name in names:
        if name != "null" and name not in available:
            where = f"conf/{group}/{name}.yaml" + "".join(f" nor {Path(f) / group / name}.yaml" for f in search)
            hint = "" if search else (f"; for a YAML of your own add its folder to the search path "
                                      f"(hydra.searchpath=[file:///path/to/conf], the folder that holds {group}/)")
            return f"{group}={name}: no {where}; available: {', '.join(available)}{hint}"
    return None


def _names(value: Any) -> list[str] | None:
    """The config names an override's value picks: a name, a list, a comma sweep (of names or lists);
    None for what only Hydra expands (glob, range, interval)."""
    from hydra.core.override_parser.types import ChoiceSweep

    if isinstance(value, ChoiceSweep):
        value = [n for item in value.list for n in (item if isinstance(item, list) else [item])]
    if value is None or isinstance(value, (str, int, float)):
        return [] if value is None else [str(value)]
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return [str(v) for v in value]
    return None


def unknown_choice(argv: list[str]) -> str | None:
    """A message naming the available options when a command-line override picks a config that is neither
    in conf/ nor in a folder of `hydra.searchpath=[file://...]`.

    Hydra lists them for `model=nope` but not inside a list (`method=[saliency,nope]`) or a sweep. The
    overrides are read by Hydra's own parser (quoted names and lists included); globs, ranges and
    search-path entries that cannot be read here are left to Hydra.
    """
    search = search_dirs(argv)
    for ov in parsed(argv):
        if ov.key_or_group in GROUPS and ov.package is None and not ov.is_delete() and search is not None:
            if message := unknown_name(ov.key_or_group, _names(ov.value()) or [], search):
                return message
    return None


def _keys(node: Any, where: str) -> Iterator[str]:
    """Dotted paths of every key of a YAML document below `where`."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{where}.{k}" if where else str(k)
            yield path
            yield from _keys(v, path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _keys(v, f"{where}.{i}")


def hydra_code_in(search: Sequence[Path]) -> str | None:
    """A message when a search-path folder could hand Hydra code: a `hydra/` folder (Hydra's own config
    groups) or a YAML that reaches Hydra's node (`# @package _global_` or `hydra...`) and sets a `_target_`,
    callbacks or logging there. The command line may not (bench.__main__.hydra_target); neither may a folder.
    Sweeper parameters and other plain settings of Hydra stay allowed."""
    import yaml

    for folder in search:
        if (Path(folder) / "hydra").is_dir():
            return (f"{Path(folder) / 'hydra'}: a search-path folder may add {', '.join(GROUPS)} entries, not "
                    "Hydra's own config groups (Hydra would run their code before the suite's checks)")
        for path in sorted(Path(folder).rglob("*.yaml")):
            text = path.read_text(encoding="utf-8")
            package = _PACKAGE.search(text)
            if not package or not package[1].startswith(("_global_", "hydra")):
                continue                                        # placed under its config group
            root = package[1].removeprefix("_global_").lstrip(".")
            try:
                doc = yaml.safe_load(text)
            except yaml.YAMLError as e:
                return f"{path}: not valid YAML ({str(e).splitlines()[0]})"
            for key in _keys(doc, root):
                if HYDRA_CODE.match(key):
                    return (f"{path} sets {key}: a YAML of your own may not set code in Hydra's own config (Hydra "
                            "would run it before the suite's checks); plain settings such as hydra.sweeper.params "
                            "are fine")
    return None


def derived_seed(run_seed: int, group: str, name: str) -> int:
    """The seed of entry `name` of config group `group` (method or metric) in a run with `seed: run_seed`.

    derived = int.from_bytes(sha256(f"{run_seed}/{group}/{name}".encode()).digest()[:4], "big") >> 1, an
    integer in [0, 2**31): the same in every process, platform and Python version (Python's hash() of a
    string is salted per process), and far apart for neighbouring run seeds. Seeds follow the entry's
    name, not the cell's: every method is scored under the same draws of a metric (paired comparisons),
    and the draws of a method do not depend on which metrics score it.

    >>> derived_seed(0, "method", "smoothgrad") == derived_seed(0, "method", "smoothgrad") != derived_seed(1, "method", "smoothgrad")
    True
    """
    if isinstance(run_seed, bool) or not isinstance(run_seed, int) or run_seed < 0:
        raise ValueError(f"seed must be a non-negative integer (the run's seed, conf/config.yaml), got {run_seed!r}")
    return int.from_bytes(hashlib.sha256(f"{run_seed}/{group}/{name}".encode()).digest()[:4], "big") >> 1


def derive_seeds(cfg: Any) -> Any:
    """A copy of the experiment config `cfg` in which every method's and metric's `seed: null` is its
    derived_seed(cfg.seed, group, name); an integer seed in an entry is kept (pinned), and an entry without
    a `seed` key gets none. Datasets and zoo models keep their own seeds: the run seed never changes which
    images are scored, nor retrains a model (README, "Reproducible"). The runner fills the seeds in before it
    computes cell keys, so keys and the manifest's config hold the seeds actually used; bench.api does the
    same for its defaults. A method or metric built from a YAML node without this gets seed=None and
    refuses it."""
    from omegaconf import DictConfig, open_dict

    seed = cfg.get("seed", 0)
    out = copy.deepcopy(cfg)
    for group in SEEDED:
        entries = out.get(group)
        if not isinstance(entries, DictConfig):
            continue
        for name, node in entries.items():
            if isinstance(node, DictConfig) and "seed" in node and node.seed is None:
                with open_dict(node):
                    node.seed = derived_seed(seed, group, str(name))
    return out
