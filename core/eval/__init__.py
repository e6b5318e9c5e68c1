"""Evaluation helpers: metrics, image files and grids, and the independent judge of generated images."""

from polymodal.eval.images import make_grid, read_image, save_png, to_pil, write_samples
from polymodal.eval.metrics import accuracy

__all__ = ["accuracy", "make_grid", "read_image", "save_png", "to_pil", "write_samples"]
