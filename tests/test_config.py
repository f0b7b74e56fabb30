"""Config: YAML files then CLI overrides through HfArgumentParser (CLI wins), clear errors for
unknown keys and wrong types, and the resolved config's round trip."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from vlm_grpo_ma.config import ConfigError, JsonObject, config_to_dict, load_yaml, parse_config, save_config


class Agg(str, enum.Enum):
    TOKEN_MEAN = "token-mean"
    SEQ_MEAN = "seq-mean-token-mean"


@dataclass
class ModelArgs:
    model: str = field(metadata={"help": "Local path, hub id or tiny-model name (required)."})
    dtype: Literal["float32", "bfloat16"] = field(default="float32", metadata={"help": "Weights dtype."})


@dataclass
class RLArgs:
    lr: float = field(default=1e-6, metadata={"help": "Peak learning rate."})
    num_thoughts: int = field(default=4, metadata={"help": "K: thoughts per prompt."})
    use_kl: bool = field(default=True, metadata={"help": "Add the KL term."})
    log_images: bool = field(default=False, metadata={"help": "Log rollout images."})
    loss_agg: Agg = field(default=Agg.TOKEN_MEAN, metadata={"help": "Loss aggregation."})
    tasks: list[str] = field(default_factory=lambda: ["affordance"], metadata={"help": "Tasks to train on."})
    seed: Optional[int] = field(default=None, metadata={"help": "Random seed (None: from time)."})

    def __post_init__(self):
        self.loss_agg = Agg(self.loss_agg)


TYPES = (ModelArgs, RLArgs)


def yaml_file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_and_cli_only():
    m, r = parse_config(TYPES, ["--model", "tiny-qwen2-vl"])
    assert m == ModelArgs(model="tiny-qwen2-vl")
    assert r == RLArgs()


def test_yaml_then_cli_precedence(tmp_path):
    base = yaml_file(tmp_path, "base.yaml", "model: tiny-qwen2.5-vl\nlr: 1e-4\nnum_thoughts: 8\nuse_kl: false\ntasks: [detection, trajectory]\n")
    exp = yaml_file(tmp_path, "exp.yaml", "num_thoughts: 2\nloss_agg: seq-mean-token-mean\n")
    m, r = parse_config(TYPES, ["--config", base, "--config", exp, "--lr", "3e-5", "--log_images"])
    assert m.model == "tiny-qwen2.5-vl" and m.dtype == "float32"
    assert r.lr == 3e-5  # the CLI wins over the file ("1e-4" is a YAML string, read as a float)
    assert r.num_thoughts == 2  # the later file wins over the earlier one
    assert r.use_kl is False and r.log_images is True
    assert r.loss_agg is Agg.SEQ_MEAN and r.tasks == ["detection", "trajectory"]
    # a file value overridden back on the command line, and a list override
    _, r = parse_config(TYPES, ["--config", base, "--use_kl", "true", "--tasks", "vqa", "--num_thoughts", "5"])
    assert r.use_kl is True and r.tasks == ["vqa"] and r.num_thoughts == 5
    # the required field given by the file only: fine; given nowhere: argparse's usage error
    with pytest.raises(SystemExit):
        parse_config(TYPES, ["--config", exp])


def test_unknown_yaml_key_names_key_and_file(tmp_path):
    p = yaml_file(tmp_path, "bad.yaml", "model: x\nnum_thought: 3\n")
    with pytest.raises(ConfigError) as e:
        parse_config(TYPES, ["--config", p])
    msg = str(e.value)
    assert msg.startswith(f"{p}: unknown config key 'num_thought'") and "did you mean 'num_thoughts'" in msg


@pytest.mark.parametrize(
    "text, match",
    [
        ("num_thoughts: four\n", "key 'num_thoughts': cannot read 'four' as int"),
        ("num_thoughts: 2.5\n", "key 'num_thoughts': cannot read 2.5 as int"),
        ("lr: true\n", "key 'lr' must be a number"),
        ("dtype: float16\n", r"key 'dtype': 'float16' is not one of \['float32', 'bfloat16'\]"),
        ("loss_agg: sum\n", "key 'loss_agg': 'sum' is not one of"),
        ("use_kl: maybe\n", "key 'use_kl': cannot read 'maybe'"),
        ("- a\n- b\n", "must be a mapping"),
        ("lr: [1\n", "invalid YAML"),
    ],
)
def test_bad_yaml_values_name_file_and_key(tmp_path, text, match):
    p = yaml_file(tmp_path, "c.yaml", "model: x\n" + text if not text.startswith("-") else text)
    with pytest.raises(ConfigError, match=match) as e:
        parse_config(TYPES, ["--config", p])
    assert str(e.value).startswith(p)


def test_bad_cli_argument_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"command line: .*\['--bogus', '1'\]"):
        parse_config(TYPES, ["--model", "x", "--bogus", "1"])
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(TYPES, ["--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(SystemExit):  # a malformed CLI value: argparse's usage error
        parse_config(TYPES, ["--model", "x", "--lr", "fast"])


def test_resolved_config_round_trip(tmp_path):
    base = yaml_file(tmp_path, "base.yaml", "model: m\nlr: 0.001\n")
    resolved = parse_config(TYPES, ["--config", base, "--seed", "7", "--loss_agg", "seq-mean-token-mean", "--no_use_kl"])
    out = save_config(resolved, tmp_path / "run" / "config.yaml")
    d = load_yaml(out, TYPES)
    assert d == {
        "model": "m",
        "dtype": "float32",
        "lr": 0.001,
        "num_thoughts": 4,
        "use_kl": False,
        "log_images": False,
        "loss_agg": "seq-mean-token-mean",
        "tasks": ["affordance"],
        "seed": 7,
    }
    assert config_to_dict(resolved) == d
    again = parse_config(TYPES, ["--config", out])
    assert again == resolved


def test_single_type_and_help_lists_fields(capsys):
    (r,) = parse_config(RLArgs, ["--lr", "0.5"])
    assert r.lr == 0.5
    with pytest.raises(SystemExit):
        parse_config(TYPES, ["--help"])
    out = capsys.readouterr().out
    assert "--num_thoughts" in out and "K: thoughts per prompt." in out and "--config FILE.yaml" in out


def test_yaml_number_for_a_string_field_is_the_string(tmp_path):
    p = yaml_file(tmp_path, "n.yaml", "model: 123\nseed: 3\n")
    m, r = parse_config(TYPES, ["--config", p])
    assert m.model == "123" and r.seed == 3


@dataclass
class WithJson:
    name: str = field(default="x", metadata={"help": "A name."})
    opts: Optional[JsonObject] = field(default=None, metadata={"help": "A JSON object."})


def test_json_object_field_from_yaml_mapping_and_cli_string(tmp_path):
    (a,) = parse_config(WithJson, ["--opts", '{"b": 2,  "a": [1, 2]}'])
    assert json.loads(a.opts) == {"b": 2, "a": [1, 2]} and a.opts == '{"b": 2, "a": [1, 2]}'  # canonical
    cfg = tmp_path / "c.yaml"
    cfg.write_text("opts:\n  scale: 1.5\n  mode: points\n")
    (b,) = parse_config(WithJson, ["--config", str(cfg)])
    assert json.loads(b.opts) == {"scale": 1.5, "mode": "points"}
    (c,) = parse_config(WithJson, ["--config", str(cfg), "--opts", '{"scale": 2}'])  # the CLI wins whole
    assert json.loads(c.opts) == {"scale": 2}
    saved = save_config(b, tmp_path / "resolved.yaml")
    assert "scale: 1.5" in (tmp_path / "resolved.yaml").read_text()  # a mapping in the file, not a string
    assert parse_config(WithJson, ["--config", saved]) == (b,)
    assert parse_config(WithJson, [])[0].opts is None


@pytest.mark.parametrize("value, match", [("{nope", "not valid JSON"), ("[1, 2]", "must be a JSON object")])
def test_json_object_field_errors_name_the_field(value, match):
    with pytest.raises(ConfigError, match=f"--opts: {match}"):
        parse_config(WithJson, ["--opts", value])
