"""``kilm-ray export``: a consolidated checkpoint -> a Hugging Face directory, without DeepSpeed or Ray."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from kilm_ray import storage
from kilm_ray.train.checkpoint import STATE_FILE, load_weights_into_module, read_checkpoint


def export_checkpoint(checkpoint: str, out: str) -> str:
    from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration

    from kilm_ray.config import config_from_dict
    from kilm_ray.model.bart import export_hf
    from kilm_ray.train.loop import export_metadata

    with tempfile.TemporaryDirectory(prefix="kilm_export_") as tmp:
        local = storage.local_copy(checkpoint, tmp)
        if not (local / STATE_FILE).is_file():
            raise storage.InputError(f"{checkpoint} is not a complete kilm_ray checkpoint (no {STATE_FILE})")
        state = json.loads((local / STATE_FILE).read_text())
        config = BartConfig.from_dict(json.loads((local / "model_config.json").read_text()))
        model = BartForConditionalGeneration(config)
        load_weights_into_module(model, read_checkpoint(local).weights)
        tokenizer = AutoTokenizer.from_pretrained(str(local / "tokenizer"))
        # The export's metadata needs the model, masking, data and serve sections; the train section of
        # a checkpoint written by an earlier version may hold keys that no longer exist.
        saved = {section: v for section, v in state["config"].items() if section != "train"}
        cfg = config_from_dict(saved, source=f"{checkpoint}/{STATE_FILE}")
        meta = export_metadata(cfg, int(state["step"]), state.get("data_dir", ""), checkpoint)
        if storage.is_remote(out):
            staged = Path(tmp) / "export"
            export_hf(model, tokenizer, staged, meta)
            storage.upload_dir(staged, out)
        else:
            export_hf(model, tokenizer, out, meta)
    return out
