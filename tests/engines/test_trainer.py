"""In-process tests of the trainer (engines/SegTrainer.py) and its builders (engines/builders.py):
a two-epoch CPU run on tiny synthetic data, the optimiser's parameter groups, resuming a run, the
config → loss options table and the stage table, GRAD_CLIP, EARLY_STOPPING, the per-rank seeds and
the MODEL_WEIGHTS load report. Restarts after a kill: test_trainer_resume.py; faults:
test_trainer_faults.py."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from configs import Config
from conftest import make_trainer, tiny_config, torch_threads
from engines.builders import build_data, build_network, loss_options, lr_factor
from engines.checkpoint import read_checkpoint
from utils.run_paths import RunDir
from engines.SegTrainer import epoch_seed
from model.stages import STAGES
from model.losses import LossOptions

#: :func:`conftest.tiny_config`'s run: 3 training images of 128² give 12 tiles of 64², 3 steps per epoch.
STEPS_PER_EPOCH = 3


def fit(trainer) -> dict:
    try:
        return trainer.fit()
    finally:
        trainer.logger.close()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(config, run folder, trainer, summary) of a finished 2-epoch run, shared by the tests below
    (those that change the run work on a copy)."""
    root = tmp_path_factory.mktemp("trainer")
    cfg = tiny_config(root)
    run = RunDir(root / "run")
    run.root.mkdir()
    trainer = make_trainer(cfg, run)
    return cfg, run, trainer, fit(trainer)


@pytest.fixture(scope="module")
def bare_weights(tmp_path_factory):
    """A bare state_dict of the tiny AuxNet-EDC network (what MODEL_WEIGHTS may point at)."""
    path = tmp_path_factory.mktemp("weights") / "edc.pth"
    torch.manual_seed(0)
    torch.save(build_network(tiny_config(path.parent))[0].state_dict(), path)
    return path


def parts_of(net) -> dict[str, list[torch.nn.Parameter]]:
    """The network's parameters by part: E(ncoder), D(ecoder), C (classifier and fill heads)."""
    groups = {"E": net.encoder_modules(), "D": net.decoder_modules(), "C": net.head_modules()}
    return {key: [p for m in mods for p in m.parameters()] for key, mods in groups.items()}


def ids(params) -> set[int]:
    return {id(p) for p in params}


# ----------------------------------------------------------------------------------- a whole run


def test_two_epochs_write_last_best_and_log_return_the_summary_and_the_loss_falls(finished_run):
    cfg, run, trainer, summary = finished_run
    assert {p.name for p in run.root.iterdir()} >= {"last.pth", "best.pth", "log.jsonl", "tts.json"}
    assert not run.summary.exists()  # engines.train writes it once, with the whole-image evaluation
    assert [h["epoch"] for h in trainer.history] == [0, 1]
    assert trainer.history[1]["loss"] < trainer.history[0]["loss"]
    assert all(key in trainer.history[0] for key in ("loss/SoftDICE", "loss/BCE", "loss/CLS", "DSC", "TTR", "HD95"))

    log = [json.loads(line) for line in run.log.read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert [r["loss"] for r in log] == pytest.approx([h["loss"] for h in trainer.history])
    assert log[0]["lr"] == pytest.approx(cfg.BASE_LR)  # no warm-up: epoch 0 starts at BASE_LR

    assert summary["final"]["loss"] == pytest.approx(log[1]["loss"])
    assert summary["eval_metric"] == "DSC" and summary["final"]["epoch"] == 1
    assert summary["best_epoch"] in (0, 1) and summary["best"]["epoch"] == summary["best_epoch"]

    last, best = read_checkpoint(run.last), read_checkpoint(run.best)
    assert last["epoch"] == 1 and best["epoch"] == summary["best_epoch"]
    assert last["best"] == {"metric": "DSC", "value": summary["best"]["DSC"], "epoch": summary["best_epoch"]}
    assert last["config"] == cfg.to_dict() and last["fold"] == 0
    assert last["scheduler"]["last_epoch"] == 2 * STEPS_PER_EPOCH
    assert last["model"].keys() == trainer.step.net.state_dict().keys()


# ----------------------------------------------------------------------------------- optimiser


def test_whole_image_distances_reach_the_boundary_term(trainers):
    # SDM_SCOPE=image: the training batches carry each tile's cut of its image's distance maps,
    # and the step's Boundary term integrates the probabilities against them (not the tile's own)
    trainer = trainers("LOSS=SoftDICE_Boundary", "SDM_SCOPE=image", "SDM_NORMALIZATION=none")
    image, mask, label, fill, sdm = trainer.to_device(next(iter(trainer.train_loader)))
    assert sdm.shape == (4, 1, 64, 64)
    with torch.no_grad():
        out, loss = trainer.ddp(image, mask, label, fill, sdm)
    expected = (torch.sigmoid(out.seg.float()) * sdm).mean()
    assert loss.terms["Boundary"].item() == pytest.approx(expected.item(), rel=1e-5)
    plain = trainers("LOSS=SoftDICE_Boundary", run=RunDir(trainer.settings.run.root.parent / "plain"))
    assert plain.to_device(next(iter(plain.train_loader)))[-1] is None  # SDM_SCOPE=tile: no maps


def test_evaluation_data_computes_no_distance_maps(tmp_path):
    # `eval` scores the test split only: the training tiles' whole-image maps would be wasted work
    cfg = tiny_config(tmp_path, "LOSS=SoftDICE_Boundary", "SDM_SCOPE=image")
    split = RunDir(tmp_path / "run").split
    assert build_data(cfg, split, 0).train.scene_sdm is not None
    assert build_data(cfg, split, 0, scene_sdm=False).train.scene_sdm is None


def test_network_params_get_l2_decay_and_a_static_loss_has_no_group(trainers):
    trainer = trainers("L2_DECAY=0.05")
    (group,) = trainer.optimizer.param_groups
    assert group["weight_decay"] == 0.05 and group["lr"] == Config().BASE_LR
    assert ids(group["params"]) == ids(trainer.step.net.parameters())
    assert list(trainer.step.loss.parameters()) == []


def test_learnable_loss_weights_get_no_weight_decay(trainers):
    trainer = trainers("ADAPTIVE_WEIGHTS=true", "L2_DECAY=0.05")
    net_group, loss_group = trainer.optimizer.param_groups
    assert net_group["weight_decay"] == 0.05 and ids(net_group["params"]) == ids(trainer.step.net.parameters())
    assert loss_group["weight_decay"] == 0.0
    assert loss_group["params"] and ids(loss_group["params"]) == ids(trainer.step.loss.parameters())
    # the learnable weights move with the network
    before = [p.detach().clone() for p in loss_group["params"]]
    trainer.ddp.train()
    trainer.optimise(next(iter(trainer.train_loader)))
    assert any(not torch.equal(b, p) for b, p in zip(before, loss_group["params"]))


def test_auxnet_c_from_weights_optimises_only_the_head_and_leaves_the_rest_as_loaded(trainers, bare_weights):
    trainer = trainers("MODEL=AuxNet-C", f"MODEL_WEIGHTS={bare_weights}", "EVAL_METRIC=TTR")
    net = trainer.step.net
    parts = parts_of(net)
    (group,) = trainer.optimizer.param_groups
    assert ids(group["params"]) == ids(parts["C"])
    assert all(not p.requires_grad for p in parts["E"] + parts["D"])
    assert not trainer.step.decode and trainer.step.use_cls

    saved = torch.load(bare_weights, weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())  # loaded, head included
    trainer.train_epoch(0)
    state = net.state_dict()
    frozen = [k for k in state if not k.startswith(("head.", "fill_head."))]
    assert all(torch.equal(state[k], saved[k]) for k in frozen)  # weights and BatchNorm statistics
    assert not torch.equal(state["head.3.weight"], saved["head.3.weight"])


# ----------------------------------------------------------------------------------- resume


def test_resume_continues_after_the_last_epoch_with_the_optimiser_state(finished_run, trainers, tmp_path):
    _, run, _, _ = finished_run
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.root, copy.root)
    saved = read_checkpoint(copy.last)
    trainer = trainers("TRAIN_EPOCHS=3", run=copy)

    trainer.resume_if_possible()
    assert trainer.start_epoch == 2
    assert trainer.best_epoch == saved["best"]["epoch"] and [h["epoch"] for h in trainer.history] == [0, 1]
    state = trainer.optimizer.state_dict()["state"]
    assert state.keys() == saved["optimizer"]["state"].keys()
    for key, entry in saved["optimizer"]["state"].items():
        assert all(torch.equal(state[key][name], value) for name, value in entry.items())
        assert int(state[key]["step"]) == 2 * STEPS_PER_EPOCH
    assert all(torch.equal(v, saved["model"][k]) for k, v in trainer.step.net.state_dict().items())
    assert trainer.scheduler.last_epoch == 2 * STEPS_PER_EPOCH

    summary = trainer.fit()
    assert [h["epoch"] for h in trainer.history] == [0, 1, 2] and summary["final"]["epoch"] == 2
    assert [json.loads(line)["epoch"] for line in copy.log.read_text().splitlines()] == [0, 1, 2]
    assert read_checkpoint(copy.last)["epoch"] == 2


def test_resume_with_more_epochs_stretches_the_decay_from_the_next_step(finished_run, trainers, tmp_path):
    # README: "A larger TRAIN_EPOCHS extends a finished run (the cosine decay is stretched from the
    # next step on)". The 2-epoch run ended at lr 0; its next step, 6 of 9, should use the 3-epoch decay.
    cfg, run, _, _ = finished_run
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.root, copy.root)
    trainer = trainers("TRAIN_EPOCHS=3", run=copy)
    trainer.resume_if_possible()
    factor = lr_factor(2 * STEPS_PER_EPOCH, warmup=0, decay=3 * STEPS_PER_EPOCH, start=cfg.INIT_LR / cfg.BASE_LR)
    expected = cfg.BASE_LR * factor
    assert expected > 0
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    # issue #11 bug 7: the first new epoch logged lr 0.0000 (the finished schedule's last rate)
    trainer.fit()
    assert [json.loads(line) for line in copy.log.read_text().splitlines()][-1]["lr"] == pytest.approx(expected)


# ----------------------------------------------------------------------------------- builders

#: LossOptions field → the Config option it comes from.
LOSS_OPTION_SOURCES = {
    "seg_classes": "SEG_CLASSES",
    "cls_classes": "CLS_CLASSES",
    "weighting": "ADAPTIVE_WEIGHTS",
    "static_weights": "STATIC_WEIGHTS",
    "cls_weight": "CLS_WEIGHT",
    "include_background": "INCLUDE_BACKGROUND",
    "batch_dice": "BATCH_DICE",
    "sdm_distance": "SDM_DISTANCE",
    "sdm_normalization": "SDM_NORMALIZATION",
    "sdm_kernel_size": "SDM_KERNEL_SIZE",
    "clamp_delta": "CLAMP_DELTA",
    "sigmoid_steepness": "SIGMOID_STEEPNESS",
    "seg_threshold": "SEG_THRESHOLD",
    "wce_w0": "WCE_W0",
    "wce_sigma": "WCE_SIGMA",
    "wbce_w0": "WBCE_W0",
    "wbce_sigma": "WBCE_SIGMA",
    "cldice_iterations": "CLDICE_ITERATIONS",
    "focal_gamma": "FOCAL_GAMMA",
    "focal_alpha": "FOCAL_ALPHA",
    "schedule_alpha": "SCHEDULE_ALPHA",
}

#: (Config option, a value other than its default, the LossOptions value it must become).
LOSS_OPTION_CASES = [
    ("SEG_CLASSES", 3, 3),
    ("CLS_CLASSES", 2, 2),
    ("ADAPTIVE_WEIGHTS", True, "adaptive"),
    ("ADAPTIVE_WEIGHTS", "schedule", "schedule"),
    ("STATIC_WEIGHTS", [0.25, 4.0], [0.25, 4.0]),
    ("CLS_WEIGHT", 0.5, 0.5),
    ("INCLUDE_BACKGROUND", True, True),
    ("BATCH_DICE", False, False),
    ("SDM_DISTANCE", "chebyshev", "chebyshev"),
    ("SDM_NORMALIZATION", "minmax", "minmax"),
    ("SDM_NORMALIZATION", "none", None),
    ("SDM_KERNEL_SIZE", 7, 7),
    ("CLAMP_DELTA", 0.3, 0.3),
    ("SIGMOID_STEEPNESS", 25.0, 25.0),
    ("SEG_THRESHOLD", 0.7, 0.7),
    ("WCE_W0", 3.0, 3.0),
    ("WCE_SIGMA", 2.0, 2.0),
    ("WBCE_W0", 6.0, 6.0),
    ("WBCE_SIGMA", 8.0, 8.0),
    ("CLDICE_ITERATIONS", 4, 4),
    ("FOCAL_GAMMA", 1.5, 1.5),
    ("FOCAL_ALPHA", 0.25, 0.25),
    ("SCHEDULE_ALPHA", [0.1, 0.2, 0.8], (0.1, 0.2, 0.8)),
]


def test_loss_options_table_covers_every_option():
    assert set(LOSS_OPTION_SOURCES) == {f.name for f in dataclasses.fields(LossOptions)}
    assert set(LOSS_OPTION_SOURCES.values()) <= set(Config.__dataclass_fields__)
    assert {key for key, _, _ in LOSS_OPTION_CASES} == set(LOSS_OPTION_SOURCES.values())


def test_loss_options_defaults_are_the_config_defaults():
    # The default MODEL trains the head, so the default config has a CLS term; LossOptions has none.
    assert loss_options(Config()) == dataclasses.replace(LossOptions(), cls_classes=Config().CLS_CLASSES)


@pytest.mark.parametrize("key, value, expected", LOSS_OPTION_CASES, ids=lambda v: str(v))
def test_loss_options_maps_each_option_to_its_field_only(key, value, expected):
    base = loss_options(Config())
    changed = loss_options(dataclasses.replace(Config(), **{key: value}))
    diff = {f.name for f in dataclasses.fields(LossOptions) if getattr(changed, f.name) != getattr(base, f.name)}
    (field,) = [f for f, source in LOSS_OPTION_SOURCES.items() if source == key]
    assert diff == {field} and getattr(changed, field) == expected


@pytest.mark.parametrize("model", list(STAGES))
def test_cls_term_only_when_the_stage_trains_the_head(model):
    cfg = dataclasses.replace(Config(), MODEL=model, CLS_CLASSES=2)
    assert loss_options(cfg).cls_classes == (2 if "C" in STAGES[model].trains else 0)


@pytest.mark.parametrize("model", list(STAGES))
def test_build_network_applies_the_stage_table(model, tmp_path, bare_weights):
    stage = STAGES[model]
    weights = [f"MODEL_WEIGHTS={bare_weights}"] if stage.needs_weights else []
    metric = ["EVAL_METRIC=TTR"] if not stage.decodes else []
    cfg = tiny_config(tmp_path, f"MODEL={model}", *weights, *metric)
    net = build_network(cfg)[0]
    assert (net.head is not None) == stage.has_head and (net.fill_head is not None) == stage.has_head
    for part, params in parts_of(net).items():
        assert all(p.requires_grad == (part in stage.trains) for p in params), part
    if stage.needs_weights:
        saved = torch.load(bare_weights, weights_only=True)
        assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items())
    net.train()  # frozen parts stay in eval mode (their BatchNorm statistics do not move)
    assert net.inc.training == ("E" in stage.trains) and net.ups.training == ("D" in stage.trains)


def test_lr_schedule_warmup_then_cosine():
    f = lambda s: lr_factor(s, warmup=10, decay=20, start=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1)
    assert f(5) == pytest.approx(0.55)
    assert f(10) == pytest.approx(1.0)
    assert f(20) == pytest.approx(0.5)
    assert f(30) == pytest.approx(0.0, abs=1e-12)
    assert f(40) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, warmup=0, decay=4, start=0.1) == 1.0
    values = [f(s) for s in range(10, 31)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# ----------------------------------------------------------------------------------- options and seeds


def test_every_rank_and_epoch_draws_its_own_seed():
    seeds = {epoch_seed(42, epoch, rank) for epoch in range(20) for rank in range(8)}
    assert len(seeds) == 160
    assert epoch_seed(42, 3, 1) == epoch_seed(42, 3, 1)


def test_grad_clip_bounds_the_gradient_norm(trainers):
    trainer = trainers("GRAD_CLIP=0.001")
    trainer.ddp.train()
    trainer.optimise(next(iter(trainer.train_loader)))
    grads = [p.grad for p in trainer.step.parameters() if p.grad is not None]
    assert float(torch.nn.utils.get_total_norm(grads)) <= 0.001 * 1.0001


def test_early_stopping_stops_after_patience_epochs_without_improvement(trainers, monkeypatch, capsys):
    trainer = trainers("TRAIN_EPOCHS=6", "EARLY_STOPPING=2")

    class Flat:
        def compute(self):
            return {"DSC": 0.5}

    monkeypatch.setattr(trainer, "evaluate", lambda loader=None: Flat())
    summary = trainer.fit()
    assert [h["epoch"] for h in trainer.history] == [0, 1, 2] and summary["best_epoch"] == 0
    assert "early stopping after epoch 2" in capsys.readouterr().out


def test_auxnet_d_starts_from_a_unet_checkpoint_and_reports_the_new_frozen_head(trainers, tmp_path, capsys):
    unet = build_network(tiny_config(tmp_path, "MODEL=UNet"))[0]
    torch.save(unet.state_dict(), tmp_path / "unet.pth")
    trainer = trainers("MODEL=AuxNet-D", f"MODEL_WEIGHTS={tmp_path / 'unet.pth'}")
    out = capsys.readouterr().out
    assert "newly initialised" in out and "(head, fill_head)" in out and "frozen at their initialisation" in out
    assert all(not p.requires_grad for p in trainer.step.net.head.parameters())
