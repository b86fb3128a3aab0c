"""The outline reader: no weights, so it must read the generator's own pictures right, and count what is drawn."""

import numpy as np
import torch
from helpers import picture

from unclip.data.shapes import COLORS, SHAPES
from unclip.eval.outlines import Outline, is_right, read_image, read_images


def test_every_shape_in_every_colour_is_read_as_drawn_even_small():
    for i, (shape, color) in enumerate((s, c) for s in SHAPES for c in COLORS):
        size = ("small", "medium", "large")[i % 3]
        read = read_image(picture([{"shape": shape, "color": color, "size": size, "position": "center"}], seed=i))
        assert [(o.shape, o.color) for o in read] == [(shape, color)], (shape, color, size, read)


def test_circles_and_hexagons_are_told_apart_at_every_size_and_place():
    for i, shape in enumerate(["circle", "hexagon"] * 9):
        size, position = ("small", "medium", "large")[i % 3], ("top left", "bottom", "right")[i // 6]
        read = read_image(picture([{"shape": shape, "color": "purple", "size": size, "position": position}], seed=100 + i))
        assert len(read) == 1 and read[0].shape == shape, (shape, size, position, read[0].overlap)
        assert read[0].overlap[shape] > 0.9


def test_two_touching_objects_of_different_colours_are_two():
    objects = [{"shape": "square", "color": "red", "size": "large", "position": "center", "geometry": [0.42, 0.5, 0.19, 0.0]},
               {"shape": "circle", "color": "blue", "size": "large", "position": "center", "geometry": [0.78, 0.5, 0.19, 0.0]}]
    read = read_image(picture(objects))
    assert sorted((o.shape, o.color) for o in read) == [("circle", "blue"), ("square", "red")]
    assert is_right(read, [{"shape": "circle", "color": "blue"}, {"shape": "square", "color": "red"}])  # in any order


def test_a_speck_is_no_object_but_a_second_blob_makes_the_picture_wrong():
    one = picture([{"shape": "star", "color": "yellow", "size": "large", "position": "center"}])
    speck = one.copy()
    speck[2:4, 2:4] = [1.0, 0.0, 0.0]  # 4 saturated pixels: a decoder's stray dot
    assert [(o.shape, o.color) for o in read_image(speck)] == [("star", "yellow")]
    asked = [{"shape": "star", "color": "yellow"}]
    two = picture([{"shape": "star", "color": "yellow", "size": "large", "position": "center"},
                   {"shape": "circle", "color": "yellow", "size": "small", "position": "top left"}])
    assert is_right(read_image(speck), asked) and not is_right(read_image(two), asked)
    assert read_image(np.full((64, 64, 3), 0.4, dtype=np.float32)) == []  # a bare background holds nothing


def test_the_pipelines_pixels_are_read_as_the_picture_is():
    image = picture([{"shape": "triangle", "color": "green", "size": "medium", "position": "top"}])
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1  # (1, 3, H, W) in [-1, 1]
    assert read_images(pixels) == [read_image(image)]
    at_32 = read_images(torch.nn.functional.interpolate(pixels, size=32, mode="bilinear", antialias=True))
    assert [(o.shape, o.color) for o in at_32[0]] == [("triangle", "green")]  # any image size


def test_right_asks_only_for_what_the_prompt_names():
    read = [Outline("hexagon", "orange", 100.0, (10.0, 10.0), {}), Outline("circle", "cyan", 90.0, (40.0, 40.0), {})]
    assert is_right(read, [{"shape": "circle", "color": "cyan"}, {"shape": "hexagon"}])
    assert not is_right(read, [{"shape": "circle", "color": "orange"}, {"shape": "hexagon"}])
    assert not is_right(read[:1], [{"shape": "hexagon"}, {"shape": "circle"}])


def test_the_shard_check_reads_the_generators_real_images_right(shapes_dir):
    from unclip.eval.outlines import check_shard

    shard = sorted(shapes_dir.glob("val-*.tar"))[0]
    report = check_shard(str(shard), limit=50)
    assert report["images"] >= 12 and report["right"] >= 0.95, report  # 1.000 over 500 val images (README)
    assert sum(int(v.split("/")[1]) for v in report["one_object"].values()) <= report["images"]
    through_32 = check_shard(str(shard), limit=50, size=32)
    assert through_32["images"] == report["images"] and through_32["right"] >= 0.85, through_32
