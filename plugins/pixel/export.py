"""``polymodal export DIR OUT --to hf`` for ``pixel-mae`` folders: refused, naming the setting.

transformers' counterpart of PIXEL's masked autoencoder is ``ViTMAEForPreTraining``, whose patch grid is
square (its fixed sin-cos position table is built side × side: a (12, 288) image fails to build), while
PIXEL renders text into a grey 1 × N strip of patches (``PixelMAEConfig.mae.grid_rows=1``). No
configuration of transformers' ViTMAE runs it, so the exporter says so instead of writing a folder that
would not load. Square image MAEs are the ``mae`` family's, whose ``hf-vitmae`` exporter and converter
write and read transformers ViTMAE folders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from polymodal.io.export import Exporter, ExportError


def write_hf_vitmae(model: Any, folder: Path) -> None:
    """Refuse: PIXEL's 1 × N strip of patches has no transformers ViTMAE form (see the module docstring)."""
    mae = model.config.mae
    cols = mae.grid_cols or mae.encoder.patch_grid[1]
    raise ExportError(
        f"cannot export to transformers ViTMAE: it has no counterpart for PixelMAEConfig.mae.grid_rows=1 with "
        f"grid_cols={cols} (a 1×{cols} strip of patches); transformers' ViTMAE builds square patch grids only"
    )


EXPORTER = Exporter("pixel-mae", "hf", write_hf_vitmae, "transformers ViTMAEForPreTraining (refused: a 1×N strip)")
