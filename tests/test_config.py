"""The config system: YAML + dotted overrides, typed, with errors that name the key."""
import pytest
import yaml

from pretrain.config import Config, ConfigError, config_from_dict, load_config, save_config

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_main_config_loads_and_resolves():
    cfg = load_config(ROOT / "configs/pretrain/tiny_v3.yaml")
    assert cfg.parallel.pp == 2 and cfg.parallel.pp_schedule == "dualpipev"
    mc = cfg.model_config()
    assert mc.name == "tiny-deepseek-v3" and mc.vocab_size == 4096 and mc.n_layers == 4
    assert cfg.train.mtp_lambda == [[0.0, 0.3], [0.676, 0.1]]


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=3e-4", "train.steps=7", "parallel.sp=true", "train.batch_ramp=[8,8,64]",
                             "model.n_layers=5", "logging.wandb_tags=[a,b]", "data.paths=[x,y]"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)   # YAML 1.1 reads 3e-4 as a string
    assert cfg.train.steps == 7 and cfg.parallel.sp is True and cfg.train.batch_ramp == [8, 8, 64]
    assert cfg.model_config().n_layers == 5 and cfg.logging.wandb_tags == ["a", "b"]
    assert cfg.data.paths == ["x", "y"]


@pytest.mark.parametrize("arg, words", [
    ("train.stepz=3", ["train.stepz", "valid train.* keys", "steps"]),
    ("trian.steps=3", ["unknown section", "trian", "train"]),
    ("train.steps=abc", ["train.steps", "integer"]),
    ("train.lr=fast", ["train.lr", "number"]),
    ("parallel.sp=maybe", ["parallel.sp", "true or false"]),
    ("model.n_layerz=2", ["model.n_layerz", "n_layers"]),
    ("model.n_layers=two", ["model.n_layers", "integer"]),
    ("model.preset=gpt5", ["model.preset", "tiny-deepseek-v3"]),
    ("train.dtype=fp16", ["train.dtype", "bf16"]),
    ("parallel.pp_schedule=zigzag", ["parallel.pp_schedule", "dualpipev"]),
    ("train.exit_at_step=500", ["train.exit_at_step", "train.steps"]),
    ("train.steps", ["KEY=VALUE"]),
])
def test_bad_keys_and_values_are_named(arg, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [arg])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n  lr: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    f.write_text("steps: 3\n")
    with pytest.raises(ConfigError, match="must be a section"):
        load_config(f)
    f.write_text("train:\n  micro_batch: 3\n")
    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/pretrain/tiny_v3.yaml", ["train.steps=9"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and isinstance(again, Config)
