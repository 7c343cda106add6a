"""decode_image at the edges: PNG image data that ends early, files cut at every byte of their
header, JPEGs of thousands of scans, and APNG frame counts that the file does not back."""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
import zlib

import numpy as np
import pytest
from PIL import Image

from fakespotter.data import MAX_JPEG_SCANS, ImageError, decode_image
from scan_helpers import damaged_files, encode, jpeg_with_scans, noise_image, png_file, png_rows
from scan_helpers import png_chunk as chunk



def kind_of(data: bytes) -> str:
    try:
        decode_image(data)
    except ImageError as e:
        return e.kind
    return "ok"


@pytest.mark.parametrize("interlaced", [False, True], ids=["plain", "adam7"])
@pytest.mark.parametrize("shape", [(24, 32), (7, 5), (1, 9)], ids=["24x32", "7x5", "1x9"])
def test_png_complete_decodes(interlaced, shape):
    rgb = noise_image(3, *shape)
    rgb[-1] = 0  # a black last row: the image data is inflated again, and found whole
    img = decode_image(png_file(rgb, zlib.compress(b"".join(png_rows(rgb, interlaced))), interlaced))
    assert np.array_equal(img.rgb, rgb)


@pytest.mark.parametrize("interlaced", [False, True], ids=["plain", "adam7"])
@pytest.mark.parametrize("shape", [(24, 32), (7, 5), (1, 9)], ids=["24x32", "7x5", "1x9"])
def test_png_zlib_stream_ending_at_a_row_is_truncated(interlaced, shape):
    """Pillow decodes a whole zlib stream that stops at a row boundary without an error, the
    rows not reached black; every such stop (each row, each pass) is refused as truncated."""
    rgb = noise_image(4, *shape)
    rows = png_rows(rgb, interlaced)
    for n in range(len(rows)):
        data = png_file(rgb, zlib.compress(b"".join(rows[:n])), interlaced)
        with pytest.raises(ImageError, match=r"PNG data ends early|image file is truncated") as e:
            decode_image(data)
        assert e.value.kind == "truncated", (n, e.value.message)


@pytest.mark.parametrize("interlaced", [False, True], ids=["plain", "adam7"])
def test_png_cut_stream_or_file_is_truncated(interlaced):
    rgb = noise_image(5, 24, 32)
    stream = zlib.compress(b"".join(png_rows(rgb, interlaced)))
    for frac in (0.1, 0.5, 0.9, 0.99):
        cut_stream = png_file(rgb, stream[:int(len(stream) * frac)], interlaced)  # CRCs and IEND intact
        whole = png_file(rgb, stream, interlaced)
        assert kind_of(cut_stream) == "truncated", frac
        assert kind_of(whole[:int(len(whole) * frac)]) == "truncated", frac  # the file cut inside an IDAT


def test_png_image_data_failing_its_crc_is_a_decode_error(tmp_path):
    """Pillow checks no IDAT CRC (nor zlib's Adler-32 once every row is filled): a flipped bit in
    the image data decoded to garbled rows without an error. The API refuses it too."""
    from fakespotter.faces import load_image

    rgb = noise_image(7, 24, 32)
    whole = png_file(rgb, zlib.compress(b"".join(png_rows(rgb, False))), False)
    assert np.array_equal(decode_image(whole).rgb, rgb)
    at = whole.index(b"IDAT") + 4
    flipped = 0
    for i in range(at, at + 500, 7):  # bits all over the first IDAT's data
        data = bytearray(whole)
        data[i] ^= 1 << (i % 8)
        with pytest.raises(ImageError, match=f"damaged PNG image data: the IDAT chunk at byte {at - 8} fails its CRC"):
            decode_image(bytes(data))
        flipped += 1
    assert flipped > 70
    (tmp_path / "bad.png").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"load_image: .*bad.png: damaged PNG image data"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="fails its CRC"):
        load_image(bytes(data))


def tiled_tiff(width, height, tile_w, tile_h, rgb=None) -> bytes:
    """A deflate-compressed RGB TIFF in tiles: of ``rgb``'s pixels, or (None) every tile one
    stream of zeros."""
    across, down = -(-width // tile_w), -(-height // tile_h)
    streams = []
    for ty in range(down):
        for tx in range(across):
            tile = np.zeros((tile_h, tile_w, 3), np.uint8)
            if rgb is not None:
                part = rgb[ty * tile_h:(ty + 1) * tile_h, tx * tile_w:(tx + 1) * tile_w]
                tile[:part.shape[0], :part.shape[1]] = part
            if rgb is not None or not streams:
                streams.append(zlib.compress(tile.tobytes()))
    if rgb is None:
        streams *= across * down  # every tile the same stream, stored once
        offsets = [16] * len(streams)
        body = streams[0]
    else:
        offsets = list(np.cumsum([16] + [len(s) for s in streams[:-1]]))
        body = b"".join(streams)
    k = len(streams)
    tables = 16 + len(body) + (len(body) & 1)
    ifd = tables + 8 * k
    tags = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, 8), (259, 3, 1, 8), (262, 3, 1, 2),
            (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile_w), (323, 4, 1, tile_h),
            (324, 4, k, tables if k > 1 else offsets[0]), (325, 4, k, tables + 4 * k if k > 1 else len(streams[0]))]
    out = b"II*\x00" + struct.pack("<I", ifd) + struct.pack("<HHHH", 8, 8, 8, 0) + body + b"\x00" * (len(body) & 1)
    out += struct.pack(f"<{k}I", *offsets) + struct.pack(f"<{k}I", *[len(s) for s in streams])
    out += struct.pack("<H", len(tags)) + b"".join(
        struct.pack("<HHIHH", t, ty, n, v, 0) if ty == 3 and n == 1 else struct.pack("<HHII", t, ty, n, v)
        for t, ty, n, v in tags) + b"\x00" * 4
    return out


def test_tiff_tiles_beyond_the_pixel_limit_are_refused_before_decoding(tmp_path):
    """libtiff decodes each tile whole whatever the image size: one 20000x20000 tile declared for
    100x100 pixels took 1.2 GB; 1000 tiles of 16x65536 over 16000x16 pixels 12 s of one native
    call. Tiles that cover the image as tiles do (edge tiles padded) still decode."""
    from fakespotter.faces import load_image

    rgb = noise_image(9, 40, 70)
    assert np.array_equal(decode_image(tiled_tiff(70, 40, 32, 16, rgb)).rgb, rgb)
    assert np.array_equal(load_image(tiled_tiff(70, 40, 32, 16, rgb)), rgb)
    # edge tiles padding an image under the limit past it (96x48 covered)
    assert np.array_equal(decode_image(tiled_tiff(70, 40, 32, 16, rgb), pixel_limit=70 * 40).rgb, rgb)
    for args, covered in (((100, 100, 4096, 4096), 4096 * 4096), ((1600, 16, 16, 8192), 100 * 16 * 8192)):
        data = tiled_tiff(*args)
        assert len(data) < 100_000
        with pytest.raises(ImageError, match=f"decoding them covers {covered} pixels, more than the pixel limit "
                                             f"10000000 \\(--pixel-limit\\)") as e:
            decode_image(data, pixel_limit=10_000_000)
        assert e.value.kind == "too_many_pixels"
        path = tmp_path / "bomb.tif"
        path.write_bytes(data)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Image, "MAX_IMAGE_PIXELS", 5_000_000)
            with pytest.raises(ValueError, match=r"load_image: .*bomb.tif: TIFF of .* more than the pixel limit "
                                                 r"10000000 \(Pillow's decompression-bomb limit"):
                load_image(path)


def test_an_avif_coding_more_than_it_declares_or_the_limit_allows_is_refused_before_decoding(tmp_path):
    """libavif decodes the picture the AV1 sequence header codes whatever the ispe box declares,
    and Pillow takes the declared size: a 2 KB file declaring 64x64 and coding 12000x12000 was
    decoded whole, past the pixel limit, and a corner of it scored."""
    from fakespotter import _avif
    from fakespotter.data import _open_formats
    from fakespotter.faces import load_image

    if "AVIF" not in _open_formats():
        pytest.skip("this Pillow reads no AVIF")
    rgb = noise_image(11, 48, 64)
    honest = encode(Image.fromarray(rgb), "AVIF", quality=90)
    assert _avif.coded_sizes(honest) == ([(64, 48)], [(64, 48)])
    assert decode_image(honest).rgb.shape == (48, 64, 3)
    lying = bytearray(honest)
    at = honest.index(b"ispe") + 8
    lying[at:at + 8] = struct.pack(">II", 16, 12)
    lying = bytes(lying)
    assert Image.open(io.BytesIO(lying)).size == (16, 12)  # what Pillow believes
    with pytest.raises(ImageError, match=r"AVIF declaring a 16x12 image but coding a 64x48 picture") as e:
        decode_image(lying)
    assert e.value.kind == "decode_error"
    with pytest.raises(ValueError, match="AVIF declaring a 16x12 image"):
        load_image(lying)
    for data, said in ((honest, "AVIF of 64x48"), (lying, "AVIF coding a 64x48 picture")):
        with pytest.raises(ImageError, match=f"{said} = 3072 pixels, more than the pixel limit 1000") as e:
            decode_image(data, pixel_limit=1000)
        assert e.value.kind == "too_many_pixels"
    # an animated AVIF: its track (moov) is decoded, whatever its items say; here every size it
    # declares lies, and its item is no longer an av01 one
    frames = [Image.fromarray(noise_image(12 + i, 48, 64)) for i in range(2)]
    out = io.BytesIO()
    frames[0].save(out, "AVIF", save_all=True, append_images=frames[1:])
    track = bytearray(out.getvalue())
    at = track.index(b"ispe") + 8
    track[at:at + 8] = struct.pack(">II", 16, 12)
    tkhd = track.index(b"tkhd") + 4
    at = tkhd + (88 if track[tkhd] == 1 else 76)
    track[at:at + 8] = struct.pack(">II", 16 << 16, 12 << 16)
    entry = track.index(b"av01", track.index(b"stsd")) + 4
    track[entry + 24:entry + 28] = struct.pack(">HH", 16, 12)
    item = track.index(b"av01")
    track[item:item + 4] = b"zzzz"
    assert _avif.coded_sizes(bytes(track))[0][0] == (64, 48)
    with pytest.raises(ImageError, match=r"AVIF declaring a 16x12 image but coding a 64x48 picture"):
        decode_image(bytes(track))


def test_a_float_image_with_nan_pixels_is_refused():
    """A PFM (Pillow mode 'F') of NaN pixels decoded to whatever the cast gave (black here) and
    was scored; finite values are clipped to 0..255 as before."""
    from fakespotter.faces import load_image

    def pfm(a):  # greyscale PFM: rows bottom to top, little-endian float32
        return b"Pf\n%d %d\n-1.0\n" % (a.shape[1], a.shape[0]) + a[::-1].astype("<f4").tobytes()

    a = np.full((20, 30), 100.25, np.float32)
    a[3, 4], a[5, 6] = 300.0, -2.0
    rgb = decode_image(pfm(a)).rgb
    assert rgb.shape == (20, 30, 3) and [tuple(rgb[p]) for p in ((0, 0), (3, 4), (5, 6))] == [(100,) * 3, (255,) * 3,
                                                                                              (0,) * 3]
    a[12, 7] = np.nan
    with pytest.raises(ImageError, match=r"float image \(Pillow mode 'F', e.g. a PFM\) with NaN pixels") as e:
        decode_image(pfm(a))
    assert e.value.kind == "decode_error"
    with pytest.raises(ValueError, match="NaN pixels"):
        load_image(pfm(a))


def small_files() -> dict:
    """name: (bytes, signature length, shortest cut that shows it is one): small valid files."""
    rgb = Image.fromarray(noise_image(6, 24, 32))
    return {
        "jpeg": (encode(rgb, "JPEG"), 3, 3),
        "jpeg_progressive": (encode(rgb, "JPEG", progressive=True), 3, 3),
        "png": (encode(rgb, "PNG"), 8, 8),
        "png_adam7": (png_file(np.asarray(rgb), zlib.compress(b"".join(png_rows(np.asarray(rgb), True))), True), 8, 8),
        "gif": (encode(rgb.convert("P"), "GIF"), 6, 6),
        "bmp": (encode(rgb, "BMP"), 2, 7),  # "BM" and the declared size: nothing yet shows a BMP
        "webp": (encode(rgb, "WEBP"), 12, 12),
        "webp_lossless": (encode(rgb, "WEBP", lossless=True), 12, 12),
        "tiff": (encode(rgb, "TIFF"), 4, 4),
        "tiff_deflate": (encode(rgb, "TIFF", compression="tiff_deflate"), 4, 4),
        "tiff_strips": (encode(rgb, "TIFF", tiffinfo={278: 5}), 4, 4),  # (5 strips: arrays outside the IFD)
        "tiff_deflate_strips": (encode(rgb, "TIFF", compression="tiff_deflate", tiffinfo={278: 5}), 4, 4),  # IFD last
        "ppm": (encode(rgb, "PPM"), 2, 3),  # "P6" alone: no header has begun
        "pgm": (encode(rgb.convert("L"), "PPM"), 2, 3),
        "pbm": (encode(rgb.convert("1"), "PPM"), 2, 3),
        "ppm_90x10": (encode(Image.fromarray(noise_image(6, 10, 90)), "PPM"), 2, 3),  # header digits 0 and 9
        "pgm_16bit": (encode(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257).convert("I;16"),
                             "PPM"), 2, 3),  # (maxval 65535: two bytes a sample)
        "ppm_16bit": (b"P6\n32 24\n65535\n" + (np.asarray(rgb).astype(np.uint16) * 257).astype(">u2").tobytes(),
                      2, 3),
    }


@pytest.mark.parametrize("name", list(small_files()))
def test_cut_at_every_header_byte_is_truncated(name):
    data, sig, shown = small_files()[name]
    assert kind_of(data) == "ok"
    cuts = list(range(1, min(len(data), 120))) + [int(len(data) * f) for f in (0.3, 0.6, 0.9)]
    wrong = []
    for n in cuts:
        want = "not_an_image" if n < sig else "decode_error" if n < shown else "truncated"
        if kind_of(data[:n]) != want:
            wrong.append((n, kind_of(data[:n]), want))
    assert not wrong, wrong


@pytest.mark.parametrize("name", list(small_files()))
def test_a_file_without_its_last_bytes_is_truncated_unless_only_its_end_marker_is_cut(name):
    """The last byte of the pixel data (or of the marker that closes it, JPEG's EOI) missing:
    truncated. A PNG cut after its last pixel byte (in the zlib stream's checksum, the IDAT
    chunk's CRC or IEND) and a GIF without its trailer still hold every pixel and are scored."""
    data = small_files()[name][0]
    whole = {"png": 20, "png_adam7": 20, "gif": 2}.get(name, 0)  # IEND, the IDAT's CRC, zlib's adler32; 00 3B
    for k in (1, 2, 5, 13, 20, 24):
        assert kind_of(data[:-k]) == ("ok" if k <= whole else "truncated"), k


@pytest.mark.parametrize("data", [b"\xff\xd8\xff\xff\xd9\x00\x10", b"\xff\xd8\xff\xd0\xff\xd9",
                                  b"\xff\xd8\xff\xd9\x00\x10", b"P6\n5a 40\n255\n" + bytes(600),
                                  b"P6\n56 4x\n255\n" + bytes(600), b"P6\n56 40\n2\xdc5\n" + bytes(600)],
                         ids=["jpeg-fill-eoi", "jpeg-rst-eoi", "jpeg-eoi-junk", "ppm-width", "ppm-height",
                              "ppm-maxval"])
def test_a_whole_structure_that_is_wrong_is_no_cut(data):
    """A JPEG whose markers run to its EOI (fill bytes, a stray RST, junk after it) and a PPM
    with a non-digit in a header number are damaged, not cut short: decode_error."""
    assert kind_of(data) == "decode_error"


@pytest.mark.parametrize("name", list(damaged_files()))
def test_damaged_header_stays_decode_error(name):
    assert kind_of(damaged_files()[name]) == "decode_error"


@pytest.mark.parametrize("text", [b"BMP files are bitmaps\n", b"BM is great, is it not? " * 4, b"BM\x00\x10\x00\x00",
                                  b"P6 is a camera", b"P1 text here\n", b"P6"])
def test_text_with_a_weak_signature_is_not_truncated(text):
    assert kind_of(text) == "decode_error"


@pytest.mark.parametrize("text", [b"just text", b"\xff\xd8", b"\x89PNG\r\n", b"GIF8", b"II*",
                                  b"RIFF\x10\x00\x00\x00WEB"])
def test_no_signature_stays_not_an_image(text):
    assert kind_of(text) == "not_an_image"


def test_jpeg_with_too_many_scans_is_refused():
    assert decode_image(jpeg_with_scans(MAX_JPEG_SCANS)).width == 16
    with pytest.raises(ImageError, match=rf"^JPEG of more than {MAX_JPEG_SCANS} scans \(SOS segments\): refused") as e:
        decode_image(jpeg_with_scans(MAX_JPEG_SCANS + 1))
    assert e.value.kind == "decode_error"


def test_jpeg_scan_count_skips_marker_bytes_inside_segments():
    """FF DA inside a comment is no scan: only real scan headers count."""
    data = jpeg_with_scans(20, comment=b"\xff\xda" * (2 * MAX_JPEG_SCANS))
    assert data.count(b"\xff\xda") > 2 * MAX_JPEG_SCANS
    assert decode_image(data).width == 16


def apng(n: int, default_image: bool = False) -> bytes:
    frames = [Image.fromarray(noise_image(9 + i, 20, 20)) for i in range(n)]
    return encode(frames[0], "PNG", save_all=True, append_images=frames[1:], default_image=default_image)


def with_declared_frames(data: bytes, frames: int) -> bytes:
    at = data.index(b"acTL") - 4
    return data[:at] + chunk(b"acTL", struct.pack(">II", frames, 0)) + data[at + 20:]


def first_frame_only(data: bytes) -> bytes:
    """The APNG less its frames after the first (their fcTL and fdAT chunks)."""
    return data[:data.index(b"fcTL", data.index(b"IDAT")) - 4] + chunk(b"IEND", b"")


def test_apng_frame_count_is_the_files():
    assert decode_image(apng(3)).frames == 3
    assert decode_image(apng(3, default_image=True)).frames == 3  # the default image and two frames
    assert decode_image(with_declared_frames(apng(3), 3)).frames == 3
    one = first_frame_only(apng(3))
    assert decode_image(with_declared_frames(one, 1)).frames == 1
    for declared in (2, 4, 2 ** 31):  # three real frames or one, against what acTL declares
        assert decode_image(with_declared_frames(apng(3), declared)).frames is None, declared
        assert decode_image(with_declared_frames(one, declared)).frames is None, declared


def test_apng_first_frame_short_stream_is_truncated():
    data = apng(2)
    at = data.index(b"IDAT") - 4
    length = int.from_bytes(data[at:at + 4], "big")
    rows = zlib.decompress(data[at + 8:at + 8 + length])
    short = chunk(b"IDAT", zlib.compress(rows[:len(rows) // 2]))  # 10 of the 20 rows
    assert kind_of(data[:at] + short + data[at + 12 + length:]) == "truncated"


def with_chunk_before_idat(data: bytes, kind: bytes, body: bytes) -> bytes:
    at = data.index(b"IDAT") - 4
    return data[:at] + chunk(kind, body) + data[at:]


@pytest.mark.parametrize("kind, body", [
    (b"zTXt", b"workflow\x00\x00" + zlib.compress(b"{}" * 600_000)),  # 1.2 MB of text: over MAX_TEXT_CHUNK
    (b"iTXt", b"prompt\x00\x01\x00\x00\x00" + zlib.compress(b"a" * 2_000_000)),
    (b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(2_000_000))),  # (colour profiles are ignored anyway)
])
def test_png_metadata_over_pillows_limits_leaves_the_pixels_readable(kind, body, tmp_path):
    """Pillow refuses a PNG whose text or ICC chunk inflates past 1 MB (a memory guard); the
    pixels are read without those chunks, by the scanner and the API alike."""
    from fakespotter.faces import load_image

    rgb = noise_image(10, 12, 16)
    data = with_chunk_before_idat(encode(Image.fromarray(rgb), "PNG"), kind, body)
    (tmp_path / "a.png").write_bytes(data)
    assert np.array_equal(decode_image(data).rgb, rgb)
    assert np.array_equal(load_image(data), rgb)
    assert np.array_equal(load_image(tmp_path / "a.png"), rgb)


def test_a_png_with_damaged_pixels_and_big_text_is_still_refused():
    rgb = noise_image(11, 12, 16)
    data = with_chunk_before_idat(png_file(rgb, zlib.compress(b"".join(png_rows(rgb, False)[:5])), False),
                                  b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 2_000_000))
    assert kind_of(data) == "truncated"


def test_width_and_height_are_the_upright_images():
    """As scan records give them: Pillow reports a TIFF's upright size but a JPEG's stored one."""
    for fmt in ("JPEG", "PNG", "TIFF"):
        img = Image.fromarray(noise_image(12, 20, 30))  # 30 wide, 20 high as stored
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees: 20 wide, 30 high upright
        out = decode_image(encode(img, fmt, exif=exif.tobytes()))
        assert (out.width, out.height) == (20, 30) and out.rgb.shape == (30, 20, 3), fmt


def test_a_format_pillow_recognises_but_refuses_says_why():
    jpeg = encode(Image.fromarray(noise_image(13, 16, 16)), "JPEG")
    at = jpeg.index(b"\xff\xc0")
    twelve_bit = jpeg[:at + 1] + b"\xc1" + jpeg[at + 2:at + 4] + b"\x0c" + jpeg[at + 5:]  # SOF1, 12-bit samples
    with pytest.raises(ImageError, match="it starts like JPEG, but Pillow's JPEG reader cannot read it: .*12-bit"):
        decode_image(twelve_bit)


def test_a_header_field_pillow_trips_on_is_named_as_damage():
    """Pillow turns a KeyError or struct.error of its reader into a SyntaxError saying only the
    key (a bare number) or the struct call: the message says the header is damaged."""
    rgb = Image.fromarray(noise_image(13, 16, 16))
    jpeg = encode(rgb, "JPEG")
    at = jpeg.index(b"\xff\xc0")
    frame_length_0 = jpeg[:at + 2] + b"\x00\x00" + jpeg[at + 4:]
    tiff = encode(rgb, "TIFF")
    ifd = struct.unpack("<I", tiff[4:8])[0]
    entries = [ifd + 2 + 12 * i for i in range(struct.unpack("<H", tiff[ifd:ifd + 2])[0])]
    (compression,) = [e for e in entries if tiff[e:e + 2] == struct.pack("<H", 259)]
    no_such_compression = tiff[:compression + 8] + struct.pack("<H", 0xfff0) + tiff[compression + 10:]
    for data, fmt, what in ((frame_length_0, "JPEG", "struct.error"), (no_such_compression, "TIFF", "KeyError")):
        with pytest.raises(ImageError, match=rf"^it starts like {fmt}, but its header is damaged \(Pillow's {fmt} "
                                             rf"reader failed on it: {what}: .+\)$") as e:
            decode_image(data)
        assert e.value.kind == "decode_error"


def test_an_animated_gif_cut_short_has_no_frame_count():
    frames = [Image.fromarray(noise_image(s, 24, 32)).convert("P") for s in range(3)]
    b = io.BytesIO()
    frames[0].save(b, "GIF", save_all=True, append_images=frames[1:])
    gif = b.getvalue()
    assert gif.endswith(b"\x3b") and decode_image(gif).frames == 3
    for after in (b"\x00" * 5, b"\r\n", b"appended text"):  # after the trailer
        assert decode_image(gif + after).frames == 3, after
    cuts = [gif[:n] for n in range(len(gif) - 60, len(gif) - 1)]  # inside the last frame's image data
    cuts.append(gif[:len(gif) - 40] + b"\x3b")  # ending in the trailer's byte
    for cut in cuts:
        assert Image.open(io.BytesIO(cut)).n_frames == 3, "premise: Pillow still counts it"
        assert decode_image(cut).frames is None, len(cut)


def test_png_data_in_one_idat_chunk_over_a_mib_is_checked_in_slices():
    """One IDAT chunk of 2.4 MB (read 1 MiB at a time): whole, it decodes; ending at a row, it
    is truncated."""
    rgb = np.random.default_rng(14).integers(0, 256, (800, 1000, 3), dtype=np.uint8)
    rgb[-1] = 0
    rows = png_rows(rgb, False)
    whole = zlib.compress(b"".join(rows), 1)
    at = 8 + 25  # after the signature and IHDR: one IDAT chunk holds the whole stream
    data = png_file(rgb, b"", False)
    assert len(whole) > 2 << 20
    assert np.array_equal(decode_image(data[:at] + chunk(b"IDAT", whole) + data[at:]).rgb, rgb)
    short = zlib.compress(b"".join(rows[:-1]), 1)
    assert kind_of(data[:at] + chunk(b"IDAT", short) + data[at:]) == "truncated"


def test_a_bigtiff_is_not_walked_as_a_classic_tiff():
    """Its header differs (magic 43, 8-byte offsets): read as a classic TIFF's, its fields would
    point anywhere, and a damaged BigTIFF could read as cut short."""
    from fakespotter.data import _tiff_cut

    big = encode(Image.fromarray(noise_image(15, 20, 30)), "TIFF", big_tiff=True)
    assert big[:4] == b"II+\x00"
    assert not any(_tiff_cut(big[:n]) for n in range(8, len(big), 7))
    classic = encode(Image.fromarray(noise_image(15, 20, 30)), "TIFF")
    assert _tiff_cut(classic[:len(classic) - 10])


def test_the_python_api_refuses_what_the_scanner_refuses_and_decodes_the_same_pixels():
    """faces.load_image (FakeSpotter, features, chips, evaluate on images) runs the checks that
    decode_image adds to Pillow: a PNG whose image data stops at a row boundary was decoded with
    its missing rows black."""
    from scan_helpers import bad_files, odd_good_files

    from fakespotter.faces import load_image

    rgb = noise_image(6, 24, 32)
    rows = png_rows(rgb, False)
    cases = [(f"png_rows_{n}", png_file(rgb, zlib.compress(b"".join(rows[:n])), False)) for n in (0, 5, 23)]
    cases += [(name, data) for name, data, kinds in bad_files(1) if data and "not_a_chip" not in kinds]
    cases += list(damaged_files().items()) + [("many_scans", jpeg_with_scans(MAX_JPEG_SCANS + 1))]
    for name, data in cases:
        with pytest.raises(ImageError):
            decode_image(data)
        with pytest.raises(ValueError, match=rf"^load_image: {len(data)} bytes"):
            load_image(data)
    for name, data in odd_good_files(2) + [("png_whole", png_file(rgb, zlib.compress(b"".join(rows)), False))]:
        assert np.array_equal(load_image(data), decode_image(data).rgb), name


def test_the_api_reads_a_pngs_bytes_again_once(tmp_path, monkeypatch):
    """For its CRCs, and (black last row) the length of its image data."""
    from fakespotter import data as data_module
    from fakespotter import faces

    reads = []
    real = faces._bytes_of
    monkeypatch.setattr(faces, "_bytes_of", lambda source: reads.append(source) or real(source))
    rgb = noise_image(8, 24, 32)
    for black, want in ((False, 1), (True, 1)):
        if black:
            rgb[-1] = 0
        path = tmp_path / f"black{black}.png"
        path.write_bytes(png_file(rgb, zlib.compress(b"".join(png_rows(rgb, False))), False))
        reads.clear()
        assert np.array_equal(faces.load_image(path), rgb) and len(reads) == want

    def no_memory(_):
        raise MemoryError

    monkeypatch.setattr(data_module, "decode_rgb", no_memory)  # out of memory stays MemoryError in the API
    with pytest.raises(MemoryError):
        faces.load_image(encode(Image.fromarray(rgb), "JPEG"))


def damaged_lzw_tiff() -> bytes:
    """A TIFF whose LZW-coded strips are damaged: libtiff fails on them ("Using code not yet
    in table") and prints that to stderr by default; Pillow says only "decoder error -2"."""
    out = io.BytesIO()
    Image.fromarray(noise_image(6, 200, 200)).save(out, "TIFF", compression="tiff_lzw")
    data = bytearray(out.getvalue())
    for i in range(200, 2000, 37):
        data[i] ^= 0x55
    return bytes(data)


def test_libtiffs_error_is_in_the_files_error_not_on_stderr(capfd, tmp_path):
    from fakespotter.faces import load_image

    data = damaged_lzw_tiff()
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.kind == "decode_error" and "(libtiff: Using code not yet in table)" in e.value.message
    path = tmp_path / "bad.tif"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"bad.tif is not an image .*libtiff: Using code not yet in table"):
        load_image(str(path))
    assert "not yet in table" not in capfd.readouterr().err
    with pytest.raises(OSError):  # Pillow used directly: libtiff's message goes to stderr, as before
        Image.open(io.BytesIO(data)).load()
    assert "Using code not yet in table" in capfd.readouterr().err


def test_a_scan_of_damaged_tiffs_keeps_stderr_clean(tmp_path, tmp_path_factory):
    """One line per damaged TIFF went through the progress bar, none saying which file."""
    import json
    import subprocess
    import sys

    from scan_helpers import model_file

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"bad{i}.tif").write_bytes(damaged_lzw_tiff())
    out = tmp_path / "scan.jsonl"
    proc = subprocess.run([sys.executable, "-m", "fakespotter", "scan", str(folder), "--aligned", "--workers", "2",
                           "--model", str(model_file(tmp_path_factory)), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["error_kind"] for r in records] == ["decode_error"] * 3
    assert all("libtiff: Using code not yet in table" in r["error"] for r in records)
    assert "libtiff" not in proc.stderr and "table" not in proc.stderr, proc.stderr


def test_a_jpeg_tiff_with_a_strip_libjpeg_fails_on_is_refused_though_pillow_loads_it():
    """libjpeg's error on one strip of a JPEG-compressed TIFF (here a stuffed FF 00 in its data
    changed to a marker libjpeg does not know) reaches libtiff's error handler, and Pillow loads
    the image with that strip garbled: it was scored. libtiff's codec errors now refuse the
    file, in the API too."""
    from fakespotter.faces import load_image

    out = io.BytesIO()
    rgb = noise_image(8, 96, 64)
    Image.fromarray(rgb).save(out, "TIFF", compression="jpeg", quality=90, tiffinfo={278: 16})  # 6 strips
    good = out.getvalue()
    img = Image.open(io.BytesIO(good))
    offsets, counts = img.tag_v2[273], img.tag_v2[279]
    assert len(offsets) == 6
    data = bytearray(good)
    stuffed = good.index(b"\xff\x00", offsets[2], offsets[2] + counts[2])
    data[stuffed + 1] = 0x16
    data = bytes(data)
    clean = np.asarray(Image.open(io.BytesIO(good)).convert("RGB"))
    loaded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # Pillow: no error
    assert not np.array_equal(loaded[32:48], clean[32:48]) and np.array_equal(loaded[:32], clean[:32])
    with pytest.raises(ImageError) as e:
        decode_image(data)
    assert e.value.kind == "decode_error"
    assert e.value.message == ("TIFF: part of the image did not decode (libtiff: JPEGLib: Unsupported marker type "
                               "0x16)")
    with pytest.raises(ValueError, match=r"TIFF: part of the image did not decode \(libtiff: JPEGLib: Unsupported"):
        load_image(data)
    for mode in ("RGB", "L"):  # the undamaged file decodes, with no message to refuse it for
        out = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(out, "TIFF", compression="jpeg", tiffinfo={278: 16})
        assert decode_image(out.getvalue()).rgb.shape == (96, 64, 3)


@pytest.mark.parametrize("tiled", [False, True], ids=["strips", "tiles"])
def test_a_jpeg_tiff_strip_libjpeg_only_warns_about_is_refused(tmp_path, tiled):
    """libjpeg's *warnings* inside libtiff reach no handler (Pillow turns libtiff's off while it
    decodes): a strip whose data hits a marker early, or lacks its end (cut short), decoded with
    rows grey or garbled and was scored. Each strip is checked as the plain JPEG path checks a
    file, in the API too."""
    from fakespotter.faces import load_image

    rgb = noise_image(10, 96, 64)
    Image.fromarray(rgb).save(tmp_path / "plain.tif")
    if tiled:
        if shutil.which("tiffcp") is None:
            pytest.skip("needs libtiff's tiffcp (Debian: libtiff-tools) to write JPEG tiles")
        good_path = tmp_path / "tiled.tif"
        subprocess.run(["tiffcp", "-t", "-w", "32", "-l", "32", "-c", "jpeg", str(tmp_path / "plain.tif"),
                        str(good_path)], check=True)
        good = good_path.read_bytes()
    else:
        out = io.BytesIO()
        Image.fromarray(rgb).save(out, "TIFF", compression="jpeg", quality=90, tiffinfo={278: 16})  # 6 strips
        good = out.getvalue()
    tags = Image.open(io.BytesIO(good)).tag_v2
    offsets, counts = (tags[324], tags[325]) if tiled else (tags[273], tags[279])
    what = "tile" if tiled else "strip"
    assert len(offsets) == 6 and decode_image(good).rgb.shape == (96, 64, 3)
    start, end = offsets[2], offsets[2] + counts[2]
    marker = bytearray(good)
    at = good.index(b"\xff\xda", start, end) + 30  # inside the scan data
    marker[at:at + 2] = b"\xff\xd4"  # a restart marker, in a scan without restart intervals
    cut = bytearray(good)
    cut[end - 40:end] = bytes(40)  # the strip's last bytes, its end marker among them, gone
    for data, kind, message in ((marker, "decode_error", f"TIFF: damaged JPEG data in {what} 2: "),
                                (cut, "truncated", f"TIFF: the JPEG data of {what} 2 ends early (no end marker")):
        Image.open(io.BytesIO(bytes(data))).load()  # Pillow: no error
        with pytest.raises(ImageError) as e:
            decode_image(bytes(data))
        assert e.value.kind == kind and e.value.message.startswith(message), e.value.message
        with pytest.raises(ValueError, match=re.escape(message)):
            load_image(bytes(data))


def test_libtiffs_words_do_not_make_a_damaged_tiff_truncated():
    """libtiff's "stream is truncated or corrupt" (LZMA) went into the text that decides
    truncated vs decode_error: a whole file with a damaged strip length was 'truncated'."""
    from fakespotter.data import _decode_failure

    out = io.BytesIO()
    Image.fromarray(noise_image(7, 16, 16)).save(out, "TIFF", compression="tiff_lzw")
    err = _decode_failure(OSError("decoder error -2"), out.getvalue(), "TIFF",
                          libtiff=["LZMADecode: Decoding error at scanline 0, stream is truncated or corrupt"])
    assert err.kind == "decode_error" and "(libtiff: LZMADecode" in err.message
    assert _decode_failure(EOFError("image file is truncated"), out.getvalue(), "TIFF").kind == "truncated"
