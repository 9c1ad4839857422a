"""Read an image's format and dimensions from its header, without decoding pixels.

This is what lets the worker refuse a 30,000 x 30,000 image or a decompression bomb before
OpenCV allocates a buffer for it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class ImageHeader:
    format: str
    width: int
    height: int


# JPEG start-of-frame markers carry the dimensions (all SOFn except DHT/JPG/DAC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def read_header(data: bytes) -> ImageHeader | None:
    """Format and size of a JPEG, PNG, PGM/PPM or TIFF; None for anything else or no size."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg(data)
    if data[:2] in (b"II", b"MM"):
        return _tiff(data)
    if data[:2] in (b"P2", b"P5", b"P3", b"P6"):
        return _pnm(data)
    return None


def _png(data: bytes) -> ImageHeader | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return ImageHeader("PNG", width, height)


def _jpeg(data: bytes) -> ImageHeader | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return ImageHeader("JPEG", width, height)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        i += 2 + length
    return None


def _tiff(data: bytes) -> ImageHeader | None:
    endian = "<" if data[:2] == b"II" else ">"
    if len(data) < 8 or struct.unpack(endian + "H", data[2:4])[0] != 42:
        return None
    (ifd,) = struct.unpack(endian + "I", data[4:8])
    if ifd + 2 > len(data):
        return None
    (count,) = struct.unpack(endian + "H", data[ifd : ifd + 2])
    width = height = None
    for k in range(count):
        off = ifd + 2 + 12 * k
        if off + 12 > len(data):
            break
        tag, typ = struct.unpack(endian + "HH", data[off : off + 4])
        if typ == 3:  # SHORT
            value = struct.unpack(endian + "H", data[off + 8 : off + 10])[0]
        else:  # LONG (or anything else read as LONG)
            value = struct.unpack(endian + "I", data[off + 8 : off + 12])[0]
        if tag == 256:
            width = value
        elif tag == 257:
            height = value
    if width is None or height is None:
        return None
    return ImageHeader("TIFF", width, height)


def _pnm(data: bytes) -> ImageHeader | None:
    # Magic, then width and height as ASCII tokens; '#' starts a comment to end of line.
    tokens: list[bytes] = []
    i, n = 2, min(len(data), 4096)
    while len(tokens) < 2 and i < n:
        c = data[i : i + 1]
        if c == b"#":
            while i < n and data[i : i + 1] not in (b"\n", b"\r"):
                i += 1
        elif c.isspace():
            i += 1
        else:
            j = i
            while j < n and not data[j : j + 1].isspace() and data[j : j + 1] != b"#":
                j += 1
            tokens.append(data[i:j])
            i = j
    if len(tokens) < 2 or not all(t.isdigit() for t in tokens):
        return None
    return ImageHeader("PNM", int(tokens[0]), int(tokens[1]))
