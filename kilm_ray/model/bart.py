"""BART for KILM: from a pretrained directory / hub id or from a preset config, with the five KILM
tokens in its embeddings; and the Hugging Face export that plain ``transformers`` loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

from kilm_ray.config import MODEL_PRESETS, ConfigError, ModelConfig
from kilm_ray.method.masking import SpecialIds

log = logging.getLogger("kilm_ray.model")
EXPORT_META = "kilm_ray.json"


def scratch_config(cfg: ModelConfig, vocab_size: int, sp: SpecialIds, max_positions: int):
    from transformers import BartConfig

    p = MODEL_PRESETS[cfg.preset]
    return BartConfig(
        vocab_size=vocab_size, d_model=p["d_model"], encoder_layers=p["layers"], decoder_layers=p["layers"],
        encoder_attention_heads=p["heads"], decoder_attention_heads=p["heads"], encoder_ffn_dim=p["ffn"],
        decoder_ffn_dim=p["ffn"], max_position_embeddings=max(max_positions, 64), dropout=cfg.dropout,
        attention_dropout=0.0, activation_dropout=0.0, pad_token_id=sp.pad, bos_token_id=sp.bos,
        eos_token_id=sp.eos, decoder_start_token_id=sp.eos, forced_bos_token_id=sp.bos, scale_embedding=False,
    )


def build_model(cfg: ModelConfig, tokenizer_size: int, sp: SpecialIds, max_positions: int):
    """A BartForConditionalGeneration whose embeddings cover ``tokenizer_size`` tokens."""
    from transformers import BartForConditionalGeneration

    if cfg.pretrained:
        try:
            model = BartForConditionalGeneration.from_pretrained(
                cfg.pretrained, attn_implementation=cfg.attn_implementation, dropout=cfg.dropout)
        except OSError as exc:
            raise ConfigError(f"model.pretrained={cfg.pretrained!r}: cannot load ({str(exc).splitlines()[0]})") from None
        if model.config.max_position_embeddings < max_positions:
            raise ConfigError(f"model.pretrained has {model.config.max_position_embeddings} positions; the data "
                              f"needs {max_positions} (lower data.max_source_tokens / max_knowledge_tokens)")
        if model.config.vocab_size < tokenizer_size:
            # New rows start at the mean of the existing embeddings (transformers' default).
            model.resize_token_embeddings(tokenizer_size, pad_to_multiple_of=8)
    else:
        model = BartForConditionalGeneration(scratch_config(cfg, _round_up(tokenizer_size, 8), sp, max_positions))
        model.config._attn_implementation = cfg.attn_implementation
    model.config.pad_token_id, model.config.decoder_start_token_id = sp.pad, sp.eos
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def check_tokenizer_matches(pretrained: Optional[str], tokenizer) -> None:
    """Refuse to pair pretrained weights with a tokenizer whose ids mean other tokens."""
    if not pretrained:
        return
    from transformers import AutoTokenizer

    try:
        reference = AutoTokenizer.from_pretrained(pretrained)
    except (OSError, ValueError):
        return  # no tokenizer beside the weights: nothing to compare
    probe = " The history of the world, Aristotle and Alexander."
    if reference(probe, add_special_tokens=False)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
        raise ConfigError(f"the data was preprocessed with a tokenizer that does not match model.pretrained="
                          f"{pretrained}; preprocess with tokenizer.source={pretrained}")


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def export_hf(model, tokenizer, out_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Write a Hugging Face directory: safetensors weights, config, tokenizer (with the KILM tokens)
    and ``kilm_ray.json`` (provenance and generation defaults). Loads with plain transformers."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    tokenizer.save_pretrained(out)
    (out / EXPORT_META).write_text(json.dumps(meta, indent=2, default=str))
    return out


def load_export(path: str | Path, device: str = "cpu", dtype: Optional[str] = None):
    """(model, tokenizer, meta) from an export directory (local; see storage.local_copy for s3)."""
    import torch
    from transformers import AutoTokenizer, BartForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a model export (no config.json); use `kilm-ray export` first")
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(dtype or "fp32")
    model = BartForConditionalGeneration.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    meta_file = path / EXPORT_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return model, tokenizer, meta


def token_losses(logits, labels):
    """Per-token cross entropy (0 where labels are -100), float32: training's loss, validation's and the
    evaluation's likelihood scores."""
    import torch

    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1),
                                             ignore_index=-100, reduction="none").view(labels.shape)
