"""PNG read/write, grids and sample folders (polymodal.eval.images)."""

from __future__ import annotations

import pytest
import torch

from polymodal.eval.images import make_grid, read_image, save_png, write_samples


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_exact_on_8_bit_values(tmp_path, channels):
    image = torch.randint(0, 256, (channels, 5, 7)).float() / 255  # (C, H, W)
    save_png(image, tmp_path / "x.png")
    assert torch.equal(read_image(tmp_path / "x.png", channels), image)
    assert read_image(tmp_path / "x.png", channels, size=4).shape == (channels, 4, 4)


def test_write_samples_writes_native_size_files_and_a_grid(tmp_path):
    images = torch.rand(5, 3, 8, 8)
    paths = write_samples(images, tmp_path / "out", grid_scale=2)
    assert [p.name for p in paths] == [f"sample_{i:03d}.png" for i in range(5)] + ["grid.png"]
    assert read_image(paths[0], 3).shape == (3, 8, 8)
    grid = make_grid(images)  # 3 per row, 2 rows, 1 pixel padding
    assert grid.shape == (3, 2 * 9 + 1, 3 * 9 + 1)
    assert torch.equal(grid[:, 1:9, 10:18], images[1])
    assert read_image(paths[-1], 3).shape == (3, 2 * grid.shape[1], 2 * grid.shape[2])


def test_bad_images_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"\(C, H, W\) tensor with C = 1 or 3; got \(2, 4, 4\)"):
        save_png(torch.rand(2, 4, 4), tmp_path / "x.png")
    with pytest.raises(ValueError, match="at least one image"):
        make_grid(torch.rand(0, 1, 4, 4))
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        read_image(tmp_path / "bad.png", 3)
    with pytest.raises(ValueError, match="2 names"):
        write_samples(torch.rand(3, 1, 4, 4), tmp_path, names=["a", "b"])
