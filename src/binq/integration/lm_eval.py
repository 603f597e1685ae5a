"""lm-evaluation-harness on any model binq loads: the ``binq`` model type and ``binq lm-eval``.

Importing this module imports ``lm_eval`` (the optional extra ``binq[lmeval]``; binq imports it only here,
and only when asked) and registers the model type ``binq`` with ``lm_eval.api.registry``:
:class:`BinqLM` is lm-eval's own HF model (``HFLM``: its batching, its log-likelihoods) given a model
that binq loaded, so ``pretrained`` may be a binq checkpoint folder (packed linears, binq's kernels), an
embedded name (``smollm2-135m``), a model folder, a ``.gguf`` file or a Hub id. From Python::

    import lm_eval, binq.integration.lm_eval
    lm_eval.simple_evaluate(model="binq", model_args={"pretrained": "runs/q1"}, tasks=[...])

:func:`run` is ``binq lm-eval``: binq's offline tasks written as local task configs
(:mod:`binq.integration.lm_eval_tasks`), lm-eval's others looked up in its own index, then
``simple_evaluate`` and its results JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lm_eval.api.registry import register_model
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable
from rich.table import Table

from binq.data.zeroshot import TASKS
from binq.errors import BinqError
from binq.integration.lm_eval_tasks import LM_EVAL_NAMES, write_task_configs

__all__ = ["RESULTS_FILE", "BinqLM", "results_table", "run"]

#: What ``binq lm-eval`` writes in its ``--out`` folder: ``simple_evaluate``'s results, plus ``binq``.
RESULTS_FILE = "lm_eval_results.json"

_NOT_METRICS = {"alias", "name", "sample_len"}  # keys of a task's results that are not metrics


@register_model("binq")
class BinqLM(HFLM):
    """lm-eval's HF model around a model binq loaded (:func:`binq.pipeline.open_model`): a binq checkpoint
    keeps its packed linears. ``device`` places it; the other arguments are ``HFLM``'s (``batch_size``,
    ``max_length``, ...)."""

    def __init__(self, pretrained: str, device: str | None = "cpu", **kwargs: Any) -> None:
        from binq.pipeline import open_model

        device = device or "cpu"
        loaded, checkpoint = open_model(str(pretrained), device)
        loaded.model.to(device)
        super().__init__(pretrained=loaded.model, tokenizer=loaded.tokenizer, **kwargs)
        self.binq_model = {"spec": str(pretrained), "name": loaded.name, "path": loaded.path, "checkpoint": checkpoint}


def run(
    model: str,
    binq_tasks: list[str],
    other_tasks: list[str],
    out: Path,
    *,
    device: str = "cpu",
    limit: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 1000,
    log_samples: bool = False,
    command: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on binq's tasks and lm-eval's, write ``out/lm_eval_results.json``, return it.

    The task configs and their JSON Lines go to ``out/tasks`` (every item; ``limit`` is lm-eval's: the
    first ``limit`` documents, the same items as ``binq eval --tasks ... --limit``). The results are
    ``simple_evaluate``'s, with a ``binq`` entry: the command, the model spec and each binq task's
    config, data file, item count and items' sha256.
    """
    task_folder = out / "tasks"
    written = write_task_configs(task_folder, binq_tasks)
    # lm-eval indexes thousands of its own configs on start: only when one of them is asked for.
    manager = TaskManager(include_path=str(task_folder), include_defaults=bool(other_tasks))
    unknown = [name for name in other_tasks if name not in manager.all_tasks]
    if unknown:
        raise BinqError(f"unknown task {unknown[0]!r} (binq's: {', '.join(TASKS)}; lm-eval's: `lm_eval ls tasks`)")
    results = simple_evaluate(
        model="binq",
        model_args={"pretrained": model},
        tasks=[LM_EVAL_NAMES[name] for name in binq_tasks] + other_tasks,
        batch_size=batch_size,
        device=device,
        limit=limit,
        bootstrap_iters=bootstrap_iters,
        log_samples=log_samples,
        task_manager=manager,
    )
    if results is None:  # a rank other than 0 of a distributed lm-eval run
        return {}
    results["binq"] = {"command": command, "model": model, "tasks": written}
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
    return results


def results_table(results: dict[str, Any], title: str) -> Table:
    """lm-eval's results, one row per task and metric (``acc,none`` shown as ``acc``), with the stderr."""
    table = Table(title=title, title_justify="left")
    for column in ("task", "metric", "value", "stderr", "samples"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for task, metrics in results.get("results", {}).items():
        samples = results.get("n-samples", {}).get(task, {}).get("effective", "")
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric in _NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            shown = f"± {stderr:.4f}" if isinstance(stderr, int | float) else "-"
            table.add_row(task, metric, f"{value:.4f}", shown, str(samples))
    return table
