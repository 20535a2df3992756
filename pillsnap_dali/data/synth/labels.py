"""The label JSONs: the release's 50-key image record, one annotation, one category, and the label defects
(``LabelWriter`` writes them, ``defects.json`` lists the affected files).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pillsnap_dali.data.synth.spec import BACK_COLORS, DEFECT_KINDS, DRUG_DIRS, LIGHTS, SINGLE_LABEL_DEFECTS, SIZE_FIELD
from pillsnap_dali.data.synth.plan import Job


IMAGE_KEYS = ("file_name", "width", "height", "imgfile", "drug_N", "drug_S", "back_color", "drug_dir",
              "light_color", "camera_la", "camera_lo", "size", "dl_idx", "dl_mapping_code", "dl_name", "dl_name_en",
              "img_key", "dl_material", "dl_material_en", "dl_custom_shape", "dl_company", "dl_company_en",
              "di_company_mf", "di_company_mf_en", "item_seq", "di_item_permit_date", "di_class_no",
              "di_etc_otc_code", "di_edi_code", "chart", "drug_shape", "thick", "leng_long", "leng_short",
              "print_front", "print_back", "color_class1", "color_class2", "line_front", "line_back",
              "img_regist_ts", "form_code_name", "mark_code_front_anal", "mark_code_back_anal",
              "mark_code_front_img", "mark_code_back_img", "mark_code_front", "mark_code_back", "change_date", "id")
NULLED_FIELDS = ("dl_name", "drug_shape", "color_class1", "dl_company", "print_front")
CATEGORY = {"supercategory": "pill", "id": 1, "name": "Drug"}


@dataclass(frozen=True)
class LabelContext:
    size: tuple
    dl_idx: str
    meta: dict


def label_json(job: Job, code: str, bbox: list, ann_id: int, lc: LabelContext) -> dict:
    """One AI Hub label: the 50 images[0] keys in order, 'type', one annotation, one category."""
    s, back, side, light, la, lo = job.fields
    number = int(code[2:])
    per_image = {"file_name": f"{job.stem}.png", "width": lc.size[0], "height": lc.size[1],
                 "imgfile": f"{job.stem}.png", "drug_N": code, "drug_S": "정상알약", "back_color": BACK_COLORS[back][0],
                 "drug_dir": DRUG_DIRS[side], "light_color": LIGHTS[light][0], "camera_la": la, "camera_lo": lo,
                 "size": SIZE_FIELD, "dl_idx": str(number - 1 if lc.dl_idx == "raw" else number),
                 "dl_mapping_code": code, "id": job.index + 1}
    merged = {**lc.meta[code], **per_image}
    images = {k: merged[k] for k in IMAGE_KEYS}
    x, y, w, h = bbox
    ann = {"area": w * h, "iscrowd": 0, "bbox": [x, y, w, h], "category_id": 1, "ignore": 0,
           "segmentation": [], "id": ann_id, "image_id": job.index + 1}
    return {"images": [images], "type": "instances", "annotations": [ann], "categories": [dict(CATEGORY)]}


def _break_label(label: dict, kind: str, serial: int, width: int) -> None:
    """Turn a clean label into one showing the defect ``kind`` (in place)."""
    img, ann = label["images"][0], label["annotations"][0]
    if kind == "bbox_outside":
        ann["bbox"][0] += 6 * width + 200           # like [6567, 625, 311, 315] on a 976-wide image
    elif kind == "bbox_bad_len":
        ann["bbox"] = ann["bbox"][:3] if serial % 2 == 0 else ann["bbox"] + [0]
    elif kind == "bbox_nonpositive":
        ann["bbox"][2 + serial % 2] *= 0 if serial % 2 == 0 else -1
    elif kind == "null_metadata":
        for i, key in enumerate(NULLED_FIELDS):
            img[key] = None if i % 2 == 0 else ""
        if serial % 2 == 1:   # every other one also loses its class field: drug_N -> dl_mapping_code fallback
            img["drug_N"] = None
    elif kind == "zero_dimension":
        img["thick"] = img["leng_long"] = img["leng_short"] = 0


def _dump(label: dict) -> str:
    return json.dumps(label, ensure_ascii=False, indent=2)


class LabelWriter:
    """Writes the label JSONs of rendered jobs (with their defects) and keeps the tallies."""

    def __init__(self, root: Path, lc: LabelContext):
        self.root, self.lc = root, lc
        self.ann_id = 0
        self.files: dict = {k: [] for k in DEFECT_KINDS}
        self.counts: dict = {p: {"single_images": 0, "single_labels": 0, "combo_images": 0, "combo_labels": 0,
                                 "index_images": 0} for p in ("train", "val")}

    def _write(self, rel: str, text: str, kind: str, part: str) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        self.counts[part][f"{kind}_labels"] += 1

    def add(self, job: Job, boxes: list) -> None:
        part, tally = job.part, self.counts[job.part]
        if job.kind == "index":
            tally["index_images"] += 1
            return
        if job.png_defect == "orphan_label":
            self.files["orphan_label"].append(job.label_paths()[0])
        else:
            tally[f"{job.kind}_images"] += 1
            if job.png_defect:
                self.files[job.png_defect].append(job.image)
        if job.label_defect in ("orphan_image", "combo_missing_pill_json"):
            self.files[job.label_defect].append(job.image)
        pills = list(zip(job.codes, boxes, job.label_paths()))
        if job.label_defect == "orphan_image":
            pills = []
        elif job.label_defect == "combo_missing_pill_json":
            pills = pills[:-1]
        elif job.label_defect == "double_label":
            x, y, w, h = boxes[0]
            extra = f"{job.label_dir}/{job.extra_code}/{job.stem}.json"
            pills.append((job.extra_code, [x + (1 if w >= 20 else 0), y, w, h], extra))
            self.files["double_label"].append(extra)
        for code, box, rel in pills:
            self.ann_id += 1
            self._write(rel, self._text(job, code, box, rel), job.kind, part)

    def _text(self, job: Job, code: str, box: list, rel: str) -> str:
        label = label_json(job, code, list(box), self.ann_id, self.lc)
        kind = job.label_defect
        if kind in SINGLE_LABEL_DEFECTS and kind != "orphan_image":
            self.files[kind].append(rel)
            _break_label(label, kind, len(self.files[kind]), self.lc.size[0])
            if kind == "unparsable_json":
                text = _dump(label)
                return text[: len(text) // 2]
        return _dump(label)
