import dataclasses

import pytest

from llmlab import config
from llmlab.config import field
from llmlab.errors import LlmlabError


@dataclasses.dataclass
class Optim:
    lr: float = field(1e-3, help="learning rate")
    betas: list[float] = field([0.9, 0.95])
    schedule: str = "cosine"


@dataclasses.dataclass
class Train:
    model: str = "tiny-llama"
    steps: int = 10
    stride: int | None = None
    bf16: bool = False
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides_layer_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\noptim:\n  lr: 0.01\n  schedule: linear\n")
    cfg = config.load(Train, path, {"optim.lr": "3e-4", "bf16": "true", "stride": "none"})
    assert cfg.steps == 20 and cfg.optim.lr == 3e-4 and cfg.optim.schedule == "linear"
    assert cfg.bf16 is True and cfg.stride is None and cfg.optim.betas == [0.9, 0.95]


def test_int_in_yaml_is_accepted_for_float_but_not_bool_for_int(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 1}\n")
    assert config.load(Train, path).optim.lr == 1.0
    path.write_text("steps: true\n")
    with pytest.raises(LlmlabError, match="config.steps expects int"):
        config.load(Train, path)


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(LlmlabError, match=r"unknown option '--optim.lrr' \(did you mean '--optim.lr'\?\)"):
        config.load(Train, None, {"optim.lrr": "1"})
    path = tmp_path / "c.yaml"
    path.write_text("stesp: 3\n")
    with pytest.raises(LlmlabError, match=r"'config.stesp' \(did you mean 'steps'\?\)"):
        config.load(Train, path)


def test_wrong_value_types_are_named(tmp_path):
    with pytest.raises(LlmlabError, match="--steps expects an integer, got 'ten'"):
        config.load(Train, None, {"steps": "ten"})
    with pytest.raises(LlmlabError, match="--bf16 expects true or false"):
        config.load(Train, None, {"bf16": "maybe"})
    path = tmp_path / "c.yaml"
    path.write_text("optim: 3\n")
    with pytest.raises(LlmlabError, match="config.optim must be a mapping"):
        config.load(Train, path)


def test_list_override_is_comma_separated():
    assert config.load(Train, None, {"optim.betas": "0.8,0.9"}).optim.betas == [0.8, 0.9]


def test_bad_yaml_and_missing_file_are_clear(tmp_path):
    with pytest.raises(LlmlabError, match="config file not found"):
        config.load(Train, tmp_path / "nope.yaml")
    path = tmp_path / "bad.yaml"
    path.write_text("steps: [1,\n")
    with pytest.raises(LlmlabError, match="is not valid YAML"):
        config.load(Train, path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(LlmlabError, match="must hold a mapping"):
        config.load(Train, path)


def test_describe_and_bool_keys_flatten_sections():
    options = [row[0] for row in config.describe(Train)]
    assert "--optim.lr" in options and "--steps" in options
    assert config.bool_keys(Train) == {"bf16"}


@dataclasses.dataclass
class WithOptions:
    method: str = "lora"
    adapter: dict = field({}, help="the method's own options")
    optim: Optim = field(default_factory=Optim)


def test_dict_field_takes_section_key_overrides_as_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  r: 8\n  dropout: 0.1\n")
    cfg = config.load(WithOptions, path, {"adapter.r": "16", "adapter.use-rslora": "true",
                                          "adapter.targets": "[q_proj, v_proj]", "adapter.name": "x",
                                          "adapter.layers.first": "2", "optim.lr": "0.5"})
    assert cfg.adapter == {"r": 16, "dropout": 0.1, "use_rslora": True, "targets": ["q_proj", "v_proj"],
                           "name": "x", "layers": {"first": 2}}
    assert cfg.optim.lr == 0.5 and config.load(WithOptions).adapter == {}
    with pytest.raises(LlmlabError, match="--adapter.r expects a YAML value"):
        config.load(WithOptions, None, {"adapter.r": "[1,"})
    with pytest.raises(LlmlabError, match=r"unknown option '--adapterr.r' \(did you mean '--adapter"):
        config.load(WithOptions, None, {"adapterr.r": "1"})


def test_yaml_numbers_that_yaml_reads_as_strings_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: '20'\noptim: {lr: 1e-3}\n")  # YAML 1.1 reads 1e-3 (no dot) as a string
    cfg = config.load(Train, path)
    assert cfg.optim.lr == 1e-3 and cfg.steps == 20
    path.write_text("optim: {lr: fast}\n")
    with pytest.raises(LlmlabError, match="config.optim.lr expects a number, got 'fast'"):
        config.load(Train, path)


def test_a_list_option_inside_a_free_form_section_parses_from_the_command_line(tmp_path):
    @dataclasses.dataclass
    class Method:
        targets: list[str] = field([])
        r: int = 8

    @dataclasses.dataclass
    class Verb:
        adapter: dict = field({})

    cfg = config.load(Verb, None, {"adapter.targets": "q_proj,v_proj", "adapter.r": "16"})
    assert config.build(Method, cfg.adapter) == Method(targets=["q_proj", "v_proj"], r=16)
    cfg = config.load(Verb, None, {"adapter.targets": "all-linear"})
    assert config.build(Method, cfg.adapter).targets == ["all-linear"]


def test_help_shows_types_once_per_default_and_no_double_space(capsys):
    from llmlab.cli import main

    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: llmlab finetune [options]")
    assert "--max-len INT" in out and "--train.lr FLOAT" in out and "--train.betas FLOAT,…" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("--train.max-steps"))
    assert "(default: --train.epochs" in line and "[default:" not in line
