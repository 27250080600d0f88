"""The settings model: validation, aliases, GPTQModel-style ``dynamic`` resolution."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gptq_compat.config import CalibrationConfig, QuantizeConfig, WorkerConfig


def test_defaults_are_the_common_recipe():
    cfg = QuantizeConfig()
    assert (cfg.bits, cfg.group_size, cfg.sym) == (4, 128, True)
    # measured in bench/quality.py: act-order with static groups and GPTAQ, no grid search
    assert (cfg.desc_act, cfg.static_groups, cfg.gptaq, cfg.mse) == (True, True, True, 0.0)
    assert cfg.checkpoint_format.value == "gptq" and cfg.damp_percent == 0.01
    assert CalibrationConfig(dataset="x").resolved() == (128, 2048)
    assert CalibrationConfig(dataset="x", profile="code").resolved() == (256, 2048)
    assert CalibrationConfig(dataset="x", profile="long-context", seqlen=1024).resolved() == (
        128,
        1024,
    )


def test_camel_case_aliases_for_the_crd():
    cfg = QuantizeConfig.model_validate(
        {"groupSize": 64, "descAct": True, "checkpointFormat": "gptq_v2"}
    )
    assert (cfg.group_size, cfg.desc_act, cfg.checkpoint_format.value) == (64, True, "gptq_v2")
    assert "groupSize" in cfg.model_dump(by_alias=True)


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"bits": 5}, "bits"),
        ({"group_size": 0}, "group_size"),
        ({"damp_percent": 0}, "damp"),
        ({"checkpoint_format": "awq"}, "checkpoint_format"),
        ({"colour": 1}, "colour"),
    ],
)
def test_invalid_settings(settings, field):
    with pytest.raises(ValidationError, match=field):
        QuantizeConfig(**settings)


def test_dynamic_negative_rules_first_then_first_positive_match():
    cfg = QuantizeConfig(
        bits=4,
        dynamic={
            r"+:.*\.mlp\..*": {"bits": 8},
            r"+:.*\.down_proj": {"bits": 2},  # never reached for mlp: the rule above wins
            r"-:model\.layers\.0\.mlp\.down_proj": {},
            r".*\.o_proj": {"group_size": 32, "desc_act": True},
        },
    )
    assert cfg.for_module("model.layers.0.mlp.down_proj") is None
    assert cfg.for_module("model.layers.1.mlp.down_proj").bits == 8
    o = cfg.for_module("model.layers.3.self_attn.o_proj")
    assert (o.bits, o.group_size, o.desc_act) == (4, 32, True)
    assert cfg.for_module("model.layers.3.self_attn.q_proj").bits == 4
    # re.match anchors at the start, as GPTQModel and vLLM do
    assert QuantizeConfig(dynamic={"-:mlp": {}}).for_module("model.layers.0.mlp.up") is not None


def test_dynamic_validation():
    with pytest.raises(ValidationError, match="not a valid regex"):
        QuantizeConfig(dynamic={"+:(": {}})
    with pytest.raises(ValidationError, match="overridable keys"):
        QuantizeConfig(dynamic={"+:x": {"format": "awq"}})
    with pytest.raises(ValidationError, match="bits"):
        QuantizeConfig(dynamic={"+:x": {"bits": 7}})


def test_output_may_not_be_the_model(tmp_path):
    with pytest.raises(ValidationError, match="output must differ from model"):
        WorkerConfig(
            model=str(tmp_path), output=str(tmp_path), calibration=CalibrationConfig(dataset="x")
        )
