"""The config system: YAML + dotted overrides, typed, with errors that name the key."""
import os
import subprocess
import sys

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


# -- issue 20 §5: a user's mistake is one `error:` line naming the key, exit 2 -----------------------------
@pytest.mark.parametrize("arg, words", [
    ("train.lr=-1e-3", ["train.lr", ">= 0", "-0.001"]),
    ("train.lr=.nan", ["train.lr", "finite"]),
    ("train.adam_beta1=1.0", ["train.adam_beta1", "[0, 1)"]),
    ("train.adam_beta2=-0.5", ["train.adam_beta2", "[0, 1)"]),
    ("train.adam_eps=0", ["train.adam_eps", "> 0"]),
    ("train.adam_eps=-1e-8", ["train.adam_eps", "> 0"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", ">= 0"]),
    ("train.grad_clip=0", ["train.grad_clip", "> 0", "1e9"]),
    ("train.grad_clip=-1", ["train.grad_clip", "> 0"]),
    ("train.eval_every=-1", ["train.eval_every", ">= 0", "-1"]),
    ("checkpoint.every=-5", ["checkpoint.every", ">= 0", "-5"]),
    ("logging.every=0", ["logging.every", ">= 1"]),
    ("data.seq_len=0", ["data.seq_len", ">= 2"]),
    ("data.seq_len=-8", ["data.seq_len", ">= 2"]),
    ("data.seq_len=512", ["data.seq_len = 512", "model.max_seq_len = 256", "model.max_seq_len=512"]),
    ("data.split=98;2", ["data.split", "malformed"]),
])
def test_bad_numbers_are_named(arg, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [arg])
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_compile_refuses_selective_recompute():
    with pytest.raises(ConfigError, match="parallel.recompute=full or none"):
        load_config(None, ["train.compile=true", "parallel.recompute=selective"])
    assert load_config(None, ["train.compile=true", "parallel.recompute=full"]).train.compile is True


def test_seq_len_follows_the_model_overrides():
    assert load_config(None, ["model.max_seq_len=512", "data.seq_len=512"]).data.seq_len == 512
    with pytest.raises(ConfigError, match=r"data.seq_len = 300 exceeds model.max_seq_len = 256"):
        load_config(None, ["data.seq_len=300"])


def test_posttrain_bad_numbers_are_named():
    from posttrain.config import load_config as load_post
    for arg, words in (("data.seq_len=0", ["data.seq_len", ">= 1"]), ("eval.every=-1", ["eval.every", ">= 0"]),
                       ("grpo.ref_update_every=-2", ["grpo.ref_update_every", ">= 0"]),
                       ("train.lr=-1", ["train.lr"]), ("train.adam_beta2=1", ["train.adam_beta2"])):
        with pytest.raises(ConfigError) as e:
            load_post(None, [arg])
        assert all(w in str(e.value) for w in words), (arg, str(e.value))
    assert load_post(None, ["data.seq_len=4096"]).data.seq_len == 4096   # the stages that pack rows check it


def test_both_clis_share_the_user_errors():
    from parallel.checkpoint import CheckpointError
    from posttrain.config import user_errors as post_errors
    from posttrain.data import DataError as PostDataError
    from posttrain.sandbox import SandboxUnavailable
    from pretrain.config import user_errors
    from pretrain.data import DataError
    assert {ConfigError, DataError, CheckpointError, FileNotFoundError} <= set(user_errors())
    assert ValueError not in user_errors() and OSError not in user_errors()
    # post-training adds its data errors and a code sandbox the kernel will not isolate (fail closed)
    assert set(post_errors()) == set(user_errors()) | {PostDataError, SandboxUnavailable}


def test_duplicate_yaml_keys_are_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4: duplicate key 'train.lr' \(first at line 3\)"):
        load_config(f)
    f.write_text("train:\n  steps: 3\nlogging:\n  every: 2\ntrain:\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"c.yaml:5: duplicate key 'train' \(first at line 1\)"):
        load_config(f)
    f.write_text("train:\n  <<: {steps: 3, lr: 0.1}\n  lr: 0.2\n")   # a `<<:` merge may be overridden beside it
    cfg = load_config(f)
    assert cfg.train.steps == 3 and cfg.train.lr == 0.2
    f.write_text("")
    assert load_config(f) == Config()


def test_config_directory_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 3\n")
    with pytest.raises(ConfigError, match=r"is a directory: give a YAML file; it holds a.yaml"):
        load_config(tmp_path)


PRETRAIN_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in [*(ROOT / "configs/pretrain").rglob("*.yaml"),
                                                                    *(ROOT / "configs/sweeps").glob("*/points/*.yaml")])


@pytest.mark.parametrize("path", PRETRAIN_CONFIGS)
def test_every_pretrain_config_loads(path):
    cfg = load_config(ROOT / path)
    assert cfg.data.seq_len <= cfg.model_config().max_seq_len


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pretrain", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error_line(r, *words):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    assert all(w in lines[0] for w in words), (words, lines[0])


def test_cli_config_directory():
    _one_error_line(_cli("--config", "configs"), "configs is a directory")


def test_main_config_error_once(monkeypatch, capsys):
    from pretrain.__main__ import main
    for rank, expected in (("0", "error: logging.every must be >= 1 (log every N steps), got 0\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)   # under torchrun only rank 0 says it
        assert main(["--config", str(ROOT / "configs/pretrain/tiny_v3.yaml"), "logging.every=0"]) == 2
        out = capsys.readouterr()
        assert out.err == expected and out.out == ""


def test_cli_missing_data_file(tmp_path):
    from pretrain.tokenizer import train_sentencepiece
    tok = train_sentencepiece([f"hello world, the quick brown fox {i}" for i in range(50)], str(tmp_path / "tok"), 320)
    r = _cli("--config", "configs/pretrain/tiny_v3.yaml", "parallel.pp=1", "parallel.ep=1", "logging.wandb=disabled",
             f"logging.run_dir={tmp_path / 'run'}", f"data.paths=[{tmp_path / 'missing'}]", f"data.tokenizer={tok}",
             f"data.cache_dir={tmp_path / 'cache'}")
    _one_error_line(r, "data file missing", str(tmp_path / "missing.idx"), "pretrain.preprocess")


@pytest.mark.parametrize("error, code", [("checkpoint", 2), ("data", 2), ("path", 2), ("nonfinite", 3)])
def test_main_reports_user_errors_once(monkeypatch, capsys, error, code):
    """The run's own errors: one line on rank 0, nothing on the others; a plain bug keeps its traceback."""
    import pretrain.train
    from parallel.checkpoint import CheckpointError
    from pretrain.__main__ import main
    from pretrain.data import DataError
    from pretrain.session import NonFiniteError
    exc = {"checkpoint": CheckpointError("runs/x/checkpoints/step_5 is not a complete checkpoint"),
           "data": DataError("corrupted index data/a.idx: truncated header (3 bytes)"),
           "path": FileNotFoundError("tokenizer not found: /nope/tok.model"),
           "nonfinite": NonFiniteError("4 non-finite steps in a row")}[error]

    def fail(cfg):
        raise exc
    monkeypatch.setattr(pretrain.train, "train", fail)
    for rank, expected in (("0", f"error: {exc}\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        assert main(["--config", str(ROOT / "configs/pretrain/tiny_v3.yaml")]) == code
        out = capsys.readouterr()
        assert out.err == expected and out.out == ""

    def bug(cfg):
        raise ValueError("a bug, not a user's mistake")
    monkeypatch.setattr(pretrain.train, "train", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["--config", str(ROOT / "configs/pretrain/tiny_v3.yaml")])
