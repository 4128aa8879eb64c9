"""Are image files what they claim to be? A file-level check run before SimpleITK reads them.

SimpleITK hides two kinds of damage (see ../shared/NOTES.md, "Reading images"):

- ITK's bundled nifti1_io (``nifti_read_buffer``) replaces every NaN/Inf float voxel of a NIfTI file with 0
  as it reads it, so a check on SimpleITK's array never sees them;
- a ``.nii.gz`` or ``.nii`` cut short can read "successfully", the missing voxels filled with zeros.

So this module reads the stored bytes itself (stdlib + numpy, one streaming pass per file): it decompresses
gzip to its end (Python's gzip checks the CRC and length there, a cut file raises), parses the NIfTI-1/2
or NRRD header, checks the data holds as many bytes as the header promises, and counts NaN/Inf among the
stored float voxels. Formats it does not know (DICOM, Analyze, ASCII NRRD, ...) are left to SimpleITK.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

CHUNK = 1 << 22  # bytes per read: bounded memory whatever the volume's size
GZIP_MAGIC = b"\x1f\x8b"
FIX = "re-export the image from the PACS / replace the file"

# NIfTI datatype code -> (bytes per voxel, numpy type code or None for RGB, RGBA and 128/256-bit types)
NIFTI_TYPES: dict[int, tuple[int, str | None]] = {
    2: (1, "u1"), 4: (2, "i2"), 8: (4, "i4"), 16: (4, "f4"), 32: (8, "c8"), 64: (8, "f8"), 128: (3, None),
    256: (1, "i1"), 512: (2, "u2"), 768: (4, "u4"), 1024: (8, "i8"), 1280: (8, "u8"), 1536: (16, None),
    1792: (16, "c16"), 2048: (32, None), 2304: (4, None),
}
# NRRD "type" spellings (teem's list) -> numpy dtype character codes
_NRRD_NAMES = {
    "i1": ("signed char", "int8", "int8_t"),
    "u1": ("uchar", "unsigned char", "uint8", "uint8_t"),
    "i2": ("short", "short int", "signed short", "signed short int", "int16", "int16_t"),
    "u2": ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"),
    "i4": ("int", "signed int", "int32", "int32_t"),
    "u4": ("uint", "unsigned int", "uint32", "uint32_t"),
    "i8": ("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
           "int64_t"),
    "u8": ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"),
    "f4": ("float",),
    "f8": ("double",),
}
NRRD_TYPES = {name: code for code, names in _NRRD_NAMES.items() for name in names}
MAX_NRRD_HEADER = 1 << 20
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)  # cut short; bad CRC, length or header; bad deflate data


class IntegrityError(ValueError):
    """A file is damaged or holds non-finite voxels; ``kind`` is ``corrupt-file``, ``non-finite`` or
    ``unreadable``, ``fix`` what the site administrator should do."""

    def __init__(self, reason: str, fix: str = FIX, kind: str = "corrupt-file") -> None:
        super().__init__(reason)
        self.reason = reason
        self.fix = fix
        self.kind = kind


@dataclass(frozen=True)
class FileCheck:
    """What was checked: ``format`` is ``nifti``, ``nrrd`` or ``unknown`` (only the gzip layer checked)."""

    path: Path
    format: str
    voxels: int = 0
    dtype: str = ""
    data_checked: bool = False  # the data block was measured (and float voxels scanned)


def check_image_file(path: Path, what: str = "image") -> FileCheck:
    """Check one NIfTI/NRRD file (or only its gzip layer when the format is unknown); raises IntegrityError."""
    path = Path(path)
    try:
        with ExitStack() as stack:
            fh = _open(path, stack)
            head = _read(fh, 348)  # never past a NIfTI-1 vox_offset (>= 352): the gzip stream only goes forward
            if head[:4] in (struct.pack("<i", 540), struct.pack(">i", 540)):
                head += _read(fh, 540 - 348)  # NIfTI-2's longer header (its data start at >= 544)
            if head.startswith(b"NRRD"):
                return _check_nrrd(path, fh, head, what, stack)
            nifti = _nifti_header(head)
            if nifti is None:
                _drain(fh)  # unknown content: still the whole gzip stream, so its CRC is checked
                return FileCheck(path, "unknown")
            return _check_nifti(path, fh, len(head), nifti, what)
    except GZIP_ERRORS as exc:
        raise _gzip_damage(path, what, exc) from exc
    except OSError as exc:
        raise IntegrityError(f"{what} file {path} cannot be read ({exc.strerror or exc})",
                             "check the file's permissions, or restore it", kind="unreadable") from exc


def _gzip_damage(path: Path, what: str, exc: BaseException) -> IntegrityError:
    text = str(exc)
    if isinstance(exc, EOFError):
        reason = "ends before its end-of-stream marker"
    elif "CRC" in text:
        reason = "fails its CRC check"
    elif "length" in text.lower():
        reason = "has the wrong length"
    else:
        reason = f"cannot be decompressed ({text})"
    return IntegrityError(f"{what} file {path} is damaged: its gzip data {reason} "
                          "(the file was cut short or altered in a copy or export)")


def _open(path: Path, stack: ExitStack) -> BinaryIO:
    """The file's bytes, through gzip when it starts with the gzip magic (whatever its name says)."""
    raw: BinaryIO = stack.enter_context(path.open("rb"))
    magic = raw.read(2)
    raw.seek(0)
    if magic == GZIP_MAGIC:
        return stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    return raw


def _read(fh: BinaryIO, n: int) -> bytes:
    """Up to n bytes; fewer only at the end of the stream."""
    parts, got = [], 0
    while got < n:
        block = fh.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def _drain(fh: BinaryIO) -> int:
    total = 0
    while block := fh.read(CHUNK):
        total += len(block)
    return total


def _chunks(fh: BinaryIO, nbytes: int) -> Iterator[bytes]:
    """At most nbytes from fh, in blocks."""
    left = nbytes
    while left > 0:
        block = fh.read(min(CHUNK, left))
        if not block:
            return
        left -= len(block)
        yield block


def _scan(fh: BinaryIO, nbytes: int, dtype: np.dtype | None) -> tuple[int, int, int]:
    """(bytes read, NaN count, Inf count) of the next nbytes, counting only when dtype is float/complex."""
    got = nan = inf = 0
    carry = b""
    for block in _chunks(fh, nbytes):
        got += len(block)
        if dtype is None:
            continue
        data = carry + block
        usable = len(data) - len(data) % dtype.itemsize
        carry = data[usable:]
        values = np.frombuffer(data, dtype=dtype, count=usable // dtype.itemsize)
        if not np.isfinite(values).all():  # one pass in the common case
            nan += int(np.count_nonzero(np.isnan(values)))
            inf += int(np.count_nonzero(np.isinf(values)))
    return got, nan, inf


def _non_finite(path: Path, what: str, nan: int, inf: int, voxels: int, note: str = "") -> IntegrityError:
    return IntegrityError(
        f"{what} has {nan + inf} NaN/Inf voxel(s) stored in {path} ({nan} NaN, {inf} Inf of {voxels} voxels{note})",
        f"{FIX} (or replace the non-finite voxels in {what})", kind="non-finite")


def _truncated(path: Path, what: str, header: str, expected: int, got: int) -> IntegrityError:
    return IntegrityError(f"{what} file {path} is truncated: its {header} header promises {expected} bytes of "
                          f"voxel data but the file holds {got} ({100 * got / expected:.1f}%)")


# --------------------------------------------------------------------------------------------------------------
# NIfTI


@dataclass(frozen=True)
class NiftiHeader:
    version: int  # 1 or 2
    endian: str  # "<" or ">"
    dims: tuple[int, ...]
    datatype: int
    bitpix: int
    vox_offset: int
    scl_slope: float
    scl_inter: float


def _nifti_header(head: bytes) -> NiftiHeader | None:
    """The NIfTI-1/2 single-file header at the start of ``head``, or None when it is not one (e.g. Analyze)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(f"{endian}i", head[:4])[0] == 348 and head[344:347] == b"n+1":
            dim = struct.unpack(f"{endian}8h", head[40:56])
            datatype, bitpix = struct.unpack(f"{endian}2h", head[70:74])
            (offset,) = struct.unpack(f"{endian}f", head[108:112])
            slope, inter = struct.unpack(f"{endian}2f", head[112:120])
            # nifti1_io reads the data at 352 when vox_offset is below it (or not a number)
            offset = int(offset) if np.isfinite(offset) and offset >= 352 else 352
            return NiftiHeader(1, endian, tuple(dim), datatype, bitpix, offset, slope, inter)
        if len(head) >= 540 and struct.unpack(f"{endian}i", head[:4])[0] == 540 and head[4:7] == b"n+2":
            datatype, bitpix = struct.unpack(f"{endian}2h", head[12:16])
            dim = struct.unpack(f"{endian}8q", head[16:80])
            (offset,) = struct.unpack(f"{endian}q", head[168:176])
            slope, inter = struct.unpack(f"{endian}2d", head[176:192])
            return NiftiHeader(2, endian, tuple(dim), datatype, bitpix, max(int(offset), 544), slope, inter)
    return None


def _check_nifti(path: Path, fh: BinaryIO, consumed: int, hdr: NiftiHeader, what: str) -> FileCheck:
    ndim = hdr.dims[0]
    if not 1 <= ndim <= 7:
        raise IntegrityError(f"{what} file {path} has a damaged NIfTI header (dim[0] = {ndim}, must be 1 to 7)")
    if hdr.datatype not in NIFTI_TYPES:
        raise IntegrityError(f"{what} file {path} has a damaged NIfTI header (unknown datatype {hdr.datatype})")
    voxels = int(np.prod([max(int(d), 1) for d in hdr.dims[1:ndim + 1]], dtype=np.int64))
    # the datatype, not bitpix, sizes a voxel: nifti1_io does the same, so a wrong bitpix reads fine
    itemsize, code = NIFTI_TYPES[hdr.datatype]
    expected = voxels * itemsize
    dtype = np.dtype(hdr.endian + code) if code else None
    scan_dtype = dtype if dtype is not None and dtype.kind in "fc" else None
    if isinstance(fh, gzip.GzipFile):
        _scan(fh, hdr.vox_offset - consumed, None)  # header extensions up to the data
        got, nan, inf = _scan(fh, expected, scan_dtype)
        _drain(fh)  # to the end, where gzip checks CRC and length
    else:
        size = path.stat().st_size
        got = min(max(size - hdr.vox_offset, 0), expected)
        nan = inf = 0
        if got == expected and scan_dtype is not None:  # integers cannot hold NaN: the size says it all
            fh.seek(hdr.vox_offset)
            _, nan, inf = _scan(fh, expected, scan_dtype)
    if got < expected:
        raise _truncated(path, what, f"NIfTI-{hdr.version}", expected, got)
    # Non-finite scl_slope/scl_inter are ignored by nifti1_io (treated as "no scaling"), so they never reach
    # the voxels; finite scaling of finite stored values stays finite, so the stored voxels decide.
    if nan or inf:
        raise _non_finite(path, what, nan, inf, voxels, "; SimpleITK reads them as 0, so only this check sees them")
    return FileCheck(path, "nifti", voxels, dtype.str if dtype else f"nifti-{hdr.datatype}", True)


# --------------------------------------------------------------------------------------------------------------
# NRRD


def _nrrd_header(fh: BinaryIO, head: bytes, path: Path, what: str) -> tuple[dict[str, str], int | None]:
    """The header's fields (lower-case names) and where its data start (after the first blank line), or
    None when no blank line ends it (a detached .nhdr may end at its last line)."""
    buffer = head
    while not (end := re.search(rb"\r?\n\r?\n", buffer)) and len(buffer) < MAX_NRRD_HEADER:
        block = fh.read(4096)
        if not block:
            break
        buffer += block
    if end is None and len(buffer) >= MAX_NRRD_HEADER:
        raise IntegrityError(f"{what} file {path} has a damaged NRRD header (no blank line ends it)")
    text = buffer[:end.start()] if end else buffer
    fields: dict[str, str] = {}
    for line in text.decode("latin-1").splitlines()[1:]:
        name, colon, value = line.partition(":")
        # comments and "key:=value" pairs are not fields
        if colon and not line.startswith("#") and not value.startswith("="):
            fields[name.strip().lower()] = value.strip()
    return fields, end.end() if end else None


def _check_nrrd(path: Path, fh: BinaryIO, head: bytes, what: str, stack: ExitStack) -> FileCheck:
    if isinstance(fh, gzip.GzipFile):  # a gzipped .nrrd as a whole is no NRRD SimpleITK reads: leave it to it
        _drain(fh)
        return FileCheck(path, "unknown")
    fields, data_start = _nrrd_header(fh, head, path, what)
    kind = NRRD_TYPES.get(fields.get("type", "").lower())
    encoding = fields.get("encoding", "").lower()
    try:
        dimension = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
        line_skip = int(fields.get("line skip", fields.get("lineskip", "0")))
        byte_skip = int(fields.get("byte skip", fields.get("byteskip", "0")))
    except (KeyError, ValueError) as exc:
        raise IntegrityError(f"{what} file {path} has a damaged NRRD header (dimension/sizes: {exc})") from exc
    if len(sizes) != dimension or min(sizes, default=0) < 1:
        raise IntegrityError(f"{what} file {path} has a damaged NRRD header (sizes {sizes} for dimension "
                             f"{dimension})")
    voxels = int(np.prod(sizes, dtype=np.int64))
    if kind is None or encoding not in ("raw", "gzip", "gz"):
        return FileCheck(path, "nrrd", voxels)  # ASCII/hex/bzip2 or block data: SimpleITK's checks stay
    dtype = np.dtype((">" if fields.get("endian", "little").lower() == "big" else "<") + kind)
    scan_dtype = dtype if dtype.kind == "f" else None
    expected = voxels * dtype.itemsize

    data_file = fields.get("data file", fields.get("datafile"))
    if data_file is None:
        source, raw = path, fh
        raw.seek(data_start if data_start is not None else path.stat().st_size)
    elif data_file.upper().startswith("LIST") or len(data_file.split()) > 1:
        return FileCheck(path, "nrrd", voxels, dtype.str)  # several data files: left to SimpleITK
    else:
        source = path.parent / data_file
        if not source.is_file():
            raise IntegrityError(f"{what} file {path} names a data file {source} that is missing",
                                 f"restore the data file next to the header, or {FIX}")
        raw = stack.enter_context(source.open("rb"))
    for _ in range(line_skip):
        raw.readline()

    if encoding == "raw":
        size = source.stat().st_size
        # byte skip -1: the data are the file's last bytes
        start = size - expected if byte_skip == -1 else raw.tell() + byte_skip
        got = min(max(size - max(start, raw.tell()), 0), expected)
        nan = inf = 0
        if got == expected and scan_dtype is not None:
            raw.seek(start)
            _, nan, inf = _scan(raw, expected, scan_dtype)
    else:
        data = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
        try:
            _scan(data, max(byte_skip, 0), None)  # NRRD skips these bytes after decompressing
            got, nan, inf = _scan(data, expected, scan_dtype)
            _drain(data)  # gzip's CRC and length are checked at its end
        except GZIP_ERRORS as exc:  # name the data file, which may not be the header's
            raise _gzip_damage(source, what, exc) from exc
    if got < expected:
        raise _truncated(source, what, "NRRD", expected, got)
    if nan or inf:
        raise _non_finite(source, what, nan, inf, voxels)
    return FileCheck(path, "nrrd", voxels, dtype.str, True)
