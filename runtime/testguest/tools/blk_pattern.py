#!/usr/bin/env python3
"""Check (or write) the test guest's virtio-blk pattern in a raw disk image.

Usage: blk_pattern.py check|write IMAGE [--seed N] [--sectors N] [--start N]
  [--zero A:B ...]  (sectors A..B must be zeroes instead; for blk-discard)
Exits 0 when every sector matches. See README.md ("blk" scenarios) for the formula.
"""
import argparse
import struct
import sys

MASK = (1 << 64) - 1
SECTOR = 512


def word(seed, sector, w):
    x = ((seed * 0x9E3779B97F4A7C15) & MASK) ^ ((sector * 0xC2B2AE3D27D4EB4F) & MASK) ^ w
    x ^= x >> 33
    x = (x * 0xFF51AFD7ED558CCD) & MASK
    x ^= x >> 33
    return x


def sector_bytes(seed, sector):
    return struct.pack("<64Q", *(word(seed, sector, w) for w in range(64)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=["check", "write"])
    ap.add_argument("image")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--sectors", type=int, default=2048)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--zero", action="append", default=[])
    a = ap.parse_args()
    zeros = [tuple(int(v) for v in z.split(":")) for z in a.zero]
    mode = "r+b" if a.action == "write" else "rb"
    with open(a.image, mode) as f:
        for s in range(a.start, a.start + a.sectors):
            want = bytes(SECTOR) if any(lo <= s < hi for lo, hi in zeros) else sector_bytes(a.seed, s)
            f.seek(s * SECTOR)
            if a.action == "write":
                f.write(want)
                continue
            got = f.read(SECTOR)
            if got != want:
                print(f"sector {s}: mismatch (first bytes {got[:16].hex()}, want {want[:16].hex()})")
                return 1
    print(f"{a.action} ok: sectors {a.start}..{a.start + a.sectors} seed={a.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
