"""Reading source folders (both ImageNet layouts, ImageFolder) and decoding odd files."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from helpers import make_class_folder, save_jpeg
from qrobust.shared.demo_data import photo
from qrobust.shared.sources import BadImage, SourceError, decode_rgb, load_rgb, open_source

WNIDS = ["n01440764", "n01443537", "n02102040"]


def test_class_folders_sorted_classes_and_keys(tmp_path):
    root = make_class_folder(tmp_path, per_class=2, names=("coffee", "astronaut", "chelsea"))
    ds = open_source(root)
    assert ds.layout == "class-folders"
    assert ds.classes == ["astronaut", "chelsea", "coffee"]
    assert [s.key for s in ds.samples] == sorted(s.key for s in ds.samples)
    assert {s.key: s.label for s in ds.samples}["coffee_1"] == 2
    assert all(s.bytes > 0 for s in ds.samples)


def _flat(tmp_path, names):
    img = Image.fromarray(np.full((40, 50, 3), 100, np.uint8))
    for n in names:
        save_jpeg(tmp_path / f"{n}.JPEG", img)


def test_flat_with_loc_val_solution(tmp_path):
    keys = [f"ILSVRC2012_val_{i:08d}" for i in (3, 1, 2)]
    _flat(tmp_path, keys)
    lines = ["ImageId,PredictionString"] + [
        f"{k},{w} 1 2 3 4 {w} 5 6 7 8" for k, w in zip(keys, [WNIDS[2], WNIDS[0], WNIDS[1]])]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    ds = open_source(tmp_path)  # label file found automatically
    assert ds.layout == "flat+labels" and ds.classes == sorted(WNIDS)
    assert [(s.key, s.label) for s in ds.samples] == [(keys[1], 0), (keys[2], 1), (keys[0], 2)]


def test_flat_with_val_txt_integer_labels_and_class_list(tmp_path):
    _flat(tmp_path, ["a", "b", "c"])
    (tmp_path / "labels.txt").write_text("a.JPEG 2\nb.JPEG 0\nc.JPEG 2\n")
    (tmp_path / "synsets.txt").write_text("\n".join(f"{w} some name" for w in WNIDS) + "\n")
    ds = open_source(tmp_path, labels=tmp_path / "labels.txt", classes=tmp_path / "synsets.txt")
    assert [(s.key, s.label) for s in ds.samples] == [("a", 2), ("b", 0), ("c", 2)]
    assert ds.classes == WNIDS


def test_class_list_fixes_indices_for_a_subset_of_classes(tmp_path):
    for w in (WNIDS[0], WNIDS[2]):
        save_jpeg(tmp_path / "val" / w / f"img_{w}.JPEG", Image.new("RGB", (40, 40)))
    (tmp_path / "classes.txt").write_text("\n".join(WNIDS))
    ds = open_source(tmp_path / "val", classes=tmp_path / "classes.txt")
    assert [s.label for s in ds.samples] == [0, 2]


def test_unlabelled_files_duplicates_dots_and_non_images_are_rejected_not_dropped(tmp_path):
    root = make_class_folder(tmp_path, per_class=1, names=("astronaut", "chelsea"))
    (root / "astronaut" / "notes.txt").write_text("not an image")
    save_jpeg(root / "chelsea" / "astronaut_0.jpg", Image.new("RGB", (40, 40)))  # same key as astronaut's
    save_jpeg(root / "chelsea" / "a.b.jpg", Image.new("RGB", (40, 40)))
    ds = open_source(root)
    reasons = {r.path.split("/")[-1]: r.reason for r in ds.rejected}
    assert "not an image file extension" in reasons["notes.txt"]
    assert "duplicate key 'astronaut_0'" in reasons["astronaut_0.jpg"]
    assert "a_b" in [s.key for s in ds.samples]  # dots would split the key in webdataset


def test_bad_layouts_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(tmp_path / "nope")
    _flat(tmp_path, ["x"])
    with pytest.raises(SourceError, match="--labels"):
        open_source(tmp_path)
    (tmp_path / "val.txt").write_text("x.JPEG\n")
    with pytest.raises(SourceError, match="expected 'filename label'"):
        open_source(tmp_path)


def test_selection_is_deterministic(tmp_path):
    ds = open_source(make_class_folder(tmp_path, per_class=3))
    assert [s.key for s in ds.select(per_class=1).samples] == ["astronaut_0", "chelsea_0", "coffee_0"]
    assert [s.key for s in ds.select(limit=4).samples] == [s.key for s in ds.samples[:4]]
    assert ds.select(per_class=2, limit=3).fingerprint() == ds.select(per_class=2, limit=3).fingerprint()
    assert ds.fingerprint() != ds.select(limit=4).fingerprint()


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_policy_for_odd_modes():
    rgb = photo("chelsea").convert("RGB").resize((60, 40))
    cmyk = decode_rgb(_encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert cmyk.mode == "RGB" and np.abs(np.asarray(cmyk, int) - np.asarray(rgb, int)).mean() < 6
    gray = decode_rgb(_encode(rgb.convert("L"), "PNG"))
    g = np.asarray(gray)
    assert gray.mode == "RGB" and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: alpha is dropped, colours kept
    assert np.array_equal(np.asarray(decode_rgb(_encode(rgba, "PNG"))), np.asarray(rgb))
    palette = decode_rgb(_encode(rgb.convert("P"), "PNG"))
    assert palette.mode == "RGB" and palette.size == rgb.size
    deep = Image.fromarray((np.arange(60 * 40).reshape(40, 60) * 27).astype(np.uint16))
    d = np.asarray(decode_rgb(_encode(deep, "PNG")))
    assert d.dtype == np.uint8 and d[..., 0].max() == (60 * 40 - 1) * 27 >> 8


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is text, not pixels", "not a readable image"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 50, "not a readable image|cannot decode"),
])
def test_undecodable_bytes_give_one_line_reasons(data, reason):
    with pytest.raises(BadImage, match=reason):
        decode_rgb(data)


def test_truncated_jpeg_is_rejected(tmp_path):
    data = _encode(photo("coffee").convert("RGB"), "JPEG", quality=90)
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated|cannot decode"):
        load_rgb(tmp_path / "t.jpg")


def test_decompression_bomb_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImage, match="decompression bomb"):
        decode_rgb(_encode(Image.new("RGB", (100, 100)), "PNG"))


def test_label_file_wins_over_stray_subfolders_and_missing_files_are_counted(tmp_path):
    _flat(tmp_path, ["a", "b"])
    (tmp_path / "old stuff").mkdir()
    (tmp_path / "val.txt").write_text("a.JPEG n1\nb.JPEG n2\nc.JPEG n1\n")
    ds = open_source(tmp_path)
    assert ds.layout == "flat+labels" and [s.key for s in ds.samples] == ["a", "b"]
    assert ds.label_entries_without_file == 1
