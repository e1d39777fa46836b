"""The evaluation report: one JSON file, a markdown table, a bar chart (PNG) and, optionally, MLflow metrics.

Scores are main scores of each task (mteb's), side by side per model; AdvBench-IR's harmful@k is lower-is-better
and is kept out of the average.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from components.evaluation.runner import TaskScore

Results = dict[str, dict[str, TaskScore]]  # model label -> task -> score


def report_dict(results: Results, seconds: dict[str, float], info: dict[str, Any]) -> dict[str, Any]:
    """Everything in the report, JSON-ready: `info` (model, suite, limit, ...) plus scores and timings per model."""
    return {
        **info,
        "models": {label: {task: score.to_dict() for task, score in scores.items()} for label, scores in results.items()},
        "averages": {label: average(scores) for label, scores in results.items()},
        "seconds": seconds,
    }


# Scores shown under a task's main score, in the markdown table only (the average uses main scores).
SECONDARY_ROWS = {"AdvBenchIR": ("harmful_at_1", "harmful_at_20", "harmful_mrr"),
                  "AdvBench-IR": ("harmful_at_1", "harmful_at_20", "harmful_at_100", "own_at_5")}


def average(scores: dict[str, TaskScore]) -> float | None:
    """Mean main score over the higher-is-better tasks."""
    values = [score.score for score in scores.values() if not score.lower_is_better]
    return sum(values) / len(values) if values else None


def markdown_table(results: Results, descriptions: dict[str, str] | None = None, size: str | None = None) -> str:
    """Tasks as rows, models as columns; the best score of each row in bold (the lowest where lower is better).
    `size` (full size or the quick mode) heads the task column, so that no copy of the table loses it."""
    labels = list(results)
    tasks = list(dict.fromkeys(task for scores in results.values() for task in scores))
    lines = [
        f"| task{f' ({size})' if size else ''} | type | metric | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---:|" * len(labels),
    ]
    for task in tasks:
        row = [results[label].get(task) for label in labels]
        first = next(score for score in row if score is not None)
        values = [score.score if score is not None else math.nan for score in row]
        present = [value for value in values if not math.isnan(value)]
        best = (min if first.lower_is_better else max)(present)
        cells = [_cell(value, value == best and len(present) > 1) for value in values]
        metric = f"{first.metric} (lower is better)" if first.lower_is_better else first.metric
        lines.append(f"| {task} | {first.type} | {metric} | " + " | ".join(cells) + " |")
        for extra in SECONDARY_ROWS.get(task, ()):  # e.g. safety: harmful@5 saturates, the rank does not
            values = [score.scores.get(extra, math.nan) if score is not None else math.nan for score in row]
            present = [value for value in values if not math.isnan(value)]
            if present:
                best = min(present) if first.lower_is_better else max(present)
                cells = [_cell(value, value == best and len(present) > 1) for value in values]
                suffix = " (lower is better)" if first.lower_is_better else ""
                lines.append(f"| {task} | {first.type} | {extra}{suffix} | " + " | ".join(cells) + " |")
    averages = [average(results[label]) for label in labels]
    lines.append("| **average** (higher-is-better tasks) | | | " + " | ".join(_cell(a) for a in averages) + " |")
    if descriptions:
        lines += [""] + [f"- `{label}`: {descriptions[label]}" for label in labels if label in descriptions]
    return "\n".join(lines) + "\n"


def _cell(value: float | None, bold: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-"
    text = f"{100 * value:.1f}"
    return f"**{text}**" if bold else text


def bar_chart(results: Results, path: Path, title: str = "") -> Path:
    """Grouped bars: one group per task, one bar per model (scores x 100)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    labels = list(results)
    tasks = list(dict.fromkeys(task for scores in results.values() for task in scores))
    width = 0.8 / max(1, len(labels))
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4.5))
    for offset, label in enumerate(labels):
        xs = [index + (offset - (len(labels) - 1) / 2) * width for index in range(len(tasks))]
        heights = [100 * results[label][task].score if task in results[label] else 0.0 for task in tasks]
        axes.bar(xs, heights, width=width, label=label)
    lower = {task for scores in results.values() for task, score in scores.items() if score.lower_is_better}
    axes.set_xticks(range(len(tasks)), [f"{task}\n(lower is better)" if task in lower else task for task in tasks],
                    rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("main score x 100")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def mlflow_metrics(results: Results) -> dict[str, float]:
    """Flat metric names: eval.<model>.<task> (main score) and eval.<model>.average."""
    metrics = {f"eval.{label}.{task}": score.score for label, scores in results.items() for task, score in scores.items()}
    for label, scores in results.items():
        mean = average(scores)
        if mean is not None:
            metrics[f"eval.{label}.average"] = mean
    return {name: value for name, value in metrics.items() if not math.isnan(value)}


def write_report(results: Results, seconds: dict[str, float], info: dict[str, Any], output: Path,
                 descriptions: dict[str, str] | None = None) -> dict[str, Path]:
    """results.json, results.md and scores.png in `output`; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {"json": output / "results.json", "markdown": output / "results.md", "chart": output / "scores.png"}
    paths["json"].write_text(json.dumps(report_dict(results, seconds, {**info, "descriptions": descriptions or {}}), indent=2))
    header = f"# Evaluation of {info.get('model', 'a model')}\n\n"
    details = ", ".join(f"{key}: {info[key]}" for key in ("size", "suite", "limit", "data_dir") if key in info)
    timing = ", ".join(f"{label} {value:.0f}s" for label, value in seconds.items())
    paths["markdown"].write_text(header + (f"{details}\n\n" if details else "") + markdown_table(results, descriptions, info.get("size"))
                                 + f"\nTime per model: {timing}.\n")
    bar_chart(results, paths["chart"], title=str(info.get("model", "")))
    return paths


def log_to_mlflow(results: Results, paths: dict[str, Path], tracking_uri: str, run_id: str | None = None,
                  experiment: str = "llm2vec-gen-eval", run_name: str = "evaluate") -> str:
    """Log the scores (and the report files as artifacts) into run `run_id`, or a new run; returns the run id."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if run_id is None:
        mlflow.set_experiment(experiment)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as run:
        mlflow.log_metrics(mlflow_metrics(results))
        for path in paths.values():
            mlflow.log_artifact(str(path), "evaluation")
        return run.info.run_id
