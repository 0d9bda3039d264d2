"""`python -m posttrain.generate`: sampling from a pretraining run. A tiny V3 trains 2 steps through
`python -m pretrain` (one process, and pp2 on two ranks), then the command prints prompt + continuation,
repeats itself under a seed, decodes greedily as the Generator does, loads the EMA and the pp2
checkpoint, and refuses bad input with one `error:` line naming the flag (exit 2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.generate import Generator, SamplingParams, load_for_sampling, main

ROOT = Path(__file__).resolve().parents[1]
SEP = "---------------\n"


def _train(corpus, run_dir, nproc=1, **extra):
    o = {"model.preset": "tiny-deepseek-v3", "model.vocab_size": 512, "model.n_layers": 2, "model.dim": 32,
         "model.max_seq_len": 64, "data.cache_dir": str(corpus), "data.vocab_size": 512,
         "data.corpus_bytes": 400_000, "data.seq_len": 32, "data.split": "90,10,0", "train.steps": 2,
         "train.warmup_steps": 1, "train.micro_batch_size": 2, "train.global_batch_size": 8,
         "train.eval_every": 0, "logging.wandb": "disabled", "logging.run_dir": str(run_dir), **extra}
    args = ["--config", str(ROOT / "configs/pretrain/tiny_v3.yaml")] + [f"{k}={v}" for k, v in o.items()]
    launch = [sys.executable, "-m", "pretrain"] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pretrain"]
    r = subprocess.run(launch + args, cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """One process (pp1 ep1), EMA on."""
    return _train(corpus, tmp_path_factory.mktemp("sample") / "run", **{
        "parallel.pp": 1, "parallel.ep": 1, "train.batch_ramp": "[]", "train.ema_decay": 0.5})


def _sample(capsys, *argv):
    assert main(["--checkpoint", *argv]) == 0
    return _split(capsys.readouterr().out)


def _split(out: str) -> list[str]:
    """The samples of the command's stdout: each is followed by a newline and the separator line."""
    *samples, rest = out.split("\n" + SEP)
    assert rest == "", out
    return samples


def test_prints_prompt_then_continuation_and_repeats_under_a_seed(run, capsys):
    args = [str(run), "--prompt", "def ", "--prompt", "import ", "--num-samples", "2", "--max-new-tokens", "12"]
    samples = _sample(capsys, *args)
    assert len(samples) == 4
    assert all(s.startswith("def ") for s in samples[:2]) and all(s.startswith("import ") for s in samples[2:])
    assert sum(len(s) for s in samples) > len("def import ") * 2     # something was generated
    assert _sample(capsys, *args) == samples                          # same seed: same text
    assert _sample(capsys, *args, "--seed", "1") != samples


def test_greedy_equals_the_generator_and_weights_equal_the_checkpoint(run, capsys):
    from parallel.checkpoint import latest_checkpoint, read_full_model_state
    net, tok, info = load_for_sampling(run)
    assert info["step_dir"] == latest_checkpoint(run / "checkpoints") and info["step"] == 2
    saved, _ = read_full_model_state(info["step_dir"])
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items() if k in saved)
    prompt = tok.encode("class ")
    (c,), _ = Generator(net, tok).generate([prompt], SamplingParams(max_new_tokens=10, temperature=0))
    want = tok.decode([t for t in prompt + c.ids if t != tok.eod_id])
    got = _sample(capsys, str(info["step_dir"]), "--prompt", "class ", "--temperature", "0", "--num-samples", "1",
                  "--max-new-tokens", "10", "--seed", "7")
    assert got == [want]
    # --ema loads other weights: the EMA (decay 0.5 over 2 steps) lags the final ones
    ema = dict(load_for_sampling(run, ema=True)[0].named_parameters())
    assert any(not torch.equal(p, ema[k]) for k, p in net.named_parameters())


def test_subprocess_with_prompt_file_and_tokenizer(run, tmp_path):
    meta = json.loads(next((run / "checkpoints").glob("step_*/meta.json")).read_text())
    assert meta["model_config"]["vocab_size"] == 512
    tok = next(Path(meta["config"]["data"]["cache_dir"]).glob("corpus/*/tokenizer.model"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("for i in \n\nwhile \n")
    r = subprocess.run([sys.executable, "-m", "posttrain.generate", "--checkpoint", str(run / "checkpoints"),
                        "--prompt-file", str(prompts), "--tokenizer", str(tok), "--num-samples", "1",
                        "--max-new-tokens", "6", "--top-k", "20", "--top-p", "0.9", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    samples = _split(r.stdout)
    assert len(samples) == 2 and samples[0].startswith("for i in ") and samples[1].startswith("while ")
    assert "step 2" in r.stderr and "tokens/s" in r.stderr


def test_pp2_checkpoint_loads_in_one_process(corpus, tmp_path, capsys):
    """DualPipeV's pp2 x ep2 layout is the demo's; plain 1F1B pp2 on two ranks is the cheap one to train."""
    run = _train(corpus, tmp_path / "pp2", nproc=2, **{"parallel.pp": 2, "parallel.ep": 1,
                                                       "parallel.pp_schedule": "1f1b", "train.batch_ramp": "[]",
                                                       "train.ema_decay": 0})
    from parallel.checkpoint import latest_checkpoint, read_full_model_state
    saved, _ = read_full_model_state(latest_checkpoint(run / "checkpoints"))
    net, _, _ = load_for_sampling(run)
    assert all(torch.equal(v, saved[k]) for k, v in net.state_dict().items() if k in saved)
    assert _sample(capsys, str(run), "--prompt", "def ", "--num-samples", "1", "--max-new-tokens", "4")[0] \
        .startswith("def ")
    assert main(["--checkpoint", str(run), "--ema"]) == 2
    assert "--ema" in capsys.readouterr().err


def _big_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i + 2 for i in range(600)}}
    Tokenizer(WordLevel(vocab, unk_token="<unk>")).save(str(path))
    return path


@pytest.mark.parametrize("case", ["missing", "no-checkpoint", "tokenizer", "temperature", "top-p-0", "top-p-big",
                                  "too-long", "top-k", "cuda"])
def test_bad_input_is_one_error_line(run, tmp_path, capsys, case):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    argv, flag = {
        "missing": (["--checkpoint", str(tmp_path / "nope")], "--checkpoint"),
        "no-checkpoint": (["--checkpoint", str(empty)], "--checkpoint"),
        "tokenizer": (["--checkpoint", str(run), "--tokenizer", str(_big_tokenizer(tmp_path / "tokenizer.json"))],
                      "--tokenizer"),
        "temperature": (["--checkpoint", str(run), "--temperature", "-1"], "--temperature"),
        "top-p-0": (["--checkpoint", str(run), "--top-p", "0"], "--top-p"),
        "top-p-big": (["--checkpoint", str(run), "--top-p", "1.5"], "--top-p"),
        "too-long": (["--checkpoint", str(run), "--max-new-tokens", "100"], "--max-new-tokens"),
        "top-k": (["--checkpoint", str(run), "--top-k", "-2"], "--top-k"),
        "cuda": (["--checkpoint", str(run), "--device", "cuda"], "--device"),
    }[case]
    assert main(argv) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], out.err
