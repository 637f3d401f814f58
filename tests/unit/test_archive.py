"""Archive checks that must hold before a member's data is read."""

from __future__ import annotations

import gzip
import io
import tarfile

import pytest

from service.api.datasets.archive import ArchiveLimits, extract_image_folder
from service.store.errors import PayloadTooLarge

LIMITS = ArchiveLimits(max_members=10, max_bytes=2**40, max_image_pixels=512 * 512, max_member_bytes=2**20)


def test_a_tar_member_over_the_cap_is_refused_at_its_header_without_reading_on(tmp_path):
    # The header declares 2 GiB but no data follows: reading on would hit the end of the stream (a
    # corrupt-archive 422), so a 413 proves the cap was checked at the header.
    header = tarfile.TarInfo("train/zeros/bomb.png")
    header.size = 2 * 2**30
    raw = header.tobuf(format=tarfile.GNU_FORMAT)
    source = tmp_path / "bomb.tar.gz"
    with gzip.open(source, "wb") as out:
        out.write(raw)
    with pytest.raises(PayloadTooLarge, match="unpacks to more than 1048576 bytes"):
        extract_image_folder(source, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_a_small_valid_tar_member_still_extracts(tmp_path):
    from PIL import Image

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (200, 10, 10)).save(buffer, format="PNG")
        return buffer.getvalue()

    source = tmp_path / "ok.tar.gz"
    with tarfile.open(source, "w:gz") as archive:
        for name in ("train/a/1.png", "train/b/1.png", "test/a/1.png"):
            data = png()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    summary = extract_image_folder(source, tmp_path / "out", LIMITS)
    assert summary.class_names == ("a", "b") and summary.train_counts == (1, 1) and summary.test_counts == (1, 0)
