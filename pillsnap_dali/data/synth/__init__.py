"""A synthetic AI Hub oral-drug tree, in the real on-disk layout (see docs/aihub_format.md).

``generate(out_dir, ...)`` writes TS/TL (images/labels) folder pairs for singles and combinations, in a
Training and a Validation part, in one of three layouts:

- ``raw``: ``DIR/166.약품식별 인공지능 개발을 위한 경구약제 이미지 데이터/01.데이터/1.Training/원천데이터/
  단일경구약제 5000종/TS_1_단일/K-000114/K-000114_0_2_0_0_75_260_200.png`` and
  ``.../라벨링데이터/단일경구약제 5000종/TL_1_단일/K-000114_json/<stem>.json``; combinations under
  ``경구약제조합 5000종/TS_1_조합/K-a-b-c/`` with one JSON per pill in ``TL_1_조합/K-a-b-c_json/K-a/``;
  ``2.Validation`` holds ``VS_n``/``VL_n``.
- ``raw_underscore``: the same with every space replaced by ``_`` (``단일경구약제_5000종``).
- ``english``: the existing project's rename, ``DIR/data/train/images/single/TS_1_single/...``,
  ``DIR/data/train/labels/combination/TL_1_combo/...``, ``DIR/data/val/images/single/VS_1_single/...``.

Each K-code has its own pill look (shape, one or two colours, imprint text, score line) and drug metadata,
drawn once; each image varies it as its file name says (background colour, front/back, light, elevation,
rotation) plus jitter and sensor noise. Clean labels always fill ``drug_N``, ``dl_name``, ``drug_shape``,
``color_class1`` and ``dl_company`` and have non-zero sizes, and no two K-codes share a look (shape,
colours, form, sizes) unless the ``near_identical_pair`` defect made them so.

``defects=True`` injects every defect of docs/aihub_format.md into the Training part only, keeping >= 4 clean
single images per class; ``DIR/defects.json`` lists counts and affected files (relative paths)::

    {"counts": {"bbox_outside": 2, ...}, "files": {"bbox_outside": ["166.../x.json", ...], ...},
     "pairs": [["K-000123", "K-004567"]]}

Determinism: every image is drawn from a generator seeded by (seed, image index), so the same seed gives
the same bytes whatever the number of worker processes. ``DIR/synth_summary.json`` records what was made.

Modules: ``spec`` (settings, constants, layouts), ``looks`` (the per-code pill looks and metadata), ``plan``
(one job per image, the defects), ``render`` (the pictures), ``labels`` (the JSONs), ``tree`` (``generate``
and the demo data). The command line is ``pillsnap_dali.commands.synth`` (``python -m pillsnap_dali.synth``).
"""
from __future__ import annotations

from pillsnap_dali.data.synth.spec import (BACK_COLORS, CLASSES_PER_FOLDER, COMBO_DEFECTS, COMBO_ELEVATIONS,
                                           COMBOS_PER_FOLDER, COMPLETE_MARKER, DEFECT_KINDS, DEFECTS_FILE,
                                           DL_IDX_MODES, DRUG_DIRS, ELEVATIONS, GENERATOR_VERSION, LAYOUTS, LIGHTS,
                                           MIN_CLEAN_PER_CLASS, parse_size, ROTATIONS, SHOT_GRID,
                                           SINGLE_LABEL_DEFECTS, SINGLE_PNG_DEFECTS, SIZE_FIELD, SUMMARY_FILE,
                                           SynthError, SynthSpec, SynthSummary, TreeLayout)
from pillsnap_dali.data.synth.looks import (Catalog, COLOURS, PillLook, ROUND_SHAPES,
                                            TABLET_SHAPES)
from pillsnap_dali.data.synth.plan import Job, folder_number, make_plan
from pillsnap_dali.data.synth.render import RenderContext, render_job, render_sprite
from pillsnap_dali.data.synth.labels import (CATEGORY, IMAGE_KEYS, label_json, LabelContext, LabelWriter,
                                             NULLED_FIELDS)
from pillsnap_dali.data.synth.tree import demo_data_dir, ensure_demo_data, generate, synth_settings

__all__ = ["BACK_COLORS", "Catalog", "CATEGORY", "CLASSES_PER_FOLDER", "COLOURS", "COMBO_DEFECTS",
           "COMBO_ELEVATIONS", "COMBOS_PER_FOLDER", "COMPLETE_MARKER", "DEFECT_KINDS", "DEFECTS_FILE",
           "demo_data_dir", "DL_IDX_MODES", "DRUG_DIRS", "ELEVATIONS", "ensure_demo_data", "folder_number",
           "generate", "GENERATOR_VERSION", "IMAGE_KEYS", "Job", "label_json", "LabelContext", "LabelWriter",
           "LAYOUTS", "LIGHTS", "make_plan", "MIN_CLEAN_PER_CLASS", "NULLED_FIELDS", "parse_size",
           "PillLook", "render_job", "render_sprite", "RenderContext", "ROTATIONS", "ROUND_SHAPES", "SHOT_GRID",
           "SINGLE_LABEL_DEFECTS", "SINGLE_PNG_DEFECTS", "SIZE_FIELD", "SUMMARY_FILE", "synth_settings",
           "SynthError", "SynthSpec", "SynthSummary", "TABLET_SHAPES", "TreeLayout"]
