"""Whole georeferenced scenes: tiled inference, merging across tiles, GeoJSON and GeoTIFF outputs."""
