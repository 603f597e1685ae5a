"""lm-evaluation-harness integration: the task configs, ``binq lm-eval`` and the ``binq`` model type.

The tests that run lm-eval skip when it is not installed (``pip install -e '.[lmeval]'``); the others
need nothing beyond binq. The model is a tiny llama with a BPE tokenizer trained here on the task texts
(so targets are several tokens and the context/continuation split matters), binarized and saved as a
binq checkpoint: lm-eval must load it through binq and give, item for item, binq's own log-likelihoods.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import binq
from binq.checkpoint import save_checkpoint
from binq.cli import main
from binq.data.zeroshot import TASK_SOURCES, TASKS, build_task, prose
from binq.engine.calibrate import quantize_model
from binq.errors import BinqError
from binq.evaluation.zeroshot import ZeroShotConfig
from binq.integration.lm_eval_tasks import LM_EVAL_NAMES, split_task_names, write_task_configs
from binq.methods import get_method
from binq.models import get_architecture
from conftest import build_tiny_model, random_ids

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-evaluation-harness is not installed (pip install -e '.[lmeval]')",
)

LIMIT = 8


def test_task_configs_read_the_items_binq_scores(tmp_path: Path) -> None:
    written = write_task_configs(tmp_path, list(TASKS))
    for name, info in written.items():
        config = yaml.safe_load(Path(info["config"]).read_text())
        assert config["task"] == LM_EVAL_NAMES[name] == info["lm_eval_task"]
        assert config["dataset_path"] == "json" and config["test_split"] == "test"
        assert config["dataset_kwargs"]["data_files"]["test"] == str(Path(info["data_file"]).resolve())
        assert info["items_total"] == 500 and info["items_sha256"] == build_task(name).sha256
        assert config["metadata"]["items_sha256"] == info["items_sha256"]
        assert len(Path(info["data_file"]).read_text(encoding="utf-8").splitlines()) == 500
    lastword = yaml.safe_load(Path(written["lastword"]["config"]).read_text())
    assert (lastword["output_type"], lastword["doc_to_target"], lastword["target_delimiter"]) == (
        "loglikelihood",
        "{{' ' + target}}",
        "",
    )
    assert [m["metric"] for m in lastword["metric_list"]] == ["perplexity", "acc"]
    choice = yaml.safe_load(Path(written["nextsentence"]["config"]).read_text())
    assert (choice["output_type"], choice["doc_to_choice"], choice["doc_to_target"]) == (
        "multiple_choice",
        "choices",
        "label",
    )
    assert [m["metric"] for m in choice["metric_list"]] == ["acc", "acc_norm"]


def test_split_task_names() -> None:
    assert split_task_names("lastword,binq_nextsentence,hellaswag,lastword") == (
        ["lastword", "nextsentence"],
        ["hellaswag"],
    )
    with pytest.raises(BinqError, match="names no task"):
        split_task_names(",")


def test_missing_lm_eval_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.delitem(sys.modules, "binq.integration.lm_eval", raising=False)
    code = main(["lm-eval", "--model", str(tmp_path), "--tasks", "lastword", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "binq: error: binq lm-eval needs lm-evaluation-harness (lm_eval is missing): pip install 'binq[lmeval]'"
    )


@pytest.mark.parametrize(
    ("extra", "pattern"),
    [(["--limit", "0"], "--limit must be at least 1"), (["--bootstrap-iters", "-1"], "--bootstrap-iters must be")],
)
def test_lm_eval_bad_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str], pattern: str
) -> None:
    code = main(["lm-eval", "--model", str(tmp_path), "--tasks", "lastword", *extra])
    err = capsys.readouterr().err
    assert code == 2 and pattern in err.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def bpe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama with a 400-token BPE vocabulary of the task texts, 1-bit RTN, as a binq checkpoint."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    backend.train_from_iterator([prose(source)[:60_000] for source in TASK_SOURCES], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    model = build_tiny_model("llama", vocab_size=backend.get_vocab_size(), max_position_embeddings=256)
    method = get_method("rtn")
    windows = random_ids(2, 16)
    result = quantize_model(model, get_architecture(model), windows, method, method.make_config(), progress=False)
    folder = tmp_path_factory.mktemp("lm-eval-ckpt")
    save_checkpoint(model, result.weights, folder, tokenizer=tokenizer, method="rtn")
    return folder


@needs_lm_eval
def test_lm_eval_gives_binq_evals_loglikelihoods(
    capsys: pytest.CaptureFixture[str], bpe_checkpoint: Path, tmp_path: Path
) -> None:
    argv = ["lm-eval", "--model", str(bpe_checkpoint), "--tasks", "lastword,nextsentence", "--limit", str(LIMIT)]
    argv += ["--batch-size", "3", "--log-samples", "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "lm_eval_results.json").read_text())
    assert results["binq"]["command"] == ["binq", *argv]
    assert "binq_lastword" in out and "binq_nextsentence" in out and "acc_norm" in out

    ours = binq.evaluate(
        str(bpe_checkpoint), zeroshot=ZeroShotConfig(tuple(TASKS), limit=LIMIT, batch_size=5), progress=False
    )
    for name, task in ours.tasks.items():
        lm_name = LM_EVAL_NAMES[name]
        assert results["binq"]["tasks"][name]["items_sha256"] == build_task(name).sha256
        samples = sorted(results["samples"][lm_name], key=lambda s: s["doc_id"])
        assert [s["doc"]["id"] for s in samples] == [item.id for item in task.task.items]
        for sample, scores in zip(samples, task.scores, strict=True):
            theirs = [response[0] for response in sample["resps"]]  # [loglik, is_greedy] per request
            assert [ll for ll, _ in theirs] == pytest.approx([s.loglik for s in scores], abs=1e-4)
            assert [bool(greedy) for _, greedy in theirs] == [s.greedy for s in scores]
        metrics = results["results"][lm_name]
        assert metrics["acc,none"] == task.metrics["acc"]
        assert metrics["acc_stderr,none"] == pytest.approx(task.metrics["acc_stderr"])
        if name == "nextsentence":
            assert metrics["acc_norm,none"] == task.metrics["acc_norm"]
        else:
            assert metrics["perplexity,none"] == pytest.approx(task.metrics["perplexity"], rel=1e-5)
    # targets of several tokens: the context/continuation split is exercised
    assert any(scores[0].tokens > 1 for scores in ours.tasks["lastword"].scores)


@needs_lm_eval
def test_binq_model_type_is_registered(bpe_checkpoint: Path) -> None:
    from lm_eval.api.registry import get_model

    import binq.integration.lm_eval as harness

    assert get_model("binq") is harness.BinqLM
    lm = harness.BinqLM(pretrained=str(bpe_checkpoint), batch_size=2)
    assert lm.binq_model["checkpoint"] is True
    assert type(lm.model.model.layers[0].mlp.down_proj).__name__ == "BinaryLinear"
