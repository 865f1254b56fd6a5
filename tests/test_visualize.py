"""Pictures: the face mosaic behind every image grid, checked pixel by pixel."""

import numpy as np
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
