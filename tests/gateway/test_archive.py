"""Unpacking job archives: order and names, skipped entries, every refusal, counting over trusting."""

from __future__ import annotations

import functools
import gzip
import io
import random
import stat
import struct
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from PIL import Image

from common.errors import BadRequest, PayloadTooLarge, ServiceError
from common.training.dataset import Entry
from gateway.archive import ArchiveLimits, unpack

MiB = 1 << 20
LIMITS = ArchiveLimits(max_images=10, max_uncompressed_bytes=64 * MiB, max_ratio=100, max_file_bytes=8 * MiB)


@functools.cache
def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def noise(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def make_zip(path: Path, files: Sequence[tuple[str | zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            archive.writestr(name, data)
    return path


def make_tar(path: Path, files: Sequence[tuple[str | tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:  # type: ignore[call-overload]
        for name, data in files:
            info = name if isinstance(name, tarfile.TarInfo) else tarfile.TarInfo(name)
            if info.isreg():
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def patch(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


def central_entry(data: bytes | bytearray, index: int) -> int:
    """Offset of the ``index``-th central directory header."""
    at = -1
    for _ in range(index + 1):
        at = data.index(b"PK\x01\x02", at + 1)
    return at


@pytest.fixture
def target(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir()
    return folder


def refuse(source: Path, target: Path, limits: ArchiveLimits = LIMITS) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        unpack(source, target, limits)
    assert list(target.iterdir()) == [], "a refusal leaves the job folder empty"
    return caught.value


def test_zip_with_folders_unpacks_files_in_sorted_name_order(tmp_path: Path, target: Path) -> None:
    files = [
        ("dogs/", b""),
        ("dogs/2.png", b"dog"),
        ("猫/1.png", b"cat"),
        ("a.png", png()),
        ("cats/1.png", b"c"),
    ]
    source = make_zip(tmp_path / "upload", files)
    entries = unpack(source, target, LIMITS)
    assert entries == [
        Entry("a.png", target / "000000"),
        Entry("cats/1.png", target / "000001"),
        Entry("dogs/2.png", target / "000002"),
        Entry("猫/1.png", target / "000003"),
    ]
    assert [entry.path.read_bytes() for entry in entries] == [png(), b"c", b"dog", b"cat"]
    assert sorted(target.iterdir()) == [entry.path for entry in entries]


@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_tar_unpacks_plain_or_compressed_with_leading_dot_slash_removed(
    tmp_path: Path, target: Path, mode: str
) -> None:
    files: list[tuple[str | tarfile.TarInfo, bytes]] = [
        (folder("./cats"), b""),
        ("./cats/2.png", png()),
        ("./cats/1.png", b"one"),
        ("top.png", b"top"),
    ]
    entries = unpack(make_tar(tmp_path / "upload", files, mode), target, LIMITS)
    assert [(entry.name, entry.path.name, entry.path.read_bytes()) for entry in entries] == [
        ("cats/1.png", "000000", b"one"),
        ("cats/2.png", "000001", png()),
        ("top.png", "000002", b"top"),
    ]


def test_hidden_entries_and_macosx_twins_are_skipped(tmp_path: Path, target: Path) -> None:
    skipped = [".DS_Store", "cats/.hidden.png", ".git/config", "__MACOSX/cats/._1.png", "cats/./.x/y.png"]
    source = make_zip(tmp_path / "upload", [(name, b"junk") for name in skipped] + [("cats/1.png", png())])
    assert [entry.name for entry in unpack(source, target, LIMITS)] == ["cats/1.png"]
    assert [path.name for path in target.iterdir()] == ["000000"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("/etc/passwd", "absolute path"),
        ("../evil.png", "'..' component"),
        ("cats/../../evil.png", "'..' component"),
        ("cats\\evil.png", "backslash"),
        ("C:/evil.png", "drive letter"),
        ("c:evil.png", "drive letter"),
        ("bad\x01name.png", "control characters"),
        ("bad\x7fname.png", "control characters"),
        ("x" * 1025, "longer than 1024"),
    ],
)
def test_unsafe_zip_names_are_refused(tmp_path: Path, target: Path, name: str, why: str) -> None:
    source = make_zip(tmp_path / "upload", [("ok.png", png()), (name, png())])
    error = refuse(source, target)
    assert isinstance(error, BadRequest) and error.status == 400
    assert error.code == "unsafe_archive" and why in error.message


def test_nul_in_a_zip_name_is_refused_although_zipfile_cuts_the_name_there(
    tmp_path: Path, target: Path
) -> None:
    source = make_zip(tmp_path / "upload", [("evil.png#.exe", png())])
    patch(source, b"evil.png#.exe", b"evil.png\x00.exe")
    error = refuse(source, target)
    assert error.code == "unsafe_archive" and "control characters" in error.message


def test_absolute_tar_name_is_refused(tmp_path: Path, target: Path) -> None:
    error = refuse(make_tar(tmp_path / "upload", [("/tmp/evil.png", png())]), target)
    assert error.code == "unsafe_archive" and "absolute path" in error.message


def test_tar_name_that_is_not_utf8_is_refused(tmp_path: Path, target: Path) -> None:
    source = make_tar(tmp_path / "upload", [("bad\udcffname.png", png())])  # a raw 0xff byte
    assert b"bad\xffname.png" in source.read_bytes()
    error = refuse(source, target)
    assert error.code == "unsafe_archive" and "not valid UTF-8" in error.message


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (tarfile.SYMTYPE, "symbolic link"),
        (tarfile.LNKTYPE, "hard link"),
        (tarfile.CHRTYPE, "device"),
        (tarfile.BLKTYPE, "device"),
        (tarfile.FIFOTYPE, "fifo"),
    ],
)
def test_tar_links_and_special_files_are_refused(
    tmp_path: Path, target: Path, kind: bytes, words: str
) -> None:
    special = tarfile.TarInfo("cats/2.png")
    special.type, special.linkname = kind, "cats/1.png"
    error = refuse(make_tar(tmp_path / "upload", [("cats/1.png", png()), (special, b"")]), target)
    assert error.code == "unsafe_archive" and words in error.message


def test_zip_symlink_is_refused(tmp_path: Path, target: Path) -> None:
    link = zipfile.ZipInfo("cats/1.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    error = refuse(make_zip(tmp_path / "upload", [(link, b"/etc/passwd")]), target)
    assert error.code == "unsafe_archive" and "symbolic link" in error.message


def test_names_equal_after_normalisation_are_refused(tmp_path: Path, target: Path) -> None:
    source = make_zip(tmp_path / "upload", [("cats/1.png", png()), ("./cats//1.png", png())])
    error = refuse(source, target)
    assert error.code == "unsafe_archive" and "listed more than once" in error.message


def test_refusal_names_ten_problems_then_counts_the_rest(tmp_path: Path, target: Path) -> None:
    source = make_zip(tmp_path / "upload", [(f"../evil{i:02d}.png", png()) for i in range(12)])
    message = refuse(source, target).message
    assert message.count("'..' component") == 10 and "'../evil09.png'" in message
    assert message.endswith("; and 2 more")


def test_more_files_than_max_images_is_refused(tmp_path: Path, target: Path) -> None:
    source = make_zip(tmp_path / "upload", [(f"{i}.png", png()) for i in range(11)])
    error = refuse(source, target)
    assert isinstance(error, BadRequest) and error.code == "too_many_images"
    assert "11 files; at most 10" in error.message


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_an_entry_count_past_the_cap_is_refused_before_the_listing_is_read(
    tmp_path: Path, target: Path, kind: str
) -> None:
    limits = ArchiveLimits(max_images=1, max_uncompressed_bytes=MiB, max_ratio=100, max_file_bytes=MiB)
    if kind == "zip":
        source = make_zip(tmp_path / "upload", [*((f"d{i}/", b"") for i in range(1029)), ("1.png", png())])
    else:
        source = make_tar(
            tmp_path / "upload", [*((folder(f"d{i}"), b"") for i in range(1029)), ("1.png", png())]
        )
    error = refuse(source, target, limits)
    assert error.code == "too_many_images" and "more than 1028 entries" in error.message


def test_file_over_max_file_bytes_is_refused_with_413(tmp_path: Path, target: Path) -> None:
    limits = ArchiveLimits(max_images=10, max_uncompressed_bytes=64 * MiB, max_ratio=100, max_file_bytes=MiB)
    error = refuse(
        make_tar(tmp_path / "upload", [("a.png", png()), ("big.png", noise(MiB + 1))]), target, limits
    )
    assert isinstance(error, PayloadTooLarge) and error.status == 413
    assert error.code == "archive_too_large" and "'big.png'" in error.message


def test_total_over_max_uncompressed_bytes_is_refused(tmp_path: Path, target: Path) -> None:
    limits = ArchiveLimits(max_images=10, max_uncompressed_bytes=MiB, max_ratio=100, max_file_bytes=MiB)
    files: list[tuple[str | tarfile.TarInfo, bytes]] = [(f"{i}.png", noise(400_000)) for i in range(3)]
    error = refuse(make_tar(tmp_path / "upload", files, "w:gz"), target, limits)
    assert error.status == 413 and error.code == "archive_too_large" and "in all" in error.message


def test_zip_entry_with_a_huge_compression_ratio_is_refused(tmp_path: Path, target: Path) -> None:
    source = make_zip(tmp_path / "upload", [("zeros.png", bytes(4 * MiB))])
    error = refuse(source, target)
    assert error.status == 413 and error.code == "archive_too_large"
    assert "'zeros.png' has a compression ratio above 100" in error.message


def test_zip_entry_declaring_bytes_from_zero_compressed_bytes_is_refused(
    tmp_path: Path, target: Path
) -> None:
    source = make_zip(tmp_path / "upload", [("a.png", png())])
    data = bytearray(source.read_bytes())
    struct.pack_into("<I", data, central_entry(data, 0) + 20, 0)  # compressed size
    source.write_bytes(data)
    error = refuse(source, target)
    assert error.code == "archive_too_large" and "compression ratio" in error.message


def gzip_bomb(path: Path, members: list[tuple[str, int]]) -> Path:
    """A tar.gz of zero-filled files, built from a reused gzip member per MiB (fast to make)."""
    zeros = gzip.compress(bytes(MiB))
    with path.open("wb") as out:
        for name, size in members:
            info = tarfile.TarInfo(name)
            info.size = size
            out.write(gzip.compress(info.tobuf(tarfile.GNU_FORMAT)))
            out.write(zeros * (size // MiB))
            out.write(gzip.compress(bytes(-size % 512)))
        out.write(gzip.compress(bytes(10240)))
    return path


def test_gzip_bomb_is_refused_by_its_compression_ratio(tmp_path: Path, target: Path) -> None:
    limits = ArchiveLimits(
        max_images=10, max_uncompressed_bytes=1 << 40, max_ratio=100, max_file_bytes=1 << 40
    )
    error = refuse(gzip_bomb(tmp_path / "upload", [("bomb.png", 50 * MiB)]), target, limits)
    assert error.code == "archive_too_large" and "compression ratio" in error.message


def test_skipped_hidden_bomb_is_stopped_while_reading_the_listing(tmp_path: Path, target: Path) -> None:
    limits = ArchiveLimits(
        max_images=10, max_uncompressed_bytes=1 << 40, max_ratio=100, max_file_bytes=1 << 40
    )
    source = gzip_bomb(tmp_path / "upload", [(".padding", 200 * MiB), ("1.png", MiB)])
    error = refuse(source, target, limits)
    assert error.code == "archive_too_large" and "compression ratio" in error.message


def test_zip_entry_whose_headers_understate_its_size_is_refused(tmp_path: Path, target: Path) -> None:
    source = make_zip(tmp_path / "upload", [("a.png", png()), ("b.png", noise(3 * MiB))])
    data = bytearray(source.read_bytes())
    local = data.index(b"PK\x03\x04", 1)
    struct.pack_into("<I", data, local + 22, 1000)  # uncompressed size, local header
    struct.pack_into("<I", data, central_entry(data, 1) + 24, 1000)  # and central directory
    source.write_bytes(data)
    limits = ArchiveLimits(max_images=10, max_uncompressed_bytes=64 * MiB, max_ratio=100, max_file_bytes=MiB)
    # zipfile stops at the declared 1000 bytes and then fails the CRC; a.png was already written.
    error = refuse(source, target, limits)
    assert error.code == "invalid_archive" and "'b.png' is corrupt or truncated" in error.message


def test_bytes_are_counted_whatever_the_entry_declares(
    tmp_path: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = make_zip(tmp_path / "upload", [("a.png", png())])
    # A reader that yields more than the header says, as a lying entry would without zipfile's cap.
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *args, **kwargs: io.BytesIO(noise(3 * MiB)))
    limits = ArchiveLimits(
        max_images=10, max_uncompressed_bytes=64 * MiB, max_ratio=1e9, max_file_bytes=2 * MiB
    )
    error = refuse(source, target, limits)
    assert error.code == "archive_too_large" and "'a.png' unpacks to more than 2097152" in error.message


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello, world\n" * 100,
        noise(4096),
        b"PK\x03\x04" + noise(200),
        gzip.compress(b"not a tar" * 100),
    ],
    ids=["empty", "text", "noise", "zip-magic-only", "gzip-not-tar"],
)
def test_bytes_that_are_not_an_archive_are_invalid(tmp_path: Path, target: Path, content: bytes) -> None:
    source = tmp_path / "upload"
    source.write_bytes(content)
    error = refuse(source, target)
    assert isinstance(error, BadRequest) and error.code == "invalid_archive"


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_truncated_archive_is_invalid(tmp_path: Path, target: Path, kind: str) -> None:
    files = [("a.png", png()), ("b.png", noise(200_000))]
    source = (
        make_zip(tmp_path / "upload", list(files))
        if kind == "zip"
        else make_tar(tmp_path / "upload", list(files), "w:gz")
    )
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    assert refuse(source, target).code == "invalid_archive"


def test_encrypted_zip_entry_is_invalid(tmp_path: Path, target: Path) -> None:
    source = make_zip(tmp_path / "upload", [("a.png", png())])
    data = bytearray(source.read_bytes())
    for flags in (6, central_entry(data, 0) + 8):  # general purpose flags: local and central
        data[flags] |= 0x1
    source.write_bytes(data)
    error = refuse(source, target)
    assert error.code == "invalid_archive" and "'a.png' is encrypted" in error.message


def test_archive_with_no_files_is_invalid(tmp_path: Path, target: Path) -> None:
    source = make_zip(tmp_path / "upload", [("cats/", b""), (".DS_Store", b"junk")])
    error = refuse(source, target)
    assert error.code == "invalid_archive" and "no files" in error.message


@pytest.mark.parametrize("offset", [2**62, 2**64 - 1, 10**9])
def test_a_zip64_locator_pointing_outside_the_archive_is_a_400(tmp_path: Path, offset: int) -> None:
    """The end record says 'see zip64' and the locator names an absurd offset: seeking there raised
    OSError or ValueError (a 500) before."""
    data = make_zip(tmp_path / "a.zip", [("a.png", png())]).read_bytes()
    end = data.rfind(b"PK\x05\x06")
    record = bytearray(data[end:])
    record[8:12] = b"\xff\xff\xff\xff"  # entries on this disk and in all: 0xFFFF, look in zip64
    locator = struct.pack("<4sIQI", b"PK\x06\x07", 0, offset, 1)
    (tmp_path / "b.zip").write_bytes(data[:end] + locator + bytes(record))
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(BadRequest) as refused:
        unpack(tmp_path / "b.zip", target, LIMITS)
    assert refused.value.code == "invalid_archive" and "zip64" in refused.value.message
    assert list(target.iterdir()) == []
