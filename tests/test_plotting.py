import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from pyro_am.plotting import pattern_shape, plot_pattern_grid, save_figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_pattern_grid_layout_and_no_pyplot_state():
    before = plt.get_fignums()
    rows = [("original", np.zeros((3, 64))), ("retrieved", np.ones((3, 64)))]
    hidden = {1: np.eye(3, 64, dtype=bool)}
    figure = plot_pattern_grid(rows, image_shape=(8, 8), hidden=hidden, title="digits")
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 2 * 3
    assert figure.axes[0].get_ylabel() == "original"
    # The hidden coordinates are drawn as masked cells, so the row-1 images are masked arrays.
    image = figure.axes[3].get_images()[0].get_array()
    assert np.ma.is_masked(image)
    assert int(image.mask.sum()) == 1
    assert plt.get_fignums() == before


def test_plot_pattern_grid_strips_without_image_shape():
    figure = plot_pattern_grid([("x", np.arange(10.0).reshape(2, 5))])
    image = figure.axes[0].get_images()[0].get_array()
    assert image.shape == (1, 5)


def test_plot_pattern_grid_rejects_mismatched_rows():
    rows = [("a", np.zeros((3, 4))), ("b", np.zeros((2, 4)))]
    with pytest.raises(ValueError, match="row 'b' has shape"):
        plot_pattern_grid(rows)
    with pytest.raises(ValueError, match="at least one"):
        plot_pattern_grid([])


def test_pattern_shape_checks_cells():
    assert pattern_shape(64, (8, 8)) == (8, 8)
    assert pattern_shape(7, None) == (1, 7)
    with pytest.raises(ValueError, match="64 cells"):
        pattern_shape(63, (8, 8))


def test_save_figure_writes_png_atomically(tmp_path):
    figure = plot_pattern_grid([("x", np.zeros((2, 4)))])
    path = save_figure(figure, tmp_path / "nested" / "grid.png")
    with open(path, "rb") as handle:
        assert handle.read(8) == PNG_SIGNATURE
    assert sorted(p.name for p in (tmp_path / "nested").iterdir()) == ["grid.png"]
