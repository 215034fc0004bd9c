"""What ``branchadapt translate`` writes where: never over an input, never two images to one file."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import branchadapt as ba
from branchadapt_cartoon.sampling import save_png
from branchadapt_cartoon.translate import plan_jobs

GROUPS = ("men", "kids")


def image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), 100, np.uint8))
    return path


def test_outputs_never_replace_inputs(tmp_path):
    photo = image(tmp_path / "in" / "a.png")
    with pytest.raises(ba.UserError, match=r"a\.png would overwrite the input image"):
        plan_jobs(photo, photo, "men", GROUPS)
    with pytest.raises(ba.UserError, match="would overwrite the input image"):
        plan_jobs(tmp_path / "in", tmp_path / "in", "men", GROUPS)  # the same folder


def test_two_inputs_with_one_name_are_refused(tmp_path):
    image(tmp_path / "in" / "men" / "a.jpg")
    image(tmp_path / "in" / "men" / "a.png")
    with pytest.raises(ba.UserError, match=r"a\.jpg and .*a\.png would both be written to .*a\.png"):
        plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS)


def test_an_output_below_a_file_is_refused(tmp_path):
    photo = image(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ba.UserError, match=r"notes\.txt is a file; the output .* must be a folder"):
        plan_jobs(photo, tmp_path / "notes.txt" / "x.png", "men", GROUPS)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_loose_images_beside_group_folders_are_reported(tmp_path, capsys):
    image(tmp_path / "in" / "men" / "a.png")
    image(tmp_path / "in" / "loose.jpg")
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS)
    assert [(g, t.relative_to(tmp_path)) for g, _, t in jobs] == [
        ("men", tmp_path.joinpath("out/men/a.png").relative_to(tmp_path))
    ]
    assert "1 image(s) directly in" in capsys.readouterr().err


def test_a_single_output_keeps_the_format_its_name_asks_for(tmp_path):
    photo = image(tmp_path / "a.png")
    ((_, _, target),) = plan_jobs(photo, tmp_path / "out.jpg", "men", GROUPS)
    assert target.name == "out.jpg"
    save_png(target, np.full((8, 8, 3), 50, np.uint8))
    assert target.read_bytes()[:2] == b"\xff\xd8"  # a JPEG, as its name says


def test_outputs_of_an_earlier_translation_are_kept_unless_overwrite(tmp_path):
    image(tmp_path / "in" / "men" / "a.png")
    image(tmp_path / "in" / "men" / "b.png")
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS, cam=True)  # nothing there yet
    assert [t.name for _, _, t in jobs] == ["a.png", "b.png"]
    image(tmp_path / "out" / "men" / "b_cam.png")
    plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS)  # the heatmap is only in the way of --cam
    with pytest.raises(
        ba.UserError, match=r"1 output file\(s\) exist already \(.*b_cam\.png\); pass --overwrite"
    ):
        plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS, cam=True)
    image(tmp_path / "out" / "men" / "a.png")
    with pytest.raises(ba.UserError, match=r"1 output file\(s\) exist already \(.*men/a\.png\)"):
        plan_jobs(tmp_path / "in" / "men", tmp_path / "out" / "men", "men", GROUPS)
    with pytest.raises(ba.UserError, match=r"exist already \(.*a\.png\)"):
        plan_jobs(tmp_path / "in" / "men" / "a.png", tmp_path / "out" / "men", "men", GROUPS)
    assert len(plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS, overwrite=True, cam=True)) == 2


def test_a_heatmap_named_as_another_input_s_output_is_refused(tmp_path):
    image(tmp_path / "in" / "x.png")
    image(tmp_path / "in" / "x_cam.png")
    assert len(plan_jobs(tmp_path / "in", tmp_path / "out", "men", GROUPS)) == 2  # no heatmaps: fine
    with pytest.raises(ba.UserError, match=r"x\.png and .*x_cam\.png would both be written to .*x_cam\.png"):
        plan_jobs(tmp_path / "in", tmp_path / "out", "men", GROUPS, cam=True)


def test_a_folder_where_an_output_image_goes_is_refused(tmp_path):
    image(tmp_path / "in" / "a.png")
    (tmp_path / "out" / "a.png").mkdir(parents=True)
    for overwrite in (False, True):
        with pytest.raises(ba.UserError, match=r"out/a\.png is a folder; an output image would be written"):
            plan_jobs(tmp_path / "in", tmp_path / "out", "men", GROUPS, overwrite=overwrite)


def test_a_file_that_is_no_image_is_refused_before_anything_is_written(tmp_path):
    image(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "d.png").write_text("junk")
    with pytest.raises(ba.UserError, match=r"d\.png: not an image OpenCV can read"):
        plan_jobs(tmp_path / "in", tmp_path / "out", "men", GROUPS)
    assert not (tmp_path / "out").exists()


def test_hidden_files_and_folders_are_not_inputs(tmp_path):
    image(tmp_path / "in" / "men" / "a.png")
    (tmp_path / "in" / "men" / "._a.png").write_bytes(b"\0\5\26\7macOS metadata")
    image(tmp_path / "in" / ".ipynb_checkpoints" / "x.png")
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS)
    assert [(g, p.name) for g, p, _ in jobs] == [("men", "a.png")]


def test_an_output_folder_inside_the_group_folders_is_not_read_as_one_of_them(tmp_path):
    image(tmp_path / "in" / "men" / "a.png")
    image(tmp_path / "in" / "kids" / "b.png")
    for _ in range(2):  # the second run sees the first one's output folder among the groups
        jobs = plan_jobs(tmp_path / "in", tmp_path / "in" / "out", None, GROUPS, overwrite=True)
        assert sorted((g, p.name) for g, p, _ in jobs) == [("kids", "b.png"), ("men", "a.png")]
        for _, _, target in jobs:
            save_png(target, np.zeros((8, 8, 3), np.uint8))


def test_group_folders_without_images_are_refused(tmp_path):
    (tmp_path / "in" / "men").mkdir(parents=True)
    with pytest.raises(ba.UserError, match=r"no images in its group sub-folders \['men'\]"):
        plan_jobs(tmp_path / "in", tmp_path / "out", None, GROUPS)


def test_an_output_in_a_format_that_cannot_be_written_is_refused_not_made_a_folder(tmp_path):
    photo = image(tmp_path / "in" / "a.png")
    for name in ("a.gif", "A.HEIC"):
        with pytest.raises(ba.UserError, match=rf"{name}: cannot write \.\w+ images; expected a folder or"):
            plan_jobs(photo, tmp_path / name, "men", GROUPS)
    assert not (tmp_path / "a.gif").exists()
    (tmp_path / "folder.gif").mkdir()  # an existing folder of that name is a folder
    assert plan_jobs(photo, tmp_path / "folder.gif", "men", GROUPS)[0][2] == tmp_path / "folder.gif" / "a.png"
    assert plan_jobs(photo, tmp_path / "a.tiff", "men", GROUPS)[0][2] == tmp_path / "a.tiff"


def test_overwriting_without_cam_names_only_the_replaced_outputs_heatmaps(tmp_path):
    from branchadapt_cartoon.translate import stale_heatmaps

    image(tmp_path / "in" / "a.png")
    image(tmp_path / "in" / "b.png")
    image(tmp_path / "in" / "b_cam.png")  # an input of its own, translated to out/b_cam.png
    image(tmp_path / "in" / "d.png")
    for name in ("a.png", "a_cam.png", "b_cam.png", "c_cam.png", "d_cam.png"):
        image(tmp_path / "out" / name)
    jobs = plan_jobs(tmp_path / "in", tmp_path / "out", "men", GROUPS, overwrite=True)
    # c has no output here, b_cam is an output itself, d's output is new (nothing replaced)
    assert stale_heatmaps(jobs) == {tmp_path / "out" / "a_cam.png"}
