"""BART for KILM: from a pretrained directory / hub id or from a preset config, with the five KILM
tokens in its embeddings; and the Hugging Face export that plain ``transformers`` loads."""

from __future__ import annotations

import functools
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
    without_host_syncs(model)
    return model


def clamp_if_not_finite(hidden_states):
    """What transformers' BART encoder layer does to fp16 hidden states, decided on the device: clamped to
    +-(fp16 max - 1000) when any value is inf or nan, else unchanged."""
    import torch

    if hidden_states.dtype != torch.float16:
        return hidden_states
    limit = torch.finfo(torch.float16).max - 1000
    return torch.where(torch.isfinite(hidden_states).all(), hidden_states,
                       torch.clamp(hidden_states, min=-limit, max=limit))


@functools.lru_cache(maxsize=1)  # rewritten once per process, not per model built
def encoder_layer_forward_without_host_sync():
    """transformers' ``BartEncoderLayer.forward`` with its fp16 overflow check moved onto the device, or
    None when the installed version has no such check.

    The check (``if fp16 and not torch.isfinite(h).all(): clamp``; 5.0 spells it ``isinf(h).any() or
    isnan(h).any()``) is decided on the host: a device sync per encoder layer per micro-batch (6 per
    bart-base micro-step, 768 per V100 optimizer step at 128 micro-steps), each draining the GPU's queue.
    The function is the installed version's own, with that ``if`` statement (the one whose body clamps
    ``hidden_states``) replaced by :func:`clamp_if_not_finite`: the same values, no sync, and whatever
    else the installed version's layer does is kept."""
    import ast
    import inspect
    import textwrap

    from transformers.models.bart import modeling_bart

    original = modeling_bart.BartEncoderLayer.forward
    try:
        lines, first_line = inspect.getsourcelines(original)
    except (OSError, TypeError):  # no source beside the installed package: keep transformers' own
        return None
    tree = ast.parse(textwrap.dedent("".join(lines)))
    if tree.body[0].decorator_list:  # a wrapper the rewritten function would silently lose
        return None

    class Rewrite(ast.NodeTransformer):
        def __init__(self):
            self.replaced = 0

        def visit_If(self, node):
            clamps = any(isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.clamp"
                         for stmt in node.body for n in ast.walk(stmt))
            if clamps and "hidden_states" in ast.unparse(node.test) and not node.orelse:
                self.replaced += 1
                return ast.parse("hidden_states = clamp_if_not_finite(hidden_states)").body[0]
            return self.generic_visit(node)

    rewrite = Rewrite()
    tree = ast.fix_missing_locations(rewrite.visit(tree))
    if rewrite.replaced != 1:
        return None
    ast.increment_lineno(tree, first_line - 1)  # tracebacks point at modeling_bart.py's own lines
    function = tree.body[0]
    namespace = dict(vars(modeling_bart), clamp_if_not_finite=clamp_if_not_finite)
    exec(compile(ast.Module(body=[function], type_ignores=[]), modeling_bart.__file__, "exec"), namespace)
    return namespace[function.name]


def without_host_syncs(model) -> int:
    """Give ``model``'s encoder layers the sync-free forward (this model only; the class is untouched).
    Returns the number of layers changed (0 where the installed transformers has no such check). The
    forward is an instance attribute: ``copy.deepcopy`` and cloudpickle keep it, a plain pickle of the
    whole module (``torch.save(model)``) falls back to transformers' own; kilm_ray saves state dicts."""
    import types

    forward = encoder_layer_forward_without_host_sync()
    layers = getattr(getattr(model, "model", model), "encoder", None)
    if forward is None or layers is None:
        return 0
    for layer in layers.layers:
        layer.forward = types.MethodType(forward, layer)
    return len(layers.layers)


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
