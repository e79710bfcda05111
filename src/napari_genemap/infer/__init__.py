"""Whole-slide prediction: tile grid, tile engine and signed zarr cache, lazy levels, the tile service
process the viewer talks to, and aggregation of the maps over circles and polygons."""
