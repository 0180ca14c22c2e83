"""Encoders whose tokens carry more than a grid: BEiT-style relative position biases (one entry
per pair of tokens) and ViTMAE's random subset of the patches.

The bias a merged layer adds must be the original one at the tokens present: for every pair of
current tokens, the entry of the pair of original tokens they stand at (a merged token at its
destination's place). These tests compare what the attention receives with that, computed from
the unpatched bias module; ViTMAE's tokens must carry the grid positions of the patches they
came from.
"""

from __future__ import annotations

import copy as copy_module
from typing import Any

import pytest
import torch
from snapshots import hook_count, snapshot
from torch import Tensor, nn
from vit_models import (
    BATCH,
    FAMILIES,
    IMG,
    PATCH,
    mae_noise,
    make_data2vec_vision,
    make_hf_beit,
    make_vit_mae,
    pixels,
)

import tokenmerge
from tokenmerge.adapters._tables import gather_pairs

GRID = (IMG // PATCH, IMG // PATCH)
TOKENS = 1 + GRID[0] * GRID[1]


def _full_bias(module: nn.Module) -> Tensor:
    """The bias module's output for the whole grid, computed without its hooks."""
    return type(module).forward(module, GRID, False, dim_size=TOKENS)


class _Capture:
    """Pre-hook keeping the ``name`` keyword of every call, and the adapter's token index of
    the call (current tokens -> original ones) at that moment."""

    def __init__(self, name: str, index: Any) -> None:
        self.name, self.index = name, index
        self.seen: list[tuple[Tensor | None, Tensor | None]] = []

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen.append((kwargs.get(self.name), self.index()))


def _token_index(handle: tokenmerge.Handle):
    return lambda: handle.adapter.carry.track.token_index()


def test_beit_layers_get_their_own_and_the_shared_bias_at_the_tokens_present() -> None:
    model = make_hf_beit()
    beit = model.beit
    handle = tokenmerge.apply(
        model, "retom", r=8, adapter_options={"proportional_attention": False}
    )
    captures = []
    for layer in beit.layers:
        capture = _Capture("attention_mask", _token_index(handle))
        layer.attention.register_forward_pre_hook(capture, with_kwargs=True)
        captures.append(capture)
    with torch.no_grad():
        model(pixel_values=pixels())
    shared = _full_bias(beit.shared_position_bias)
    for number, (layer, capture) in enumerate(zip(beit.layers, captures, strict=True)):
        ((mask, index),) = capture.seen
        full = _full_bias(layer.relative_position_bias) + shared
        if number == 0:  # nothing merged yet: the whole bias
            assert index is None and torch.equal(mask, full)
            continue
        expected = gather_pairs(full, index)
        assert mask.shape[-2:] == (TOKENS - 8 * number,) * 2
        torch.testing.assert_close(mask, expected.expand_as(mask), rtol=0, atol=1e-6)
    handle.remove()


def test_data2vec_bias_inside_the_attention_follows_the_tokens() -> None:
    """Data2Vec-Vision computes its bias inside the self-attention: the scores see it cut."""
    model = make_data2vec_vision()
    handle = tokenmerge.apply(model, "tome", r=8, adapter_options={"proportional_attention": False})
    layers = model.encoder.layer
    outputs, indices = [], []
    for layer in layers:
        bias = layer.attention.attention.relative_position_bias
        bias.register_forward_hook(lambda m, a, out: outputs.append(out))
        layer.register_forward_pre_hook(
            lambda m, a: indices.append(handle.adapter.carry.track.token_index())
        )
    with torch.no_grad():
        model(pixel_values=pixels())
    for number, layer in enumerate(layers):
        full = _full_bias(layer.attention.attention.relative_position_bias)
        if number == 0:
            assert torch.equal(outputs[0], full)
            continue
        assert outputs[number].shape[-1] == TOKENS - 8 * number
        torch.testing.assert_close(
            outputs[number], gather_pairs(full, indices[number]), rtol=0, atol=0
        )
    handle.remove()


@pytest.mark.parametrize("make", [make_hf_beit, make_data2vec_vision], ids=["beit", "data2vec"])
def test_local_mode_cuts_the_bias_to_the_kept_tokens(make) -> None:
    """Local mode: the attention runs on the kept tokens, with the bias between them; a merge
    of tokens identical in every way is exact, so at a tiny ratio the output stays close."""
    model = make()
    x = pixels()
    with torch.no_grad():
        plain = model(pixel_values=x)[0]
    with tokenmerge.apply(model, "retom", ratio=0.5, adapter_options={"mode": "local"}) as h:
        with torch.no_grad():
            merged = model(pixel_values=x)[0]
        assert all(s.tokens_out < s.tokens_in for s in h.stats().values())
    assert merged.shape == plain.shape and bool(merged.isfinite().all())
    assert not torch.equal(merged, plain)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x)[0], plain)


def test_vit_mae_tokens_carry_the_positions_of_their_patches() -> None:
    model = make_vit_mae()
    noise = mae_noise(BATCH)
    seen = []
    handle = tokenmerge.apply(model, "retom", r=2)
    model.vit.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append(handle.adapter.carry.track.layout())
    )
    with torch.no_grad():
        out = model(pixel_values=pixels(), noise=noise)
    layout = seen[0]
    kept = noise.argsort(dim=1)[:, : GRID[0] * GRID[1] // 4]
    assert layout.grid == GRID and torch.equal(layout.positions, kept)
    assert torch.equal(out.ids_restore.argsort(dim=1)[:, : kept.shape[1]], kept)
    stats = handle.stats()
    # the encoder's layers merge; the decoder's, of the same class, are not sites
    assert sorted(stats) == [f"vit.layers.{i}" for i in range(3)]
    assert [s.tokens_out for s in stats.values()] == [15, 13, 11]
    handle.remove()


def test_vit_mae_tome_takes_the_alternating_partition_in_local_mode() -> None:
    """tomesd's cells tile the whole grid; ViTMAE's tokens are a random quarter of it."""
    fam = FAMILIES["vit_mae"]
    model = fam.build()
    before = snapshot(model)
    hooks = hook_count(model)
    with tokenmerge.apply(model, "tome", ratio=0.5, adapter_options={"mode": "local"}) as h:
        fam.run(model)
        assert [s.tokens_out for s in h.stats().values()] == [9, 9, 9]
    with pytest.raises(tokenmerge.ConfigError, match="partition='cells' tiles the whole"):
        with tokenmerge.apply(
            model, "tome", partition="cells", ratio=0.5, adapter_options={"mode": "local"}
        ):
            fam.run(model)
    assert hook_count(model) == hooks and snapshot(model) == before


@pytest.mark.parametrize("mode", ["progressive", "local"])
def test_a_deepcopy_of_a_patched_model_cuts_its_own_biases(mode: str) -> None:
    """The copy's hooks share their per-call state with each other, not with the original's."""
    model = make_data2vec_vision()
    x = pixels()
    with tokenmerge.apply(model, "retom", ratio=0.25, adapter_options={"mode": mode}):
        with torch.no_grad():
            merged = model(pixel_values=x)[0]
        copy = copy_module.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(copy(pixel_values=x)[0], merged)
