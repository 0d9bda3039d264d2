"""python -m model.convert: Hugging Face safetensors <-> whaletron native safetensors.

    python -m model.convert hf-to-native HF_DIR OUT_DIR [--dtype {fp32,bf16}]
    python -m model.convert native-to-hf IN_DIR HF_DIR [--dtype {fp32,bf16}]
    python -m model.convert checkpoint-to-hf CKPT_DIR HF_DIR [--dtype {fp32,bf16}]

Native format: our state_dict names (experts stacked [E, out, in]; the tied head omitted) in
model.safetensors or model-0000i-of-0000N.safetensors + model.safetensors.index.json, beside
whaletron_config.json (= ModelConfig.to_dict()). Both directions stream one tensor at a time and write
one shard at a time; FP8 HF checkpoints are dequantized (to bf16 unless --dtype fp32).

checkpoint-to-hf exports a training checkpoint (parallel/checkpoint.py: a step directory, or a
checkpoint root whose latest is taken), saved under any parallel layout, in one process: the model
tensors are read at their global shapes and the model config comes from the checkpoint's meta.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .config import ModelConfig
from .hf import (_key_error, _natural, _trim_mtp, cast_for_export, check_float, config_from_hf, config_to_hf,
                 iter_from_hf, iter_to_hf, read_hf_config)
from .safetensors_io import SafetensorsDir, ShardWriter, as_dtype, atomic_dir

NATIVE_CONFIG = "whaletron_config.json"
DEFAULT_SHARD_BYTES = 5 * 2**30


def _native_keys(cfg: ModelConfig) -> set[str]:
    from .hf import _expected_shapes

    keys = set(_expected_shapes(cfg))
    if cfg.tie_embeddings:
        keys.discard("head.weight")
    return keys


def hf_to_native(hf_dir, out_dir, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 overwrite: bool = False) -> ModelConfig:
    """Convert a Hugging Face checkpoint directory to the native format; returns its ModelConfig."""
    dtype = as_dtype(dtype)
    d = read_hf_config(hf_dir)
    cfg = config_from_hf(d, str(Path(hf_dir) / "config.json"))
    with SafetensorsDir(hf_dir) as reader:
        keys = reader.keys()
        cfg = _trim_mtp(cfg, keys)
        tensors = iter_from_hf(cfg, keys, reader.get, d, fp8_dtype=dtype or torch.bfloat16)
        with atomic_dir(out_dir, overwrite) as tmp:
            writer = ShardWriter(tmp, max_shard_bytes)
            for k, t in tensors:
                writer.add(k, cast_for_export(k, t, dtype))
            writer.close()
            (tmp / NATIVE_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg


def read_native_config(path) -> ModelConfig:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    f = path / NATIVE_CONFIG
    if not f.is_file():
        hint = " (it has a config.json: is it a Hugging Face checkpoint? use hf-to-native)" \
            if (path / "config.json").is_file() else ""
        raise FileNotFoundError(f"{path} has no {NATIVE_CONFIG}{hint}")
    return ModelConfig.from_dict(json.loads(f.read_text()))


def native_to_hf(in_dir, hf_dir, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                 rope_interleave: bool = True) -> dict:
    """Convert a native checkpoint directory to a Hugging Face one; returns the config.json dict."""
    dtype = as_dtype(dtype)
    cfg = read_native_config(in_dir)
    hf_cfg = config_to_hf(cfg, rope_interleave)  # refuses configs no HF architecture expresses
    with SafetensorsDir(in_dir) as reader:
        present, expected = set(reader.keys()), _native_keys(cfg)
        if present != expected:
            raise _key_error(f"native checkpoint {in_dir}", list(expected - present), list(present - expected),
                             f"(whaletron_config.json: {cfg.n_layers} layers, {cfg.n_mtp} MTP modules)")

        def get(key, index=None):
            t = reader.get(key, index)
            check_float(key, t)
            return t

        return _write_hf(cfg, hf_cfg, get, hf_dir, dtype, max_shard_bytes, overwrite, rope_interleave)


def _write_hf(cfg: ModelConfig, hf_cfg: dict, get, hf_dir, dtype, max_shard_bytes: int, overwrite: bool,
              rope_interleave: bool) -> dict:
    """Stream the native tensors `get(key, index=None)` yields into a Hugging Face directory, atomically."""
    first = None
    with atomic_dir(hf_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        for k, t in iter_to_hf(cfg, get, rope_interleave):
            first = first or t.dtype
            writer.add(k, cast_for_export(k, t, dtype))
        writer.close()
        hf_cfg["dtype"] = str(dtype or first).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return hf_cfg


def checkpoint_to_hf(ckpt_dir, hf_dir, dtype=None, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                     overwrite: bool = False, rope_interleave: bool = True) -> dict:
    """Export a training checkpoint (a step directory or a checkpoint root: its latest) as a Hugging Face
    checkpoint directory; returns the config.json dict."""
    from parallel.checkpoint import read_full_model_state  # keeps torch.distributed out of `import model`

    dtype = as_dtype(dtype)
    state, model_config = read_full_model_state(ckpt_dir)
    if not model_config:
        raise ValueError(f"{ckpt_dir}: the checkpoint's meta.json records no model_config")
    cfg = ModelConfig.from_dict(model_config)
    hf_cfg = config_to_hf(cfg, rope_interleave)
    present, expected = set(state), _native_keys(cfg)
    if present != expected:
        raise _key_error(f"checkpoint {ckpt_dir}", list(expected - present), list(present - expected),
                         f"(its model_config: {cfg.n_layers} layers, {cfg.n_mtp} MTP modules)")

    def get(key, index=None):
        t = state[key]
        return t if index is None else t[index]

    return _write_hf(cfg, hf_cfg, get, hf_dir, dtype, max_shard_bytes, overwrite, rope_interleave)


def load_native(path, dtype=torch.float32, device="cpu"):
    """A native checkpoint directory as an eval-mode Transformer."""
    from .hf import _empty_model

    cfg = read_native_config(path)
    net = _empty_model(cfg, as_dtype(dtype) or torch.float32, device)
    dest = net.state_dict()
    with SafetensorsDir(path) as reader:
        present, expected = set(reader.keys()), _native_keys(cfg)
        if present != expected:
            raise _key_error(f"native checkpoint {path}", list(expected - present), list(present - expected), "")
        with torch.no_grad():
            for k in sorted(present, key=_natural):
                t = reader.get(k)
                check_float(k, t)
                if t.shape != dest[k].shape:
                    raise ValueError(f"{k} has shape {tuple(t.shape)}, the config implies {tuple(dest[k].shape)}")
                dest[k].copy_(t)
    return net.eval()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m model.convert",
        description="Convert checkpoints between Hugging Face safetensors (DeepseekV3ForCausalLM, "
                    "DeepseekV2ForCausalLM, Qwen2ForCausalLM, LlamaForCausalLM; FP8 block-quantized V3 "
                    "weights are dequantized) and whaletron's native safetensors (our parameter names plus "
                    f"{NATIVE_CONFIG}). Tensors stream one at a time; output is written atomically.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp):
        sp.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="cast floating tensors (not the fp32 routing bias) to this dtype; default: keep "
                             "each tensor's dtype (FP8 weights dequantize to bf16)")
        sp.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                        help="largest shard in GiB (default %(default)s); one file when everything fits")
        sp.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")

    a = sub.add_parser("hf-to-native", help="Hugging Face checkpoint directory -> native directory",
                       description="Read config.json + model.safetensors (or a sharded index) from HF_DIR and write "
                                   f"our-names safetensors + {NATIVE_CONFIG} to OUT_DIR.")
    a.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face checkpoint directory (config.json + safetensors)")
    a.add_argument("out_dir", metavar="OUT_DIR", help="output directory (created; must be empty or absent)")
    common(a)
    b = sub.add_parser("native-to-hf", help="native directory -> Hugging Face checkpoint directory",
                       description=f"Read {NATIVE_CONFIG} + safetensors from IN_DIR and write config.json + "
                                   "per-expert hub-format safetensors (and V3 MTP layers) to HF_DIR.")
    b.add_argument("in_dir", metavar="IN_DIR", help=f"native checkpoint directory ({NATIVE_CONFIG} + safetensors)")
    b.add_argument("hf_dir", metavar="HF_DIR", help="output directory (created; must be empty or absent)")
    common(b)
    b.add_argument("--rope-half", action="store_true",
                   help="DeepseekV3 only: write rope_interleave=false with the rope rows in rotate_half order")
    c = sub.add_parser("checkpoint-to-hf", help="training checkpoint (any parallel layout) -> Hugging Face directory",
                       description="Read a checkpoint written by training (parallel/checkpoint.py) in one process "
                                   "and write config.json + hub-format safetensors to HF_DIR; the model config "
                                   "comes from the checkpoint's meta.json.")
    c.add_argument("ckpt_dir", metavar="CKPT_DIR",
                   help="a checkpoint step directory (step_XXXXXXXX) or a checkpoint root (its latest is used)")
    c.add_argument("hf_dir", metavar="HF_DIR", help="output directory (created; must be empty or absent)")
    common(c)
    c.add_argument("--rope-half", action="store_true",
                   help="DeepseekV3 only: write rope_interleave=false with the rope rows in rotate_half order")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    shard = int(args.max_shard_gb * 2**30)
    try:
        if args.command == "hf-to-native":
            cfg = hf_to_native(args.hf_dir, args.out_dir, args.dtype, shard, args.overwrite)
            print(f"wrote {args.out_dir}: {cfg.name} ({cfg.n_layers} layers, {cfg.n_mtp} MTP)")
        elif args.command == "checkpoint-to-hf":
            d = checkpoint_to_hf(args.ckpt_dir, args.hf_dir, args.dtype, shard, args.overwrite,
                                 rope_interleave=not args.rope_half)
            print(f"wrote {args.hf_dir}: {d['architectures'][0]}")
        else:
            d = native_to_hf(args.in_dir, args.hf_dir, args.dtype, shard, args.overwrite,
                             rope_interleave=not args.rope_half)
            print(f"wrote {args.hf_dir}: {d['architectures'][0]}")
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"python -m model.convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
