"""The block walker: every block's real inputs, the consumer's changes fed forward, Hessians, early stop."""

from __future__ import annotations

import torch

from binq.engine.walker import block_hessians, walk_blocks
from binq.models import get_architecture, named_linears


def test_inputs_are_the_models_hidden_states(make_tiny_model, make_ids) -> None:
    model = make_tiny_model("llama")
    ids = make_ids(3, 12)
    arch = get_architecture(model)
    with torch.no_grad():
        hidden = [model(sample.unsqueeze(0), output_hidden_states=True).hidden_states for sample in ids]
    steps = 0
    for step in walk_blocks(model, arch, ids):
        for n, x in enumerate(step.inputs):
            torch.testing.assert_close(x, hidden[n][step.index], rtol=1e-5, atol=1e-6)
        steps += 1
    assert steps == model.config.num_hidden_layers


def test_a_change_to_a_block_reaches_the_next_one(make_tiny_model, make_ids) -> None:
    # With both residual branches of block 0 zeroed, block 1 receives exactly block 0's inputs.
    model = make_tiny_model("llama")
    arch = get_architecture(model)
    seen = {}
    for step in walk_blocks(model, arch, make_ids(2, 10)):
        seen[step.index] = [x.clone() for x in step.inputs]
        if step.index == 0:
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                step.linears[name].weight.data.zero_()
    for before, after in zip(seen[0], seen[1], strict=True):
        assert torch.equal(before, after)


def test_outputs_set_by_the_consumer_are_not_recomputed(make_tiny_model, make_ids) -> None:
    model = make_tiny_model("llama")
    arch = get_architecture(model)
    marker = [torch.full((1, 10, model.config.hidden_size), 7.0) for _ in range(2)]
    for step in walk_blocks(model, arch, make_ids(2, 10)):
        if step.index == 0:
            step.outputs = marker
        else:
            assert all(torch.equal(x, m) for x, m in zip(step.inputs, marker, strict=True))


def test_block_hessians_are_those_of_the_real_inputs(make_tiny_model, make_ids) -> None:
    model = make_tiny_model("qwen3")
    arch = get_architecture(model)
    ids = make_ids(2, 16)
    captured = {}
    handles = [
        item.linear.register_forward_pre_hook(
            lambda _m, args, name=item.full_name: captured.setdefault(name, []).append(args[0].detach())
        )
        for item in named_linears(model, arch)
        if item.block == 1
    ]
    with torch.no_grad():
        for sample in ids:
            model(sample.unsqueeze(0), use_cache=False)
    for handle in handles:
        handle.remove()
    layers = block_hessians(model, arch, ids, [1], ("mlp.down_proj", "self_attn.k_proj"))
    assert set(layers) == {"model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj"}
    for name, (weight, hessian) in layers.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured[name]]).double()
        expected = 2 * x.T @ x / x.shape[0]
        torch.testing.assert_close(hessian.double(), expected, rtol=1e-4, atol=1e-5)
        assert torch.equal(weight, model.get_submodule(name).weight)


def test_the_walk_stops_after_the_last_block_asked_for(make_tiny_model, make_ids) -> None:
    model = make_tiny_model("llama", num_hidden_layers=3)
    indices = [step.index for step in walk_blocks(model, get_architecture(model), make_ids(1, 8), last_block=1)]
    assert indices == [0, 1]
