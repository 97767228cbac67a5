"""A class mask as polygons (GeoJSON): one feature per connected region of each class, holes kept,
in the image's map coordinates when it is georeferenced.

The regions are traced by OpenCV (``cv2.findContours``, ``RETR_CCOMP``: outer boundaries and their
holes) on the mask scaled up twice, which puts every traced vertex on a pixel *edge*: a polygon
covers exactly its region's pixels (its shoelace area is the pixel count), as GIS polygonizers
(GDAL's) draw them, not the pixel-centre outline a plain trace gives (smaller by about half the
perimeter). Regions are 8-connected (pixels touching at a corner are one region; a hole is
4-connected background), OpenCV's rule. One tracer on every install: the output does not depend on
whether rasterio is present. The rings are then simplified by Douglas-Peucker
(``cv2.approxPolyDP``) within ``tolerance`` pixels.

Memory: the class mask is held whole (one byte a pixel) and each class is traced on a twice-scaled
copy (four bytes a pixel), so a 10,000² scene needs about 0.5 GB while its polygons are made.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

import cv2
import numpy as np

from utils.util import atomic_write

#: An affine pixel-to-map transform ``(a, b, c, d, e, f)``: x = a*col + b*row + c, y = d*col + e*row + f
#: (GDAL's / rasterio's order, as :class:`utils.raster.GeoRef` holds it).
Transform = Sequence[float]


def _edge_ring(contour: np.ndarray) -> np.ndarray:
    """Pixel-edge vertices ``(K, 2)`` int64 (x = column edge, y = row edge) of a contour traced on the
    twice-scaled mask, without repeated or collinear vertices.

    A boundary pixel of the scaled mask is the outer half of an original pixel (outer boundaries and
    holes alike), so scaled index ``u`` lies on the original edge ``ceil(u / 2)``.
    """
    pts = (contour.reshape(-1, 2).astype(np.int64) + 1) // 2
    pts = pts[np.any(pts != np.roll(pts, 1, axis=0), axis=1)]  # consecutive duplicates
    while len(pts) >= 3:  # collinear vertices (exact: integer cross products)
        prev, nxt = np.roll(pts, 1, axis=0), np.roll(pts, -1, axis=0)
        cross = (pts[:, 0] - prev[:, 0]) * (nxt[:, 1] - pts[:, 1]) - (pts[:, 1] - prev[:, 1]) * (nxt[:, 0] - pts[:, 0])
        keep = cross != 0
        if keep.all():
            break
        pts = pts[keep]
    return pts


def _simplify(ring: np.ndarray, tolerance: float) -> np.ndarray:
    """``ring`` simplified within ``tolerance`` pixels; a ring that would drop below 3 vertices (a
    region smaller than the tolerance) keeps its exact shape, so no region or hole is lost."""
    if tolerance <= 0 or len(ring) <= 3:
        return ring
    simple = cv2.approxPolyDP(ring.reshape(-1, 1, 2).astype(np.float32), float(tolerance), True).reshape(-1, 2)
    return simple.astype(np.float64) if len(simple) >= 3 else ring


def signed_area(ring: np.ndarray) -> float:
    """Shoelace area of an (unclosed) ring ``(K, 2)``: positive when counter-clockwise in x-right,
    y-up axes (clockwise on an image, whose rows go down)."""
    x, y = ring[:, 0].astype(np.float64), ring[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _to_map(ring: np.ndarray, transform: Optional[Transform]) -> np.ndarray:
    """Pixel-edge coordinates ``(K, 2)`` (x = column, y = row) mapped by ``transform`` (None: kept)."""
    ring = ring.astype(np.float64)
    if transform is None:
        return ring
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    return np.stack([a * ring[:, 0] + b * ring[:, 1] + c, d * ring[:, 0] + e * ring[:, 1] + f], axis=1)


def _geojson_ring(ring: np.ndarray, counter_clockwise: bool) -> list[list[float]]:
    """A closed GeoJSON ring (first vertex repeated last) wound as asked (RFC 7946: outer rings
    counter-clockwise, holes clockwise)."""
    if (signed_area(ring) > 0) != counter_clockwise:
        ring = ring[::-1]
    return [[float(x), float(y)] for x, y in ring] + [[float(ring[0][0]), float(ring[0][1])]]


def class_regions(mask: np.ndarray, cls: int) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """The connected regions of class ``cls`` in ``mask`` as exact pixel-edge rings.

    Args:
        mask: ``(H, W)`` integer class indices.
        cls: the class traced.

    Returns:
        ``[(outer ring, [hole rings])]``, each ring ``(K, 2)`` int64 pixel-edge vertices (x =
        column, y = row), not closed.
    """
    binary = np.ascontiguousarray(mask == cls, dtype=np.uint8)
    if not binary.any():
        return []
    scaled = cv2.resize(binary, (2 * binary.shape[1], 2 * binary.shape[0]), interpolation=cv2.INTER_NEAREST)
    # a one-pixel frame keeps regions at the image border from touching the trace's edge
    scaled = cv2.copyMakeBorder(scaled, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = cv2.findContours(scaled, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=(-1, -1))
    if hierarchy is None:
        return []
    regions = []
    for i, (nxt, _prev, child, parent) in enumerate(hierarchy[0]):
        if parent != -1:
            continue  # a hole: taken with its outer boundary below
        holes = []
        while child != -1:
            holes.append(_edge_ring(contours[child]))
            child = hierarchy[0][child][0]
        regions.append((_edge_ring(contours[i]), holes))
    return regions


def mask_features(mask: np.ndarray, tolerance: float = 1.0, transform: Optional[Transform] = None,
                  background: Optional[int] = 0) -> list[dict]:
    """GeoJSON features of ``mask``: one Polygon per connected region of each class, holes kept.

    Args:
        mask: ``(H, W)`` integer class indices.
        tolerance: Douglas-Peucker tolerance in pixels (0 = the exact pixel edges). A ring the
            tolerance would collapse keeps its exact shape.
        transform: the affine pixel-to-map transform of a georeferenced image (coordinates are then
            map coordinates); None: pixel coordinates (x = column, y = row, both at pixel edges).
        background: a class left out (None: every class gets features).

    Returns:
        Features in class order, then in OpenCV's trace order; each has ``properties`` ``class``
        and ``pixels`` (the region's pixel count: its exact area in pixels, before simplifying).

    Raises:
        ValueError: a mask that is not 2-D integers, or a negative or non-finite tolerance.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype.kind not in "uib":
        raise ValueError(f"a mask of (H, W) integer class indices is needed, not {mask.dtype} {mask.shape}")
    if not np.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be a finite number of pixels >= 0")
    features = []
    for cls in np.unique(mask).tolist():
        if background is not None and cls == background:
            continue
        for outer, holes in class_regions(mask, cls):
            pixels = round(abs(signed_area(outer)) - sum(abs(signed_area(h)) for h in holes))
            rings = [_geojson_ring(_to_map(_simplify(outer, tolerance), transform), True)]
            rings += [_geojson_ring(_to_map(_simplify(h, tolerance), transform), False) for h in holes]
            features.append({"type": "Feature", "properties": {"class": int(cls), "pixels": pixels},
                             "geometry": {"type": "Polygon", "coordinates": rings}})
    return features


def crs_member(crs: Optional[str]) -> Optional[dict]:
    """The GeoJSON ``crs`` member GDAL and QGIS read: ``urn:ogc:def:crs:EPSG::<code>`` for an EPSG
    code (``"EPSG:32633"``, or a WKT whose last AUTHORITY/ID is EPSG), else the WKT itself (which
    GDAL accepts as a name); None without a CRS."""
    if not crs:
        return None
    match = re.fullmatch(r"EPSG:(\d+)", crs.strip(), re.IGNORECASE)
    codes = re.findall(r'(?:AUTHORITY|ID)\[\s*"EPSG"\s*,\s*"?(\d+)"?\s*\]\s*\]*\s*$', crs.strip())
    code = match.group(1) if match else (codes[-1] if codes else None)
    name = f"urn:ogc:def:crs:EPSG::{code}" if code else crs
    return {"type": "name", "properties": {"name": name}}


def write_polygons(path: Path, mask: np.ndarray, tolerance: float = 1.0, transform: Optional[Transform] = None,
                   crs: Optional[str] = None, overwrite: bool = True) -> int:
    """Write :func:`mask_features` of ``mask`` as a GeoJSON FeatureCollection, atomically.

    Args:
        path: the ``.geojson`` file.
        mask, tolerance, transform: see :func:`mask_features` (class 0, the background, is left out).
        crs: the image's CRS (``"EPSG:<code>"`` or WKT) when it is georeferenced; written as the
            collection's ``crs`` member (see :func:`crs_member`).
        overwrite: False: never replace an existing ``path`` (FileExistsError, the file left as it is).

    Returns:
        The number of features written.
    """
    features = mask_features(mask, tolerance, transform)
    collection: dict = {"type": "FeatureCollection"}
    member = crs_member(crs) if transform is not None else None
    if member:
        collection["crs"] = member
    collection["features"] = features
    text = json.dumps(collection, separators=(",", ":"))
    atomic_write(Path(path), lambda fh: fh.write(text.encode()), overwrite)
    return len(features)


class KeptRows:
    """Passes bands of mask rows on to ``writer`` (anything with ``write_rows(y0, rows)``, e.g. a
    :class:`utils.raster_write.MaskWriter`) and keeps the whole ``(height, width)`` mask in
    :attr:`array`, for :func:`write_polygons` once the last band is written."""

    def __init__(self, writer, height: int, width: int):
        self.writer = writer
        self.array = np.zeros((height, width), np.uint8)

    def write_rows(self, y0: int, rows: np.ndarray) -> None:
        """Write ``rows`` (``(h, width)`` or ``(h, width, 1)`` class indices) from row ``y0`` on."""
        self.writer.write_rows(y0, rows)
        rows = np.asarray(rows)
        self.array[y0:y0 + len(rows)] = rows[..., 0] if rows.ndim == 3 else rows
