"""What a pipeline call may take as images, turned into requests of named ``H x W x C`` arrays.

One image is a path (``str`` / ``PathLike``), a Pillow image or a numpy array (``H x W`` or ``H x W x C``, channels
last, any band count and numeric dtype). A tuple is one request of several images (a before/after pair); a list is a
batch of such requests. Files go through :mod:`rsvlm_edge.imageio`; in-memory images get the same treatment as the
file readers give their decoded pixels, so an array and the file it was saved to make the same request.

In-memory images have no file name, so results and errors call them ``<array K>`` / ``<PIL K>``, ``K`` being the
image's position among all images of the call (for a batch of single images: its index in the list).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from rsvlm_edge.imageio import pillow_to_array, read_image_with_meta
from rsvlm_edge.preprocess import PreprocessError, explain_sensor, prepare_image

#: One image as a call takes it; PIL.Image.Image is named as Any so that Pillow stays an import of use, not of typing.
ImageInput = Union[str, os.PathLike, np.ndarray, Any]
#: One request: an image, or a tuple of images (before, after).
RequestInput = Union[ImageInput, tuple]

#: Most bands any sensor takes (a 13-band Sentinel-2 L1C stack); more suggests a channels-first array.
MAX_BANDS = 13


@dataclass
class Tile:
    """One request's images, read and prepared."""

    paths: list[str]  # file paths, or ``<array K>`` / ``<PIL K>`` for in-memory images
    sensor: str
    pixels: list[np.ndarray]  # float32 (C, image_size, image_size) each
    sizes: list[tuple[int, int]]  # (width, height) of each original image
    sensor_reason: str = ""  # "stated", or what the guess went by ("3 bands", "1 float band with negative values")


@dataclass
class Loaded:
    """An image's native pixels and what the preprocessing needs to know about where they came from."""

    array: np.ndarray  # H x W x C, native dtype
    name: str
    nodata: float | None = None


def split_requests(images: Any) -> tuple[bool, list[list[ImageInput]]]:
    """``(batched, requests)``: a list is a batch, anything else one request; each request a list of images.

    Only types are checked here (no file is opened), so a bad item fails before any work is done."""
    if isinstance(images, list):
        if not images:
            raise ValueError("no images given: pass a path, PIL image or numpy array, a (before, after) tuple, "
                             "or a non-empty list of those")
        return True, [_request(item, f"images[{i}]") for i, item in enumerate(images)]
    return False, [_request(images, "images")]


def _request(item: Any, where: str) -> list[ImageInput]:
    if isinstance(item, tuple):
        if not item:
            raise ValueError(f"{where}: an empty tuple; a before/after pair is (before, after)")
        for j, image in enumerate(item):
            _check_type(image, f"{where}[{j}]")
        return list(item)
    if isinstance(item, list):
        raise TypeError(f"{where}: a list inside the batch; give a before/after pair as a tuple (before, after)")
    _check_type(item, where)
    return [item]


def _check_type(image: Any, where: str) -> None:
    if isinstance(image, (str, os.PathLike, np.ndarray)) or _is_pil(image):
        return
    raise TypeError(f"{where}: give an image as a path, a PIL image or a numpy array (H x W x C), "
                    f"got {type(image).__name__} {_short_repr(image)}")


def _is_pil(image: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # Pillow absent: nothing can be a PIL image
        return False
    return isinstance(image, Image.Image)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def image_names(requests: Sequence[Sequence[ImageInput]]) -> list[list[str]]:
    """The name each image has in results and errors: its path, or ``<array K>`` / ``<PIL K>``."""
    names, k = [], 0
    for request in requests:
        row = []
        for image in request:
            if isinstance(image, (str, os.PathLike)):
                row.append(str(image))
            else:
                row.append(f"<{'array' if isinstance(image, np.ndarray) else 'PIL'} {k}>")
            k += 1
        names.append(row)
    return names


def check_array(array: np.ndarray, name: str) -> np.ndarray:
    """An in-memory array as the file readers return pixels: ``H x W x C``, numeric, non-empty."""
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: image arrays must hold numbers (bool, integers or floats), got dtype {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3:
        hint = "; a batch goes in a list: pipe([a, b])" if array.ndim == 4 else ""
        raise ValueError(f"{name}: an image array is H x W or H x W x C (channels last), got shape {array.shape}{hint}")
    if 0 in array.shape:
        raise ValueError(f"{name}: empty image array of shape {array.shape}")
    if array.shape[2] > MAX_BANDS and array.shape[0] <= MAX_BANDS:
        raise ValueError(f"{name}: shape {array.shape} has {array.shape[2]} bands, more than any sensor takes; "
                         f"channels-first? pass np.moveaxis(array, 0, -1)")
    return array


def load(image: ImageInput, name: str) -> Loaded:
    """Native pixels of one image: files through the readers, PIL images converted by mode as the readers convert."""
    if isinstance(image, (str, os.PathLike)):
        array, meta = read_image_with_meta(image)
        return Loaded(array, name, meta.get("nodata"))
    if isinstance(image, np.ndarray):
        return Loaded(check_array(image, name), name)
    if 0 in image.size:
        raise ValueError(f"{name}: empty PIL image of size {image.size}")
    return Loaded(check_array(pillow_to_array(image), name), name)


def prepare_tile(images: Sequence[Loaded], sensor: str | None, image_size: int, known_sensors: dict[str, int],
                 image_preprocess: str = "rsvlm") -> Tile:
    """Prepare one request's images for the model; the sensor is guessed from the first image when not given.

    ``image_preprocess`` is the model config's (see :mod:`rsvlm_edge.preprocess`). Errors name the image."""
    chosen, reason = (sensor, "stated") if sensor else explain_sensor(images[0].array, image_preprocess)
    if chosen not in known_sensors:
        raise ValueError(f"sensor {chosen!r} is not one this model has a stem for ({', '.join(known_sensors)})")
    pixels = []
    for image in images:
        try:
            pixels.append(prepare_image(image.array, chosen, image_size, nodata=image.nodata, source=image.name,
                                        mode=image_preprocess))
        except PreprocessError as exc:
            if image.name in str(exc):
                raise
            raise PreprocessError(f"{image.name}: {exc}") from None
    sizes = [(int(i.array.shape[1]), int(i.array.shape[0])) for i in images]
    return Tile(paths=[i.name for i in images], sensor=chosen, pixels=pixels, sizes=sizes,
                sensor_reason=reason if sensor else f"guessed: {reason}")


def read_tile(paths: Sequence[str | Path], sensor: str | None, image_size: int, known_sensors: dict[str, int],
              image_preprocess: str = "rsvlm") -> Tile:
    """Read and prepare one request's image files."""
    return prepare_tile([load(p, str(p)) for p in paths], sensor, image_size, known_sensors, image_preprocess)
