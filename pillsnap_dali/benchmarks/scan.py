"""Scan-rate benchmark: how many images per second ``scan_tree`` pairs and parses on one core.

Imports neither torch nor the loaders (``bench scan --help`` is instant). Builds (once) a tree of tiny PNGs in the raw AI Hub layout, each with a full-size (~2.5 KB, 50-key) label
JSON, since parsing the JSON is the scanner's main cost; then times ``scan_tree`` in this process.

    python -m pillsnap_dali.bench scan --images 100000 --tree /dev/shm/scanbench --out scan_bench.json
(also reachable as ``python -m pillsnap_dali.bench scan``)
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pillsnap_dali.benchmarks.machine import machine_info
from pillsnap_dali.atomic import atomic_write_text
from pillsnap_dali.data.scan import scan_tree

_logger = logging.getLogger(__name__)



def source_dirs(root: Path, layout: str, part: str, kind: str, n: int) -> tuple[Path, Path]:
    """(image folder, label folder) of source ``n`` in either layout; part train|val, kind single|combination."""
    single = kind == "single"
    if layout == "english":
        base, tag = root / "data" / part, "single" if single else "combo"
        pre = "T" if part == "train" else "V"
        sub = "single" if single else "combination"
        return (base / "images" / sub / f"{pre}S_{n}_{tag}", base / "labels" / sub / f"{pre}L_{n}_{tag}")
    sep = "_" if layout == "raw_underscore" else " "
    base = root / ("1.Training" if part == "train" else "2.Validation")
    group = f"단일경구약제{sep}5000종" if single else f"경구약제조합{sep}5000종"
    pre, tag = ("T" if part == "train" else "V"), ("단일" if single else "조합")
    return (base / "원천데이터" / group / f"{pre}S_{n}_{tag}", base / "라벨링데이터" / group / f"{pre}L_{n}_{tag}")


@dataclass
class TreeSpec:
    n_images: int              # single images (combination images come on top)
    classes: int = 1000
    combos: int = 0            # combination folders, 3 images x 3 pills each
    per_source: int = 50       # classes per TS_n folder
    side: int = 8              # PNG width = height
    layout: str = "raw"        # raw | raw_underscore | english
    val_per_class: int = 0     # single images per class in the Validation part


def tiny_png(side: int = 8, rgb=(200, 200, 200)) -> bytes:
    """A valid ``side`` x ``side`` RGB PNG, made without PIL."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    rows = b"".join(b"\x00" + bytes(rgb) * side for _ in range(side))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def label_json(stem: str, code: str, bbox: list, idx: int) -> str:
    """A label with all 50 image keys of the real format (values shaped like the real ones)."""
    k = int(code[2:])
    info = {
        "file_name": stem + ".png", "width": 976, "height": 1280, "imgfile": stem + ".png", "drug_N": code,
        "drug_S": "정상알약", "back_color": "연회색 배경", "drug_dir": "앞면", "light_color": "주백색",
        "camera_la": 75, "camera_lo": 260, "size": 200, "dl_idx": str(k - 1), "dl_mapping_code": code,
        "dl_name": f"테스트정 {k}mg", "dl_name_en": f"Test Tab. {k}mg",
        "img_key": f"http://connectdi.com/design/img/drug/{147426_000 + k}.jpg",
        "dl_material": "테트라사이클린염산염", "dl_material_en": "Tetracycline Hydrochloride",
        "dl_custom_shape": "경질캡슐제", "dl_company": "(주)테스트제약", "dl_company_en": "Test Pharm Co., Ltd.",
        "di_company_mf": "", "di_company_mf_en": "", "item_seq": 195_500_000 + k,
        "di_item_permit_date": "19550413", "di_class_no": "[06150]주로 그람양성, 음성균, 리케치아, 비루스에 작용하는 것",
        "di_etc_otc_code": "전문의약품", "di_edi_code": "643303740", "chart": "상부는 암적색, 하부는 황색의 경질캡슐제",
        "drug_shape": "장방형", "thick": 5.9, "leng_long": 18.5, "leng_short": 6.4, "print_front": "CKD 250",
        "print_back": "", "color_class1": "갈색", "color_class2": "노랑", "line_front": "", "line_back": "",
        "img_regist_ts": "20040729", "form_code_name": "경질캡슐제, 산제", "mark_code_front_anal": "",
        "mark_code_back_anal": "", "mark_code_front_img": "", "mark_code_back_img": "", "mark_code_front": "",
        "mark_code_back": "", "change_date": "20210524", "id": idx}
    area = bbox[2] * bbox[3] if len(bbox) == 4 else 0
    ann = {"area": area, "iscrowd": 0, "bbox": bbox, "category_id": 1, "ignore": 0,
           "segmentation": [], "id": idx, "image_id": idx}
    doc = {"images": [info], "type": "instances", "annotations": [ann],
           "categories": [{"supercategory": "pill", "id": 1, "name": "Drug"}]}
    return json.dumps(doc, ensure_ascii=False, indent=4)


def _stem(codes: str, j: int) -> str:
    """The j-th distinct single-image name of a drug (3 backgrounds x 2 sides x 3 lights x 4 elevations x
    18 rotations = 1,296, the most shots the real data has per drug)."""
    lo, la, light, side, back = j % 18, (j // 18) % 4, (j // 72) % 3, (j // 216) % 2, (j // 432) % 3
    return f"{codes}_0_{back}_{side}_{light}_{(60, 70, 75, 90)[la]}_{lo * 20:03d}_200"


def make_tree(root: str | Path, spec: TreeSpec) -> Path:
    """Write a tree of ``spec.n_images`` singles (+ validation singles, + combinations); returns ``root``."""
    root = Path(root)
    png = tiny_png(spec.side)
    for i in range(spec.n_images):
        _make_single(root, spec, "train", i, png)
    for i in range(spec.val_per_class * spec.classes):
        _make_single(root, spec, "val", i, png)
    for c in range(spec.combos):
        _make_combo(root, c, spec, png)
    return root


def _make_single(root: Path, spec: TreeSpec, part: str, i: int, png: bytes) -> None:
    cls = i % spec.classes
    code = f"K-{cls + 1:06d}"
    stem = _stem(code, i // spec.classes)
    img_src, lbl_src = source_dirs(root, spec.layout, part, "single", cls // spec.per_source + 1)
    img_dir, lbl_dir = img_src / code, lbl_src / f"{code}_json"
    if i < spec.classes:
        img_dir.mkdir(parents=True, exist_ok=True)
        lbl_dir.mkdir(parents=True, exist_ok=True)
    (img_dir / f"{stem}.png").write_bytes(png)
    (lbl_dir / f"{stem}.json").write_text(label_json(stem, code, [300, 400, 380, 420], i), encoding="utf-8")


def _make_combo(root: Path, c: int, spec: TreeSpec, png: bytes) -> None:
    codes = sorted({f"K-{(c + j * 7) % spec.classes + 1:06d}" for j in range(3)})
    name = "K-" + "-".join(x[2:] for x in codes)
    img_src, lbl_src = source_dirs(root, spec.layout, "train", "combination", 1)
    img_dir = img_src / name
    img_dir.mkdir(parents=True, exist_ok=True)
    (img_dir / f"{name}_index.png").write_bytes(png)
    for i, la in enumerate((70, 75, 90)):
        stem = f"{name}_0_2_0_2_{la}_000_200"
        (img_dir / f"{stem}.png").write_bytes(png)
        for j, code in enumerate(codes):
            d = lbl_src / f"{name}_json" / code
            d.mkdir(parents=True, exist_ok=True)
            box = [60 + 450 * (j % 2), 100 + 550 * (j // 2), 380, 420]
            (d / f"{stem}.json").write_text(label_json(stem, code, box, c * 10 + i), encoding="utf-8")


def run_scan_bench(n_images: int, out_json: str | Path | None, *, tree: str | Path | None = None,
                   keep: bool = False) -> dict:
    """Build a tree of ``n_images`` (reused if ``tree`` already holds one that size), time one scan."""
    tmp = tree is None
    root = Path(tree) if tree else Path(tempfile.mkdtemp(prefix="scanbench_"))
    marker = root / ".scanbench.json"
    try:
        if not (marker.exists() and json.loads(marker.read_text()).get("n_images") == n_images):
            if any(root.iterdir()) if root.exists() else False:
                raise FileExistsError(f"{root} is not empty and holds no {n_images}-image bench tree")
            t0 = time.perf_counter()
            make_tree(root, TreeSpec(n_images=n_images, combos=max(1, n_images // 450)))
            marker.write_text(json.dumps({"n_images": n_images}))
            _logger.info("built a %d-image tree in %.1f s", n_images, time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        res = scan_tree(root)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        if tmp and not keep:
            shutil.rmtree(root, ignore_errors=True)
    n = res.counts["images"]
    result = {"images": n, "labels": res.counts["labels"], "records": len(res.records), "wall_s": round(wall, 3),
              "cpu_s": round(cpu, 3), "images_per_s": round(n / wall, 1), "images_per_cpu_s": round(n / cpu, 1),
              **machine_info(),
              "tree": str(root), "page_cache": "warm (tree just written or scanned before)"}
    if out_json:
        atomic_write_text(out_json, json.dumps(result, indent=1))
    return result
