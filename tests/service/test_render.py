"""The pictures stored with each inspection: colour scale, overlay weights, sizes."""

import io

import numpy as np
from PIL import Image

from gaikan.service.render import (fit_size, heatmap_rgb, inspection_pictures, map_range, overlay_rgb,
                                   to_display_rgb)


def test_heat_map_colour_scale_runs_from_blue_at_lo_to_red_at_hi_and_clips():
    amap = np.array([[0.0, 5.0, 10.0, 20.0]], dtype=np.float32)
    rgb = heatmap_rgb(amap, 0.0, 10.0)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > 100 and rgb[0, 0, 0] == 0  # jet starts dark blue
    assert rgb[0, 2, 0] > 100 and rgb[0, 2, 2] == 0  # and ends dark red
    assert (rgb[0, 3] == rgb[0, 2]).all()  # above hi: clipped
    assert map_range(np.array([[1.0, 3.0]]), threshold=2.0) == (0.0, 4.0)  # 2 x threshold
    assert map_range(np.array([[-1.0, 9.0]]), threshold=2.0) == (-1.0, 9.0)


def test_overlay_is_a_per_pixel_blend():
    img = np.zeros((2, 2, 3), np.uint8)
    heat = np.full((2, 2, 3), 200, np.uint8)
    w = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    out = overlay_rgb(img, heat, w)
    assert out[..., 0].tolist() == [[0, 100], [200, 50]]


def test_display_conversion_and_sizes():
    assert to_display_rgb(np.ones((4, 5), np.float32)).tolist()[0][0] == [255, 255, 255]
    assert to_display_rgb(np.zeros((4, 5, 4), np.uint8)).shape == (4, 5, 3)
    assert fit_size(1000, 500, 200) == (200, 100) and fit_size(10, 20, 200) == (10, 20)
    pics = inspection_pictures(np.zeros((600, 300), np.uint8), np.ones((8, 8), np.float32), threshold=0.5)
    sizes = {k: Image.open(io.BytesIO(v)).size for k, v in pics.items()}
    assert sizes == {"thumb": (96, 192), "heatmap": (256, 512), "overlay": (256, 512)}
    assert set(inspection_pictures(np.zeros((8, 8), np.uint8), None, 1.0)) == {"thumb"}
