"""NORM and ACTIVATION in checkpoints: a checkpoint made before they existed loads as BatchNorm and
ReLU whatever the defaults are now (configs.schema.LEGACY_VALUES); eval and predict take them from the
checkpoint, as UNET_DEPTH; MODEL_WEIGHTS of another NORM or ACTIVATION is one clean error; InstanceNorm
and GroupNorm checkpoints are predicted end to end."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from configs import Config, ConfigError, load_config
from configs.config_parser import FIELDS, resume_problems, saved_values
from conftest import predict_config, write_checkpoint
from engines.builders import build_network
from engines.checkpoint import CheckpointError
from engines.predict import predict

#: A tiny fp32 network (3-level U-Net 4 maps wide, 32² tiles).
TINY_NET = ["INPUT_SIZE=32", "UNET_DEPTH=3", "CONV_DEPTH=4", "MIXED_PRECISION=none", "CHANNELS_LAST=false"]


@pytest.fixture
def defaults_changed(monkeypatch):
    """NORM and ACTIVATION default to instance and leaky_relu, as if the defaults had changed since a
    checkpoint was written."""
    names = [f.name for f in dataclasses.fields(Config)]
    defaults = list(Config.__init__.__defaults__)
    assert len(defaults) == len(names)  # every option has a default: one per __init__ parameter
    for key, value in {"NORM": "instance", "ACTIVATION": "leaky_relu"}.items():
        defaults[names.index(key)] = value
        monkeypatch.setattr(FIELDS[key], "default", value)
    monkeypatch.setattr(Config.__init__, "__defaults__", tuple(defaults))
    assert (Config().NORM, Config().ACTIVATION) == ("instance", "leaky_relu")


def _old_checkpoint(path, *overrides):
    """A checkpoint of a BatchNorm/ReLU network whose saved configuration lacks NORM and ACTIVATION
    (made before they existed); its BatchNorm statistics are not the fresh ones."""
    cfg = load_config(None, [*TINY_NET, "NORM=batch", "ACTIVATION=relu", *overrides])
    torch.manual_seed(0)
    net = build_network(cfg)[0]
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    write_checkpoint(path, cfg, net)
    state = torch.load(path, weights_only=True)
    del state["config"]["NORM"], state["config"]["ACTIVATION"]
    torch.save(state, path)
    return path, net


def test_a_saved_configuration_without_norm_and_activation_reads_as_batchnorm_and_relu(defaults_changed):
    assert saved_values({"UNET_DEPTH": 3}) == {"UNET_DEPTH": 3, "NORM": "batch", "ACTIVATION": "relu",
                                               "CLS_TRAINS_ENCODER": True, "GATE_THRESHOLD": 0.5}
    saved = {"NORM": "group", "ACTIVATION": "leaky_relu", "CLS_TRAINS_ENCODER": False, "GATE_THRESHOLD": 0.3}
    assert saved_values(saved) == saved


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_checkpoint_made_before_norm_existed_is_evaluated_with_its_batchnorm(tmp_path, defaults_changed, command):
    from engines.inference import load_for_inference

    path, net = _old_checkpoint(tmp_path / "old.pth")
    args = [f"MODEL_WEIGHTS={path}", "GPUs=[]"]
    read = load_for_inference(load_config(None, args), args, command)
    assert (read.cfg.NORM, read.cfg.ACTIVATION) == ("batch", "relu")
    assert isinstance(read.net.inc[1], torch.nn.BatchNorm2d) and isinstance(read.net.inc[2], torch.nn.ReLU)
    assert all(torch.equal(v, read.net.state_dict()[k]) for k, v in net.state_dict().items())


def test_eval_and_predict_take_norm_and_activation_from_the_checkpoint(tmp_path, checkpoint):
    """As UNET_DEPTH: the checkpoint fixes them; typed otherwise, they are refused with the fix."""
    for typed, trained in (("NORM=instance", "NORM=batch"), ("ACTIVATION=leaky_relu", "ACTIVATION=relu")):
        with pytest.raises(ConfigError, match=rf"{typed} but the checkpoint was trained with {trained}: "
                                              "remove it from the command line"):
            predict_config(checkpoint, typed)
    assert predict_config(checkpoint, "NORM=batch").cfg.NORM == "batch"  # the same value is no problem


def test_training_from_an_old_checkpoint_with_another_norm_is_one_clean_error(tmp_path, defaults_changed):
    path, _ = _old_checkpoint(tmp_path / "old.pth")
    (tmp_path / "empty.yaml").write_text("")  # NORM and ACTIVATION: today's defaults (the schema's)
    cfg = load_config(tmp_path / "empty.yaml", [*TINY_NET, f"MODEL_WEIGHTS={path}"])
    assert (cfg.NORM, cfg.ACTIVATION) == ("instance", "leaky_relu")
    with pytest.raises(CheckpointError, match=rf"MODEL_WEIGHTS='{path}' was trained with NORM=batch, but this run "
                                              r"has NORM=instance: the normalisation layers hold different weights "
                                              r"\(BatchNorm keeps running statistics, InstanceNorm and GroupNorm "
                                              r"normalise each sample by its own\); use NORM=batch, or leave "
                                              r"MODEL_WEIGHTS out to train NORM=instance from scratch"):
        build_network(cfg)
    cfg = load_config(tmp_path / "empty.yaml", [*TINY_NET, f"MODEL_WEIGHTS={path}", "NORM=batch"])
    with pytest.raises(CheckpointError, match=r"was trained with ACTIVATION=relu, but this run has "
                                              r"ACTIVATION=leaky_relu: its weights were learnt for the other "
                                              r"activation; use ACTIVATION=relu"):
        build_network(cfg)
    net, report = build_network(load_config(None, [*TINY_NET, f"MODEL_WEIGHTS={path}", "NORM=batch",
                                                   "ACTIVATION=relu"]))
    assert not report.initialised and isinstance(net.inc[1], torch.nn.BatchNorm2d)


@pytest.mark.parametrize("saved, asked", [("instance", "group"), ("group", "instance"), ("instance", "batch"),
                                          ("batch", "group")])
def test_model_weights_of_another_norm_are_refused(tmp_path, saved, asked):
    """Without the check, batch -> instance/group dropped the statistics silently and instance <-> group
    loaded scale and shift of the same shape into layers that mean something else."""
    path = write_checkpoint(tmp_path / "w.pth", load_config(None, [*TINY_NET, f"NORM={saved}"]))
    with pytest.raises(CheckpointError, match=rf"was trained with NORM={saved}, but this run has NORM={asked}"):
        build_network(load_config(None, [*TINY_NET, f"NORM={asked}", f"MODEL_WEIGHTS={path}"]))


def test_bare_weights_are_told_apart_by_batchnorm_statistics(tmp_path):
    for saved, asked, trained in (("batch", "instance", "NORM=batch"), ("group", "batch", "NORM=instance or NORM=group")):
        path = tmp_path / f"{saved}.pth"
        torch.save(build_network(load_config(None, [*TINY_NET, f"NORM={saved}"]))[0].state_dict(), path)
        with pytest.raises(CheckpointError, match=rf"was trained with {trained}, but this run has NORM={asked}: .*; "
                                                  rf"use {trained}, or leave"):
            build_network(load_config(None, [*TINY_NET, f"NORM={asked}", f"MODEL_WEIGHTS={path}"]))
    path = tmp_path / "instance.pth"  # bare weights do not tell instance from group: both load
    torch.save(build_network(load_config(None, [*TINY_NET, "NORM=instance"]))[0].state_dict(), path)
    assert build_network(load_config(None, [*TINY_NET, "NORM=group", f"MODEL_WEIGHTS={path}"]))[1].loaded


def test_resuming_a_run_made_before_norm_existed_names_its_norm(tmp_path, defaults_changed):
    (tmp_path / "empty.yaml").write_text("")
    cfg = load_config(tmp_path / "empty.yaml", TINY_NET)
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("NORM", "ACTIVATION")}
    assert resume_problems(saved, cfg, tmp_path) == [
        f"NORM=instance but the run in {tmp_path} was made with NORM=batch: resuming cannot change it; use "
        f"NORM=batch, or start a new run (another RUN_ID) with MODEL_WEIGHTS={tmp_path}/last",
        f"ACTIVATION=leaky_relu but the run in {tmp_path} was made with ACTIVATION=relu: resuming cannot change it; "
        f"use ACTIVATION=relu, or start a new run (another RUN_ID) with MODEL_WEIGHTS={tmp_path}/last",
    ]


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_instance_and_group_norm_checkpoints_are_predicted_whole_as_monai_slides_them(tmp_path, norm):
    """``predict`` of a 3-class network on an 80 x 112 image in 32² windows (sides 32 + a multiple of
    16, where MONAI's windows are ours): the written mask is the argmax of MONAI's sliding window
    inference; gated, it runs and writes a mask of the classes."""
    from monai.inferers import sliding_window_inference

    cfg = load_config(None, [*TINY_NET, f"NORM={norm}", "ACTIVATION=leaky_relu", "SEG_CLASSES=3",
                             "LOSS=CE_SoftDICE"])
    torch.manual_seed(0)
    path = write_checkpoint(tmp_path / "best.pth", cfg)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60, (80, 112), dtype=np.uint8)
    pixels[20:60, 30:90] += 150
    pixels[:, 96:] = 128  # a uniform strip: whole windows of one value
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    read = predict_config(path, f"INPUT={tmp_path / 'scene.png'}", f"OUTPUT={tmp_path / 'plain'}", "GATING=false",
                          "MIXED_PRECISION=none")
    assert predict(read) == 0
    net = read.net.eval()
    with torch.no_grad():
        ref = sliding_window_inference(torch.from_numpy(pixels / 255.0).float()[None, None], (32, 32), 4,
                                       lambda x: torch.softmax(net(x).seg, 1), overlap=0.5, mode="gaussian",
                                       sigma_scale=0.125)[0].argmax(0).numpy()
    written = np.asarray(Image.open(tmp_path / "plain" / "scene_mask.png"))
    np.testing.assert_array_equal(written, ref)
    gated = predict_config(path, f"INPUT={tmp_path / 'scene.png'}", f"OUTPUT={tmp_path / 'gated'}", "GATING=true",
                           "MIXED_PRECISION=none")
    assert gated.cfg.GATING and predict(gated) == 0
    mask = np.asarray(Image.open(tmp_path / "gated" / "scene_mask.png"))
    assert mask.shape == (80, 112) and set(np.unique(mask)) <= {0, 1, 2}
