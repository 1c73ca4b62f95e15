"""Opening a scene with rasterio (GDAL): one raster, a stack of band files, or a before/after pair, on one grid.

Two steps, so that a worker process can redo the second: :func:`resolve_scene` turns what the user named (files,
folders, ``--bands``) into a :class:`SceneSpec` (plain, picklable: file paths per image, band names, the stated
sensor); :func:`open_scene` opens it as a :class:`SceneSource`, whose :meth:`SceneSource.read` returns the pixels of
one window, one ``(C, H, W)`` array per image, never more of the scene than that window.

The common grid:

* one raster: its own pixels;
* a band stack: the grid of its finest band (Sentinel-2: a 10 m band); coarser bands are resampled onto it on the
  read (bilinear), bands in another CRS are warped (rasterio ``WarpedVRT``). Files without georeferencing are
  stretched onto the largest one's pixels;
* a before/after pair: the before image's pixels, cropped to the extent both cover; the after image is read on
  that grid (cropped, resampled or warped). Pairs that do not overlap, or where only one side is georeferenced,
  are refused.

Band files are found by name: ``--bands B02,B03,B04,B08`` (or a layout of :data:`LAYOUTS`, such as ``s2-l2a`` or
``s1``) looks in each folder for the file whose name has that band as a word (``..._B02.tif``, ``T33UUP_..._B02_10m
.jp2``, ``s1a-iw-grd-vv-....tiff``); several candidates for one band (an L2A ``R10m``/``R20m``/``R60m`` set) give
the finest one. A folder named without ``--bands`` is matched against the layouts.
"""

from __future__ import annotations

import math
import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from rsvlm_edge.imageio import GDAL_CACHE_MB
from rsvlm_edge.preprocess import MS_BANDS, MS_BANDS_L1C, explain_sensor

#: GDAL's block cache while a scene is read, in MB: a whole row of 512 px blocks of a 20,000 px wide 3-band
#: 16-bit scene (63 MB) stays cached while the tiles that cross it are read, so no block is decoded twice.
SCENE_CACHE_MB = max(GDAL_CACHE_MB, 128)

RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".png", ".jpg", ".jpeg", ".vrt", ".img")


class SceneError(ValueError):
    """A scene that cannot be opened as asked: missing band file, no overlap, unreadable raster... (one line)."""


@dataclass(frozen=True)
class Layout:
    """A product's band files: their names in the model's band order, the sensor, and the product's nodata value
    (used when a file does not tag its own)."""

    bands: tuple[str, ...]
    sensor: str
    nodata: float | None
    title: str


#: Named band layouts for ``--bands``.
LAYOUTS: dict[str, Layout] = {
    "s2-l2a": Layout(MS_BANDS, "ms", 0, "Sentinel-2 L2A, 12 bands"),
    "s2-l1c": Layout(MS_BANDS_L1C, "ms", 0, "Sentinel-2 L1C, 13 bands"),
    "s2-rgb": Layout(("B04", "B03", "B02"), "rgb", 0, "Sentinel-2 true colour"),
    "s1": Layout(("VV", "VH"), "sar", 0, "Sentinel-1 VV + VH"),
}


@dataclass(frozen=True)
class ImageSpec:
    """One image of a scene: its files, and which bands of each (1-based; empty = every band but alpha)."""

    files: tuple[str, ...]
    band_indexes: tuple[int, ...] = ()


@dataclass(frozen=True)
class SceneSpec:
    """What to open: one image (two for a change pair), the band names, the stated sensor and how it was decided.
    Plain data: it pickles, and it is what the resume journal keys a scene by."""

    images: tuple[ImageSpec, ...]
    band_names: tuple[str, ...]
    sensor: str | None = None  # stated (--sensor) or from a layout; None = guess from the pixels
    sensor_reason: str = ""
    nodata: float | None = None  # the layout's nodata, for files that do not tag one

    @property
    def name(self) -> str:
        first = Path(self.images[0].files[0])
        return first.parent.name if len(self.images[0].files) > 1 else first.name

    def to_dict(self) -> dict[str, Any]:
        return {"images": [{"files": list(i.files), "band_indexes": list(i.band_indexes)} for i in self.images],
                "band_names": list(self.band_names), "sensor": self.sensor, "nodata": self.nodata}


# --------------------------------------------------------------------------------------------------- resolving


def resolve_scene(inputs: Sequence[str | Path], *, bands: str | None = None, pair: bool = False,
                  sensor: str | None = None) -> SceneSpec:
    """``inputs`` as the user named them -> a :class:`SceneSpec`. ``pair``: the task compares two dates, so two
    inputs (files or band folders) are before and after; otherwise all inputs are bands of one image."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise SceneError("give a scene: a raster file, band files, or a folder of band files")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise SceneError(f"scene file not found: {', '.join(missing)}")
    layout = _layout(bands)
    if pair:
        if len(paths) != 2:
            raise SceneError(f"a before/after pair takes two scenes (before, after), got {len(paths)} input(s)")
        images = [_image(p, bands, layout) for p in paths]
        names_seen = [names for _, names, _ in images]
        if names_seen[0] != names_seen[1] and not (bands or layout):
            raise SceneError(f"the before and after scenes have different bands ({', '.join(names_seen[0])} vs "
                             f"{', '.join(names_seen[1])})")
    elif len(paths) == 1:
        images = [_image(paths[0], bands, layout)]
    else:
        if any(p.is_dir() for p in paths):
            raise SceneError("give one folder of band files, or band files, not both")
        images = [_stack(paths, bands, layout)]
    specs = tuple(spec for spec, _, _ in images)
    band_names = images[0][1]
    found_layout = images[0][2]
    reason = ""
    if sensor:
        reason = "stated (--sensor)"
    elif found_layout is not None:
        sensor, reason = found_layout.sensor, f"from the band layout ({found_layout.title})"
    return SceneSpec(specs, tuple(band_names), sensor, reason, found_layout.nodata if found_layout else None)


def _layout(bands: str | None) -> Layout | None:
    if bands is None or bands.strip().lower() not in LAYOUTS:
        return None
    return LAYOUTS[bands.strip().lower()]


def _band_list(bands: str | None, layout: Layout | None) -> list[str] | None:
    if layout is not None:
        return list(layout.bands)
    if bands is None:
        return None
    names = [b.strip() for b in bands.split(",") if b.strip()]
    if not names:
        raise SceneError(f"--bands {bands!r}: give band names (B02,B03,B04) or a layout ({', '.join(LAYOUTS)})")
    return names


def _image(path: Path, bands: str | None, layout: Layout | None) -> tuple[ImageSpec, list[str], Layout | None]:
    """One image from one input: a raster file, or a folder of band files."""
    if path.is_dir():
        return _folder(path, bands, layout)
    names = _band_list(bands, layout)
    if names and all(n.isdigit() for n in names):
        indexes = tuple(int(n) for n in names)
        if 0 in indexes:
            raise SceneError(f"--bands {bands}: band numbers start at 1")
        return ImageSpec((str(path),), indexes), [f"band {i}" for i in indexes], None
    if names is not None:
        raise SceneError(f"--bands {bands}: names bands of separate files; {path} is one raster (give band "
                         f"numbers, e.g. --bands 3,2,1, or a folder of band files)")
    return ImageSpec((str(path),)), [], None


def _folder(folder: Path, bands: str | None, layout: Layout | None) -> tuple[ImageSpec, list[str], Layout | None]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
    if not files:
        raise SceneError(f"no raster files ({', '.join(RASTER_SUFFIXES)}) in {folder}")
    names = _band_list(bands, layout)
    if names is None:  # no --bands: the first layout whose every band is there
        for candidate in LAYOUTS.values():
            if all(_candidates(files, band) for band in candidate.bands) and \
                    len({_normalise(b) for b in candidate.bands}) == len(_band_files(files)):
                names, layout = list(candidate.bands), candidate
                break
        else:
            raise SceneError(f"{folder}: cannot tell which file is which band; name them with --bands "
                             f"(e.g. --bands B04,B03,B02, or a layout: {', '.join(LAYOUTS)})")
    chosen = [_pick(folder, files, band) for band in names]
    return ImageSpec(tuple(str(p) for p in chosen)), names, layout


def _stack(paths: list[Path], bands: str | None, layout: Layout | None) -> tuple[ImageSpec, list[str], Layout | None]:
    """Band files named one by one: in the user's order, or sorted into ``--bands`` order by their names."""
    names = _band_list(bands, layout)
    if names is None:
        tokens = [_band_token(p) for p in paths]
        if polarisations(paths):
            layout = LAYOUTS["s1"]
            ordered = sorted(paths, key=lambda p: layout.bands.index(_band_token(p) or ""))
            return ImageSpec(tuple(str(p) for p in ordered)), list(layout.bands), layout
        return ImageSpec(tuple(str(p) for p in paths)), [t or p.stem for t, p in zip(tokens, paths)], None
    if len(names) != len(paths):
        raise SceneError(f"--bands names {len(names)} band(s), {len(paths)} file(s) were given")
    chosen = [_pick(None, paths, band) for band in names]
    return ImageSpec(tuple(str(p) for p in chosen)), names, layout


_WORD = re.compile(r"[A-Za-z0-9]+")


def _normalise(band: str) -> str:
    """``b2``, ``B2``, ``B02`` -> ``B02``; ``b8a``, ``B08A`` -> ``B8A``; ``vv`` -> ``VV``."""
    b = band.strip().upper()
    if re.fullmatch(r"B0?8A", b):
        return "B8A"
    m = re.fullmatch(r"B0*(\d{1,2})", b)
    return f"B{int(m.group(1)):02d}" if m else b


def _words(path: Path) -> list[str]:
    return [_normalise(w) for w in _WORD.findall(path.name.split(".")[0].replace("_", " "))]


def _band_token(path: Path) -> str | None:
    known = {_normalise(b) for layout in LAYOUTS.values() for b in layout.bands}
    hits = [w for w in _words(path) if w in known]
    return hits[-1] if hits else None


def polarisations(paths: Sequence[Path]) -> bool:
    """Whether two files are the VV and VH bands of one Sentinel-1 scene (by their names)."""
    return len(paths) == 2 and {_band_token(Path(p)) for p in paths} == {"VV", "VH"}


def _band_files(files: list[Path]) -> set[str]:
    return {t for t in (_band_token(p) for p in files) if t}


def _candidates(files: Sequence[Path], band: str) -> list[Path]:
    want = _normalise(band)
    return [p for p in files if want in _words(p)]


def _pick(folder: Path | None, files: Sequence[Path], band: str) -> Path:
    found = _candidates(files, band)
    if not found:
        where = f"in {folder}" if folder is not None else "among the files given"
        raise SceneError(f"no band file for {band} {where} (looked for a name with {_normalise(band)} as a word)")
    if len(found) == 1:
        return found[0]
    return min(found, key=_pixel_area)  # e.g. an L2A band at 10, 20 and 60 m: the finest


def _pixel_area(path: Path) -> float:
    import rasterio

    with _quiet(), rasterio.open(path) as ds:
        return abs(ds.transform.a * ds.transform.e) if not ds.transform.is_identity else 1.0 / (ds.width * ds.height)


# --------------------------------------------------------------------------------------------------- opening


@dataclass(frozen=True)
class Grid:
    """The common pixel grid: size, CRS (None when not georeferenced) and the affine pixel -> CRS transform."""

    width: int
    height: int
    crs: Any
    transform: Any

    @property
    def res(self) -> tuple[float, float] | None:
        if self.crs is None:
            return None
        return abs(self.transform.a), abs(self.transform.e)

    @property
    def metres(self) -> bool:
        return self.crs is not None and bool(self.crs.is_projected) and self.crs.linear_units_factor[1] == 1.0


@dataclass
class _Layer:
    """One file's bands of an image, and how a window of the common grid maps into the file."""

    path: str
    dataset: Any  # a rasterio dataset, or a WarpedVRT already on the common grid
    indexes: list[int]
    nodata: float | None
    to_layer: Any  # Affine: common-grid pixels -> this dataset's pixels (identity for a VRT on the grid)

    def read(self, col: int, row: int, width: int, height: int, out: tuple[int, int], dtype: np.dtype) -> np.ndarray:
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        x0, y0 = self.to_layer @ (col, row)
        x1, y1 = self.to_layer @ (col + width, row + height)
        window = Window(x0, y0, x1 - x0, y1 - y0)
        inside = x0 >= -1e-6 and y0 >= -1e-6 and x1 <= self.dataset.width + 1e-6 and y1 <= self.dataset.height + 1e-6
        down = out[0] < (x1 - x0) - 1e-6
        resampling = Resampling.average if down else Resampling.bilinear
        exact = abs((x1 - x0) - out[0]) < 1e-6 and abs((y1 - y0) - out[1]) < 1e-6 and \
            float(x0).is_integer() and float(y0).is_integer()
        if exact:
            resampling = Resampling.nearest
        fill = self.nodata if self.nodata is not None else 0
        data = self.dataset.read(self.indexes, window=window, out_shape=(len(self.indexes), out[1], out[0]),
                                 resampling=resampling, boundless=not inside, fill_value=fill)
        return data.astype(dtype, copy=False)


@dataclass
class SceneSource:
    """An open scene: the common grid, the sensor, and windowed reads. Use as a context manager (or :meth:`close`).

    ``read(window, out_size)`` -> one ``(C, out_h, out_w)`` array per image, in the scene's dtype."""

    spec: SceneSpec
    grid: Grid
    images: list[list[_Layer]]
    dtype: np.dtype
    band_names: list[str]
    sensor: str
    sensor_reason: str
    nodata: float | None
    _stack: ExitStack = field(default_factory=ExitStack, repr=False)

    @property
    def width(self) -> int:
        return self.grid.width

    @property
    def height(self) -> int:
        return self.grid.height

    @property
    def crs(self) -> Any:
        return self.grid.crs

    @property
    def transform(self) -> Any:
        return self.grid.transform

    @property
    def bands(self) -> int:
        return sum(len(layer.indexes) for layer in self.images[0])

    def read(self, window: Any, out_size: tuple[int, int] | None = None) -> list[np.ndarray]:
        """The pixels of ``window`` (a :class:`~rsvlm_edge.scene.tiling.TileWindow`, or anything with col_off,
        row_off, width, height) at ``out_size`` (width, height; default: native), one array per image."""
        import rasterio

        out = out_size or (window.width, window.height)
        arrays = []
        with rasterio.Env(GDAL_CACHEMAX=SCENE_CACHE_MB), _quiet():
            for layers in self.images:
                parts = [layer.read(window.col_off, window.row_off, window.width, window.height, out, self.dtype)
                         for layer in layers]
                arrays.append(parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
        return arrays

    def invalid(self, array: np.ndarray) -> np.ndarray:
        """Boolean ``(H, W)``: pixels that are nodata (or NaN) in every band."""
        bad = np.zeros(array.shape[1:], dtype=bool) if self.nodata is None else np.all(array == self.nodata, axis=0)
        if array.dtype.kind == "f":
            bad |= np.all(~np.isfinite(array), axis=0)
        return bad

    def describe(self) -> str:
        """One line: size, bands, dtype, CRS and pixel size, and the sensor with how it was decided."""
        grid = self.grid
        where = "no georeferencing (pixel coordinates)"
        if grid.crs is not None:
            res = grid.res or (0.0, 0.0)
            unit = " m" if grid.metres else ""
            where = f"{_crs_name(grid.crs)}, {res[0]:g}{unit} x {res[1]:g}{unit} pixels"
        pair = " (before/after pair on their common extent)" if len(self.images) == 2 else ""
        names = f" [{', '.join(self.band_names)}]" if self.band_names else ""
        return (f"scene {self.spec.name}{pair}: {grid.width}x{grid.height}, {self.bands} band(s){names} "
                f"{self.dtype}, {where}; sensor: {self.sensor} ({self.sensor_reason})")

    def info(self) -> dict[str, Any]:
        """What the outputs need to know about the scene (JSON-ready)."""
        return {"name": self.spec.name, "width": self.width, "height": self.height,
                "crs": self.crs.to_wkt() if self.crs is not None else None,
                "crs_name": _crs_name(self.crs) if self.crs is not None else None,
                "transform": list(self.transform)[:6] if self.crs is not None else None,
                "bands": self.band_names, "dtype": str(self.dtype), "sensor": self.sensor,
                "sensor_reason": self.sensor_reason, "nodata": self.nodata,
                "images": [list(i.files) for i in self.spec.images]}

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "SceneSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_scene(spec: SceneSpec) -> SceneSource:
    """Open every file of ``spec`` on the common grid; the sensor is the spec's, else guessed from a sample."""
    import rasterio
    from rasterio.errors import RasterioError

    stack = ExitStack()
    try:
        opened = []
        for image in spec.images:
            datasets = []
            for path in image.files:
                try:
                    with _quiet():
                        datasets.append(stack.enter_context(rasterio.open(path)))
                except RasterioError as exc:
                    raise SceneError(f"cannot open raster {path} ({' '.join(str(exc).split())})") from None
            opened.append(datasets)
        grids = [_image_grid(ds) for ds in opened]
        grid = grids[0] if len(grids) == 1 else _pair_grid(spec, grids)
        images = [_layers(stack, image, datasets, grid) for image, datasets in zip(spec.images, opened)]
        dtypes = {np.dtype(ds.dtypes[i - 1]) for layers in images for layer in layers for ds in [layer.dataset]
                  for i in layer.indexes}
        dtype = np.result_type(*dtypes)
        nodata = next((layer.nodata for layer in images[0] if layer.nodata is not None), spec.nodata)
        counts = {sum(len(layer.indexes) for layer in layers) for layers in images}
        if len(counts) > 1:
            raise SceneError(f"the before and after scenes have different band counts ({' vs '.join(map(str, counts))})")
        band_names = list(spec.band_names) or _band_names(images[0])
        source = SceneSource(spec, grid, images, dtype, band_names, spec.sensor or "", spec.sensor_reason, nodata,
                             stack)
        if not spec.sensor:
            source.sensor, reason = explain_sensor(_sample(source))
            source.sensor_reason = f"guessed: {reason}; --sensor to override"
        return source
    except BaseException:
        stack.close()
        raise


@contextmanager
def _quiet() -> Iterator[None]:
    """Plain images (PNG, JPEG) have no georeferencing by nature: rasterio's warning about it is noise here."""
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        yield


def _crs_name(crs: Any) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_string()[:60]


def _georeferenced(ds: Any) -> bool:
    return ds.crs is not None and not ds.transform.is_identity


def _image_grid(datasets: list[Any]) -> Grid:
    """An image's grid: its finest georeferenced band file, else the largest one's pixels."""
    geo = [ds for ds in datasets if _georeferenced(ds)]
    if geo and len(geo) != len(datasets):
        plain = next(ds for ds in datasets if not _georeferenced(ds))
        raise SceneError(f"{plain.name} has no georeferencing but the other band files do; stack files of one kind")
    if geo:
        for ds in geo:
            if ds.transform.b or ds.transform.d:
                raise SceneError(f"{ds.name}: rotated grids are not supported; warp it north-up first "
                                 f"(gdalwarp)")
        ref = min(geo, key=lambda ds: abs(ds.transform.a * ds.transform.e))
        return Grid(ref.width, ref.height, ref.crs, ref.transform)
    ref = max(datasets, key=lambda ds: ds.width * ds.height)
    return Grid(ref.width, ref.height, None, ref.transform)


def _pair_grid(spec: SceneSpec, grids: list[Grid]) -> Grid:
    """Before's pixels over the extent both images cover."""
    from rasterio.transform import Affine, array_bounds
    from rasterio.warp import transform_bounds
    from rasterio.windows import from_bounds

    before, after = grids
    names = [Path(i.files[0]).name if len(i.files) == 1 else Path(i.files[0]).parent.name for i in spec.images]
    if (before.crs is None) != (after.crs is None):
        plain = names[0] if before.crs is None else names[1]
        raise SceneError(f"{plain} has no georeferencing but the other scene of the pair does; give two "
                         f"georeferenced scenes, or two plain images")
    if before.crs is None:
        return before  # plain images: the after image is stretched onto the before one's pixels
    b = array_bounds(before.height, before.width, before.transform)  # (left, bottom, right, top)
    a = array_bounds(after.height, after.width, after.transform)
    if after.crs != before.crs:
        a = transform_bounds(after.crs, before.crs, *a)
    left, bottom, right, top = max(b[0], a[0]), max(b[1], a[1]), min(b[2], a[2]), min(b[3], a[3])
    if left >= right or bottom >= top:
        raise SceneError(f"{names[0]} ({_crs_name(before.crs)}) and {names[1]} ({_crs_name(after.crs)}) do not "
                         f"overlap: a change pair needs a common extent")
    window = from_bounds(left, bottom, right, top, transform=before.transform)
    col0, row0 = math.ceil(window.col_off - 1e-6), math.ceil(window.row_off - 1e-6)
    col1 = math.floor(window.col_off + window.width + 1e-6)
    row1 = math.floor(window.row_off + window.height + 1e-6)
    col0, row0, col1, row1 = max(col0, 0), max(row0, 0), min(col1, before.width), min(row1, before.height)
    if col1 <= col0 or row1 <= row0:
        raise SceneError(f"{names[0]} and {names[1]} overlap by less than one pixel")
    transform = before.transform @ Affine.translation(col0, row0)
    return Grid(col1 - col0, row1 - row0, before.crs, transform)


def _layers(stack: ExitStack, image: ImageSpec, datasets: list[Any], grid: Grid) -> list[_Layer]:
    from rasterio.enums import ColorInterp, Resampling
    from rasterio.transform import Affine
    from rasterio.vrt import WarpedVRT

    layers = []
    for ds in datasets:
        if image.band_indexes:
            bad = [i for i in image.band_indexes if i > ds.count]
            if bad:
                raise SceneError(f"--bands {bad[0]}: {ds.name} has {ds.count} band(s)")
            indexes = list(image.band_indexes)
        else:
            interp = list(ds.colorinterp)
            if ds.count == 1 and interp and interp[0] == ColorInterp.palette:
                raise SceneError(f"{ds.name}: a palette image; convert it to RGB first (gdal_translate -expand rgb)")
            indexes = [i + 1 for i, ci in enumerate(interp) if ci != ColorInterp.alpha] or [1]
        if len({ds.dtypes[i - 1] for i in indexes}) > 1:
            raise SceneError(f"{ds.name}: bands of different types ({', '.join(sorted(set(ds.dtypes)))})")
        nodata = ds.nodata
        if grid.crs is None:  # plain pixels: stretch onto the grid
            to_layer = Affine.scale(ds.width / grid.width, ds.height / grid.height)
            layers.append(_Layer(ds.name, ds, indexes, nodata, to_layer))
        elif ds.crs == grid.crs:
            layers.append(_Layer(ds.name, ds, indexes, nodata, ~ds.transform @ grid.transform))
        else:
            vrt = stack.enter_context(WarpedVRT(ds, crs=grid.crs, transform=grid.transform, width=grid.width,
                                                height=grid.height, resampling=Resampling.bilinear,
                                                nodata=nodata))
            layers.append(_Layer(ds.name, vrt, indexes, nodata, Affine.identity()))
    return layers


def _band_names(layers: list[_Layer]) -> list[str]:
    names = []
    for layer in layers:
        descriptions = layer.dataset.descriptions
        for i in layer.indexes:
            names.append(descriptions[i - 1] or "")
    return names if any(names) else []


def _sample(source: SceneSource, side: int = 256) -> np.ndarray:
    """A few windows (centre and the four quarter points) stacked as one ``H x W x C`` array for the sensor
    guess: enough pixels to judge, a few blocks read whatever the scene's size."""
    from rsvlm_edge.scene.tiling import TileWindow

    w, h = min(side, source.width), min(side, source.height)
    spots = [(0.5, 0.5), (0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    parts = []
    for fx, fy in spots:
        col = min(max(0, round(source.width * fx - w / 2)), source.width - w)
        row = min(max(0, round(source.height * fy - h / 2)), source.height - h)
        array = source.read(TileWindow(0, col, row, w, h))[0]
        parts.append(np.moveaxis(array, 0, -1))
        if w == source.width and h == source.height:
            break
    return np.concatenate(parts, axis=0)


__all__ = ["SceneSpec", "ImageSpec", "SceneSource", "SceneError", "Grid", "Layout", "LAYOUTS", "resolve_scene",
           "open_scene", "polarisations", "SCENE_CACHE_MB"]
