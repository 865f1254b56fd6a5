"""Pictures: the face mosaic behind every image grid, checked pixel by pixel."""

import numpy as np
import pytest
from PIL import Image

from vqvae_faces import visualize


def test_the_mosaic_places_each_face_with_white_gaps_and_grey_as_rgb():
    colour = np.zeros((3, 2, 2, 3), np.float32)
    colour[1] = 0.5
    colour[2] = 2.0  # out of range: clipped to 1
    grey = np.full((4, 2, 2, 1), 64, np.uint8)  # uint8, one channel, one face more than the first row
    mosaic = visualize.image_mosaic([colour, grey], gap=1)
    assert mosaic.shape == (2 * 2 + 1, 3 * 2 + 2, 3)
    expected = np.ones((5, 8, 3), np.float32)
    expected[0:2, 0:2], expected[0:2, 3:5], expected[0:2, 6:8] = 0.0, 0.5, 1.0
    expected[3:5, [0, 1, 3, 4, 6, 7]] = 64 / 255
    np.testing.assert_allclose(mosaic, expected, rtol=1e-6)


def test_an_image_grid_shows_each_row_s_faces_in_order(tmp_path):
    """Eight faces of one flat colour each, then the same faces reversed: in the saved PNG each colour
    is a block of its own, left to right in the first row and right to left in the second."""
    colours = np.array([[r, g, b] for r in (0, 255) for g in (0, 255) for b in (40, 200)], np.uint8)
    faces = np.broadcast_to(colours[:, None, None, :], (8, 16, 16, 3))
    visualize.save_image_grid([faces, faces[::-1]], ["original", "reconstruction"], tmp_path / "grid.png", title="t")
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.format == "PNG" and picture.width > picture.height > 100
        pixels = np.asarray(picture.convert("RGB"))
    assert not list(tmp_path.glob("*.partial*"))
    centres = []
    for colour in colours:
        rows, columns = np.nonzero(np.all(pixels == colour, axis=-1))
        upper = rows < rows.min() + (rows.max() - rows.min()) / 2  # the colour's tile in the first row
        assert upper.sum() > 100 and (~upper).sum() > 100, colour  # a whole tile in each row
        centres.append((columns[upper].mean(), columns[~upper].mean(), rows[upper].mean(), rows[~upper].mean()))
    first, second, top, bottom = np.array(centres).T
    assert (np.diff(first) > 0).all() and (np.diff(second) < 0).all()
    np.testing.assert_allclose(first, second[::-1], atol=1.0)  # the same columns, reversed
    assert (bottom - top > 10).all()


def test_heat_tiles_fill_each_token_s_cell_with_the_colour_of_its_value():
    # magma's end colours, from matplotlib's table: 0 is near black, `top` and above a pale yellow
    first, last = np.array([0.001462, 0.000466, 0.013866]), np.array([0.987053, 0.991438, 0.749504])
    values = np.array([[[0.0, 4.0], [9.0, 2.0]], [[1.0, 3.0], [0.5, 0.0]]])
    tiles = visualize.heat_tiles(values, (4, 6), top=4.0)
    assert tiles.shape == (2, 4, 6, 3) and tiles.dtype == np.float32
    for n, i, j in np.ndindex(values.shape):
        cell = tiles[n, 2 * i : 2 * i + 2, 3 * j : 3 * j + 3]
        assert (cell == cell[0, 0]).all(), (n, i, j)  # one colour per token
    np.testing.assert_allclose(tiles[0, 0, 0], first, atol=1e-4)
    np.testing.assert_allclose(tiles[0, 0, 3], last, atol=1e-4)  # 4.0 = top
    np.testing.assert_allclose(tiles[0, 2, 0], last, atol=1e-4)  # 9.0 > top: clipped
    brightness = [tiles[1, 2, 3].sum(), tiles[1, 2, 0].sum(), tiles[1, 0, 0].sum(), tiles[1, 0, 3].sum()]
    assert brightness == sorted(brightness) and len(set(brightness)) == 4  # 0 < 0.5 < 1 < 3: brighter
    with pytest.raises(ValueError, match=r"divide size \(4, 5\), received shape \(2, 2, 2\)"):
        visualize.heat_tiles(values, (4, 5), top=4.0)
    with pytest.raises(ValueError, match="top must be > 0, received 0"):
        visualize.heat_tiles(values, (4, 6), top=0)


def test_the_bits_map_shows_the_mean_then_faces_from_the_cheapest_to_the_dearest(monkeypatch, tmp_path):
    from vqvae_faces import prior_evaluation

    drawn = {}
    monkeypatch.setattr(visualize, "save_image_grid", lambda rows, labels, path, title: drawn.update(rows=rows))
    rng = np.random.default_rng(0)
    bits = rng.uniform(0, 8, (13, 2, 2))
    images = rng.uniform(0, 1, (13, 4, 4, 3))
    prior_evaluation.save_bits_by_position(images, bits, tmp_path / "map.png", "pr")
    faces, tiles = drawn["rows"]
    order = np.argsort(bits.sum(axis=(1, 2)))
    picked = order[[0, 2, 4, 6, 8, 10, 12]]  # 7 faces at evenly spaced ranks of 13
    np.testing.assert_allclose(faces[0], images.mean(axis=0))
    np.testing.assert_allclose(faces[1:], images[picked])
    # the faces' maps on one scale; the mean map from its lowest (dark) to its highest value (bright)
    np.testing.assert_allclose(tiles[1:], visualize.heat_tiles(bits[picked], (4, 4), np.quantile(bits, 0.99)))
    mean = bits.mean(axis=0)
    np.testing.assert_allclose(tiles[0], visualize.heat_tiles(mean[None] - mean.min(), (4, 4), np.ptp(mean))[0])
