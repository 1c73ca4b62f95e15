"""GeoTIFFs written by the scene tests: known CRS, transform, pixels and nodata."""

from __future__ import annotations

from pathlib import Path

import numpy as np

ORIGIN = (500000.0, 5300000.0)  # UTM 33N easting / northing of the top-left corner


def write_raster(path: Path, data: np.ndarray, *, crs: str | None = "EPSG:32633", res: float = 10.0,
                 origin: tuple[float, float] = ORIGIN, nodata: float | None = None, tiled: bool = True) -> Path:
    """``data`` (C, H, W) as a GeoTIFF; ``crs=None`` writes a plain TIFF without georeferencing."""
    import rasterio
    from rasterio.transform import from_origin

    count, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": str(data.dtype),
               "nodata": nodata}
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(origin[0], origin[1], res, res))
    if tiled and width >= 16 and height >= 16:
        profile.update(tiled=True, blockxsize=16, blockysize=16)  # windowed reads cross block edges
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data)
    return path


def noise(shape: tuple[int, ...], seed: int = 0, low: int = 100, high: int = 3000, dtype=np.uint16) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, shape).astype(dtype)
