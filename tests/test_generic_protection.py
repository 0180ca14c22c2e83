"""The generic adapter protects the model from what it cannot merge (issue 22, item 5): prefix
tokens it can detect stay whole, an argument that could not follow the merge is refused with an
error naming it, and a site that merges nothing in a forward says so once."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tokenmerge
from tokenmerge.errors import InputError, NothingMergedWarning

DIM = 16


class Rotary(nn.Module):
    """Attention-like: adds a per-token table it is handed, as rotary embeddings do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, hidden_states: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states) * freqs.cos()


class WithRotary(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Rotary()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        freqs = torch.linspace(0, 1, x.shape[1]).unsqueeze(-1)  # (tokens, 1): full length
        return x + self.attn(x, freqs)


class SelfAttention(nn.Module):
    """nn.MultiheadAttention called as self-attention, query, key and value the same tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x, x, x, need_weights=False)[0]


class CrossSame(nn.Module):
    """nn.MultiheadAttention whose keys and values are another tensor of the same length."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.norm(x)
        return x + self.attn(x, context, context, need_weights=False)[0]


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class ConvThenTokens(nn.Module):
    """A conv on (B, C, H, W) - 4-D input, nothing to merge there - then a token MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(DIM, DIM, 1)
        self.mlp = nn.Linear(DIM, DIM)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = self.conv(image)
        return self.mlp(image.flatten(2).transpose(1, 2))


def tokens(n: int = 64, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, n, DIM, generator=torch.Generator().manual_seed(0))


def generic(model: nn.Module, include: list[str], **kwargs: object) -> tokenmerge.Handle:
    return tokenmerge.apply(
        model, "tome", ratio=0.5, adapter="generic",
        sites={"include": include, "min_tokens": 1}, **kwargs,
    )  # fmt: skip


# ---------------------------------------------------------------- arguments of full length


def test_an_argument_of_the_token_length_is_refused_by_name():
    model = WithRotary().eval()
    with generic(model, ["attn"]), pytest.raises(InputError) as info:
        model(tokens())
    message = str(info.value)
    assert "freqs=<tensor of shape (64, 1)>" in message  # named, though passed positionally
    assert "length of the token axis (64 tokens)" in message
    assert "adapter_options={'full_length_args': ['freqs']}" in message


def test_at_ratio_zero_nothing_is_refused_and_the_output_is_exact():
    model = WithRotary().eval()
    x = tokens()
    expected = model(x)
    with tokenmerge.apply(model, "tome", ratio=0.0, adapter="generic",
                          sites={"include": ["attn"], "min_tokens": 1}):  # fmt: skip
        assert torch.equal(model(x), expected)


def test_full_length_args_lets_a_named_argument_through():
    model = CrossSame().eval()
    with pytest.raises(InputError, match="key=<tensor of shape"):
        with generic(model, ["attn"]):
            model(tokens())
    options = {"full_length_args": ["key", "value"]}
    with generic(model, ["attn"], adapter_options=options) as handle:
        assert model(tokens()).shape == (2, 64, DIM)
    assert handle.stats()["attn"].tokens_out == 32


def test_self_attention_on_its_own_input_is_not_refused():
    model = SelfAttention().eval()
    with generic(model, ["attn"]) as handle:
        assert model(tokens()).shape == (2, 64, DIM)
    assert handle.stats()["attn"].tokens_out == 32


def test_a_batch_vector_the_size_of_the_token_axis_is_not_mistaken_for_one():
    class Timed(nn.Module):
        def forward(self, hidden_states: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return hidden_states * t[:, None, None]

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Timed()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x, torch.ones(x.shape[0]))

    model = Model()
    with generic(model, ["inner"]) as handle:
        model(tokens(n=4, batch=4))
    assert handle.stats()["inner"].tokens_out == 2


# ---------------------------------------------------------------- prefix tokens


@pytest.mark.parametrize(
    ("total", "prefix", "grid"),
    [(65, 1, (8, 8)), (69, 5, (8, 8)), (64, 0, (8, 8)), (10, 1, (3, 3))],
)
def test_auto_prefix_is_the_fewest_tokens_in_front_of_a_square_grid(total, prefix, grid):
    model = nn.Sequential(Block())
    with generic(model, ["0"]) as handle:
        model(tokens(total))
        layout = handle.patches[0].last_layout
    assert (layout.num_prefix, layout.grid) == (prefix, grid)


def test_the_class_token_is_never_merged():
    model = nn.Sequential(Block()).eval()
    x = tokens(65)
    x[:, 1:] = x[:, 1:2]  # every image token alike: any of them could merge into the first
    expected = model(x)
    with generic(model, ["0"]) as handle:
        out = model(x)
        plan = handle.patches[0].last_plan
    assert 0 in plan.kept[0].tolist() and 0 not in plan.src.tolist()[0]
    assert torch.allclose(out[:, 0], expected[:, 0])


def test_auto_prefix_follows_a_given_grid_and_an_explicit_count_wins():
    model = nn.Sequential(Block())
    with generic(model, ["0"], adapter_options={"grid": (4, 16)}) as handle:
        model(tokens(66))
        assert handle.patches[0].last_layout.num_prefix == 2
    with generic(model, ["0"], adapter_options={"num_prefix": 0}) as handle:
        model(tokens(65))
        assert handle.patches[0].last_layout.grid == (1, 65)


# ---------------------------------------------------------------- sites that merge nothing


def test_a_site_given_four_d_input_warns_once():
    model = ConvThenTokens()
    image = torch.randn(1, DIM, 8, 8)
    with generic(model, ["conv", "mlp"]) as handle:
        with pytest.warns(NothingMergedWarning, match="'conv' merged nothing.*passed through"):
            model(image)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(image)  # once per site
    assert handle.stats()["conv"].passed_through == 2
    assert handle.stats()["mlp"].tokens_out == 32  # the token site merged


def test_a_site_below_min_tokens_warns():
    model = nn.Sequential(Block())
    with tokenmerge.apply(model, "tome", adapter="generic",
                          sites={"include": ["0"], "min_tokens": 100}):  # fmt: skip
        with pytest.warns(NothingMergedWarning, match="64 image tokens < min_tokens 100"):
            model(tokens())
