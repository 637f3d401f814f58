"""Checked extraction of an uploaded ImageFolder archive (zip or tar.gz), member by member.

Refused: absolute paths, `..`, links and other non-regular members, paths outside
`train/<class>/<image>` and `test/<class>/<image>` (under at most one top-level folder), names that are
not UTF-8 or that no file system stores (a part over 255 bytes), non-image files, more members or bytes
than allowed, images over the pixel cap, and any image Pillow cannot fully decode. Nothing is left
behind on failure: the caller extracts into a scratch folder.
"""

from __future__ import annotations

import gzip
import io
import lzma
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from models.contract.catalog import IMAGE_SUFFIXES
from models.contract.onnx_model import image_error
from service.store.errors import InvalidInput, PayloadTooLarge

IGNORED_PARTS = ("__MACOSX",)  # metadata folders added by archivers
NAME_MAX_BYTES = 255  # the longest file or folder name common file systems store


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_bytes: int  # all members together, uncompressed
    max_image_pixels: int
    max_member_bytes: int  # one member, uncompressed: what is held in memory at once


@dataclass(frozen=True)
class FolderSummary:
    class_names: tuple[str, ...]
    train_counts: tuple[int, ...]
    test_counts: tuple[int, ...]


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    read: object  # () -> bytes, reading at most size + 1 bytes


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return archive.open(info).read(info.file_size + 1)
    except (OSError, lzma.LZMAError) as exc:  # what bz2 and lzma raise on a stream that does not decode
        raise InvalidInput(f"archive member {info.filename!r} does not decompress: {exc}") from exc


def _zip_members(archive: zipfile.ZipFile) -> Iterator[_Member]:
    for info in archive.infolist():
        mode = info.external_attr >> 16
        if (mode & 0o170000) == 0o120000:
            raise InvalidInput(f"archive member {info.filename!r} is a symbolic link")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise InvalidInput(f"archive member {info.filename!r} is encrypted")
        yield _Member(info.filename, info.file_size, lambda info=info: _read_zip_member(archive, info))


def _tar_members(archive: tarfile.TarFile) -> Iterator[_Member]:
    for info in archive:
        if info.isdir():
            continue
        if not info.isfile():
            kind = "link" if info.issym() or info.islnk() else "special file"
            raise InvalidInput(f"archive member {info.name!r} is a {kind}")
        yield _Member(info.name, info.size, lambda info=info: archive.extractfile(info).read(info.size + 1))


def _checked_parts(name: str) -> tuple[str, ...] | None:
    """The path's parts, or None for archiver metadata to skip; raises on hostile paths."""
    if "\\" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise InvalidInput(f"archive member {name!r} has an absolute or non-POSIX path")
    parts = tuple(p for p in PurePosixPath(name).parts if p not in ("", "."))
    if any(p == ".." for p in parts):
        raise InvalidInput(f"archive member {name!r} points outside the archive ('..')")
    try:
        longest = max((len(p.encode()) for p in parts), default=0)
    except UnicodeEncodeError as exc:  # tar names that are not UTF-8 are read with surrogates in their place
        raise InvalidInput(f"archive member {name!r} has a name that is not UTF-8") from exc
    if longest > NAME_MAX_BYTES:
        raise InvalidInput(f"archive member {name[:60]!r}... has a file or folder name over {NAME_MAX_BYTES} bytes")
    if not parts or any(p in IGNORED_PARTS or p.startswith(".") for p in parts):
        return None
    return parts


def _decode_checked(data: bytes, name: str, max_pixels: int) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidInput(f"image {name!r} is {width}x{height}, over the {max_pixels}-pixel limit")
            image.load()  # a full decode: truncated or corrupt files fail here
    except InvalidInput:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{name!r} is not a readable image: {image_error(exc)}") from exc


def extract_image_folder(source: Path, dest: Path, limits: ArchiveLimits) -> FolderSummary:
    """Check every member of `source` and write the images under `dest/train|test/<class>/`."""
    if zipfile.is_zipfile(source):
        try:
            with zipfile.ZipFile(source) as archive:
                return _extract(_zip_members(archive), dest, limits)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, zlib.error, EOFError,
                UnicodeDecodeError) as exc:  # a name flagged UTF-8 that is not
            raise InvalidInput(f"the zip archive is corrupt or unsupported: {exc}") from exc
    try:
        archive = tarfile.open(source, mode="r:gz")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise InvalidInput("the upload is not a readable zip or tar.gz archive") from exc
    with archive:
        try:
            return _extract(_tar_members(archive), dest, limits)
        except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
            raise InvalidInput(f"the tar.gz archive is corrupt: {exc}") from exc


def _extract(members: Iterator[_Member], dest: Path, limits: ArchiveLimits) -> FolderSummary:
    entries: list[tuple[tuple[str, ...], _Member]] = []
    total = 0
    for count, member in enumerate(members, start=1):
        if count > limits.max_members:
            raise PayloadTooLarge(f"the archive has more than {limits.max_members} members")
        parts = _checked_parts(member.name)
        if parts is None:
            continue
        # checked at the member's header: a tar.gz is not read on past an oversized member
        if member.size > limits.max_member_bytes:
            raise PayloadTooLarge(
                f"archive member {member.name!r} unpacks to more than {limits.max_member_bytes} bytes")
        total += member.size
        if total > limits.max_bytes:
            raise PayloadTooLarge(f"the archive unpacks to more than {limits.max_bytes} bytes")
        entries.append((parts, member))
    if not entries:
        raise InvalidInput("the archive holds no files")

    # allow one wrapping folder, as made by `zip -r name.zip name/`
    tops = {parts[0] for parts, _ in entries}
    strip = 1 if len(tops) == 1 and next(iter(tops)) not in ("train", "test") else 0
    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    extracted: set[tuple[str, str, str]] = set()
    written = 0
    for parts, member in entries:
        rel = parts[strip:]
        if len(rel) != 3 or rel[0] not in counts:
            raise InvalidInput(f"archive member {member.name!r} is not train/<class>/<image> or test/<class>/<image>")
        split, cls, filename = rel
        if (split, cls, filename) in extracted:  # a second copy would overwrite the first and skew the counts
            raise InvalidInput(f"archive member {member.name!r} appears twice")
        extracted.add((split, cls, filename))
        if not filename.lower().endswith(IMAGE_SUFFIXES):
            raise InvalidInput(f"archive member {member.name!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        if len(cls) > 200:
            raise InvalidInput(f"class name {cls[:40]!r}... is longer than 200 characters")
        data = member.read()  # at most the declared size + 1 bytes
        if len(data) != member.size:
            raise InvalidInput(f"archive member {member.name!r} is not the size its header declares")
        written += len(data)
        if written > limits.max_bytes:
            raise PayloadTooLarge(f"the archive unpacks to more than {limits.max_bytes} bytes")
        _decode_checked(data, member.name, limits.max_image_pixels)
        target = dest / split / cls / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        counts[split][cls] = counts[split].get(cls, 0) + 1

    class_names = tuple(sorted(counts["train"]))
    if len(class_names) < 2:
        raise InvalidInput("train/ must hold at least two class folders with images")
    unknown = sorted(set(counts["test"]) - set(class_names))
    if unknown:
        raise InvalidInput(f"test/ has classes that train/ lacks: {unknown[:10]}")
    if not counts["test"]:
        raise InvalidInput("test/ holds no images: the held-out split is needed for evaluation")
    return FolderSummary(class_names, tuple(counts["train"][c] for c in class_names),
                         tuple(counts["test"].get(c, 0) for c in class_names))
