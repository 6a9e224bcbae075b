"""`python -m bench.catalog`: the catalogue is read from conf/, entry by entry, with each paper."""
from __future__ import annotations

import pytest

from bench.catalog import GROUPS, catalog, families, main
from bench.config import CONF


def test_lists_every_method_yaml_with_its_paper(capsys):
    stems = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"methods ({len(stems)}, conf/method/<name>.yaml)"
    assert [line.split()[0] for line in lines[1:]] == stems                # one line per YAML, in order
    entries = {e.name: e for e in catalog("methods")}
    # every method names its paper, except two of the controls (which say they are controls)
    assert {n for n, e in entries.items() if not e.paper} == {"constant", "random"}
    assert all(entries[n].description.startswith("Control:") for n in ("constant", "random", "edge", "centre"))
    ig = entries["integrated_gradients"]                                   # a two-line header, "et al." inside
    assert (ig.target, ig.paper) == ("methods.integrated_gradients", "Sundararajan et al. 2017")
    assert ig.description == ("Integrated Gradients; 16 Gauss-Legendre nodes, a third of captum's default 50 "
                              "steps, keep completeness within 8 % (median 1 %) of f(x) - f(0) on the trained "
                              "small_cnn (see tests).")
    shap = entries["gradient_shap"]                                        # shares its target, not its header
    assert (shap.target, shap.paper) == ("methods.expected_gradients", "Lundberg & Lee 2017")
    assert entries["edge"].paper == "Adebayo et al. 2018"
    line = next(line for line in lines if line.startswith("saliency "))
    assert line.split() == ["saliency", "Simonyan", "et", "al.", "2014", "Saliency:", "absolute", "input", "gradient."]


@pytest.mark.parametrize("group", list(GROUPS))
def test_every_group_matches_its_folder(group):
    names = [e.name for e in catalog(group)]
    assert names == sorted(p.stem for p in (CONF / GROUPS[group]).glob("*.yaml"))
    assert all(e.description for e in catalog(group))


def test_docstring_fallback_and_errors(tmp_path, capsys):
    (tmp_path / "method").mkdir()
    (tmp_path / "method" / "plain.yaml").write_text("plain:\n  _target_: methods.gradient\n  _partial_: true\n")
    (tmp_path / "method" / "outside.yaml").write_text("# Not ours (Doe 2020).\noutside:\n  _target_: os.system\n")
    entries = {e.name: e for e in catalog("methods", conf=tmp_path)}
    # no header: the docstring's first sentence and its paper
    assert (entries["plain"].description, entries["plain"].paper) == ("Gradient, signed: d f_target / d x.",
                                                                      "Simonyan et al. 2014")
    # a target outside the allowed prefixes is never imported; the header still describes it
    assert (entries["outside"].description, entries["outside"].paper) == ("Not ours.", "Doe 2020")

    (tmp_path / "method" / "wrong.yaml").write_text("right:\n  _target_: methods.gradient\n")
    with pytest.raises(ValueError, match=r"wrong.yaml: the top key must be the file stem 'wrong', got \['right'\]"):
        catalog("methods", conf=tmp_path)
    with pytest.raises(ValueError, match="group must be one of"):
        catalog("method")
    with pytest.raises(ValueError, match="no config group folder"):
        catalog("metrics", conf=tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["methods", "widgets"])
    assert exit_info.value.code == 2 and "unknown group 'widgets'" in capsys.readouterr().err


def test_families_list_every_metric_once_in_report_order(capsys):
    from metrics import FAMILIES, family
    import metrics

    found = families()
    assert list(found) == list(FAMILIES)                                   # every metric is in one of them
    stems = sorted(p.stem for p in (CONF / "metric").glob("*.yaml"))
    assert sorted(e.name for es in found.values() for e in es) == stems
    by_name = {e.name: f for f, es in found.items() for e in es}
    assert by_name["focus"] == "localization" and by_name["pixel_flipping"] == "faithfulness"
    assert by_name["input_invariance"] == "axiomatic" and by_name["mprt"] == "randomization"
    for e in catalog("metrics"):                                            # the same as metrics.family of the target
        assert e.family == family(getattr(metrics, e.target.rpartition(".")[2]))
    assert main(["families"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"families ({len(FAMILIES)}, metrics.family")
    loc = next(line for line in lines if line.startswith("localization "))
    assert loc.split()[1] == str(len(found["localization"])) and "focus" in loc and "pointing_game" in loc
    assert main(["metrics"]) == 0                                           # the metrics table names the family
    focus_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("focus "))
    assert focus_line.split()[1:4] == ["localization", "Arias-Duart", "et"]


def test_a_metric_outside_metrics_is_listed_as_other(tmp_path):
    (tmp_path / "metric").mkdir()
    (tmp_path / "metric" / "mine.yaml").write_text("# Mine (Doe 2020).\nmine:\n  _target_: bench.stats.holm\n")
    (tmp_path / "metric" / "rma.yaml").write_text("rma:\n  _target_: metrics.relevance_mass_accuracy\n")
    found = families(conf=tmp_path)
    assert [e.name for e in found["other"]] == ["mine"] and [e.name for e in found["localization"]] == ["rma"]
    assert found["robustness"] == []
