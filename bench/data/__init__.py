"""Datasets of the benchmark; `shapes` is the embedded one, generated, never downloaded."""
from __future__ import annotations

from bench.data.shapes import CLASSES, Shapes, render_shapes_item

__all__ = ["CLASSES", "Shapes", "render_shapes_item"]
