"""Where a scene lies on Earth: scene pixels -> the scene's CRS -> WGS84 longitude/latitude.

The affine transform maps pixel corners (x right, y down) to the CRS, so a feature in scene pixels needs only that
transform for the scene CRS, and :func:`rasterio.warp.transform_geom` (GDAL/PROJ, longitude first) for RFC 7946's
WGS84. A scene without a CRS or without a transform cannot be placed: its outputs stay in pixel coordinates, and
:func:`warn_if_not_georeferenced` says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from rasterio.warp import transform_geom
from shapely import affinity
from shapely.geometry import MultiPolygon, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

WGS84 = CRS.from_epsg(4326)
#: Decimal places written: 7 for degrees (about 1 cm), 3 for metres and pixels (1 mm / a thousandth of a pixel).
DEGREE_DIGITS = 7
LINEAR_DIGITS = 3


@dataclass(frozen=True)
class GeoReference:
    """A scene's pixel grid: size, CRS (None when the raster has none) and affine transform."""

    width: int
    height: int
    crs: CRS | None
    transform: Affine

    @classmethod
    def of(cls, source: Any) -> GeoReference:
        """From anything with ``width``, ``height``, ``crs`` and ``transform`` (a scene source, a rasterio dataset)."""
        crs = source.crs
        return cls(int(source.width), int(source.height), CRS.from_user_input(crs) if crs else None,
                   Affine(*tuple(source.transform)[:6]))

    @property
    def georeferenced(self) -> bool:
        """Both a CRS and a transform other than the identity GDAL reports for rasters without one."""
        return self.crs is not None and not self.transform.almost_equals(Affine.identity())

    def to_crs(self, geometry: BaseGeometry) -> BaseGeometry:
        """Scene pixels -> scene CRS (pixels unchanged when the scene is not georeferenced)."""
        if not self.georeferenced:
            return geometry
        t = self.transform
        return affinity.affine_transform(geometry, [t.a, t.b, t.d, t.e, t.c, t.f])

    def to_wgs84(self, geometries: Sequence[BaseGeometry]) -> list[dict[str, Any]]:
        """Scene pixels -> GeoJSON geometry mappings in WGS84 longitude/latitude (pixels when not georeferenced)."""
        if not geometries:
            return []
        if not self.georeferenced:
            return [_geojson(g, LINEAR_DIGITS) for g in geometries]
        projected = [mapping(self.to_crs(g)) for g in geometries]
        return [_geojson(shape(g), DEGREE_DIGITS) for g in transform_geom(self.crs, WGS84, projected)]

    def to_crs_mappings(self, geometries: Sequence[BaseGeometry]) -> list[dict[str, Any]]:
        """Scene pixels -> GeoJSON geometry mappings in the scene CRS, rounded to what the CRS's unit needs."""
        digits = DEGREE_DIGITS if self.crs is not None and self.crs.is_geographic else LINEAR_DIGITS
        return [_geojson(self.to_crs(g), digits) for g in geometries]

    def crs_name(self) -> str | None:
        """``EPSG:32633`` when the CRS has an EPSG code, else its WKT; None without a CRS."""
        if self.crs is None:
            return None
        epsg = self.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg is not None else self.crs.to_wkt()


def warn_if_not_georeferenced(georef: GeoReference, name: str) -> bool:
    """Warn (rasterio's NotGeoreferencedWarning) that ``name``'s outputs are in pixel coordinates; True if so."""
    if georef.georeferenced:
        return False
    missing = "CRS" if georef.crs is None else "geotransform"
    warnings.warn(f"{name} has no {missing}: scene outputs are in pixel coordinates (x right, y down), not lon/lat",
                  NotGeoreferencedWarning, stacklevel=2)
    return True


def _geojson(geometry: BaseGeometry, digits: int) -> dict[str, Any]:
    """A GeoJSON geometry mapping, rings oriented by RFC 7946's right-hand rule (exteriors counterclockwise in the
    output axes; the y-down pixel grid or a north-up transform would otherwise flip them), rounded."""
    if geometry.geom_type == "Polygon":
        geometry = orient(geometry, 1.0)
    elif geometry.geom_type == "MultiPolygon":
        geometry = MultiPolygon([orient(p, 1.0) for p in geometry.geoms])
    return rounded(mapping(geometry), digits)


def rounded(geometry: dict[str, Any], digits: int) -> dict[str, Any]:
    """A GeoJSON geometry mapping with every coordinate rounded to ``digits`` decimals, as lists (JSON arrays)."""
    def walk(value: Any) -> Any:
        if isinstance(value, (int, float)):
            return round(float(value), digits)
        return [walk(v) for v in value]

    out = dict(geometry)
    if "coordinates" in out:
        out["coordinates"] = walk(out["coordinates"])
    if "geometries" in out:
        out["geometries"] = [rounded(g, digits) for g in out["geometries"]]
    return out
