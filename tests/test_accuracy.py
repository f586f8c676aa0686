"""The accuracy harness's readers and scoring rules (pure: no model, no service)."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from bench.accuracy import Sample, load_dataset, match_image, summarise


@pytest.fixture()
def folder(tmp_path):
    (tmp_path / "images" / "ev").mkdir(parents=True)
    for name in ("a.jpg", "ev/b.jpg"):
        cv2.imwrite(str(tmp_path / "images" / name), np.zeros((50, 80, 3), np.uint8))
    return tmp_path


def test_reads_annotations_json(folder):
    doc = {"images": {"a.jpg": {"width": 80, "height": 50, "faces": [[1, 2, 30, 40]]}}}
    (folder / "annotations.json").write_text(json.dumps(doc))
    [s] = load_dataset(folder)
    assert s.path.name == "a.jpg" and s.faces == [(1.0, 2.0, 30.0, 40.0)] and s.ignore == []


def test_reads_wider_gt_with_invalid_faces_as_ignore_regions(folder):
    (folder / "wider_face_val_bbx_gt.txt").write_text(
        "ev/b.jpg\n2\n10 10 20 20 0 0 0 0 0 0 \n40 5 8 8 2 0 0 1 0 0 \n"
        "a.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \n"
    )
    a, b = load_dataset(folder)
    assert (a.path.name, a.faces, a.ignore) == ("a.jpg", [], [])
    assert b.faces == [(10.0, 10.0, 20.0, 20.0)] and b.ignore == [(40.0, 5.0, 8.0, 8.0)]


def test_reads_imglab_xml(folder):
    (folder / "faces.xml").write_text(
        "<dataset><images><image file='images/a.jpg'>"
        "<box top='5' left='6' width='20' height='22'/>"
        "<box top='1' left='1' width='4' height='4' ignore='1'/>"
        "</image></images></dataset>"
    )
    [s] = load_dataset(folder)
    assert s.faces == [(6.0, 5.0, 20.0, 22.0)] and s.ignore == [(1.0, 1.0, 4.0, 4.0)]


def test_greedy_matching_one_gt_per_prediction_and_buckets():
    s = Sample(path=None, faces=[(0, 0, 100, 100), (200, 0, 20, 20)], ignore=[(300, 0, 10, 10)])
    preds = [
        ((2, 2, 100, 100), 0.9),  # matches the large face
        ((0, 0, 98, 98), 0.8),  # the same face again: a false positive, bucket >=64
        ((201, 1, 20, 20), 0.7),  # matches the 20 px face
        ((300, 0, 10, 10), 0.6),  # on an ignore region: not counted
        ((500, 0, 40, 40), 0.5),  # nothing there: false positive, bucket 32-64 (own size)
    ]
    m = match_image(preds, s)
    assert m == [
        (0.9, True, ">=64"),
        (0.8, False, ">=64"),
        (0.7, True, "16-32"),
        (0.5, False, "32-64"),
    ]
    out = summarise([s], [m])
    assert out["overall"] == {
        "gt": 2,
        "tp": 2,
        "fp": 2,
        "recall": 1.0,
        "precision": 0.5,
        "ap": out["overall"]["ap"],
    }
    assert out["buckets"][">=64"]["precision"] == 0.5 and out["buckets"]["16-32"]["recall"] == 1
    assert out["buckets"]["<16"]["recall"] is None  # no face of that size
    # The curve, highest score first: precision 1, 0.5, 0.667, 0.5; AP uses the monotone hull.
    assert [c[1] for c in out["curve"]] == [1.0, 0.5, 0.6667, 0.5]
    assert out["overall"]["ap"] == pytest.approx(0.5 * 1.0 + 0.5 * 0.6667, abs=1e-3)
