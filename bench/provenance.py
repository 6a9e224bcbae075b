"""What a run records about itself (DESIGN: "Every run also writes a manifest"): its identity and folder,
package versions, git commit, the checkpoint's hash and the summary of its failed samples."""
from __future__ import annotations

import copy
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from bench.checks import check_name
from bench.zoo.sources import sha256
from metrics import ranked

PACKAGES = ("saliency-bench", "torch", "torchvision", "captum", "hydra-core", "omegaconf", "numpy", "pandas", "pyarrow", "scipy")
PLUMBING = ("results_dir", "cache_dir", "report", "gallery", "report_pdf", "allowed_targets", "run_tag", "progress")   # where a run writes
                                                                                        # and reports, not what it computes
# Keys of a metric's YAML that describe it for the report, never what it computes: popped before the metric is
# instantiated, kept out of every digest (identity, cell keys), recorded in the manifest's `metrics` entry.
METRIC_META = {"_sanity_": "sanity", "_staged_": "staged", "_headline_": "headline"}   # YAML key -> manifest key


def metric_meta(name: str, node: DictConfig) -> dict[str, Any]:
    """`sanity` (the score names the report's sanity table shows, `_sanity_`, default none), `staged`
    (`_staged_`, default false) and `headline` (`_headline_`, the one score that ranks the metric in every rank
    aggregate, default None: the metric's only ranked score) of metric `name`, checked; ValueError naming the
    key and the fix."""
    sanity, staged = node.get("_sanity_", []), node.get("_staged_", False)
    headline = node.get("_headline_", None)
    if headline is not None and not (isinstance(headline, str) and headline and ranked(headline)):
        raise ValueError(f"metric.{name}._headline_ must be the name of one ranked score the metric returns (not a "
                         f"stage '@' score or a '_std' spread), e.g. auc, got {headline!r}: fix conf/metric/{name}.yaml")
    sanity = OmegaConf.to_container(sanity) if OmegaConf.is_config(sanity) else sanity
    if not isinstance(sanity, list) or not all(isinstance(s, str) and s for s in sanity):
        raise ValueError(f"metric.{name}._sanity_ must be a list of score names, e.g. [spearman], got {sanity!r}: "
                         f"fix conf/metric/{name}.yaml")
    if not isinstance(staged, bool):
        raise ValueError(f"metric.{name}._staged_ must be true or false, got {staged!r}: fix conf/metric/{name}.yaml")
    return {"sanity": sanity, "staged": staged, "headline": headline}


def without_meta(node: DictConfig) -> DictConfig:
    """A metric's config without the METRIC_META keys (a copy where it has them): what is instantiated."""
    if not any(key in node for key in METRIC_META):
        return node
    node = copy.deepcopy(node)                                   # keeps its parent: interpolations resolve
    with open_dict(node):
        for key in METRIC_META:
            node.pop(key, None)
    return node


def computed(job: dict[str, Any]) -> dict[str, Any]:
    """A resolved config less the metrics' METRIC_META keys: what the digests see."""
    metrics = {k: {o: v for o, v in node.items() if o not in METRIC_META} if isinstance(node, dict) else node
               for k, node in (job.get("metric") or {}).items()}
    return {**job, "metric": metrics} if "metric" in job else job


def digest(obj: Any, n: int = 8) -> str:
    """The first `n` hex digits of the sha256 of `obj` as sorted JSON."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def identity(cfg: DictConfig, *, tag: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """A run's identity (DESIGN: "A run has an identity ... and its own folder").

    tag: `run_tag`, else `tag` (the CLI passes the experiment's name), else "default"; config: a digest of
    everything that determines the run's numbers (the resolved config less PLUMBING); name: `<tag>-<config>`,
    the run's folder below results/<dataset>/<model>/, so runs of different configurations never share a
    folder; group: `<tag>-<digest>` of the same without dataset and model, which the report shows side by side
    (the models of one experiment); overrides: the command line's values (sweeps included), for the record.
    """
    job = {k: v for k, v in computed(OmegaConf.to_container(cfg, resolve=True)).items() if k not in PLUMBING}
    tag = str(cfg.get("run_tag") or tag or "default")
    check_name("run_tag", tag)
    config = digest(job)
    group = f"{tag}-{digest({k: v for k, v in job.items() if k not in ('dataset', 'model')})}"
    return {"tag": tag, "name": f"{tag}-{config}", "config": config, "group": group, "overrides": list(overrides)}


def _differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Dotted keys at which two resolved configs differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _differences(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))]
    return [] if a == b else [where or "(root)"]


def check_folder_identity(out_dir: Path, ident: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse a folder whose manifest records a run of another configuration: a folder is never reused across
    configurations (its cells and manifest would mix two runs). Returns that earlier manifest (None if none)."""
    path = out_dir / "manifest.json"
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
        recorded = previous.get("identity", {}).get("config")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path} cannot be read ({e}); remove the folder {str(out_dir)!r} or run into another one") \
            from e
    if recorded != ident["config"]:
        old = {k: v for k, v in (previous.get("config") or {}).items() if k not in PLUMBING}
        diff = _differences(old, {k: v for k, v in job.items() if k not in PLUMBING})
        raise ValueError(f"results folder {str(out_dir)!r} holds run {previous.get('run_id')!r} of another configuration "
                         f"(it differs in {', '.join(diff[:6]) or 'its identity'}{', ...' if len(diff) > 6 else ''}); a "
                         "folder is never reused across configurations: let `python -m bench` pick the run's folder, "
                         "or pass another out_dir")
    return previous


def versions() -> dict[str, str | None]:
    """The Python version and the installed version of each of PACKAGES (None where absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def suite_version() -> str:
    """saliency-bench's installed version, part of every cell key."""
    try:
        return metadata.version("saliency-bench")
    except metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The checkout's commit, with '-dirty' when tracked files differ from it; None outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def checkpoint_hash(model: nn.Module, info: dict[str, Any]) -> str:
    """sha256 of the checkpoint file the weights came from (as load_model recorded it), else of the weights."""
    path = Path(str(info.get("checkpoint", "")))
    if info.get("sha256") or path.is_file():
        return (info.get("sha256") or sha256(path))[:16]
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode() + v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def summarise(failed: pd.DataFrame) -> list[dict[str, Any]]:
    """One manifest entry per (method, metric, error): method-stage failures once, with metric None."""
    if not len(failed):
        return []
    f = failed.copy()
    f["metric"] = f["metric"].where(f["stage"] == "metric", None)
    out = []
    for (method, metric, stage, error), g in f.groupby(["method", "metric", "stage", "error"], dropna=False, sort=True):
        ids = sorted(set(g["sample_id"].astype(int).tolist()))
        out.append({"method": method, "metric": None if pd.isna(metric) else metric, "stage": stage, "error": error,
                    "n_samples": len(ids), "sample_ids": ids})
    return out
