"""Image sources: what a ``data.train``, ``--images`` or ``--hr`` string names, as a sorted list of files.

A source is an image file, a folder (searched recursively), ``skimage:NAME,...`` (images inside the
scikit-image wheel, nothing to download), or several of these joined by ``;`` (``T91;BSD200``).
:func:`lq_candidates` is the naming rule by which an HR image finds its LQ partner in a folder. Decoding
the files is :mod:`xswinir.images`; Parquet shards, the other kind of source, are :mod:`xswinir.shards`.
"""

from __future__ import annotations

from pathlib import Path

from xswinir.paths import is_remote

# What a folder scan takes for an image (compared lower-case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


# Images inside the scikit-image wheel: real photographs and textures with nothing to download.
# The two default sets are disjoint, so validation never sees a training image.
SKIMAGE_FILES = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "immunohistochemistry": "ihc.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "chelsea": "chelsea.png",
    "camera": "camera.png",
    "coins": "coins.png",
}
SKIMAGE_SETS = {
    "train": ("astronaut", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "brick", "grass",
              "gravel"),
    "val": ("chelsea", "camera", "coins"),
}


def skimage_data_dir() -> Path:
    """The folder of the images that ship inside the scikit-image wheel (see :data:`SKIMAGE_FILES`)."""
    import skimage  # only for its location; a source naming no ``skimage:`` image never imports it

    return Path(skimage.__file__).parent / "data"


def absolute_source(source: str) -> str:
    """A source with its existing local paths made absolute (each part of a ``;`` list); URIs and
    ``skimage:`` names unchanged. Ray Tune trials run in their own working directory."""
    parts = []
    for part in source.split(";"):
        text = part.strip()
        local = text and not is_remote(text) and not text.startswith("skimage:")
        parts.append(str(Path(text).expanduser().resolve()) if local and Path(text).expanduser().exists() else text)
    return ";".join(parts)


def resolve_image_files(source: str | Path) -> list[Path]:
    """The image files a source names, sorted.

    Args:
        source: an image file, a folder (searched recursively for image suffixes), or
            ``skimage:NAME,...`` where a NAME is a key of ``SKIMAGE_FILES`` or of ``SKIMAGE_SETS``; several
            such sources joined by ``;`` (``T91;BSD200``) name all their files, in that order.

    Raises:
        FileNotFoundError: the source names nothing that exists.
    """
    text = str(source)
    if ";" in text:
        return [file for part in text.split(";") if part.strip() for file in resolve_image_files(part.strip())]
    if text.startswith("skimage:"):
        names: list[str] = []
        for name in filter(None, text[len("skimage:"):].split(",")):
            if name in SKIMAGE_SETS:
                names.extend(SKIMAGE_SETS[name])
            elif name in SKIMAGE_FILES:
                names.append(name)
            else:
                raise FileNotFoundError(
                    f"'{name}' is not an image shipped with scikit-image here; choose from "
                    f"{sorted(SKIMAGE_FILES)} or the sets {sorted(SKIMAGE_SETS)}"
                )
        return [skimage_data_dir() / SKIMAGE_FILES[name] for name in names]
    path = Path(text).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        # Hidden files are skipped: macOS "._name.png" resource forks and unfinished atomic writes.
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    raise FileNotFoundError(f"{path} does not exist")


def lq_candidates(hr_name: str, scale: int) -> list[str]:
    """File stems the LQ partner of an HR image may have: ``{stem}x{s}``, ``{stem}_x{s}`` or ``{stem}``.

    The naming of the benchmark sets' LR folders (``babyx2.png``); paired training and ``pack --lq`` match by it.
    """
    stem = Path(hr_name).stem
    return [f"{stem}x{scale}", f"{stem}_x{scale}", stem]
