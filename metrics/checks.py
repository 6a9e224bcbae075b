"""Argument checks shared by the methods and the metrics (public API; the metric modules import them
from metrics._check, where they are defined): one ValueError per bad input, naming the argument,
what it takes and what it got, before any work."""
from metrics._check import check_bool, check_choice, check_classes, check_finite, check_float, check_int, check_target

__all__ = ["check_bool", "check_choice", "check_classes", "check_finite", "check_float", "check_int", "check_target"]
