"""Shared by the scan tests: one tiny detector per test process, small image corpora, and a
generator of malformed and odd image files whose names say what a scan must report."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

_MODEL = {}


def noise_chips(n, seed, power):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 150, 150, 3, generator=g) ** power * 255).to(torch.uint8)


def model_file(tmp_path_factory):
    """A detector trained on aligned noise chips (once per test process), saved to a file."""
    if "path" not in _MODEL:
        from fakespotter.detector import FakeSpotter

        det = FakeSpotter(hidden=(8,), max_epochs=5).fit(noise_chips(16, 0, 1.0), noise_chips(16, 1, 2.5))
        path = tmp_path_factory.mktemp("scan_model") / "det.fsm"
        det.save(path)
        _MODEL["path"] = path
    return _MODEL["path"]


def noise_image(seed, h=24, w=24, power=1.0):
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) ** power * 255).astype(np.uint8)


def write_good(folder: Path, n: int, seed: int = 0, ext: str = ".png") -> list:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i:03d}{ext}"
        Image.fromarray(noise_image(seed * 1000 + i, power=1.0 + 1.5 * (i % 2))).save(p)
        out.append(p)
    return out


def write_images(folder: Path, n: int, seed: int, power: float, size: int = 64) -> Path:
    """``n`` noise images 000.png... in ``folder`` (one random stream per folder), for the
    train/evaluate/robustness command tests."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = (rng.random((size, size, 3)) ** power * 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:03d}.png")
    return folder


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b""))


def gif_bomb(width: int, height: int) -> bytes:
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
    desc = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return head + desc + b"\x02\x02\x44\x01\x00\x3b"


def bmp_bomb(width: int, height: int) -> bytes:
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 54 + 16, 0, 0, 54) + info + b"\x00" * 16


def exif_rotated_jpeg(orientation: int, seed: int) -> bytes:
    img = Image.fromarray(noise_image(seed, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", exif=exif.tobytes())


def animated(fmt: str, frames: int, seed: int) -> bytes:
    imgs = [Image.fromarray(noise_image(seed + k, 20, 20)) for k in range(frames)]
    return encode(imgs[0], fmt, save_all=True, append_images=imgs[1:], duration=50, loop=0)


def odd_good_files(seed: int):
    """(name, bytes) of decodable but unusual images: every one must be scanned (status ok)."""
    rgb = Image.fromarray(noise_image(seed, 20, 26))
    grey = rgb.convert("L")
    files = [
        ("cmyk.jpg", encode(rgb.convert("CMYK"), "JPEG")),
        ("cmyk.tif", encode(rgb.convert("CMYK"), "TIFF")),
        ("grey16.png", encode(Image.fromarray((np.asarray(grey).astype(np.uint16) * 257)), "PNG")),
        ("grey16.tif", encode(Image.fromarray((np.asarray(grey).astype(np.uint16) * 257)), "TIFF")),
        ("palette.png", encode(rgb.convert("P"), "PNG")),
        ("palette.gif", encode(rgb.convert("P"), "GIF")),
        ("palette_transparent.png", encode(rgb.convert("P"), "PNG", transparency=3)),
        ("rgba.png", encode(rgb.convert("RGBA"), "PNG")),
        ("rgba.webp", encode(rgb.convert("RGBA"), "WEBP")),
        ("grey_alpha.png", encode(grey.convert("LA"), "PNG")),
        ("grey.jpg", encode(grey, "JPEG")),
        ("grey.pgm", encode(grey, "PPM")),
        ("bilevel.png", encode(grey.convert("1"), "PNG")),
        ("rgb.bmp", encode(rgb, "BMP")),
        ("rgb.ppm", encode(rgb, "PPM")),
        ("rgb.tiff", encode(rgb, "TIFF")),
        ("rgb.webp", encode(rgb, "WEBP")),
        ("png_named.jpg", encode(rgb, "PNG")),
        ("jpeg_named.png", encode(rgb, "JPEG")),
        ("jpeg_named.gif", encode(rgb, "JPEG")),
    ]
    files += [(f"exif_orientation{o}.jpg", exif_rotated_jpeg(o, seed + o)) for o in range(1, 9)]
    files += [("animated.gif", animated("GIF", 3, seed)), ("animated.png", animated("PNG", 4, seed)),
              ("animated.webp", animated("WEBP", 2, seed))]
    return files


NOT_IMAGES = [
    ("text.jpg", b"just some text, not an image\n"),
    ("html.png", b"<!DOCTYPE html><html><body>404</body></html>"),
    ("pdf.jpg", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n"),
    ("zip.png", b"PK\x03\x04" + b"\x00" * 40),
    ("one_byte.jpg", b"\x00"),
    ("zeros.bmp", b"\x00" * 1000),
    ("eps.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"),
    ("svg.png", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'),
    ("ico.png", b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00\x01\x00\x20\x00" + b"\x00" * 60),
    ("psd.jpg", b"8BPS\x00\x01" + b"\x00" * 40),
]


def bad_files(seed: int):
    """(name, bytes, expected error kinds) of inputs a scan with --aligned must refuse."""
    rgb = Image.fromarray(noise_image(seed, 48, 48))
    out = []
    encoded = {"jpg": encode(rgb, "JPEG"), "png": encode(rgb, "PNG"), "gif": encode(rgb.convert("P"), "GIF"),
               "bmp": encode(rgb, "BMP"), "webp": encode(rgb, "WEBP", quality=90), "tif": encode(rgb, "TIFF"),
               "ppm": encode(rgb, "PPM")}
    for ext, data in encoded.items():
        for frac in (0.5, 0.75, 0.95):
            out.append((f"truncated_{int(frac * 100)}.{ext}", data[: int(len(data) * frac)], {"truncated"}))
        # cut inside the header: the signature is there, the rest is not
        out.append((f"header_cut.{ext}", data[:12], {"truncated"}))
        out.append((f"empty.{ext}", b"", {"empty_file"}))
    for name, data in NOT_IMAGES:
        out.append((name, data, {"not_an_image"}))
    rng = np.random.default_rng(seed)
    out.append((f"random_bytes_{seed}.jpg", rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(), {"not_an_image"}))
    out.append(("bomb.png", png_bomb(100_000, 100_000), {"too_many_pixels"}))
    out.append(("bomb.gif", gif_bomb(65_535, 65_535), {"too_many_pixels"}))
    out.append(("bomb.bmp", bmp_bomb(60_000, 60_000), {"too_many_pixels"}))
    # decodable, but no aligned face chip (the corpus is scanned with --aligned)
    out.append(("one_pixel.png", encode(Image.fromarray(noise_image(seed, 1, 1)), "PNG"), {"not_a_chip"}))
    out.append(("wide.png", encode(Image.fromarray(noise_image(seed, 3, 400)), "PNG"), {"not_a_chip"}))
    out.append(("strip.png", encode(Image.fromarray(noise_image(seed, 40, 100)), "PNG"), {"not_a_chip"}))
    return out


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def png_rows(rgb: np.ndarray, interlaced: bool) -> list:
    """The filtered rows (filter type 0) of an RGB image, pass by pass for Adam7."""
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    return [b"\x00" + row.tobytes() for x, y, dx, dy in passes for row in rgb[y::dy, x::dx] if row.size]


def png_file(rgb: np.ndarray, stream: bytes, interlaced: bool) -> bytes:
    """A well-formed PNG (valid CRCs, IEND) whose IDAT chunks hold ``stream``."""
    h, w = rgb.shape[:2]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, int(interlaced))
    idat = b"".join(png_chunk(b"IDAT", stream[i:i + 500]) for i in range(0, len(stream), 500))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + idat + png_chunk(b"IEND", b"")


def damaged(data: bytes, at: int, new: bytes) -> bytes:
    return data[:at] + new + data[at + len(new):]


def damaged_files() -> dict:
    """Wrong bytes in a header (no length or offset field), the file otherwise whole."""
    rgb = Image.fromarray(noise_image(7, 24, 32))
    jpeg, png, gif = encode(rgb, "JPEG"), encode(rgb, "PNG"), encode(rgb.convert("P"), "GIF")
    bmp, webp, ppm = encode(rgb, "BMP"), encode(rgb, "WEBP"), encode(rgb, "PPM")
    tiff = encode(rgb, "TIFF", compression="tiff_deflate")
    ihdr = png[16:29]
    return {
        "jpeg_marker": damaged(jpeg, jpeg.index(b"\xff\xdb"), b"\x00"),
        "jpeg_precision": damaged(jpeg, jpeg.index(b"\xff\xc0") + 4, b"\x07"),
        "png_ihdr_crc": damaged(png, 29, b"\x00\x00\x00\x00"),
        "png_colour_type": png[:8] + png_chunk(b"IHDR", ihdr[:9] + b"\x05" + ihdr[10:]) + png[33:],
        "png_chunk_type": damaged(png, 37, b"I#AT"),
        "gif_block": damaged(gif, gif.index(b"\x2c", 13 + 768), b"\x00"),
        "bmp_info_size": damaged(bmp, 14, struct.pack("<I", 99)),
        "bmp_depth": damaged(bmp, 28, struct.pack("<H", 7)),
        "webp_chunk": damaged(webp, 12, b"XXXX"),
        "tiff_directory_offset": damaged(tiff, 4, struct.pack("<I", 2)),
        "ppm_width": damaged(ppm, 3, b"x"),
        "ppm_maxval": ppm.replace(b"255\n", b"000\n", 1),
        "png_no_palette": png_without(encode(rgb.convert("P"), "PNG"), b"PLTE"),  # Pillow: one colour
    }


def png_without(data: bytes, ctype: bytes) -> bytes:
    """The PNG ``data`` less its chunks of type ``ctype``."""
    out, pos = [data[:8]], 8
    while pos < len(data):
        end = pos + 12 + int.from_bytes(data[pos:pos + 4], "big")
        if data[pos + 4:pos + 8] != ctype:
            out.append(data[pos:end])
        pos = end
    return b"".join(out)


def jpeg_with_scans(total: int, comment: bytes = b"") -> bytes:
    """A 16x16 progressive JPEG whose last scan header is repeated (with no scan data) up to
    ``total`` scans: libjpeg decodes each over the whole image."""
    data = encode(Image.fromarray(noise_image(8, 16, 16)), "JPEG", progressive=True, comment=comment)
    scans = data.count(b"\xff\xda") - comment.count(b"\xff\xda")
    last = data.rindex(b"\xff\xda")
    header = data[last:last + 2 + int.from_bytes(data[last + 2:last + 4], "big")]
    assert data.endswith(b"\xff\xd9") and 1 < scans < total
    return data[:-2] + header * (total - scans) + b"\xff\xd9"


def die_while_writing_a_result() -> None:
    """Run in a pool's worker: write the start of a result message to the pool's result pipe
    (a length header and a few bytes of the body), then die, as a worker stopped in the middle
    of sending a large result does."""
    import os
    import signal
    import sys

    frame = sys._getframe()
    while frame is not None and "result_queue" not in frame.f_locals:  # concurrent.futures' _process_worker
        frame = frame.f_back
    writer = frame.f_locals["result_queue"]._writer
    os.write(writer.fileno(), struct.pack("!i", 1 << 20) + b"the start of a result")
    os.kill(os.getpid(), signal.SIGKILL)


def forget_heif_opener(monkeypatch: Any, importable: bool = True) -> None:
    """Pillow as a fresh process has it: no HEIF opener (a test may have registered
    pillow-heif's); ``importable=False``: nor can pillow_heif be imported."""
    from PIL import Image

    for table in (Image.OPEN, Image.MIME, Image.SAVE, Image.SAVE_ALL):
        if "HEIF" in table:
            monkeypatch.delitem(table, "HEIF")
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])
    if not importable:
        monkeypatch.setitem(sys.modules, "pillow_heif", None)


def without_permission_override(denied: Path, access: str):
    """The argv prefix that runs a command with file permissions enforced, as for any user: [] when
    not root; as root, ``setpriv`` dropping the capabilities that let root read and write past them.
    None where that cannot be done (no setpriv, or ``denied``, a path the caller took ``access``
    ("r" or "w") from, still has it through the prefix)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]
    try:
        denied_there = subprocess.run(prefix + ["test", f"-{access}", str(denied)],
                                      capture_output=True, timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if denied_there else None
