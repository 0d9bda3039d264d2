"""The DeepSeek model family in one process: DeepSeek LLM, DeepSeekMoE, V2, V3 (MLA, MoE, MTP)."""
from .config import ModelConfig, preset, preset_names, set_param_counter
from .transformer import Transformer, build_model, param_counts

# config.param_counts() counts the built network; config.py cannot import it (the network imports config)
set_param_counter(param_counts)


def load_hf(path, **kwargs):
    """A Hugging Face safetensors checkpoint directory as an eval-mode single-process model."""
    from .hf import load_hf as _load_hf

    return _load_hf(path, **kwargs)


__all__ = ["ModelConfig", "Transformer", "build_model", "load_hf", "preset", "preset_names"]
