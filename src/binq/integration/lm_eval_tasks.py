"""binq's offline zero-shot tasks as lm-evaluation-harness task configs (no lm_eval import here).

For each task, :func:`write_task_configs` writes the items of :mod:`binq.data.zeroshot` as JSON Lines and
an lm-eval ``task:`` YAML that reads them with ``dataset_path: json`` (``datasets``' local JSON loader:
no Hub). The YAML says what binq's own scoring does (:mod:`binq.evaluation.zeroshot`):

- ``binq_lastword``: ``output_type: loglikelihood``, text ``context``, target ``" " + target`` (no
  delimiter besides); metrics ``acc`` (greedy) and ``perplexity``, as lm-eval's ``lambada_openai``;
- ``binq_nextsentence``: ``output_type: multiple_choice``, text ``context``, choices ``choices``, gold
  ``label``; metrics ``acc`` and ``acc_norm``, as lm-eval's ``piqa``.

So ``lm_eval --include_path FOLDER --tasks binq_lastword`` runs the same items outside binq as well.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from binq.data.zeroshot import TASKS, build_task, write_jsonl
from binq.errors import BinqError

__all__ = ["LM_EVAL_NAMES", "split_task_names", "task_config", "write_task_configs"]

#: binq's task names -> the names its configs register in lm-eval (prefixed: lm-eval's names are global).
LM_EVAL_NAMES = {name: f"binq_{name}" for name in TASKS}

_METRICS = {
    "lastword": [("perplexity", "perplexity", False), ("acc", "mean", True)],
    "nextsentence": [("acc", "mean", True), ("acc_norm", "mean", True)],
}
_FIELDS = {
    # A loglikelihood task's target gets no delimiter: the space is in the template, as lambada_openai's.
    "lastword": {
        "output_type": "loglikelihood",
        "doc_to_text": "context",
        "doc_to_target": json.dumps("{{' ' + target}}"),
        "target_delimiter": '""',
    },
    "nextsentence": {
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_target": "label",
        "doc_to_choice": "choices",
        "target_delimiter": '" "',
    },
}


def split_task_names(spec: str) -> tuple[list[str], list[str]]:
    """``--tasks`` of ``binq lm-eval``: binq's tasks (by binq's or lm-eval's name) and lm-eval's others."""
    names = list(dict.fromkeys(name.strip() for name in spec.split(",") if name.strip()))
    if not names:
        raise BinqError(f"--tasks names no task (binq's: {', '.join(TASKS)}; or lm-eval's own)")
    by_lm_eval_name = {v: k for k, v in LM_EVAL_NAMES.items()}
    ours = [by_lm_eval_name.get(name, name) for name in names if name in TASKS or name in by_lm_eval_name]
    return list(dict.fromkeys(ours)), [name for name in names if name not in TASKS and name not in by_lm_eval_name]


def task_config(name: str, data_file: Path, items_sha256: str) -> str:
    """The lm-eval YAML of binq task ``name`` reading ``data_file`` (JSON strings are YAML strings)."""
    if name not in TASKS:
        raise BinqError(f"unknown task {name!r} (tasks: {', '.join(TASKS)})")
    lines = [
        f"# binq's offline zero-shot task '{name}' (binq.data.zeroshot): {TASKS[name].summary}",
        f"task: {LM_EVAL_NAMES[name]}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(data_file.resolve()))}",
        "test_split: test",
        *(f"{key}: {value}" for key, value in _FIELDS[name].items()),
        "metric_list:",
    ]
    for metric, aggregation, higher in _METRICS[name]:
        lines += [
            f"  - metric: {metric}",
            f"    aggregation: {aggregation}",
            f"    higher_is_better: {str(higher).lower()}",
        ]
    lines += ["metadata:", "  version: 1.0", f"  items_sha256: {items_sha256}", ""]
    return "\n".join(lines)


def write_task_configs(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """Write ``binq_<name>.jsonl`` (every item) and ``binq_<name>.yaml`` for each task into ``folder``;
    return, per task, its lm-eval name, the two paths, the item count and the items' sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names:
        task = build_task(name)
        data_file = write_jsonl(task.items, folder / f"{LM_EVAL_NAMES[name]}.jsonl")
        config = folder / f"{LM_EVAL_NAMES[name]}.yaml"
        config.write_text(task_config(name, data_file, task.sha256), encoding="utf-8")
        written[name] = {
            "lm_eval_task": LM_EVAL_NAMES[name],
            "config": str(config),
            "data_file": str(data_file),
            "items_total": task.total,
            "items_sha256": task.sha256,
        }
    return written
