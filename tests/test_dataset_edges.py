"""fakespotter.dataset without a build: the split rules, the output folder's guards, the swap, the
builder's stages with their renderers / detectors stubbed, the detail matcher's edge cases and the
confound report's keys.  Model-free and fast (no OpenVINO, no dlib, no registry data)."""

import errno
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakespotter import dataset as D
from fakespotter.manifest import ManifestRow, file_sha256, read_manifest, write_manifest


def _jpeg(seed: int, h: int = 32, w: int = 32, quality: int = 80) -> bytes:
    rgb = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _builder(tmp_path, sizes=D.SMALL, seed=0, log=None):
    return D._Builder(tmp_path / "stage", sizes, seed, 1, log or (lambda m: None))


# ----------------------------------------------------------------------------------------------
# splits


def test_split_of_cuts_exactly_at_70_and_85():
    # groups whose sha256[:8] % 100 is 69, 70, 84, 85, 99 (the cut values, found once)
    assert D.split_of("nba:73") == "train"   # 69
    assert D.split_of("nba:171") == "val"    # 70
    assert D.split_of("nba:32") == "val"     # 84
    assert D.split_of("nba:185") == "test"   # 85
    assert D.split_of("nba:10") == "test"    # 99
    # "external:" must be a prefix, not just somewhere in the group
    assert D.is_external("external:menpo:x") and not D.is_external("nba:external:x")
    assert D.split_of("external:nba:171") == "test"


def test_split_quota_rounds_70_15_15():
    assert D.split_quota(100) == {"train": 70, "val": 15, "test": 15}
    assert D.split_quota(10) == {"train": 6, "val": 2, "test": 2}
    assert D.split_quota(1) == {"train": 1, "val": 0, "test": 0}


def test_key_ints_are_pinned():
    """Every nuisance draw of a build is keyed by these: a change re-draws every chip of every
    seed (builds stop matching their recorded manifests)."""
    assert D._key_ints("real/nba/x.jpg") == [1493929444, 2161293327, 2416098839, 3417434846]


# ----------------------------------------------------------------------------------------------
# output folder


def test_previous_build_needs_our_format_and_keys(tmp_path):
    keys = {"pipeline": 1, "packages": 1, "sources": 1, "counts": 1}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / D.BUILD_JSON).write_text(json.dumps({"format": D.BUILD_FORMAT, **keys}))
    assert D._is_previous_build(tmp_path / "x")
    (tmp_path / "x" / D.BUILD_JSON).write_text(json.dumps({"format": D.BUILD_FORMAT + 1, **keys}))
    assert not D._is_previous_build(tmp_path / "x")
    (tmp_path / "x" / D.BUILD_JSON).write_text("[1, 2]")  # JSON, not an object: not ours, no traceback
    assert not D._is_previous_build(tmp_path / "x")
    with pytest.raises(ValueError, match="holds no earlier build"):
        D.check_output_dir(tmp_path / "x", overwrite=True)


def test_check_output_dir_cases(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        D.check_output_dir(f, overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert D.check_output_dir(empty, overwrite=False) == empty  # an empty folder is fine
    assert D.check_output_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / D.BUILD_MARKER).write_text("")
    assert D.check_output_dir(prev, overwrite=True) == prev
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (prev / "real").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="is a symbolic link; remove it first"):
        D.check_output_dir(prev, overwrite=True)


def test_remove_tree_removes_links_not_their_targets(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    D._remove_tree(link)
    assert not os.path.lexists(link) and (target / "keep.txt").exists()
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nothing")
    D._remove_tree(dangling)
    assert not os.path.lexists(dangling)


def test_replace_previous_swaps_and_cleans_up(tmp_path):
    out, stage = tmp_path / "out", tmp_path / "out" / D.STAGE_DIR
    (out / "real").mkdir(parents=True)
    (out / "real" / "old.jpg").write_bytes(b"old")
    (out / "notes.txt").write_text("the user's")
    (out / D.MANIFEST_NAME).write_text("old")
    (out / D.BUILD_JSON).write_text("{}")
    (stage / "real").mkdir(parents=True)
    (stage / "real" / "new.jpg").write_bytes(b"new")
    (stage / "fake").mkdir()
    (stage / D.MANIFEST_NAME).write_text("new")
    (stage / D.BUILD_JSON).write_text('{"new": 1}')
    D._replace_previous(out, stage)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted([
        "fake", "notes.txt", "real", "real/new.jpg", D.MANIFEST_NAME, D.BUILD_JSON])
    assert (out / D.MANIFEST_NAME).read_text() == "new" and (out / D.BUILD_JSON).read_text() == '{"new": 1}'


def test_a_full_disk_while_the_chips_are_written_names_the_file_as_the_build_would(tmp_path, monkeypatch):
    """It named the staging folder's file, which is gone by the time the message is read."""
    _stub_stages(monkeypatch)
    write_bytes = D._write_bytes

    def full(path, *a, **k):
        if path.name == "1.jpg":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return write_bytes(path, *a, **k)

    monkeypatch.setattr(D, "_write_bytes", full)
    out = tmp_path / "out"
    with pytest.raises(OSError) as e:
        D.build(out, small=True, log=lambda m: None)
    assert e.value.filename == str(out / "real" / "x" / "1.jpg") and not (out / D.STAGE_DIR).exists()


def test_a_read_only_output_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    monkeypatch.setattr(D, "why_not_writable", lambda where: " (a read-only file system)")
    with pytest.raises(ValueError, match=rf"^data build: cannot write into {tmp_path} \(a read-only file system\)$"):
        D.check_output_dir(tmp_path / "new", overwrite=False)


@pytest.mark.parametrize("fails", ["build.json", "manifest"])
def test_a_build_that_cannot_write_its_manifest_leaves_the_previous_one(tmp_path, monkeypatch, fails):
    """build.json and the manifest were written after the swap: a full disk (or a file size
    limit) there left the new chips with no manifest, and the previous build gone."""
    _stub_stages(monkeypatch)
    out = tmp_path / "out"
    D.build(out, small=True, log=lambda m: None)
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    write_bytes = D._write_bytes

    def full(path, *a, **k):
        if fails == "build.json" and path.name != D.BUILD_JSON:  # (the chips go on being written)
            return write_bytes(path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(D, "_write_bytes" if fails == "build.json" else "write_manifest",
                        full if fails == "build.json" else lambda rows, path: full(Path(path)))
    with pytest.raises(OSError, match="No space left"):
        D.build(out, small=True, seed=1, overwrite=True, log=lambda m: None)
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------------
# the builder's steps, with the pipeline / renderers stubbed


def test_emit_records_detail_and_keeps_external_reals_out_of_the_match(tmp_path, monkeypatch):
    from fakespotter import samples

    chip = (np.random.default_rng(1).random((150, 150, 3)) * 255).astype(np.uint8)
    monkeypatch.setattr(samples, "pipeline_compose", lambda *a: chip)
    b = _builder(tmp_path)
    kw = dict(label="real", fake_type="", generator="", source="x", licence="x", params={})
    assert b.emit("real/external/menpo/a-00.jpg", chip, True, group="external:menpo:a", **kw)
    assert b.real_details == []  # the fakes match the training reals only
    assert b.emit("real/nba/b.jpg", chip, True, group="nba:b", **kw)
    detail = len(samples.encode_jpeg(chip, D.DETAIL_QUALITY))
    assert b.real_details == [detail]
    for row in b.rows:
        assert row.params_dict["detail_bytes"] == detail
        assert file_sha256(b.out / row.file) == row.sha256
    assert b.rows[0].split == "test" and b.rows[1].split == D.split_of("nba:b")


def test_matcher_budgets_small_and_full(tmp_path):
    small = _builder(tmp_path, D.SMALL)
    assert small.matcher("dcgan", 10).limit == int(D.MATCH_BUDGET_SMALL["dcgan"] * 10) == 50
    assert small.matcher("nothing", 10) is None and set(small.matchers) == {"dcgan"}
    full = _builder(tmp_path, D.FULL)
    assert full.matcher("dcgan", 10).limit == 30 and len(full.matcher("x", 1) or []) == 0
    assert full.match_bins == D.MATCH_BINS and small.match_bins == D.MATCH_BINS_SMALL


def test_progress_logs_the_last_step(tmp_path):
    lines = []
    b = _builder(tmp_path, log=lines.append)
    for done in range(1, 8):
        b.progress("x", done, 7)
    assert len(lines) == 1 and lines[0].startswith("  x: 7/7")


def test_gan_blocks_give_up_after_about_100_blocks(tmp_path):
    b = _builder(tmp_path)
    calls = []
    with pytest.raises(RuntimeError, match="could not fill the split quotas"):
        b._gan_blocks("x", 3, lambda block, need: calls.append(block) or 0)
    assert len(calls) <= 101


def _sizes(**kw):
    base = dict(nba=None, mobilestylegan=0, dcgan=0, identity_swap=0, local_manipulation=0, expression=0,
                local_donors=0)
    return D.BuildSizes(**{**base, **kw})


def _recording_emit(b, rows):
    def emit(rel, rgb, borrow, **kw):
        rows.append(dict(kw, rel=rel, borrow=borrow))
        return True
    b.emit = emit


def test_mobilestylegan_seeds_and_psi_follow_the_build_seed(tmp_path):
    b = _builder(tmp_path, _sizes(mobilestylegan=4), seed=3)
    renders, rows = [], []
    b.msg_render = lambda face_seed, psi: renders.append((face_seed, psi)) or np.zeros((8, 8, 3), np.uint8)
    _recording_emit(b, rows)
    b.mobilestylegan()
    assert len(rows) == 4 and all(r["borrow"] for r in rows)
    for (face_seed, psi), r in zip(renders, rows):
        i = int(r["rel"].rsplit("-", 1)[1][:6])
        assert face_seed == 3_000_000 + i == r["params"]["seed"]
        assert psi == round(float(np.random.default_rng([3, 0x5053, i]).uniform(*D.PSI_RANGE)), 6)
    assert len({psi for _, psi in renders}) == 4


def test_dcgan_renders_with_the_build_seed_and_its_own_mask(tmp_path, monkeypatch):
    from fakespotter import samples

    seeds, rows = [], []

    def render(indices, seed, gen):
        seeds.append(seed)
        return [np.zeros((64, 64, 3), np.uint8) for _ in indices]

    monkeypatch.setattr(samples, "_render", render)
    b = _builder(tmp_path, _sizes(dcgan=3), seed=5)
    _recording_emit(b, rows)
    b.dcgan()
    assert seeds and set(seeds) == {5}
    assert len(rows) == 3 and not any(r["borrow"] for r in rows)  # native renders: own edge as mask
    assert all(r["params"]["seed"] == 5 for r in rows)


def test_local_donors_follow_the_seed_and_give_up(tmp_path):
    b = _builder(tmp_path, _sizes(local_donors=2), seed=4)
    b.msg_render = lambda face_seed, psi: np.zeros((8, 8, 3), np.uint8)
    b.landmarks = lambda key, rgb: np.zeros((5, 2))
    assert [d[0] for d in b.local_donors()] == [D.LOCAL_DONOR_SEED0 + 4000, D.LOCAL_DONOR_SEED0 + 4001]
    tries = []
    b.landmarks = lambda key, rgb: tries.append(key) and None
    with pytest.raises(RuntimeError, match="no face found in the MobileStyleGAN donor renders"):
        b.local_donors()
    assert len(tries) <= 10 * 2 + 11


def test_msg_render_survives_a_damaged_cache_and_a_read_only_one(tmp_path, monkeypatch):
    from fakespotter import generators

    monkeypatch.setenv("FAKESPOTTER_CACHE", str(tmp_path))
    monkeypatch.setattr(D, "_openvino_version", lambda: "v")

    class Fake:
        def render(self, seed, psi):
            return np.full((512, 512, 3), 9, np.uint8)

    monkeypatch.setattr(generators, "default_mobilestylegan", lambda threads: Fake())
    folder = tmp_path / "renders" / f"mobilestylegan-{D.RENDER_SIDE}-openvino-v"
    folder.mkdir(parents=True)
    (folder / "7-0.500000.png").write_bytes(b"not a png")
    b = _builder(tmp_path)
    assert (b.msg_render(7, 0.5) == 9).all()  # rendered again
    with Image.open(folder / "7-0.500000.png") as img:
        assert img.size == (D.RENDER_SIDE, D.RENDER_SIDE)

    def read_only(path, data):
        raise OSError("read-only")

    monkeypatch.setattr(D, "_write_bytes", read_only)
    assert (b.msg_render(8, 0.5) == 9).all()  # no caching, still a render


def test_swap_donor_is_never_the_target(tmp_path):
    b = _builder(tmp_path)
    b.nba_paths = [Path("/nowhere/a.png"), Path("/nowhere/b.png")]
    assert b._swap_donor(0, "train", {"train": [0]}, (0, 0, 0)) is None


def test_local_types_licences_and_donor_pools(tmp_path, monkeypatch):
    from fakespotter import faces, manipulations

    monkeypatch.setattr(faces, "load_image", lambda path, background: np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(manipulations, "manipulate", lambda kind, rgb, lm, rng, donor, donor_landmarks: rgb)
    b = _builder(tmp_path, _sizes(identity_swap=6, local_manipulation=20, expression=3, local_donors=6), seed=0)
    b.nba_paths = [Path(f"/nowhere/p{i:015d}.png") for i in range(80)]
    b.landmarks = lambda key, rgb: np.zeros((5, 2))
    b.local_donors = lambda: [(100 + d, np.zeros((8, 8, 3), np.uint8), np.zeros((5, 2))) for d in range(6)]
    rows = []
    _recording_emit(b, rows)
    b.local_types()
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["fake_type"], []).append(r)
    assert {k: len(v) for k, v in by_kind.items()} == {"identity_swap": 6, "local_manipulation": 20, "expression": 3}
    for kind, rs in by_kind.items():
        for r in rs:
            assert ("; donor: " in r["licence"]) == (kind == "local_manipulation"), (kind, r["licence"])
    split_of_donor = {}
    for r in by_kind["local_manipulation"]:  # each split lends its own donors
        assert split_of_donor.setdefault(r["params"]["donor"], D.split_of(r["group"])) == D.split_of(r["group"])


# ----------------------------------------------------------------------------------------------
# detail matcher


def test_detail_matcher_without_reals_and_with_ties():
    m = D._DetailMatcher([], 3, 2.0, 4)  # no reals: no edges, no crash, all n kept in the one bin
    assert m.edges.size == 0 and m.target == [3, 0, 0, 0]
    assert all(m.accept(d) for d in (123, 0, 10**6)) and m.got[0] == 3 and not m.accept(5)
    # edges [2, 2.5, 4.25]; counts [1, 3, 2, 2] (a detail equal to an edge goes to the bin above)
    m = D._DetailMatcher([1, 2, 2, 2, 3, 4, 5, 6], 5, 2.0, 4)
    assert m.target == [1, 2, 1, 1]  # the largest remainder (bin 1) gets the extra one
    assert m.accept(2) and m.got == [0, 1, 0, 0]


# ----------------------------------------------------------------------------------------------
# build(): arguments and orchestration, with every stage stubbed


@pytest.mark.parametrize("kw, exc, msg", [
    ({"seed": -1}, ValueError, "seed must be an int >= 0"),
    ({"seed": True}, ValueError, "seed must be an int >= 0"),
    ({"threads": 0}, ValueError, "threads must be an int >= 1"),
    ({"sizes": {"nba": 1}}, TypeError, "sizes must be a BuildSizes"),
])
def test_build_refuses_bad_arguments_before_work(tmp_path, monkeypatch, kw, exc, msg):
    monkeypatch.setattr(D, "_preflight", lambda: pytest.fail("preflight reached"))
    with pytest.raises(exc, match=msg):
        D.build(tmp_path / "out", log=lambda m: None, **kw)
    assert not (tmp_path / "out").exists()


def _stub_stages(monkeypatch, fail_in=None):
    monkeypatch.setattr(D, "_preflight", lambda: None)

    def reals(self):
        for i, (label, ftype, gen, q) in enumerate([("real", "", "", 75), ("real", "", "", 76),
                                                    ("fake", "entire_synthesis", "dcgan", 90),
                                                    ("fake", "entire_synthesis", "dcgan", 91),
                                                    ("fake", "entire_synthesis", "dcgan", 92)]):
            rel = f"{label}/x/{i}.jpg"
            data = _jpeg(i, quality=q)
            D._write_bytes(self.out / rel, data)
            group = f"g{i}"
            self.rows.append(ManifestRow(rel, file_sha256(self.out / rel), label, ftype, gen, "pypi:x",
                                         group, D.split_of(group), "x", "{}"))

    def stop(self):
        raise RuntimeError("stop")

    for name in ("reals", "other_reals", "mobilestylegan", "dcgan", "local_types"):
        monkeypatch.setattr(D._Builder, name, reals if name == "reals" else
                            stop if name == fail_in else (lambda self: None))


def test_build_orchestration_with_stubbed_stages(tmp_path, monkeypatch):
    _stub_stages(monkeypatch)
    out = tmp_path / "out"
    (out / D.STAGE_DIR / "real").mkdir(parents=True)  # a killed build's leftovers
    (out / D.STAGE_DIR / "real" / "junk.jpg").write_bytes(b"junk")
    (out / D.OLD_DIR).mkdir()
    (out / D.BUILD_MARKER).write_text("")
    lines = []
    manifest = D.build(out, small=True, overwrite=True, log=lines.append)
    assert lines[0].startswith("data build: small set, seed 0")
    assert "2 real and 3 fake chips" in lines[-1]
    assert (out / D.BUILD_MARKER).is_file()
    assert not (out / D.STAGE_DIR).exists() and not (out / D.OLD_DIR).exists()
    assert not (out / "real" / "junk.jpg").exists()  # the leftovers were not swapped in
    assert len(manifest) == 5
    info = json.loads((out / D.BUILD_JSON).read_text())
    assert info["total"] == {"real": 2, "fake": 3} and info["small"] is True
    assert info["pipeline"]["match_budget"] == D.MATCH_BUDGET_SMALL
    assert info["rows_sha256"] == D.rows_digest(manifest.rows)
    # the same, unstubbed marker check: the output now counts as a previous build
    assert D._is_previous_build(out)
    info = json.loads((D.build(tmp_path / "full", log=lambda m: None).root / D.BUILD_JSON).read_text())
    assert info["pipeline"]["match_budget"] == D.MATCH_BUDGET and info["small"] is False


def test_a_failed_build_removes_its_staging_folder(tmp_path, monkeypatch):
    _stub_stages(monkeypatch, fail_in="dcgan")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stop"):
        D.build(out, small=True, log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == [D.BUILD_MARKER]


# ----------------------------------------------------------------------------------------------
# confound report


def _manifest(tmp_path, specs):
    """specs: (label, generator, group, height, quality) per row."""
    rows = []
    for i, (label, gen, group, h, q) in enumerate(specs):
        rel = f"{label}/{i}.jpg"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(_jpeg(i, h=h, quality=q))
        rows.append(ManifestRow(rel, file_sha256(tmp_path / rel), label,
                                "entire_synthesis" if label == "fake" else "", gen, "pypi:x", group,
                                D.split_of(group), "x"))
    write_manifest(rows, tmp_path)
    return read_manifest(tmp_path)


def test_confound_report_keys_and_external_reals(tmp_path):
    # fakes are SMALLER and of LOWER quality than the reals: max(AUC, 1 - AUC) still says 1.0;
    # the external reals look like the fakes (no signal against them)
    specs = ([("real", "", f"r{i}", 40, 90) for i in range(10)]
             + [("fake", "g", f"f{i}", 32, 70) for i in range(10)])
    rep = D.confound_report(_manifest(tmp_path / "a", specs))
    assert rep["all_fakes"]["height"] == 1.0 and rep["all_fakes"]["jpeg_quality"] == 1.0
    assert set(rep["per_generator"]) == {"g"} and "external_reals" not in rep
    specs += [("real", "", f"external:e:{i}", 32, 70) for i in range(10)]
    rep = D.confound_report(_manifest(tmp_path / "b", specs))
    assert rep["n_real"] == 10 and rep["external_reals"]["n_real"] == 10
    assert rep["external_reals"]["height"] == 0.5 and rep["external_reals"]["jpeg_quality"] == 0.5
    assert rep["all_fakes"]["height"] == 1.0


def test_confound_report_of_fakes_only_has_nothing_to_compare(tmp_path):
    rep = D.confound_report(_manifest(tmp_path, [("fake", "g", f"f{i}", 32, 70) for i in range(4)]))
    assert rep["all_fakes"] == {} and rep["per_generator"] == {"g": {}} and rep["n_real"] == 0


def test_logistic_cv_scores_each_fold_on_its_training_scale():
    """The held-out fold is standardised like the training folds: a feature with a large offset
    and a noisy one of a large scale must not swamp the informative one."""
    rng = np.random.default_rng(0)
    y = (np.arange(60) % 2).astype(float)
    x = np.c_[1000 + y + rng.normal(0, 0.5, 60), rng.normal(0, 100, 60)]
    assert D._logistic_cv(x, y, [f"g{i}" for i in range(60)]) > 0.85  # (0.94; 0.52 unstandardised)
