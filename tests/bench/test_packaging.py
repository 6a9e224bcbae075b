"""It installs like a library: the wheel holds every module and YAML, and once installed (not editable) into
a fresh venv it runs from another directory, as `python -m bench` and as `saliency-bench`, with a user's
plugin (tests/plugin_example) from its own package and YAML folder.

The fresh venv sees this environment's dependencies through a .pth file and gets the wheel with --no-deps
(torch and CUDA are gigabytes): what is tested is the wheel, never this checkout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

from bench.config import search_dirs, unknown_choice

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "tests" / "plugin_example"
SOURCES = ("pyproject.toml", "README.md", "bench", "methods", "metrics", "conf")
TINY = ["hydra.mode=RUN", "report=false", "batch_size=4", "model.net.width=4", "model.train.epochs=1",
        "model.train.n_train=24", "model.train.n_test=8", "dataset.n_samples=4"]
PLUGIN_RUN = [f"hydra.searchpath=[file://{PLUGIN / 'conf'}]", "allowed_targets=[my_saliency.]", "dataset=stripes",
              "model=tiny_net", "method=[gradient_squared,saliency]", "metric=[top_mass,pointing_game]"]


def _python_files(folder: Path) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in folder.rglob("*.py") if "__pycache__" not in p.parts}


def _isolation() -> list[str]:
    """--no-build-isolation (offline, fast) when this environment's setuptools meets pyproject's build
    requirement; else pip builds in isolation, fetching it from the package index."""
    try:
        import tomllib                                          # Python >= 3.11
        from packaging.requirements import Requirement
    except ImportError:
        return []
    (need,) = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]]
    try:
        have = metadata.version(need.name)
    except metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if need.specifier.contains(have, prereleases=True) else []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the checkout gets no build/ folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    (tmp / "src").mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tmp / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, tmp / "src" / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *_isolation(), "-w", str(tmp / "dist"),
                           str(tmp / "src")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = (tmp / "dist").glob("saliency_bench-*.whl")
    return found


def test_the_wheel_ships_every_module_every_yaml_and_the_script(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    want = set().union(*(_python_files(ROOT / p) for p in ("bench", "methods", "metrics")))
    assert want and want <= names, sorted(want - names)
    yamls = {f"bench/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "bench/conf/config.yaml" in yamls and yamls <= names, sorted(yamls - names)
    assert {"bench/page_assets/page.css", "bench/page_assets/page.js"} <= names     # bench.page inlines them
    assert not {n for n in names if n.startswith(("conf/", "tests/"))}              # nothing at the top level
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "saliency-bench = bench.__main__:cli" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no deps: they come from this environment through a .pth)."""
    env = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=300)
    purelib = Path(subprocess.run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                   "['purelib'])"], capture_output=True, text=True, check=True).stdout.strip())
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (purelib / "_deps.pth").write_text("\n".join(deps) + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return env


def _run(venv: Path, cwd: Path, *args: str, plugin: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env |= {"OMP_NUM_THREADS": "1", "SALIENCY_BENCH_CACHE": str(cwd / "cache"), "PATH": f"{venv / 'bin'}:{env['PATH']}",
            **({"PYTHONPATH": str(PLUGIN)} if plugin else {})}
    return subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_the_installed_wheel_runs_from_another_directory(venv, tmp_path):
    where = _run(venv, tmp_path, "python", "-c", "import bench, bench.config; print(bench.__file__); "
                                                 "print(bench.config.CONF)")
    module, conf = where.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(conf) == Path(module).parent / "conf", where.stderr

    quick = _run(venv, tmp_path, "python", "-m", "bench", "experiment=quick", *TINY, "metric.pixel_flipping.steps=4")
    assert quick.returncode == 0, quick.stderr[-3000:]
    (manifest,) = (tmp_path / "results" / "shapes" / "small_cnn").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["status"] == "complete" and {(c["method"], c["metric"]) for c in m["cells"]} == {
        (a, b) for a in ("saliency", "random") for b in ("pixel_flipping", "pointing_game")}

    report = _run(venv, tmp_path, "saliency-bench", "report", "results", "--no-gallery", "--n-boot", "10")
    assert report.returncode == 0, report.stderr[-3000:]
    assert (tmp_path / "results" / "report" / "leaderboard.md").is_file()
    catalog = _run(venv, tmp_path, "saliency-bench", "catalog", "methods")
    assert catalog.returncode == 0 and any(line.startswith("integrated_gradients ") for line in
                                           catalog.stdout.splitlines()), catalog.stderr[-2000:]
    wrong = _run(venv, tmp_path, "saliency-bench", "method=[saliency,'nope']")
    assert wrong.returncode == 2 and wrong.stderr.startswith("error: method=nope: no conf/method/nope.yaml")


@pytest.mark.slow
def test_a_users_plugin_runs_from_its_own_package_and_yaml_folder(venv, tmp_path):
    """README, "Extending": search path, allowed_targets, the package importable; nothing in the suite edited."""
    run = _run(venv, tmp_path, "saliency-bench", *PLUGIN_RUN, *TINY[:3], plugin=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (manifest,) = (tmp_path / "results" / "stripes" / "tiny_net").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["status"] == "complete" and m["n_samples"] == 8 and not m["failures"]
    assert {(c["method"], c["metric"]) for c in m["cells"]} == {
        (a, b) for a in ("gradient_squared", "saliency") for b in ("top_mass", "pointing_game")}
    assert m["model_info"]["source"] == "train" and m["config"]["model"]["net"]["_target_"] == "my_saliency.TinyNet"
    # without allowed_targets the user's code never runs; without the search path the name is unknown
    refused = _run(venv, tmp_path, "saliency-bench", *PLUGIN_RUN[:1], *PLUGIN_RUN[2:], *TINY[:3], plugin=True)
    assert refused.returncode == 2 and "error: dataset._target_='my_saliency.Stripes' is not an allowed target" in \
        refused.stderr and "Traceback" not in refused.stderr
    unknown = _run(venv, tmp_path, "saliency-bench", *PLUGIN_RUN[1:], *TINY[:3], plugin=True)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: dataset=stripes: no conf/dataset/stripes.yaml")


def test_the_name_check_honours_the_search_path_and_quotes():
    own = f"hydra.searchpath=[file://{PLUGIN / 'conf'}]"
    assert search_dirs([own, "-m"]) == [PLUGIN / "conf"] and search_dirs(["model=resnet"]) == []
    assert unknown_choice([own, "method=[saliency,gradient_squared]", "model=tiny_net", "dataset=stripes"]) is None
    assert unknown_choice([own, "metric=top_mass,pointing_game"]) is None                       # a sweep
    message = unknown_choice([own, "method=[saliency,'gradient_sqared']"])                      # quoted, misspelt
    assert message.startswith(f"method=gradient_sqared: no conf/method/gradient_sqared.yaml nor "
                              f"{PLUGIN / 'conf' / 'method' / 'gradient_sqared'}.yaml; available: ")
    assert "gradient_squared, gradient_x_input" in message
    assert unknown_choice(["method=['gradient_squared']"]).startswith("method=gradient_squared: no conf/method/")
    assert unknown_choice(["--cfg", "job", "model=[tiny_net]"]).startswith("model=tiny_net: no conf/model/")


def test_one_place_knows_where_conf_is():
    """bench.config.CONF, never a path computed from a module's own file (wrong once installed)."""
    computed = re.compile(r"""parents\[\d+\]\s*/\s*["']conf["']|["']\.\./conf["']""")
    found = [f"{p.relative_to(ROOT)}:{i}" for folder in ("bench", "methods", "metrics", "tests")
             for p in sorted((ROOT / folder).rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if computed.search(line)]
    assert not found, f"use bench.config.CONF at {found}"
