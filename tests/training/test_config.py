"""The one config loader: TOML/JSON, nested --set, unknown keys with suggestions, precise type errors."""

import json

import pytest

from rosim.errors import InputError
from rosim.training.config import (
    SupervisedConfig,
    TrainConfig,
    apply_overrides,
    load_config,
    parse_overrides,
)
from rosim.univae.train import VAETrainConfig

BASE = '[model]\nvocab = "build"\n[data]\nsources = [{path = "d.jsonl"}]\n'


def test_nested_set_reaches_inner_tables(tmp_path):
    """--set a.b.c=v sets c inside table b of a (the old stage loader made a key named "b.c")."""
    p = tmp_path / "c.toml"
    p.write_text(BASE + "[model.config]\nhidden_size = 32\n")
    cfg = load_config(p, parse_overrides(["model.config.num_layers=2", "train.steps=7", "train.betas=[0.8, 0.9]"]))
    assert cfg.model.config == {"hidden_size": 32, "num_layers": 2}
    assert cfg.train.steps == 7 and cfg.train.betas == [0.8, 0.9]
    sup = tmp_path / "s.toml"
    sup.write_text('[model]\ninit = "m"\n[supervised]\nbinary = [{path = "a.tsv"}]\n[distill.train]\nsteps = 3\n')
    cfg = load_config(sup, parse_overrides(["distill.train.lr=1e-3", 'train.out_dir="o"']), SupervisedConfig)
    assert cfg.distill == {"train": {"steps": 3, "lr": 1e-3}}
    assert cfg.train.out_dir == str(tmp_path / "o") and cfg.supervised.binary[0].path == str(tmp_path / "a.tsv")
    data = {"train": {"steps": 1}}
    with pytest.raises(InputError, match="train.steps is not a table"):
        apply_overrides(data, {"train.steps.x": 1})
    with pytest.raises(InputError, match="SECTION.KEY=VALUE"):
        parse_overrides(["steps=3"])
    assert parse_overrides(["train.device=cuda:1"]) == {"train.device": "cuda:1"}  # not TOML: a bare string


def test_unknown_keys_suggest_the_closest_name(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(BASE + "[train]\nbatchsize = 4\n[noize]\nrow_prob = 0.1\n")
    with pytest.raises(InputError) as info:
        load_config(p)
    message = str(info.value)
    assert "[train]: unknown keys ['batchsize'] (did you mean 'batch_size' for 'batchsize'?)" in message
    assert "config: unknown keys ['noize'] (did you mean 'noise' for 'noize'?)" in message
    with pytest.raises(InputError, match=r"\[distill\]: unknown keys \['trian'\] \(did you mean 'train'"):
        SupervisedConfig.load({"model": {"init": "m"}, "supervised": {"binary": [{"path": "a"}]},
                               "distill": {"trian": {}}}).validate()


@pytest.mark.parametrize(("table", "message"), [
    ({"train": {"lr": "abc"}}, "[train] lr must be a number, got 'abc'"),
    ({"train": {"betas": 5}}, "[train] betas must be a list of numbers, got 5"),
    ({"train": {"betas": [0.9]}}, "[train] betas must have 2 items"),
    ({"train": {"out_dir": 5}}, "[train] out_dir must be a string, got 5"),
    ({"train": {"steps": 1.5}}, "[train] steps must be an integer, got 1.5"),
    ({"train": {"steps": True}}, "[train] steps must be an integer, got True"),
    ({"train": {"steps": 0}}, "[train] steps must be a positive integer, got 0"),
    ({"train": {"lr": float("nan")}}, "[train] lr must be a finite number"),
    ({"train": {"schedule": "cosin"}}, "[train] schedule must be one of constant, linear, cosine, got 'cosin' "
                                       "(did you mean 'cosine'?)"),
    ({"data": {"sources": [{"path": 5}]}}, "[data] sources[0] path must be a string, got 5"),
    ({"data": {"sources": [{"ratio": 1}]}}, "[data] sources[0] path is required"),
    ({"model": {"dropout": 1.0}}, "[model] dropout must be < 1.0, got 1.0"),
    ({"teacher": 5}, "[teacher] must be a table, got 5"),
])
def test_type_and_range_errors_name_the_key(table, message):
    with pytest.raises(InputError) as info:
        TrainConfig.load(table)
    assert message in str(info.value)


def test_json_config_and_checks_after_assignment(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"model": {"vocab": "build"}, "data": {"sources": [{"path": "d.jsonl"}]},
                             "train": {"steps": 3}}))
    cfg = load_config(p)
    assert cfg.train.steps == 3 and cfg.data.sources[0].path == str(tmp_path / "d.jsonl")
    cfg.validate("stage1")
    cfg.train.steps = -1  # assigned later: validate() checks again
    with pytest.raises(InputError, match=r"\[train\] steps must be a positive integer, got -1"):
        cfg.validate("stage1")
    p.write_text("[1]")
    with pytest.raises(InputError, match="must be a JSON object"):
        load_config(p)


def test_keyword_config_raises_input_error():
    assert VAETrainConfig(steps=3, lr=1e-3).steps == 3
    with pytest.raises(InputError, match="steps must be a positive integer, got 0"):
        VAETrainConfig(steps=0)
    with pytest.raises(InputError, match=r"unknown keys \['step'\] \(did you mean 'steps'"):
        VAETrainConfig(step=3)


def test_one_json_object_parser_for_configs_and_data_lines(tmp_path):
    """A JSON config, a training record and an NLI record are parsed by one function: same faults, same words."""
    from rosim.errors import DataError
    from rosim.training.config import parse_json_object
    from rosim.training.data import PairStream, Source
    from rosim.training.labelled import read_nli_file

    assert parse_json_object('{"a": 1}', "x") == {"a": 1}
    with pytest.raises(InputError, match=r"^x: malformed JSON \(Expecting ',' delimiter at line 2 column 1\)$"):
        parse_json_object('{"a": 1\n"b": 2}', "x")
    with pytest.raises(DataError, match=r"^f:3: expected a JSON object, got list$"):
        parse_json_object("[1]", "f:3", DataError)

    conf = tmp_path / "c.json"
    conf.write_text("{not json")
    with pytest.raises(InputError, match=rf"^{conf}: malformed JSON \(Expecting property name .* at column 2\)$"):
        load_config(conf)
    conf.write_bytes(b'{"train": "\xff"}')
    with pytest.raises(InputError, match=rf"^{conf}: not UTF-8 text \(invalid start byte at byte 11\)$"):
        load_config(conf)

    for name, lines in (("data.jsonl", ['{"text_a": "甲"', '"x"']), ("nli.jsonl", ['{"sentence1": "甲"', '"x"'])):
        path = tmp_path / name
        read = (lambda p: PairStream([Source(str(p))]).next_pair()) if name == "data.jsonl" else read_nli_file
        path.write_text(lines[0] + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"^{path}:1: malformed JSON \(Expecting ',' delimiter at column \d+\)"):
            read(path)
        path.write_text(lines[1] + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"^{path}:1: expected a JSON object.*, got str"):
            read(path)
