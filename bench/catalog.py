"""`python -m bench.catalog [methods|metrics|models|datasets|families]`: what the config groups hold.

The config groups are the registry (DESIGN.md), so the catalogue is read from them: one
entry per conf/<group>/<name>.yaml, its description the first sentence of the YAML's
header comment (the target's docstring when the YAML has none) and its paper the
year-bearing parentheses of that sentence, e.g. "(Sundararajan et al. 2017)" (the
docstring's first sentence when the header names none). No list is kept by hand.
Targets outside the allowed prefixes (bench.checks.ALLOWED_TARGETS) are not imported.
`families` lists the metric families (metrics.FAMILIES, in the report's order) and the metrics
each holds; a metric's family is `metrics.family` of its target (the module that defines it).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from bench.checks import ALLOWED_TARGETS
from bench.config import CONF

GROUPS = {"methods": "method", "metrics": "metric", "models": "model", "datasets": "dataset"}
OTHER = "other"                 # a metric outside metrics/ (a user's own): family() cannot place it
_YEAR = re.compile(r"\b(?:19|20)\d{2}[a-z]?\b")
_PAREN = re.compile(r"\s*\(([^()]*)\)")
# a sentence ends at . ! ? followed by a space or the end, but not after "al", "e.g", "i.e", "vs", "cf"
_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bcf)[.!?](?=\s|$)")


@dataclass(frozen=True)
class Entry:
    """One config of a group: its name (the file stem), `_target_`, one-line description, paper and, for a
    metric, its family."""

    name: str
    target: str
    description: str
    paper: str
    family: str = ""


def _first_sentence(text: str) -> str:
    """The first sentence of `text`, whitespace collapsed (the whole text if it has no sentence end)."""
    text = " ".join(text.split())
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def _papers(sentence: str) -> str:
    """Year-bearing parts (split at ; and ,) of every parenthesis:
    "Foo (Bach et al. 2015; zennit) (Samek et al. 2017)" -> "Bach et al. 2015; Samek et al. 2017"."""
    parts = [p.strip() for inner in _PAREN.findall(sentence) for p in re.split(r"[;,]", inner)]
    return "; ".join(p for p in parts if _YEAR.search(p))


def _without_papers(sentence: str) -> str:
    """The sentence with its year-bearing parentheses removed."""
    return _PAREN.sub(lambda m: "" if _YEAR.search(m.group(1)) else m.group(0), sentence).strip()


def _header(path: Path) -> str:
    """The comment lines at the top of a YAML file, joined."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def _node(group: str, name: str, cfg: Any, path: Path) -> DictConfig:
    """The config node that holds `_target_`, after checking that the file's name key equals its stem."""
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: expected a mapping, got {type(cfg).__name__}")
    if group in ("method", "metric"):
        if list(cfg) != [name]:
            raise ValueError(f"{path}: the top key must be the file stem {name!r}, got {list(cfg)}")
        node = cfg[name]
    else:
        if cfg.get("name") != name:
            raise ValueError(f"{path}: `name` must be the file stem {name!r}, got {cfg.get('name')!r}")
        node = cfg.net if group == "model" else cfg
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise ValueError(f"{path}: no `_target_` found (conf/{group}/ entries need one)")
    return node


def _resolve(target: str) -> tuple[Any, str]:
    """(the target's object, "") or (None, why it was not read); only allowed prefixes are imported."""
    if not target.startswith(ALLOWED_TARGETS):
        return None, ""
    module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr), ""
    except (ImportError, AttributeError) as e:
        return None, f"(target {target} cannot be imported: {type(e).__name__}: {e})"


def _docstring(target: str) -> str:
    """The target's docstring, read from its source where it is a plain def or class (importing `methods` for one
    card costs seconds: captum, zennit, torchvision), else imported; or a note why it could not be read."""
    if target.startswith(ALLOWED_TARGETS) and (doc := _source_docstring(*target.rpartition(".")[::2])) is not None:
        return doc
    obj, why = _resolve(target)
    return why if obj is None else inspect.getdoc(obj) or ""


def _source_docstring(module: str, name: str, depth: int = 0) -> str | None:
    """The docstring of def/class `name` in `module`'s source, following `from x import name` re-exports;
    None where the source does not show it (then the caller imports the target). Nothing is executed."""
    import ast
    import importlib.util

    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)                      # a top-level spec: found, not executed
    except (ImportError, ValueError):
        return None
    path = Path(spec.origin) if spec and spec.origin else None
    for part in rest:                                              # submodules by file, without importing parents
        folder = path.parent if path else None
        path = next((f for f in (folder / part / "__init__.py", folder / f"{part}.py") if f.is_file()), None) \
            if folder else None
    if depth > 4 or path is None or path.suffix != ".py":
        return None
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for node in reversed(tree.body):                               # the last binding of `name` wins
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if any(isinstance(t, ast.Name) and t.id == name or isinstance(t, ast.Attribute) and t.attr == "__doc__"
               and isinstance(t.value, ast.Name) and t.value.id == name for t in targets):
            return None                                            # rebound or its __doc__ set: ask the object
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_docstring(node) or ""
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return _source_docstring(node.module, alias.name, depth + 1)
                if alias.name == "*" and (doc := _source_docstring(node.module, name, depth + 1)) is not None:
                    return doc
    return None


def _family(target: str) -> str:
    """The metric family of a target (metrics.family), OTHER where it is not a metric of metrics/."""
    import metrics

    obj, _ = _resolve(target)
    try:
        return metrics.family(obj) if obj is not None else OTHER
    except ValueError:
        return OTHER


def catalog(group: str, *, conf: Path | str = CONF) -> list[Entry]:
    """Every entry of config group `group` (methods, metrics, models, datasets), sorted by name."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {sorted(GROUPS)}, got {group!r}")
    folder = Path(conf) / GROUPS[group]
    if not folder.is_dir():
        raise ValueError(f"no config group folder {folder}: pass the conf/ directory that holds {GROUPS[group]}/")
    entries = []
    for path in sorted(folder.glob("*.yaml")):
        target = str(_node(GROUPS[group], path.stem, OmegaConf.load(path), path)["_target_"])
        description, paper = _describe(target, _header(path))
        entries.append(Entry(path.stem, target, description, paper, _family(target) if group == "metrics" else ""))
    return entries


def _describe(target: str, header: str) -> tuple[str, str]:
    """(description, paper) from a YAML's header comment, the target's docstring (imported only then) for what
    the header lacks."""
    header = _first_sentence(header)
    if header and _papers(header):
        return _without_papers(header), _papers(header)
    doc = _first_sentence(_docstring(target).split("\n\n")[0])
    return _without_papers(header or doc), _papers(header) or _papers(doc)


def describe(group: str, name: str, target: str, *, conf: Path | str = CONF) -> tuple[str, str]:
    """(description, paper) of one config of `group` (methods, metrics, ...) as `catalog` derives them: from
    conf/<group>/<name>.yaml when that file names the same `_target_` (a run may name a user's own), else from
    the target's docstring."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {sorted(GROUPS)}, got {group!r}")
    path = Path(conf) / GROUPS[group] / f"{name}.yaml"
    same = path.is_file() and str(_node(GROUPS[group], name, OmegaConf.load(path), path)["_target_"]) == target
    return _describe(target, _header(path) if same else "")


def families(*, conf: Path | str = CONF) -> dict[str, list[Entry]]:
    """The metrics of conf/metric/ by family: every family of metrics.FAMILIES in order (empty ones too),
    then OTHER where some metric is not in one."""
    from metrics import FAMILIES

    entries = catalog("metrics", conf=conf)
    out = {f: [e for e in entries if e.family == f] for f in FAMILIES}
    other = [e for e in entries if e.family not in FAMILIES]
    return {**out, OTHER: other} if other else out


def format_table(entries: Sequence[Entry]) -> str:
    """Aligned lines: name, family (metrics only), paper (- when none), description."""
    if not entries:
        return "(none)"
    w_name = max(len(e.name) for e in entries)
    w_family = max(len(e.family) for e in entries)
    w_paper = max(len(e.paper or "-") for e in entries)
    return "\n".join(f"{e.name:<{w_name}}  " + (f"{e.family:<{w_family}}  " if w_family else "")
                     + f"{e.paper or '-':<{w_paper}}  {e.description}" for e in entries)


def format_families(groups: dict[str, list[Entry]]) -> str:
    """One line per family: its name, how many metrics, and their names."""
    w = max(len(f) for f in groups)
    return "\n".join(f"{f:<{w}}  {len(es):>2}  {', '.join(e.name for e in es) or '(none yet)'}"
                     for f, es in groups.items())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catalog", description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", metavar="{" + ",".join([*GROUPS, "families"]) + "}",
                        help="config groups to list, or the metric families (default: all)")
    parser.add_argument("--conf", type=Path, default=CONF, help="the conf/ directory (default: the suite's own)")
    args = parser.parse_args(argv)
    unknown = [g for g in args.groups if g not in (*GROUPS, "families")]
    if unknown:
        parser.error(f"unknown group {unknown[0]!r}: choose from {', '.join([*GROUPS, 'families'])}")
    groups = args.groups or [*GROUPS, "families"]
    for i, group in enumerate(groups):
        if group == "families":
            found = families(conf=args.conf)
            print(("\n" if i else "") + f"families ({len(found)}, metrics.family: the module of metrics/ that "
                  "defines a metric)")
            print(format_families(found))
            continue
        entries = catalog(group, conf=args.conf)
        print(("\n" if i else "") + f"{group} ({len(entries)}, conf/{GROUPS[group]}/<name>.yaml)")
        print(format_table(entries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
