"""Datasets of the benchmark; `shapes` is the embedded one, generated, never downloaded."""
from __future__ import annotations

from bench.data.digits import Digits
from bench.data.examples import write_example
from bench.data.folder import Folder
from bench.data.shapes import CLASSES, Shapes, render_shapes_item
from bench.data.voc import VOC, ImageNetVal
from bench.data.mosaic import ShapesMosaic

__all__ = ["CLASSES", "Shapes", "ShapesMosaic", "render_shapes_item", "Digits", "Folder", "VOC", "ImageNetVal", "write_example"]
