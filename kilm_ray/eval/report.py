"""metrics.json -> a Markdown report and PNG plots (one model, or several side by side)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from kilm_ray import storage
from kilm_ray.eval.harness import headline


def read_training_log(run_uri: str) -> list[dict[str, Any]]:
    """metrics.jsonl of a run; replayed steps after a resume keep their last value."""
    path = storage.join(run_uri, "metrics.jsonl")
    if not storage.exists(path):
        return []
    by_step: dict[int, dict] = {}
    for line in storage.read_bytes(path).decode().splitlines():
        row = json.loads(line)
        if "event" not in row:
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _plot_bars(models: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = ["title_exact_match", "description_f1", "description_rouge_l"]
    splits = ["valid_seen", "valid_unseen"]
    labels = [f"{s}\n{k.replace('description_', 'desc ').replace('_', ' ')}" for s in splits for k in keys]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(labels))
    for i, (name, m) in enumerate(models.items()):
        values = [m.get(f"describe_{s}", {}).get(k, 0.0) or 0.0 for s in splits for k in keys]
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("score")
    ax.set_title("Description generation (describe probe)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for name, rows in runs.items():
        for ax, key in zip(axes, ("train_loss", "valid_seen_knowledge_loss", "valid_unseen_knowledge_loss")):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name)
                ax.set_title(key.replace("_", " "))
                ax.set_xlabel("step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(models: dict[str, dict[str, Any]], out_dir: str | Path,
                 runs: Optional[dict[str, str]] = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = list(models)
    rows = {name: headline(m) for name, m in models.items()}
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    lines = ["# KILM evaluation report", "", "| metric | " + " | ".join(names) + " |",
             "| --- |" + " --- |" * len(names)]
    for key in keys:
        cells = [f"{rows[n][key]:.4f}" if key in rows[n] else "-" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "![description generation](describe.png)", ""]
    _plot_bars(models, out / "describe.png")
    if runs:
        logs = {name: read_training_log(uri) for name, uri in runs.items()}
        if any(logs.values()):
            _plot_curves(logs, out / "training.png")
            lines += ["![training curves](training.png)", ""]
    for name, m in models.items():
        lines += [f"## {name}", "", f"Model `{m.get('model')}` (step {m.get('model_step')}), data `{m.get('data')}`.", ""]
        for split in ("valid_seen", "valid_unseen"):
            examples = m.get(f"describe_{split}", {}).get("examples", [])
            if examples:
                lines += [f"Sample {split} descriptions (gold -> generated):", ""]
                lines += [f"- `{e['gold']}` -> `{e['generated']}`" for e in examples[:5]]
                lines.append("")
        for key in ("disambiguation_anchor", "disambiguation_wordnet", "retention", "retention_train_text", "qa"):
            if key in m:
                summary = {k: v for k, v in m[key].items() if k != "examples"}
                lines.append(f"- {key}: `{json.dumps(summary, default=str)}`")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
