"""Config loading, command-line overrides and every validator rule."""

import dataclasses
import json
import re
import shlex
import subprocess
import sys

import pytest
import torch
import yaml

from configs import Config, ConfigError, load_config
from configs.config_parser import DEFAULT_CONFIG, FIELDS
from configs.reference import COMMAND, REFERENCE, render
from conftest import ROOT, write_checkpoint


def problems_of(*overrides, path=None):
    with pytest.raises(ConfigError) as err:
        load_config(path, list(overrides))
    return err.value.problems


def visible_gpus(monkeypatch, count):
    """Make torch see ``count`` CUDA GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@pytest.fixture
def cpu_only(monkeypatch):
    """This process sees no CUDA GPU and a CPU without native bf16 (auto precision = fp32)."""
    import utils.hardware

    visible_gpus(monkeypatch, 0)
    monkeypatch.setattr(utils.hardware, "cpu_bf16_support", lambda: (False, "none in this test"))


def test_yaml_defaults_match_schema_and_are_documented():
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    assert list(data) == list(FIELDS), "config.yaml must list every option, in schema order"
    defaults = Config()
    for key, value in data.items():
        assert getattr(defaults, key) == value, key
    for line in DEFAULT_CONFIG.read_text().splitlines():
        if re.match(r"^[A-Za-z_]+:", line) and not line.rstrip().endswith(":"):
            assert "#" in line, f"option without a one-line comment: {line}"


def test_configuration_reference_documents_every_option_in_its_section():
    reference = REFERENCE.read_text()
    missing = [key for key in FIELDS if f"| `{key}` |" not in reference]
    assert not missing, f"docs/configuration.md lacks {missing}: run {COMMAND}"
    assert "## optimiser (AdamW)\n\n| option | default | meaning |\n|---|---|---|\n| `INIT_LR` | `0.0001` |" in reference
    assert "| `CMA_COEFFICIENTS` | `{DSC: 0.5, TTR: 0.2, HD95: 0.3}` |" in reference
    assert "| `RESULTS_DIR` | `saved` | runs go to RESULTS_DIR/&lt;EXP_ID&gt;/&lt;RUN_ID&gt;/ |" in reference


def test_configuration_reference_is_what_the_generator_writes_now():
    """docs/configuration.md is generated from the schema: a changed doc or default without the file
    rewritten fails here, with the command that rewrites it."""
    assert REFERENCE.read_text() == render(), f"docs/configuration.md is stale: run {COMMAND}"


def test_readme_links_the_configuration_reference():
    readme = (DEFAULT_CONFIG.parents[1] / "README.md").read_text()
    assert "(docs/configuration.md)" in readme


def test_default_config_is_valid():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.LOSS == "SoftDICE_BCE"


def test_overrides_are_typed():
    cfg = load_config(None, ["BATCH_SIZE=4", "STATIC_WEIGHTS=[1, 0.5]", "BASE_LR=1e-3", "EXP_ID=abc",
                             "MASTER_PORT=12345", "PIXEL_SPACING=[0.5,2]"])
    assert cfg.BATCH_SIZE == 4 and cfg.STATIC_WEIGHTS == [1.0, 0.5] and cfg.BASE_LR == 1e-3
    assert cfg.EXP_ID == "abc" and isinstance(cfg.BASE_LR, float)
    assert cfg.MASTER_PORT == 12345 and cfg.PIXEL_SPACING == [0.5, 2.0]


def test_wrong_types_and_unknown_keys_are_all_reported():
    problems = problems_of("BATCH_SIZE=four", "SEG_DROPOUT=true", "BACH_SIZE=3", "justaword")
    text = "\n".join(problems)
    assert "BATCH_SIZE=four has the wrong type: expected int" in text
    assert "SEG_DROPOUT=true has the wrong type" in text
    assert "unknown option 'BACH_SIZE' (did you mean 'BATCH_SIZE'?)" in text
    assert "'justaword' is not KEY=VALUE" in text
    assert len(problems) == 4


def test_a_bad_choice_lists_the_choices_and_the_closest():
    (problem,) = problems_of("MIXED_PRECISION=bf61")
    assert "MIXED_PRECISION=bf61 is not valid: expected one of 'auto' | 'bf16' | 'fp16' | 'none'" in problem
    assert "(did you mean 'bf16'?)" in problem


def test_text_options_keep_what_was_typed():
    cfg = load_config(None, ["RUN_ID=001", "EXP_ID=2024", "MODEL_WEIGHTS=null"])
    assert cfg.RUN_ID == "001" and cfg.EXP_ID == "2024" and cfg.MODEL_WEIGHTS is None


def test_bool_is_not_an_int():
    assert any("UNET_DEPTH=true" in p for p in problems_of("UNET_DEPTH=true"))


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("MODLE: UNet\nSEED: 3\n")
    (problem,) = problems_of(path=path)
    assert str(path) in problem and "did you mean 'MODEL'" in problem


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("SEED: [1,\n")
    (problem,) = problems_of(path=path)
    assert str(path) in problem and "not valid YAML" in problem
    (problem,) = problems_of(path=tmp_path / "missing.yaml")
    assert "cannot read config file" in problem


def test_cli_value_replaces_a_bad_file_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("BATCH_SIZE: lots\n")
    assert load_config(path, ["BATCH_SIZE=2"]).BATCH_SIZE == 2


def test_the_three_classic_mistakes_in_one_error():
    problems = problems_of("MODEL=AuxNet-XYZ", "LOSS=Foo_BCE", "INPUT_SIZE=100")
    text = "\n".join(problems)
    assert "MODEL=AuxNet-XYZ is not valid" in text and "'AuxNet-EDC'" in text and "'UNet'" in text
    assert "Foo" in text and "SoftDICE" in text
    assert "INPUT_SIZE=100 is not divisible by 2^(UNET_DEPTH-1)=8" in text and "use e.g. 96 or 104" in text


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["STATIC_WEIGHTS=[1.0]"], "STATIC_WEIGHTS has 1 weight(s) but LOSS='SoftDICE_BCE' has 2 term(s)"),
        (["STATIC_WEIGHTS=[1, -1]"], "has a negative weight"),
        (["ADAPTIVE_WEIGHTS=true", "STATIC_WEIGHTS=[1,1]"], "remove STATIC_WEIGHTS"),
        (["MODEL=AuxNet-C"], "set MODEL_WEIGHTS"),
        (["MODEL=AuxNet-D"], "set MODEL_WEIGHTS"),
        (["MODEL_WEIGHTS=/no/such/ckpt"], "no such file"),
        (["TEST_SPLIT=1.5"], "TEST_SPLIT=1.5 is out of range"),
        (["TEST_SPLIT=0.7"], "use TEST_SPLIT <= 0.5"),
        (["DEFAULT_FOLD=5"], "DEFAULT_FOLD=5 does not exist"),
        (["UNET_DEPTH=1"], "UNET_DEPTH=1 is out of range"),
        (["SEG_DROPOUT=1.0"], "SEG_DROPOUT=1 is out of range"),
        (["SEG_THRESHOLD=0"], "SEG_THRESHOLD=0 is out of range"),
        (["CLS_CLASSES=3"], "use 1 (sigmoid) or 2 (softmax)"),
        (["TRAIN_EPOCHS=0"], "TRAIN_EPOCHS=0 is out of range"),
        (["BASE_LR=0"], "BASE_LR=0 is out of range"),
        (["SDM_KERNEL_SIZE=4"], "SDM_KERNEL_SIZE=4 must be an odd int >= 3"),
        (["SDM_SCOPE=image"], "LOSS='SoftDICE_BCE' has no Boundary term: add Boundary to LOSS or set SDM_SCOPE=tile"),
        (["MODEL=UNet", "EVAL_METRIC=TTR"], "which MODEL=UNet lacks"),
        (["DISTANCE_METRICS=false", "EVAL_METRIC=HD95"], "set DISTANCE_METRICS=true"),
        (["EVAL_METRIC=CMA", "CMA_COEFFICIENTS={DSC: 1, HD59: 1}"], "unknown metric 'HD59' (did you mean 'HD95'?)"),
        (["EVAL_METRIC=CMA", "CMA_COEFFICIENTS={DSC: 0}"], "at least one positive weight"),
        (["PIXEL_SPACING=[1, 0]"], "two positive numbers"),
        (["TILE_OVERLAP=128"], "TILE_OVERLAP=128 must be in [0, INPUT_SIZE=128)"),
        (["SEG_CLASSES=5"], "does not fit the synthetic data"),
        (["SEED=-1"], "SEED=-1 is out of range"),
        (["MODEL=AuxNet-ED", "EVAL_METRIC=TTR"], "which MODEL=AuxNet-ED does not train"),
        (["SYNTHETIC_IMAGES=3"], "SYNTHETIC_IMAGES=3 is fewer than the 5 folds of TEST_SPLIT=0.2"),
        (["SYNTHETIC_SIZE=64"], "SYNTHETIC_SIZE=64 is smaller than INPUT_SIZE=128"),
        (["DATASET_DIR=/no/such/dir"], "lacks the folder(s) images, masks"),
        (["GPUs=[0]"], "no CUDA GPU is visible"),
        (["MASTER_PORT=http"], "must be a port number"),
        (["RUN_ID=../escape"], "must be a plain folder name"),
        (["MIXED_PRECISION=fp16"], "needs a CUDA GPU"),
        (["AUGMENTATIONS=[{name: HorizontalFlap, p: 0.5}]"], "HorizontalFlap"),
        (["TEST_IDS=[f3, f4]", "CROSS_VALIDATION=true"],
         "TEST_IDS fixes one test split, but CROSS_VALIDATION=true draws K folds: use CROSS_VALIDATION=false, or "
         "TEST_IDS=null"),
        (["TEST_IDS=[a, b]", "DEFAULT_FOLD=2"], "DEFAULT_FOLD=2 chooses a drawn fold, but TEST_IDS fixes the one split"),
        (["TEST_IDS=[]"], "TEST_IDS=[] holds no image: list the stems of the test images, or use TEST_IDS=null"),
        (["TEST_IDS=[a, b, a]"], "TEST_IDS lists a more than once: list each test image once"),
        (["POLYGON_TOLERANCE=-0.5"], "POLYGON_TOLERANCE=-0.5 is out of range: use a value in [0, inf)"),
    ],
)
def test_validator_rules(overrides, expected, cpu_only):  # the GPU rows mean a machine without one
    text = "\n".join(problems_of(*overrides))
    assert expected in text


def test_gpus_that_are_not_there_are_named_on_a_machine_with_one_gpu(monkeypatch):
    visible_gpus(monkeypatch, 1)
    text = "\n".join(problems_of("GPUs=[0, 3]"))
    assert "GPUs=[0, 3]: no GPU [3]; visible GPUs are 0..0" in text and "no CUDA GPU is visible" not in text


def test_error_message_lists_every_problem_with_count():
    with pytest.raises(ConfigError, match=r"3 problem\(s\)"):
        load_config(None, ["UNET_DEPTH=1", "BATCH_SIZE=0", "TRAIN_EPOCHS=0"])


def test_auxnet_c_chooses_ttr_with_a_note_when_eval_metric_is_left_at_its_default(checkpoint, tmp_path, capsys):
    weights = f"MODEL_WEIGHTS={checkpoint}"
    cfg = load_config(None, ["MODEL=AuxNet-C", weights])  # config.yaml holds the default EVAL_METRIC: DSC
    assert cfg.EVAL_METRIC == "TTR"
    assert capsys.readouterr().err == ("note: EVAL_METRIC=TTR: MODEL=AuxNet-C trains only the head, on a trained "
                                       "network, so DSC cannot change; best.pth is the epoch whose head scores best\n")
    own = tmp_path / "stage_c.yaml"
    own.write_text("MODEL: AuxNet-C\n")  # a file without EVAL_METRIC: the same choice
    assert load_config(own, [weights]).EVAL_METRIC == "TTR" and "note: EVAL_METRIC=TTR" in capsys.readouterr().err
    # chosen: kept (a combined score of the head), or refused with the fix when it cannot change
    assert load_config(None, ["MODEL=AuxNet-C", weights, "EVAL_METRIC=CMA", "CMA_COEFFICIENTS={TTR: 1}"]
                       ).EVAL_METRIC == "CMA"
    for typed in (["EVAL_METRIC=DSC"], ["EVAL_METRIC=IoU"]):
        metric = typed[0].split("=")[1]
        assert problems_of("MODEL=AuxNet-C", weights, *typed) == [
            f"EVAL_METRIC={metric} scores segmentation, which MODEL=AuxNet-C does not train: use EVAL_METRIC=TTR"]
    own.write_text("MODEL: AuxNet-C\nEVAL_METRIC: HD95\n")
    assert "EVAL_METRIC=HD95 scores segmentation" in problems_of(weights, path=own)[0]
    assert capsys.readouterr().err == ""  # no note for a configuration that does not run
    assert load_config(None, []).EVAL_METRIC == "DSC"  # a model that decodes keeps the default


def test_weights_path_suffix_is_optional(checkpoint):
    cfg = load_config(None, [f"MODEL_WEIGHTS={checkpoint.parent / 'best'}", "MODEL=AuxNet-C", "EVAL_METRIC=TTR"])
    assert cfg.MODEL_WEIGHTS.endswith("best")


def test_config_is_a_dataclass_with_docs_for_each_field():
    assert dataclasses.is_dataclass(Config)


def _yaml_comments() -> dict[str, str]:
    """The one-line comment of each top-level option in config.yaml."""
    comments = {}
    for line in DEFAULT_CONFIG.read_text().splitlines():
        m = re.match(r"([A-Za-z_]\w*):[^#]*#(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    return comments


def _reference_meanings() -> dict[str, str]:
    """The meaning column of each `| `KEY` | `default` | meaning |` row of docs/configuration.md, unescaped."""
    meanings = {}
    for line in REFERENCE.read_text().splitlines():
        m = re.fullmatch(r"\| `(\w+)` \| `[^`]*` \| (.*) \|", line.strip())
        if m and m.group(1) in FIELDS:
            meanings[m.group(1)] = m.group(2).replace(r"\|", "|").replace("&lt;", "<").replace("&gt;", ">")
    return meanings


def test_schema_doc_is_the_yaml_comment_and_the_reference_meaning():
    comments, meanings = _yaml_comments(), _reference_meanings()
    problems = []
    for key, field in FIELDS.items():
        doc = field.metadata.get("doc")
        if not doc:
            problems.append(f"{key}: no one-line doc in configs/schema.py")
            continue
        if comments.get(key) != doc:
            problems.append(f"{key}: config.yaml comment {comments.get(key)!r} != schema doc {doc!r}")
        if meanings.get(key) != doc:
            problems.append(f"{key}: docs/configuration.md meaning {meanings.get(key)!r} != schema doc {doc!r}"
                            f" (run {COMMAND})")
    assert not problems, "\n".join(problems)


# ---- non-finite numbers (issue 22, item 6)

@pytest.mark.parametrize("override, default", [
    ("SEG_THRESHOLD=.nan", "SEG_THRESHOLD=0.5"), ("CLS_WEIGHT=.nan", "CLS_WEIGHT=0.1"),
    ("TEST_SPLIT=.nan", "TEST_SPLIT=0.2"), ("BASE_LR=.inf", "BASE_LR=0.003"),
    ("L2_DECAY=.nan", "L2_DECAY=0.0001"), ("INIT_LR=.nan", "INIT_LR=0.0001"),
    ("BASE_LR=1e999", "BASE_LR=0.003"),  # overflows to inf when read
    ("GRAD_CLIP=-.inf", "GRAD_CLIP=null"),
])
def test_a_non_finite_number_is_refused_with_its_fix(override, default):
    assert problems_of(override) == [
        f"command line: {override} is not a finite number: use a finite number, e.g. {default} (the default)"]


@pytest.mark.parametrize("override, bad, default", [
    ("SCHEDULE_ALPHA=[.nan, 0.01, 0.9]", ".nan", "'SCHEDULE_ALPHA=[0.01, 0.01, 0.9]'"),
    ("STATIC_WEIGHTS=[1.0, .inf]", ".inf", "STATIC_WEIGHTS=null"),
    ("CMA_COEFFICIENTS={DSC: .nan}", ".nan", "'CMA_COEFFICIENTS={DSC: 0.5, TTR: 0.2, HD95: 0.3}'"),
    ("PIXEL_SPACING=[1.0, -.inf]", "-.inf", "PIXEL_SPACING=null"),
    ("AUGMENTATIONS=[{name: HorizontalFlip, p: .nan}]", ".nan", "AUGMENTATIONS=default"),
])
def test_a_non_finite_number_inside_a_list_or_mapping_is_refused(override, bad, default):
    assert problems_of(override) == [f"command line: {override} holds {bad}, which is not a finite number: "
                                     f"use finite numbers, e.g. {default} (the default)"]


def test_non_finite_numbers_in_a_file_are_reported_with_the_other_problems(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("BASE_LR: .inf\nSCHEDULE_ALPHA: [0.1, .nan, 0.9]\nBATCH_SIZE: 0\n")
    problems = problems_of(path=path)
    assert problems[:2] == [
        f"{path}: BASE_LR=.inf is not a finite number: use a finite number, e.g. BASE_LR=0.003 (the default)",
        f"{path}: SCHEDULE_ALPHA=[0.1, .nan, 0.9] holds .nan, which is not a finite number: use finite numbers, "
        "e.g. 'SCHEDULE_ALPHA=[0.01, 0.01, 0.9]' (the default)"]
    assert problems[2:] == ["BATCH_SIZE=0 is out of range: use a value in [1, inf)"]


def test_the_cli_refuses_nan_before_making_a_run_folder(tmp_path):
    from conftest import TINY, run_cli

    proc = run_cli(*TINY, "TRAIN_EPOCHS=1", "SEG_THRESHOLD=.nan", f"RESULTS_DIR={tmp_path / 'out'}", "GPUs=[]",
                   check=False)
    assert proc.returncode == 2, proc.stderr
    assert "SEG_THRESHOLD=.nan is not a finite number" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- one problem, one message (issue 22)

def test_an_invalid_option_is_reported_once():
    assert problems_of("SEG_CLASSES=0") == ["SEG_CLASSES=0 is out of range: use a value in [1, inf)"]
    # a mistyped option keeps its default meanwhile: rules that combine it with others skip it
    assert problems_of("INPUT_SIZE=big", "TILE_OVERLAP=200") == [
        "command line: INPUT_SIZE=big has the wrong type: expected int"]
    assert problems_of("INPUT_SIZE=0", "TILE_OVERLAP=-1") == [
        "INPUT_SIZE=0 is out of range: use a value in [1, inf)", "TILE_OVERLAP=-1 must be >= 0"]


# ---- duplicate keys (issue 22)

def test_a_key_set_twice_in_a_file_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("SEED: 1\nBATCH_SIZE: 4\nSEED: 2\nCMA_COEFFICIENTS:\n  DSC: 1\n  DSC: 0.5\nMODLE: UNet\n")
    problems = problems_of(path=path)
    assert problems[:2] == [
        f"{path}: 'SEED' is set twice, on lines 1 and 3 (the second would silently replace the first): keep one",
        f"{path}: 'DSC' is set twice, on lines 5 and 6 (the second would silently replace the first): keep one"]
    assert len(problems) == 3 and "unknown option 'MODLE'" in problems[2]


def test_a_key_set_twice_on_the_command_line_is_an_error():
    assert problems_of("CMA_COEFFICIENTS={DSC: 1, DSC: 2}") == [
        "command line: CMA_COEFFICIENTS={DSC: 1, DSC: 2} sets 'DSC' twice: keep one"]


def test_read_yaml_refuses_a_key_set_twice(tmp_path):
    from configs.config_parser import read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("SEED: 1\nSEED: 1\n")
    with pytest.raises(ConfigError, match=r"'SEED' is set twice, on lines 1 and 2"):
        read_yaml(path)


# ---- suggested values are typed as the user types them (issue 22)

def test_every_option_written_by_setting_reads_back_as_the_same_value():
    from configs.schema import setting

    defaults = Config().to_dict()
    for key, value in defaults.items():
        typed = shlex.split(setting(key, value))
        assert typed == [f"{key}={typed[0].partition('=')[2]}"], key
        assert getattr(load_config(None, typed), key) == value, (key, typed)


@pytest.mark.parametrize("key, old, new, shown", [
    ("STATIC_WEIGHTS", None, "[1, 0.5]", "STATIC_WEIGHTS=null"),
    ("INCLUDE_BACKGROUND", True, "false", "INCLUDE_BACKGROUND=true"),
    ("SCHEDULE_ALPHA", [0.02, 0.01, 0.9], "[0.01, 0.01, 0.9]", "'SCHEDULE_ALPHA=[0.02, 0.01, 0.9]'"),
    ("CMA_COEFFICIENTS", {"DSC": 1.0}, "{DSC: 0.5}", "'CMA_COEFFICIENTS={DSC: 1.0}'"),
    ("LOSS", "SoftDICE", "SoftDICE_BCE", "LOSS=SoftDICE"),
])
def test_the_resume_refusal_suggests_a_value_that_is_accepted(tmp_path, key, old, new, shown):
    from configs.config_parser import resume_problems

    saved = {**Config().to_dict(), key: old}
    (problem,) = resume_problems(saved, load_config(None, [f"{key}={new}"]), tmp_path)
    suggested = re.search(r"; use (.+), or start a new run", problem).group(1)
    assert suggested == shown
    assert getattr(load_config(None, shlex.split(suggested)), key) == old


# ---- a checkpoint evaluates on the machine the command runs on (issue 22)

def _fp16_checkpoint(tmp_path):
    """A tiny network's checkpoint trained (on a GPU) with MIXED_PRECISION=fp16 and CHANNELS_LAST=true."""
    tiny = load_config(None, ["UNET_DEPTH=3", "CONV_DEPTH=4"])
    return write_checkpoint(tmp_path / "best.pth", dataclasses.replace(tiny, MIXED_PRECISION="fp16", CHANNELS_LAST=True))


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_an_fp16_checkpoint_evaluates_on_a_cpu_only_machine(tmp_path, cpu_only, capsys, command):
    from engines.inference import load_for_inference

    args = [f"MODEL_WEIGHTS={_fp16_checkpoint(tmp_path)}"]
    cfg = load_for_inference(load_config(None, args), args, command).cfg
    assert (cfg.MIXED_PRECISION, cfg.CHANNELS_LAST) == ("auto", "auto")
    notes = [line for line in capsys.readouterr().out.splitlines(keepends=True) if "MIXED_PRECISION" in line]
    assert notes == ["note: the checkpoint was trained with MIXED_PRECISION=fp16; this machine uses fp32 (auto)\n"]


def test_fp16_typed_for_eval_without_a_gpu_is_refused_with_the_fix(tmp_path, cpu_only):
    args = [f"MODEL_WEIGHTS={_fp16_checkpoint(tmp_path)}", "MIXED_PRECISION=fp16"]
    assert problems_of(*args) == ["MIXED_PRECISION=fp16 needs a CUDA GPU but no CUDA GPU is visible: use "
                                  "MIXED_PRECISION=auto, bf16 (CPU and recent GPUs) or none"]


def test_fp16_with_the_cpu_forced_is_refused_even_where_a_gpu_is_visible(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert problems_of("MIXED_PRECISION=fp16", "GPUs=[]") == [
        "MIXED_PRECISION=fp16 needs a CUDA GPU but GPUs=[] runs on the CPU: use MIXED_PRECISION=auto, bf16 "
        "(CPU and recent GPUs) or none"]


#: Reads a YAML file into a Config in a fresh interpreter and says what it imported (see the test).
_READ_YAML = """
import json, sys
from configs import Config, load_config
from configs.config_parser import check_values, config_for_checkpoint, read_yaml
values, problems = check_values(read_yaml(sys.argv[1]), source=sys.argv[1])
cfg = Config(**values)
saved = config_for_checkpoint(cfg.to_dict(), Config(), given=["GATING"], fold=1)
print(json.dumps({"torch": "torch" in sys.modules, "problems": list(problems), "model": cfg.MODEL,
                  "trains": cfg.stage.trains, "distance": cfg.SDM_DISTANCE, "metric": cfg.EVAL_METRIC,
                  "fold": saved.DEFAULT_FOLD}))
"""


def test_reading_a_yaml_needs_no_torch(tmp_path):
    """Reading a configuration imports no torch. "Reading" is: ``import configs`` (its ``Config``
    and ``load_config``), reading a YAML file (``read_yaml``), typing its values into a ``Config``
    (``check_values``, whose MODEL, SDM_DISTANCE and EVAL_METRIC choices come from their owners),
    its derived views (``stage``), and typing a checkpoint's saved configuration
    (``config_for_checkpoint``). Validating one (``load_config``) checks the machine and the loss
    registry, and may import torch."""
    path = tmp_path / "run.yaml"
    path.write_text("MODEL: AuxNet-ED\nSDM_DISTANCE: manhattan\nEVAL_METRIC: IoU\nBASE_LR: 0.01\n")
    done = subprocess.run([sys.executable, "-c", _READ_YAML, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"torch": False, "problems": [], "model": "AuxNet-ED", "trains": "ED",
                                       "distance": "manhattan", "metric": "IoU", "fold": 1}
