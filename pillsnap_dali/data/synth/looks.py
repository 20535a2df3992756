"""The catalog: each K-code's pill look (shape, colours, imprint, score line, size) and drug metadata, drawn once
per tree; no two codes share a look unless the ``near_identical_pair`` defect made them so.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pillsnap_dali.data.synth.spec import SynthSpec
from pillsnap_dali.data.scan import LOOK_KEYS


COLOURS = {"하양": (236, 236, 230), "노랑": (238, 212, 64), "주황": (243, 138, 42), "분홍": (238, 158, 184),
           "빨강": (196, 38, 42), "갈색": (136, 84, 44), "연두": (168, 214, 92), "초록": (38, 136, 62),
           "청록": (36, 158, 160), "파랑": (52, 92, 204), "남색": (32, 42, 112), "자주": (150, 40, 110),
           "보라": (128, 88, 190), "회색": (140, 140, 142), "검정": (38, 38, 40)}
TABLET_SHAPES = ("원형", "타원형", "장방형", "삼각형", "사각형", "오각형", "육각형", "팔각형", "마름모형")
ROUND_SHAPES = ("원형", "사각형", "삼각형", "오각형", "육각형", "팔각형")   # long side == short side
_SYLLABLES = (("타", "ta"), ("록", "rok"), ("세", "se"), ("린", "rin"), ("프", "peu"), ("로", "ro"), ("졸", "jol"),
              ("민", "min"), ("아", "a"), ("스", "seu"), ("피", "pi"), ("렌", "ren"), ("카", "ka"), ("텔", "tel"),
              ("모", "mo"), ("사", "sa"), ("탄", "tan"), ("메", "me"), ("트", "teu"), ("포", "po"), ("글", "geul"),
              ("리", "ri"), ("디", "di"), ("핀", "pin"), ("코", "ko"), ("날", "nal"))
_COMPANIES = (("(주)종근당", "Chong Kun Dang"), ("한미약품(주)", "Hanmi Pharm. Co., Ltd."), ("(주)유한양행", "Yuhan"),
              ("대웅제약(주)", "Daewoong Pharmaceutical"), ("동아에스티(주)", "Dong-A ST"), ("일동제약(주)", "Ildong"),
              ("보령제약(주)", "Boryung"), ("(주)녹십자", "GC Biopharma"), ("한국화이자제약(주)", ""))
_CLASS_NOS = ("[01130]항전간제", "[02140]혈압강하제", "[01140]해열.진통.소염제", "[03960]당뇨병용제",
              "[02180]동맥경화용제", "[02320]소화성궤양용제", "[04490]기타의 알레르기용약", "[01190]기타의 중추신경용약")
_MATERIALS = (("아세트아미노펜", "Acetaminophen"), ("메트포르민염산염", "Metformin Hydrochloride"),
              ("암로디핀베실산염", "Amlodipine Besylate"), ("아토르바스타틴칼슘", "Atorvastatin Calcium"),
              ("테트라사이클린염산염", "Tetracycline Hydrochloride"), ("레보티록신나트륨", "Levothyroxine Sodium"),
              ("세티리진염산염", "Cetirizine Hydrochloride"), ("라니티딘염산염", "Ranitidine Hydrochloride"))
_TABLET_FORMS = (("정제", "나정"), ("필름코팅정", "필름코팅정"), ("정제, 저작정", "저작정"), ("서방성필름코팅정", "서방성필름코팅정"))
_PRINT_PREFIXES = ("CKD", "YH", "DW", "HM", "GC", "BR", "IL", "DA", "ST", "PF", "TY", "JW", "KP", "SK", "LG")
_DOSES = (5, 10, 20, 25, 40, 50, 100, 200, 250, 500)


@dataclass(frozen=True)
class PillLook:
    """How the pills of one K-code look (drawn once per code, shared by all its images)."""
    shape: str
    colour1: str
    colour2: str          # "" for one-colour tablets; capsules have two
    capsule: bool
    print_front: str
    print_back: str
    line_front: str       # "" | "-" | "+"
    line_back: str
    long_mm: float
    short_mm: float


def pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _mm(value: float):
    """Millimetres as the real labels write them: an int when whole."""
    value = round(float(value), 1)
    return int(value) if value == int(value) else value


def _look_candidates() -> list:
    """(shape, colour1, colour2) triples, ordered so that the first ones differ most (colour first)."""
    colours = list(COLOURS)
    out = []
    for i in range(len(colours) * len(TABLET_SHAPES)):
        out.append((TABLET_SHAPES[(i + i // len(colours)) % len(TABLET_SHAPES)], colours[i % len(colours)], ""))
        if i % 4 == 3:   # a capsule every fourth look
            j = i // 4
            c1, c2 = colours[j % len(colours)], colours[(j * 7 + 3) % len(colours)]
            if c1 != c2:
                out.append(("장방형", c1, c2))
    return list(dict.fromkeys(out))


def _imprint(rng: np.random.Generator) -> str:
    text = pick(rng, _PRINT_PREFIXES)
    return f"{text} {pick(rng, _DOSES)}" if rng.random() < 0.6 else text


def _draw_look(rng: np.random.Generator, triple: tuple) -> PillLook:
    shape, c1, c2 = triple
    capsule = bool(c2)
    long_mm = float(rng.uniform(14, 19.5) if capsule else rng.uniform(10, 17.5))
    short_mm = long_mm if shape in ROUND_SHAPES else long_mm * float(rng.uniform(0.45, 0.62))
    back = _imprint(rng) if rng.random() < 0.5 else ""
    return PillLook(shape=shape, colour1=c1, colour2=c2, capsule=capsule, print_front=_imprint(rng),
                    print_back=back, line_front=pick(rng, ("", "", "-", "+")) if not capsule else "",
                    line_back=pick(rng, ("", "-")) if not capsule else "",
                    long_mm=round(long_mm, 1), short_mm=round(short_mm, 1))


def _drug_name(rng: np.random.Generator, capsule: bool) -> tuple:
    sylls = [pick(rng, _SYLLABLES) for _ in range(int(rng.integers(2, 5)))]
    dose = pick(rng, _DOSES)
    ko = "".join(s[0] for s in sylls) + ("캡슐" if capsule else pick(rng, ("정", "정", "필름코팅정", "서방정")))
    en = "".join(s[1] for s in sylls).capitalize() + (" Cap." if capsule else " Tab.")
    return f"{ko} {dose}mg", (f"{en} {dose}mg" if rng.random() < 0.7 else "")


def _date(rng: np.random.Generator, first_year: int, last_year: int) -> str:
    return f"{int(rng.integers(first_year, last_year + 1))}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


def _drug_meta(rng: np.random.Generator, look: PillLook) -> dict:
    """The per-K-code metadata of images[0] (dl_name .. change_date, minus per-image fields)."""
    name, name_en = _drug_name(rng, look.capsule)
    company, company_en = pick(rng, _COMPANIES)
    material, material_en = pick(rng, _MATERIALS)
    custom, form = ("경질캡슐제", "경질캡슐제") if look.capsule else pick(rng, _TABLET_FORMS)
    item_seq = int(rng.integers(195_900_000, 202_300_000))
    edi = str(int(rng.integers(600_000_000, 699_999_999)))
    edi = pick(rng, (edi, edi, f"{edi},A{int(rng.integers(10_000_000, 99_999_999))}", ""))
    colour_text = look.colour1 + (f"/{look.colour2}" if look.colour2 else "")
    return {
        "dl_name": name, "dl_name_en": name_en,
        "img_key": f"http://connectdi.com/design/img/drug/{item_seq:09d}.jpg",
        "dl_material": material, "dl_material_en": material_en, "dl_custom_shape": custom,
        "dl_company": company, "dl_company_en": company_en, "di_company_mf": company,
        "di_company_mf_en": company_en, "item_seq": item_seq,
        "di_item_permit_date": _date(rng, 1990, 2020),
        "di_class_no": pick(rng, _CLASS_NOS), "di_etc_otc_code": pick(rng, ("전문의약품", "전문의약품", "일반의약품")),
        "di_edi_code": edi, "chart": f"{colour_text}의 {look.shape} {custom}",
        "drug_shape": look.shape, "thick": _mm(rng.uniform(2.5, 7.0)), "leng_long": _mm(look.long_mm),
        "leng_short": _mm(look.short_mm), "print_front": look.print_front, "print_back": look.print_back,
        "color_class1": look.colour1, "color_class2": look.colour2, "line_front": look.line_front,
        "line_back": look.line_back, "img_regist_ts": _date(rng, 2020, 2020),
        "form_code_name": form, "mark_code_front_anal": "", "mark_code_back_anal": "", "mark_code_front_img": "",
        "mark_code_back_img": "", "mark_code_front": "", "mark_code_back": "",
        "change_date": _date(rng, 2021, 2021),
    }


@dataclass
class Catalog:
    codes: list                 # K-codes ascending
    looks: dict                 # code -> PillLook
    meta: dict                  # code -> metadata dict
    pairs: list                 # near-identical K-code pairs (defect)


def _make_looks_unique(codes: list, triples: dict, looks: dict, meta: dict, rng: np.random.Generator) -> None:
    """Redraw the size (and metadata) of a code whose description equals an earlier code's, so that only the
    injected ``near_identical_pair`` defect has a twin (thousands of classes reuse shape/colour triples)."""
    taken = set()
    for code in codes:
        key = tuple(str(meta[code].get(k)) for k in LOOK_KEYS)
        for _ in range(1000):
            if key not in taken:
                break
            looks[code] = _draw_look(rng, triples[code])
            meta[code] = _drug_meta(rng, looks[code])
            key = tuple(str(meta[code].get(k)) for k in LOOK_KEYS)
        else:
            raise RuntimeError(f"no unique look left for {code}")  # not reachable with the candidate triples
        taken.add(key)


def make_catalog(spec: SynthSpec, rng: np.random.Generator) -> Catalog:
    numbers = sorted(int(n) for n in rng.choice(np.arange(1, 30001), size=spec.classes, replace=False))
    codes = [f"K-{n:06d}" for n in numbers]
    candidates = _look_candidates()
    order = rng.permutation(len(codes))   # which K-code gets which look
    looks, meta, triples = {}, {}, {}
    for rank, ci in enumerate(order):
        triple = candidates[rank % len(candidates)]   # beyond len(candidates): same triple, other sizes
        triples[codes[ci]] = triple
        looks[codes[ci]] = _draw_look(rng, triple)
    for code in codes:
        meta[code] = _drug_meta(rng, looks[code])
    _make_looks_unique(codes, triples, looks, meta, rng)
    pairs = []
    if spec.defects:
        a, b = (codes[int(i)] for i in rng.choice(len(codes), size=2, replace=False))
        looks[b] = dataclasses.replace(looks[a], print_front=_imprint(rng) + "N", print_back=looks[b].print_back)
        for key in ("dl_custom_shape", "form_code_name", "chart", "drug_shape", "thick", "leng_long", "leng_short",
                    "color_class1", "color_class2", "line_front", "line_back"):
            meta[b][key] = meta[a][key]
        meta[b]["print_front"], meta[b]["print_back"] = looks[b].print_front, looks[b].print_back
        pairs.append(sorted((a, b)))
    return Catalog(codes=codes, looks=looks, meta=meta, pairs=pairs)
