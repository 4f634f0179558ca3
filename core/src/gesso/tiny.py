"""Tiny random-weight components in the real on-disk layout, for tests (no download needed).

The tokenizer is a real CLIP byte-level BPE tokenizer with a minimal vocabulary (every byte, its
end-of-word form, a few merges and the two special tokens), written as ``vocab.json`` and
``merges.txt`` exactly as published CLIP tokenizers are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TINY_MERGES = ("t h", "th e</w>", "a n", "c a", "o r", "i n")

#: The two-stage KL autoencoder the tiny SD-shaped checkpoints share (families add their own keys).
TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
}


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from gesso.clip.tokenizer import BYTE_SYMBOLS

    symbols = list(BYTE_SYMBOLS)
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in TINY_MERGES)]:
        vocab.setdefault(token, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(TINY_MERGES) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def tiny_clip_text_config(hidden_size: int = 32, projection_dim: int | None = None, layers: int = 2, **overrides: Any) -> Any:
    from transformers import CLIPTextConfig

    vocab = 2 * 256 + len(TINY_MERGES) + 2
    return CLIPTextConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=2,
        num_hidden_layers=layers,
        vocab_size=vocab,
        max_position_embeddings=77,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
        **overrides,
    )


def write_model_index(folder: str | Path, class_name: str, components: dict[str, tuple[str | None, str | None]]) -> Path:
    from gesso import __version__

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"_class_name": class_name, "_gesso_version": __version__}
    index.update({name: list(pair) for name, pair in components.items()})
    path = folder / "model_index.json"
    path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return path


def randomise(module: torch.nn.Module, seed: int, std: float = 0.05) -> None:
    """Small random weights everywhere (zero-initialised output layers would hide wiring bugs)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + std * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(std * torch.randn(param.shape, generator=generator))
