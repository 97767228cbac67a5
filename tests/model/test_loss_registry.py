"""Tests for model/losses/registry.py: the one list of loss names (the same as the LOSS line of the
schema), each term built from the options by its own class, the rules of a combination, and the
errors that list the valid names."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from configs.schema import FIELDS
from model.losses import (
    LOSS_HEADS,
    LOSSES,
    BoundaryLoss,
    CombinedLoss,
    LossOptions,
    build_loss,
    loss_problems,
    parse_loss,
)

VALID = ("BCE, CE, wBCE, Focal, SoftDICE, HardDICE, IoU, GDL, MAE, cMAE, sMAE, Boundary, wCE, clDice")


def documented_names() -> list[str]:
    """The loss names that the schema's LOSS line documents (``terms joined by `_`: BCE CE ...``)."""
    return FIELDS["LOSS"].metadata["doc"].split(":", 1)[1].split()


# --------------------------------------------------------------------------------------- one registry


def test_the_schema_documents_exactly_the_registry():
    assert documented_names() == list(LOSSES)
    assert ", ".join(LOSSES) == VALID


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_documented_name_builds_for_each_head_it_supports(name):
    assert name in documented_names()
    for k, head in ((1, "binary"), (3, "multiclass")):
        if head not in LOSS_HEADS[name]:
            with pytest.raises(ValueError, match=f"{name} does not support SEG_CLASSES={k} \\({head} head\\)"):
                build_loss(name, seg_classes=k)
            continue
        loss = build_loss(name, seg_classes=k)
        assert isinstance(loss, CombinedLoss) and list(loss.seg_terms) == [name]
        assert type(loss.seg_terms[name]) is LOSSES[name]
        x = torch.linspace(-2, 2, 2 * k * 8 * 8).view(2, k, 8, 8)
        y = (torch.arange(2 * 8 * 8).view(2, 8, 8) // 5) % max(k, 2)
        assert torch.isfinite(loss(x, y).total)


def test_an_unknown_name_lists_every_valid_name():
    with pytest.raises(ValueError) as err:
        parse_loss("SoftDICE_Xyz")
    assert str(err.value) == f"unknown loss term 'Xyz'. Valid names: {VALID}"
    with pytest.raises(ValueError) as err:
        build_loss("softdice_Boundry")
    # the hint ignores case and keeps the registry's spelling (utils.choices.did_you_mean, cutoff 0.5)
    assert str(err.value) == ("unknown loss term 'softdice' (did you mean 'SoftDICE'?); unknown loss term 'Boundry' "
                              f"(did you mean 'Boundary'?). Valid names: {VALID}")
    assert loss_problems(["Xyz"], 1) == [f"unknown loss term 'Xyz'; valid names: {VALID}"]


OPTIONS = LossOptions(
    seg_classes=3, include_background=True, batch_dice=False, sdm_distance="manhattan", sdm_normalization="minmax", sdm_kernel_size=5,
    clamp_delta=0.3, sigmoid_steepness=4.0, seg_threshold=0.3, wce_w0=3.0, wce_sigma=2.0, wbce_w0=2.0,
    wbce_sigma=1.5, focal_gamma=1.5, focal_alpha=0.25, cldice_iterations=3,
)
SDM = {"distance": "manhattan", "normalization": "minmax", "kernel_size": 5}
EXPECTED = {  # what each term takes from OPTIONS
    "BCE": {}, "CE": {},
    "wBCE": {"w0": 2.0, "sigma": 1.5, "distance": "manhattan"},
    "Focal": {"gamma": 1.5, "alpha": 0.25},
    "SoftDICE": {"include_background": True, "batch_dice": False},
    "HardDICE": {"include_background": True, "steepness": 4.0, "threshold": 0.3, "batch_dice": False},
    "IoU": {"include_background": True, "batch_dice": False},
    "GDL": {"include_background": True, "batch_dice": False},
    "MAE": SDM,
    "cMAE": {**SDM, "delta": 0.3},
    "sMAE": {**SDM, "steepness": 4.0},
    "Boundary": {"distance": "manhattan", "normalization": "minmax", "nonnegative": False},
    "wCE": {"w0": 3.0, "sigma": 2.0, "chunk": 32},
    "clDice": {"include_background": True, "iterations": 3},
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_each_loss_reads_its_own_options(name):
    term = LOSSES[name].from_options(OPTIONS)
    assert type(term) is LOSSES[name]
    assert {key: getattr(term, key) for key in EXPECTED[name]} == EXPECTED[name]


def test_boundary_is_shifted_under_learned_weights_only():
    for weighting, shifted in (("static", False), ("schedule", False), ("adaptive", True)):
        term = BoundaryLoss.from_options(dataclasses.replace(OPTIONS, weighting=weighting))
        assert (term.nonnegative, term.can_be_negative) == (shifted, not shifted)
    assert build_loss("SoftDICE_Boundary", weighting="adaptive").seg_terms["Boundary"].nonnegative


# --------------------------------------------------------------------------------------- names and rules


def test_registry_names_and_heads():
    assert list(LOSSES) == ["BCE", "CE", "wBCE", "Focal", "SoftDICE", "HardDICE", "IoU", "GDL",
                            "MAE", "cMAE", "sMAE", "Boundary", "wCE", "clDice"]
    assert LOSS_HEADS["BCE"] == ("binary",)
    assert LOSS_HEADS["CE"] == ("multiclass",)
    assert all(LOSS_HEADS[n] == ("binary", "multiclass") for n in LOSSES if n not in ("BCE", "CE"))


def test_parse_loss():
    assert parse_loss("SoftDICE_Boundary") == ["SoftDICE", "Boundary"]
    assert parse_loss("wBCE") == ["wBCE"]


def test_parse_loss_reports_every_unknown_term_with_suggestions():
    expected = r"'softdice' \(did you mean 'SoftDICE'\?\).*'Boundry' \(did you mean 'Boundary'\?\).*Valid names: BCE, CE"
    with pytest.raises(ValueError, match=expected):
        parse_loss("softdice_BCE_Boundry")
    with pytest.raises(ValueError, match="empty term"):
        parse_loss("SoftDICE__BCE")
    with pytest.raises(ValueError, match="repeated"):
        parse_loss("BCE_SoftDICE_BCE")
    with pytest.raises(ValueError, match="is empty"):
        parse_loss("")
    with pytest.raises(ValueError, match="CLS is added by CLS_CLASSES"):
        parse_loss("SoftDICE_CLS")


def test_loss_problems():
    assert loss_problems(["SoftDICE", "BCE"], 1) == []
    assert loss_problems(["SoftDICE", "CE", "Boundary"], 3) == []
    (msg,) = loss_problems(["SoftDICE", "BCE"], 3)
    assert "BCE" in msg and "use CE" in msg
    (msg,) = loss_problems(["CE"], 1)
    assert "use BCE" in msg
    assert len(loss_problems(["SoftDICE", "BCE"], 1, weighting="schedule")) == 1
    assert len(loss_problems(["Boundary"], 1, weighting="schedule")) == 1
    assert loss_problems(["SoftDICE", "Boundary"], 1, weighting="schedule") == []


def test_build_loss_reports_every_problem():
    with pytest.raises(ValueError, match=r"BCE does not support SEG_CLASSES=3.*STATIC_WEIGHTS has 1 weight"):
        build_loss("SoftDICE_BCE", seg_classes=3, static_weights=[1.0])
    with pytest.raises(ValueError, match="ADAPTIVE_WEIGHTS=true learns the weights"):
        build_loss("SoftDICE_BCE", seg_classes=1, weighting="adaptive", static_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="weighting='learned' is not one of"):
        build_loss("SoftDICE_BCE", seg_classes=1, weighting="learned")
    with pytest.raises(ValueError, match="sdm_distance='taxicab' is not one of"):
        build_loss("Boundary", seg_classes=1, sdm_distance="taxicab")
    with pytest.raises(ValueError, match="sdm_kernel_size=4"):
        build_loss("MAE", seg_classes=1, sdm_kernel_size=4)
    with pytest.raises(ValueError, match="focal_alpha=2"):
        build_loss("Focal", seg_classes=1, focal_alpha=2)
