"""The in-memory Manifest in compact columns (issue 25 item 3): the same values and list behaviour as the Python
lists it replaces, at a fraction of the memory."""
import pickle
import tracemalloc

import pytest

from pillsnap_dali.data.classmap import ClassMap
from pillsnap_dali.data.columns import Interned, Ints, JsonPacked, Packed, Pairs
from pillsnap_dali.data.manifest import Manifest, ManifestError, read_manifest, write_manifest


def _rows(n: int, root: str = "/data/1.Training/원천데이터/단일경구약제 5000종") -> dict:
    codes = [f"K-{i % 7 + 1:06d}" for i in range(n)]
    paths = [f"{root}/TS_{i % 3 + 1}_단일/{c}/{c}_0_2_0_2_{i:05d}_000_200.png" for i, c in enumerate(codes)]
    return dict(paths=paths, codes=codes, image_types=["combination" if i % 5 == 0 else "single" for i in range(n)],
                sources=[f"TS_{i % 3 + 1}_단일" for i in range(n)], combo_ids=[p.rsplit("/", 1)[1][:-4] for p in paths],
                boxes=[[{"bbox": [i, 2, 30, 40], "code": c}] if i % 4 else [] for i, c in enumerate(codes)],
                orig_paths=["" if i % 6 else f"/src/{i}.png" for i in range(n)],
                sizes=[(976, 1280 + i) for i in range(n)], file_rows=[10 + i for i in range(n)])


def _manifest(n: int) -> tuple[Manifest, dict]:
    cols = _rows(n)
    return Manifest("m.csv", *(cols[k] for k in ("paths", "codes", "image_types", "sources", "combo_ids", "boxes",
                                                 "orig_paths", "sizes")), "pillsnap", cols["file_rows"]), cols


def test_columns_read_back_like_the_lists_they_were_made_of():
    m, cols = _manifest(40)
    for name, values in cols.items():
        col = getattr(m, name)
        assert col == values and list(col) == values and len(col) == 40, name
        assert col[3] == values[3] and col[-1] == values[-1] and col[5:9] == values[5:9], name
        with pytest.raises(IndexError):
            col[40]
    assert m.boxes[1] is not m.boxes[1]  # each read is a fresh list: a consumer's change stays its own
    assert m.orig_paths.index("/src/6.png") == 6 and "K-000003" in m.codes and m.codes.count("K-000001") == 6
    assert m.file_row(2) == 12 and m.source_path(6) == "/src/6.png" and m.source_path(7) == cols["paths"][7]
    assert isinstance(m.codes, Interned) and len(m.codes.table) == 7 and isinstance(m.paths, Packed)


def test_subset_take_and_assignment_keep_the_values():
    m, cols = _manifest(30)
    idx = [29, 0, 7, 7, 12]
    sub = m.subset(iter(idx))
    for name, values in cols.items():
        assert getattr(sub, name) == [values[i] for i in idx], name
    assert sub.subset([]).paths == [] and len(m.subset(range(30))) == 30
    assert sorted(sub.codes.table) == sorted({cols["codes"][i] for i in idx})  # only the codes its rows have
    assert m.subset(i for i, c in enumerate(cols["codes"]) if c != "K-000007").labels(ClassMap(
        codes=[f"K-{i:06d}" for i in range(1, 7)])) == [int(c[2:]) - 1 for c in cols["codes"] if c != "K-000007"]
    sub.sizes = [(1, 2)] * 5  # what the JPEG cache step does: assign a list, stored compactly
    assert isinstance(sub.sizes, Pairs) and sub.sizes[4] == (1, 2)
    plain = Manifest(None, ["/a/x.png"], ["K-000001"], ["single"], [""], ["x"], [[]], [""])
    assert not plain.sizes and not plain.file_rows and plain.file_row(0) == 0
    assert plain.subset([0]).file_rows == [0]  # the file's row numbers survive a subset


def test_labels_any_string_and_pickling():
    m, cols = _manifest(20)
    cm = ClassMap(codes=sorted(set(cols["codes"])))
    assert m.labels(cm) == [cm.index[c] for c in cols["codes"]]
    with pytest.raises(ManifestError, match="K-000007"):
        m.labels(ClassMap(codes=["K-000001"]))
    odd = Packed.of(["/x/\udcff bad byte.png", "plain", "", "/only/dir/"], split_dirs=True)  # surrogateescape'd
    assert list(odd) == ["/x/\udcff bad byte.png", "plain", "", "/only/dir/"]
    again = pickle.loads(pickle.dumps(m.paths))  # the PIL loader's worker processes get the paths pickled
    assert again == cols["paths"]
    assert JsonPacked.of([[], [{"a": 1}]]).text(1) == '[{"a":1}]' and Ints.of([3, -1])[1] == -1


def test_a_manifest_file_round_trips_and_bad_boxes_are_still_refused(tmp_path):
    m, cols = _manifest(25)
    write_manifest(m, tmp_path / "m.csv")
    back = read_manifest(tmp_path / "m.csv")
    for name in ("paths", "codes", "image_types", "sources", "combo_ids", "boxes", "orig_paths", "sizes"):
        assert getattr(back, name) == cols[name], name
    assert back.file_rows == list(range(25))  # written renumbered 0..N-1
    write_manifest(back, tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "m.csv").read_bytes()
    text = (tmp_path / "m.csv").read_text(encoding="utf-8").replace("[1, 2, 30", "[1, 2,, 30", 1)
    (tmp_path / "bad.csv").write_text(text, encoding="utf-8")
    with pytest.raises(ManifestError, match="line 3 has unparsable boxes"):
        read_manifest(tmp_path / "bad.csv")


def test_a_row_costs_a_fraction_of_the_python_lists(tmp_path):
    m, _ = _manifest(3000)
    write_manifest(m, tmp_path / "m.csv")
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        kept = read_manifest(tmp_path / "m.csv")
        per_row = (tracemalloc.get_traced_memory()[0] - base) / len(kept)
    finally:
        tracemalloc.stop()
    assert per_row < 350, per_row  # Python lists of these rows: ~1.3 KB (bench scale measures both)
