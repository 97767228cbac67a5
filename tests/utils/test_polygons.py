"""Tests for utils/polygons.py: a class mask as GeoJSON polygons (exact pixel edges, holes, classes,
simplification, map coordinates)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from utils.polygons import KeptRows, crs_member, mask_features, signed_area, write_polygons


def _square_with_hole_and_bar() -> np.ndarray:
    """12 x 12: class 1 = a 6 x 6 square (rows and columns 2-7) with a 2 x 2 hole (rows and
    columns 4-5), class 2 = a 2 x 3 bar (rows 9-10, columns 8-10)."""
    mask = np.zeros((12, 12), np.uint8)
    mask[2:8, 2:8] = 1
    mask[4:6, 4:6] = 0
    mask[9:11, 8:11] = 2
    return mask


def _ring_set(ring) -> set:
    """The vertices of a closed GeoJSON ring (order and start point aside)."""
    assert ring[0] == ring[-1]
    return {tuple(v) for v in ring[:-1]}


def _area(ring) -> float:
    return signed_area(np.array(ring[:-1]))


def test_a_square_with_a_hole_and_a_second_class_give_their_exact_pixel_edges():
    features = mask_features(_square_with_hole_and_bar(), tolerance=0)
    assert [f["properties"] for f in features] == [{"class": 1, "pixels": 32}, {"class": 2, "pixels": 6}]
    square, bar = (f["geometry"] for f in features)
    assert square["type"] == "Polygon" and len(square["coordinates"]) == 2
    outer, hole = square["coordinates"]
    assert _ring_set(outer) == {(2, 2), (8, 2), (8, 8), (2, 8)}  # pixel edges: x = column, y = row
    assert _ring_set(hole) == {(4, 4), (6, 4), (6, 6), (4, 6)}
    assert _area(outer) == 36 and _area(hole) == -4  # outer counter-clockwise, hole clockwise (RFC 7946)
    assert _ring_set(bar["coordinates"][0]) == {(8, 9), (11, 9), (11, 11), (8, 11)}
    assert len(bar["coordinates"]) == 1 and _area(bar["coordinates"][0]) == 6


def test_every_region_has_the_area_of_its_pixels():
    """Shoelace areas (outer minus holes) equal the pixel counts of the 8-connected regions (SciPy's labels)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        h, w = rng.integers(1, 25, 2)
        mask = ndi.median_filter(rng.integers(0, 3, (h, w)).astype(np.uint8), 3)
        features = mask_features(mask, tolerance=0)
        for cls in (1, 2):
            labels, n = ndi.label(mask == cls, structure=np.ones((3, 3)))
            expected = sorted(np.bincount(labels.ravel())[1:].tolist())
            mine = [f for f in features if f["properties"]["class"] == cls]
            areas = [sum(_area(r) for r in f["geometry"]["coordinates"]) for f in mine]
            assert sorted(areas) == expected
            assert sorted(f["properties"]["pixels"] for f in mine) == expected


def test_simplifying_drops_staircase_vertices_but_keeps_small_regions():
    mask = np.zeros((40, 40), np.uint8)
    mask[np.tril_indices(30)] = 1  # a right triangle with a 30-step staircase hypotenuse
    mask[35, 35] = 2  # one pixel, smaller than the tolerance
    exact = mask_features(mask, tolerance=0)
    simple = mask_features(mask, tolerance=1.0)
    # every step's two corners, the two left corners, and the first vertex again
    assert len(exact[0]["geometry"]["coordinates"][0]) == 2 * 30 + 2 + 1
    assert len(simple[0]["geometry"]["coordinates"][0]) - 1 == 3  # a triangle within one pixel
    assert simple[0]["properties"]["pixels"] == 30 * 31 // 2
    assert _ring_set(simple[1]["geometry"]["coordinates"][0]) == {(35, 35), (36, 35), (36, 36), (35, 36)}


def test_a_georeferenced_mask_is_in_map_coordinates_with_its_crs(tmp_path):
    transform = (10.0, 0.0, 500000.0, 0.0, -10.0, 4000000.0)  # 10 m pixels, north up
    path = tmp_path / "m_polygons.geojson"
    assert write_polygons(path, _square_with_hole_and_bar(), 0, transform, "EPSG:32633") == 2
    collection = json.loads(path.read_text())
    assert collection["type"] == "FeatureCollection"
    assert collection["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    outer, hole = collection["features"][0]["geometry"]["coordinates"]
    assert _ring_set(outer) == {(500020, 3999980), (500080, 3999980), (500080, 3999920), (500020, 3999920)}
    assert _ring_set(hole) == {(500040, 3999960), (500060, 3999960), (500060, 3999940), (500040, 3999940)}
    assert _area(outer) == 36 * 100 and _area(hole) == -4 * 100  # still counter-clockwise / clockwise on the map
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically


def test_pixel_coordinates_without_georeferencing_and_no_replacing(tmp_path):
    path = tmp_path / "p.geojson"
    write_polygons(path, _square_with_hole_and_bar())
    assert "crs" not in json.loads(path.read_text())
    with pytest.raises(FileExistsError):
        write_polygons(path, np.zeros((3, 3), np.uint8), overwrite=False)
    assert len(json.loads(path.read_text())["features"]) == 2


def test_crs_member_names_an_epsg_code_or_keeps_the_wkt():
    wkt = 'PROJCS["WGS 84 / UTM zone 33N",GEOGCS["WGS 84",AUTHORITY["EPSG","4326"]],AUTHORITY["EPSG","32633"]]'
    assert crs_member(wkt)["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    assert crs_member('LOCAL_CS["arbitrary"]')["properties"]["name"] == 'LOCAL_CS["arbitrary"]'
    assert crs_member(None) is None


def test_bad_masks_and_tolerances_are_refused():
    with pytest.raises(ValueError, match=r"\(H, W\) integer class indices"):
        mask_features(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match=r"tolerance=-1 must be a finite number of pixels >= 0"):
        mask_features(np.zeros((2, 2), np.uint8), tolerance=-1)


def test_kept_rows_pass_each_band_on_and_keep_the_whole_mask():
    class Sink:
        def __init__(self):
            self.bands = []

        def write_rows(self, y0, rows):
            self.bands.append((y0, rows.shape))

    sink = Sink()
    kept = KeptRows(sink, 4, 3)
    kept.write_rows(0, np.ones((2, 3), np.uint8))
    kept.write_rows(2, np.full((2, 3, 1), 2, np.uint8))
    assert sink.bands == [(0, (2, 3)), (2, (2, 3, 1))]
    assert kept.array.tolist() == [[1] * 3, [1] * 3, [2] * 3, [2] * 3]
