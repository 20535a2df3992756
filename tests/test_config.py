import pytest

from pillsnap_dali.config import CONFIG_DIR, ConfigError, all_keys, dump_config, load_config, parse_set
from pillsnap_dali.sysinfo import available_cores


def test_stage_overlays_set_stage_sizes():
    sizes = {s: (load_config(s).manifest.images, load_config(s).manifest.classes) for s in "1234"}
    assert sizes == {"1": (5000, 50), "2": (25000, 250), "3": (100000, 1000), "4": (500000, 4523)}
    assert load_config("3").manifest.sampling == "tiered"


def test_unknown_key_is_an_error_with_suggestion(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.learning_rate'"):
        load_config("demo", path=p)
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_config("demo", sets=["train.batch_sze=4"])


def test_set_overrides_and_types():
    cfg = load_config("demo", sets=["train.lr=0.5", "loader.backend=pil", "train.target_accuracy=null",
                                    "augment.random_area=[0.5, 1.0]"])
    assert cfg.train.lr == 0.5 and cfg.loader.backend == "pil" and cfg.train.target_accuracy is None
    assert cfg.augment.random_area == [0.5, 1.0]
    with pytest.raises(ConfigError, match="must be one of"):
        load_config("demo", sets=["loader.backend=cuda"])
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config("demo", sets=["train.epochs=1.5"])
    with pytest.raises(ConfigError, match="not both"):
        load_config("demo", sets=["train.class_weights=inv_freq", "train.weighted_sampler=true"])


def test_every_schema_key_is_documented_in_base_yaml():
    import yaml

    base = yaml.safe_load((CONFIG_DIR / "base.yaml").read_text())

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    assert sorted(flat(base)) == sorted(all_keys())
    text = (CONFIG_DIR / "base.yaml").read_text()
    for line in text.splitlines():  # every key line carries a comment, or opens a commented section
        s = line.strip()
        if s and not s.startswith("#") and ":" in s and not s.endswith(":"):
            assert "#" in s, f"undocumented key line: {line}"


def test_parse_set_rejects_malformed():
    with pytest.raises(ConfigError, match="key=value"):
        parse_set(["train.lr"])


def test_loader_threads_and_workers_auto_follow_the_cores_and_the_local_ranks(monkeypatch, tmp_path):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = available_cores()
    cfg = load_config("3")  # base.yaml says auto for both
    assert (cfg.loader.threads, cfg.loader.workers) == (min(cores, 32), min(cores, 16))
    assert load_config("3", sets=["loader.threads=3", "loader.workers=0"]).loader.workers == 0
    assert load_config("3", sets=["loader.threads=3"]).loader.threads == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores * 2))  # more ranks than cores: still one thread each
    assert load_config("3").loader.threads == 1
    # a stored (resolved) config comes back as it was written
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(path=tmp_path / "config.yaml").loader.threads == min(cores, 32)
    with pytest.raises(ConfigError, match="integer or 'auto'"):
        load_config("3", sets=["loader.threads=fast"])
    with pytest.raises(ConfigError, match="loader.threads"):
        load_config("3", sets=["loader.threads=0"])


def test_a_config_file_section_with_every_key_commented_out_changes_nothing(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("model:\n  # name: resnet50\ntrain:\n  # epochs: 3\n", encoding="utf-8")
    demo, mine = load_config("demo"), load_config("demo", path=f)
    assert (mine.model.name, mine.train.epochs, mine.train.batch_size) == \
        (demo.model.name, demo.train.epochs, demo.train.batch_size) == ("resnet18", 24, 32)
    assert load_config("3", path=f).train.target_accuracy == load_config("3").train.target_accuracy == 0.85


def test_the_stage_from_set_or_the_file_picks_the_overlay(tmp_path):
    assert load_config(sets=["stage=3"]).stage == "3" and load_config(sets=["stage=3"]).model.name == \
        "tf_efficientnetv2_s"
    f = tmp_path / "s.yaml"
    f.write_text("stage: 3\n", encoding="utf-8")
    assert load_config(path=f, default_stage="demo").stage == "3"          # the file beats a guess
    assert load_config(default_stage="demo").stage == "demo"
    assert load_config("1", path=f, sets=["stage=3"]).stage == "1"          # --stage beats everything


def test_set_keeps_names_and_paths_as_typed():
    cfg = load_config("demo", sets=["train.name=010", "data.root=/data/2024", "train.lr=1e-3", "data.root=null"])
    assert cfg.train.name == "010" and cfg.data.root is None and cfg.train.lr == 0.001
    assert load_config("demo", sets=["train.out=0x1F"]).train.out == "0x1F"


def _outside(rng) -> list:
    """Values just outside a range: below it, above it (when bounded), and the non-finite ones."""
    from pillsnap_dali.config import Range
    assert isinstance(rng, Range)
    out = [rng.lo if rng.lo_open else rng.lo - 1, float("nan"), float("inf")]
    if rng.hi is not None:
        out.append(rng.hi if rng.hi_open else rng.hi + 1)
    return out


def test_every_numeric_key_is_checked_against_its_range_with_key_and_range_in_the_message():
    from pillsnap_dali.config import _LENGTHS, _RANGES
    assert {"augment.hflip", "train.lr", "train.weight_decay", "train.label_smoothing", "augment.random_area",
            "train.batch_size", "detect.flipud", "predict.conf"} <= set(_RANGES)
    for key, rng in _RANGES.items():
        for bad in _outside(rng):
            value = [bad] * _LENGTHS[key] if key in _LENGTHS else bad
            with pytest.raises(ConfigError) as e:
                load_config("demo", sets=[f"{key}={value}"])
            msg = str(e.value)
            assert key in msg and (str(rng) in msg or "integer" in msg), msg


def test_ranges_named_by_the_issue():
    cases = {"augment.hflip=1.5": "[0, 1]", "train.lr=-0.1": ">= 0", "train.lr=nan": ">= 0",
             "train.weight_decay=.inf": ">= 0", "train.label_smoothing=1.0": "[0, 1)",
             "augment.random_area=[0.0, 1.0]": "(0, 1]", "augment.random_area=[0.9, 0.5]": "min <= max",
             "augment.random_area=[0.5, 1.2]": "(0, 1]", "train.batch_size=100000": "[1, 4096]",
             "train.device=gpu": "auto, cpu, cuda or cuda:N", "train.device=cuda:x": "cuda:N"}
    for pair, allowed in cases.items():
        with pytest.raises(ConfigError) as e:
            load_config("demo", sets=[pair])
        assert pair.split("=")[0] in str(e.value) and allowed in str(e.value), (pair, str(e.value))
    ok = load_config("demo", sets=["train.label_smoothing=0.0", "augment.random_area=[1.0, 1.0]", "train.lr=0",
                                   "train.device=cuda:1", "augment.hflip=1"])
    assert ok.train.device == "cuda:1" and ok.augment.random_area == [1.0, 1.0]


def test_every_shipped_stage_config_is_in_range():
    """Each stage loads, and every value its overlay sets is the value the config holds."""
    import yaml
    from pillsnap_dali.config import CONFIG_DIR, config_default

    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    for stage in ("demo", "1", "2", "3", "4", "custom"):
        cfg = load_config(stage)
        assert cfg.stage == stage
        overlay = CONFIG_DIR / ("base.yaml" if stage == "custom" else "demo.yaml" if stage == "demo"
                                else f"stage{stage}.yaml")
        pairs = [(k, v) for k, v in leaves(yaml.safe_load(overlay.read_text(encoding="utf-8")) or {})
                 if k != "stage" and v != "auto"]
        assert pairs
        for key, value in pairs:
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value or (isinstance(value, int) and node == float(value)), (stage, key, node, value)
        assert config_default("train.epochs") >= 1


def test_an_invalid_section_of_a_config_file_is_reported_even_when_a_flag_sets_a_key_of_it(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("train: 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*'train' must be a mapping"):
        load_config("demo", path=f, overrides={"train": {"epochs": 3}})
    f.write_text("augment:\n  hflip: 2\n  colour: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mine\.yaml.*augment"):
        load_config("demo", path=f, sets=["augment.hflip=0.5"])
    f.write_text("train:\n  lr: -1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"mine\.yaml: config key 'train.lr' must be a finite number >= 0"):
        load_config("demo", path=f, overrides={"train": {"lr": 0.1}})


def test_a_loaded_config_is_never_changed_in_place():
    import dataclasses

    from pillsnap_dali.config import Config, resolve_auto
    cfg = load_config("demo")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data = None
    raw = Config()  # threads/workers "auto"
    resolved = resolve_auto(raw)
    assert resolved is not raw and raw.loader.threads == "auto" and isinstance(resolved.loader.threads, int)


def test_the_machine_facts_live_in_sysinfo_not_in_the_schema(monkeypatch):
    import os

    from pillsnap_dali import config, sysinfo
    assert not hasattr(config, "available_cores") and not hasattr(config, "os")  # config.py: schema + loading
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert sysinfo.local_world_size() == 2
    assert sysinfo.process_cores() == max(1, sysinfo.available_cores() // 2)
    assert sysinfo.available_cores() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not-a-number")  # a broken launcher variable: this process alone
    assert sysinfo.local_world_size() == 1 and sysinfo.process_cores() == sysinfo.available_cores()
