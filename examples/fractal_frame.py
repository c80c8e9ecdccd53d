#!/usr/bin/env python3
"""Render one frame of a Julia-set animation to a PNG: a stand-in renderer.

    python3 fractal_frame.py FRAME OUT.png [--frames N] [--size 160x120]

Standard library only (the PNG is written with zlib and struct), so any
daemon with a Python 3 renders it, as any render node has its Blender.
Frame ``f`` of ``N`` turns the Julia constant ``c`` once around a circle
(the animation loops) while zooming in a little.  Like Blender it prints
``Fra:N`` lines, which the ``frames`` progress parser reads.
"""

from __future__ import annotations

import argparse
import cmath
import math
import struct
import sys
import zlib

MAX_ITER = 40


def render(frame: int, frames: int, width: int, height: int) -> bytes:
    """Raw RGB rows, each led by PNG's filter byte 0."""
    turn = 2 * math.pi * (frame % frames) / frames
    c = 0.7885 * cmath.exp(1j * turn)
    zoom = 1.0 + 0.35 * (1 - math.cos(turn)) / 2
    scale = 3.0 / (width * zoom)
    palette = [_colour(i) for i in range(MAX_ITER + 1)]
    out = bytearray()
    for y in range(height):
        out.append(0)
        im = (y - height / 2) * scale
        for x in range(width):
            z = complex((x - width / 2) * scale, im)
            n = 0
            while n < MAX_ITER and z.real * z.real + z.imag * z.imag < 4.0:
                z = z * z + c
                n += 1
            out += palette[n]
    return bytes(out)


def _colour(n: int) -> bytes:
    if n >= MAX_ITER:
        return b"\x08\x08\x18"
    t = n / MAX_ITER
    return bytes((int(255 * min(1, 3 * t)), int(255 * t ** 0.5), int(255 * (1 - t) ** 2 * 0.8 + 40)))


def png(width: int, height: int, raw_rows: bytes) -> bytes:
    """An 8-bit RGB PNG from filtered rows."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw_rows, 9)) + chunk(b"IEND", b""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("frame", type=int)
    ap.add_argument("out")
    ap.add_argument("--frames", type=int, default=24, help="frames in one loop of the animation")
    ap.add_argument("--size", default="160x120", help="WIDTHxHEIGHT")
    args = ap.parse_args(argv)
    width, _, height = args.size.partition("x")
    w, h = int(width), int(height)
    if not (1 <= w <= 4096 and 1 <= h <= 4096 and args.frames >= 1):
        ap.error("--size must be WxH from 1 to 4096 and --frames >= 1")
    print(f"Fra:{args.frame} | Rendering {w}x{h}", flush=True)
    data = png(w, h, render(args.frame, args.frames, w, h))
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"Fra:{args.frame} | Saved: '{args.out}' ({len(data)} bytes)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
