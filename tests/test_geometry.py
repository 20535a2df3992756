"""Box geometry (pillsnap_dali/geometry.py): one IoU per box format, the conversions, the letterbox round trip."""
import numpy as np
import pytest

from pillsnap_dali.geometry import (cxcywh_to_ltrb, iou_xywh, iou_xyxy, letterbox_geometry, on_image, unletterbox,
                                    xywh_to_xyxy)


def test_iou_of_each_box_format():
    assert iou_xyxy([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou_xywh([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)   # the same boxes as COCO
    assert iou_xywh([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0 and iou_xyxy([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0
    assert xywh_to_xyxy([3, 4, 10, 20]) == [3, 4, 13, 24]
    ltrb = cxcywh_to_ltrb(np.array([[0.5, 0.5, 0.2, 0.4]]))
    assert ltrb.dtype == np.float32 and np.allclose(ltrb, [[0.4, 0.3, 0.6, 0.7]])


@pytest.mark.parametrize("w, h, imgsz", [(976, 1280, 640), (1280, 976, 320), (333, 77, 160)])
def test_unletterbox_inverts_the_letterbox(w, h, imgsz):
    new_h, new_w, top, left = geometry = letterbox_geometry(h, w, imgsz)
    assert max(new_h, new_w) == imgsz and top + new_h <= imgsz and left + new_w <= imgsz
    box = np.array([[w * 0.1, h * 0.2, w * 0.6, h * 0.9]])
    boxed = box.copy()
    boxed[:, [0, 2]] = box[:, [0, 2]] * new_w / w + left
    boxed[:, [1, 3]] = box[:, [1, 3]] * new_h / h + top
    assert np.allclose(unletterbox(boxed, geometry, w, h), box) and on_image(box).tolist() == [True]
