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


def test_an_image_grid_is_a_picture_file(tmp_path):
    faces = np.random.default_rng(0).random((8, 16, 16, 3))
    visualize.save_image_grid([faces, faces[::-1]], ["original", "reconstruction"], tmp_path / "grid.png", title="t")
    with Image.open(tmp_path / "grid.png") as picture:
        assert picture.format == "PNG" and picture.width > picture.height > 100
    assert not list(tmp_path.glob("*.partial*"))
