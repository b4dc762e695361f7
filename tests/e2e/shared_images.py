"""The raw images two QEMU guests share in the cluster-pair scenarios, and how the host
compares a mirror's legs after (or during) a run."""

from __future__ import annotations

from pathlib import Path

LEG_SIZE = 64 << 20  # as in tests/harness/guest/pair.py
BLOCK = 4096

def differing_blocks(a: Path, b: Path, start: int, end: int) -> list[int]:
    """Offsets of the 4 KiB blocks in [start, end) whose contents differ between two images."""
    out = []
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        fa.seek(start)
        fb.seek(start)
        pos = start
        while pos < end:
            ca, cb = fa.read(1 << 20), fb.read(1 << 20)
            if ca != cb:
                for k in range(0, min(len(ca), len(cb)), BLOCK):
                    if ca[k : k + BLOCK] != cb[k : k + BLOCK]:
                        out.append(pos + k)
            pos += 1 << 20
    return out


#: Images the guests share: serial -> (size, throttled on the victim).  The legs of mirror
#: ``pair`` (A, B) and of mirror ``pairdisk`` (C, D), and ``pairdisk``'s log device (L).
IMAGES = {
    "sharedA": (LEG_SIZE, False),
    "sharedB": (LEG_SIZE, True),
    "sharedC": (LEG_SIZE, False),
    "sharedD": (LEG_SIZE, True),
    "sharedL": (4 << 20, False),
}
LEGS = {"pair": ("sharedA", "sharedB"), "pairdisk": ("sharedC", "sharedD")}




def make_images(base: Path) -> dict[str, Path]:
    """Fresh (sparse, all zero) shared images in ``base``: serial -> path."""
    images = {serial: base / f"{serial}.img" for serial in IMAGES}
    for serial, (size, _) in IMAGES.items():
        with open(images[serial], "wb") as fh:
            fh.truncate(size)
    return images
