from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_mammo_like
from tests.test_faults import _screen
from tests.test_heatmaps import _attention_workdir
from worker.imaging.heatmap import normalise_map, overlay_rgb


def test_overlay_colours_only_where_the_map_is_strong():
    grey = np.full((120, 80), 0.5, dtype=np.float32)
    heat = np.zeros((12, 8), dtype=np.float32)
    heat[0:3, 0:2] = 1.0  # attention in the top-left corner only
    rgb = overlay_rgb(grey, heat, alpha=0.5)
    assert rgb.shape == (120, 80, 3) and rgb.dtype == np.uint8
    # Far from the attended corner the picture is its own grey, untouched.
    assert np.all(rgb[100:, 60:] == 128)
    # In the attended corner the colour differs between channels (JET at its top is red).
    corner = rgb[5, 5].astype(int)
    assert corner[0] > corner[2] + 40


def test_flat_map_leaves_the_picture_as_it_is():
    grey = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    rgb = overlay_rgb(grey, np.full((4, 4), 0.3))
    assert np.array_equal(rgb[:, :, 0], grey) and np.array_equal(rgb[:, :, 2], grey)


def test_normalise_map_and_bad_shapes():
    assert normalise_map(np.array([[2.0, 4.0]])).tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError):
        normalise_map(np.zeros(5))
    with pytest.raises(ValueError):
        overlay_rgb(np.zeros((4, 4, 3)), np.zeros((2, 2)))


def test_the_html_audit_draws_no_image_over_the_configured_max_pixels(workdir: Path) -> None:
    """`screen report --html` honours ``worker.max_pixels`` as `screen heatmap` does."""
    _attention_workdir(workdir)
    write_mammo_like(workdir / "inbox" / "a.png", size=(120, 80), seed=1)
    assert _screen(workdir, "process", "--timeout", "10").returncode == 0
    config = workdir / "config.toml"
    config.write_text(config.read_text() + "max_pixels = 5000\n")  # under [worker]
    page = workdir / "audit.html"
    proc = _screen(workdir, "report", "--html", str(page))
    assert proc.returncode == 0, proc.stderr
    section = page.read_text().split("Where the model looked", 1)[1]
    assert "image too large: 80x120 pixels, over max_pixels=5000" in section
    assert '<img src="data:image/png' not in section
