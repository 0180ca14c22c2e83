"""Where progressive merging happens in a ViT block, measured: hooks at the MLP input (the
default), hooks at the block output, and ToMe's own order written as a block-forward wrapper.

Hooks can merge only at module boundaries, and the residual between a block's attention and its
MLP is a local variable of the block's forward. ToMe merges exactly there, so each merging
block's MLP runs on the merged tokens. The three ways compared, all with ToMe's plan (bipartite
matching on the keys) at the same ``r`` per block and proportional attention:

- ``hooks, merge_at=mlp`` (tokenmerge's default): the MLP's input is merged and its output copied
  back; the block output is merged with the same plan. The MLP runs on the merged tokens; the
  only difference from ToMe is that the MLP's norm sees the unmerged tokens.
- ``hooks, merge_at=block``: only the block output is merged; the MLP of a merging block runs on
  all its tokens.
- ``wrapper``: ToMe's order, ``x = merge(x + attn(x)); x = x + mlp(x)``, written here as a
  replacement block forward (for this measurement only: tokenmerge uses native hooks).

Run: ``python benchmarks/vit_merge_point.py [--device cuda] [--dtype float16] [--batch 32]``.
Prints the median seconds per batch (configurations alternate, first round warms up), the
speedup over no merging and the cosine similarity of the final features to the unmerged ones.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tokenmerge
from tokenmerge.rng import SiteRandom
from tokenmerge.site import Site, TokenLayout
from tokenmerge_bench.classify import photo_batch
from tokenmerge_bench.fidelity import tie_self_attention
from tokenmerge_bench.runner import sharing_weights


def features(model: nn.Module, pixels: Tensor) -> Tensor:
    return model.forward_head(model.forward_features(pixels), pre_logits=True)


class ToMeOrder:
    """ToMe's block order as a forward wrapper around a timm ``VisionTransformer``."""

    def __init__(self, model: nn.Module, r: int) -> None:
        self.model = model
        self.r = r
        self.strategy = tokenmerge.get_strategy("tome", r=r)
        self.site = Site("wrapper", mode="progressive")

    def __call__(self, pixels: Tensor) -> Tensor:
        model = self.model
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixels))))
        prefix = model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        batch = x.shape[0]
        sizes = torch.ones(batch, x.shape[1], device=x.device)
        origin = torch.arange(x.shape[1], device=x.device).expand(batch, -1)
        merged = False
        for block in model.blocks:
            keys: list[Tensor] = []
            hook = block.attn.k_norm.register_forward_hook(
                lambda m, a, out, keys=keys: keys.append(out)
            )
            mask = sizes.log().to(x.dtype)[:, None, None, :] if merged else None
            x = x + block.ls1(block.attn(block.norm1(x), attn_mask=mask))
            hook.remove()
            metric = F.normalize(keys[0].mean(1)[:, prefix:].float(), dim=-1)
            n = metric.shape[1]
            layout = TokenLayout(grid, prefix, positions=torch.zeros(1, n, dtype=torch.long))
            plan = self.strategy.make_plan(metric, layout, self.site, min(self.r, n // 2),
                                           SiteRandom(0)).with_prefix(prefix)  # fmt: skip
            x = plan.merge(x, sizes)
            sizes = plan.merge_sizes(sizes)
            origin = plan.origin.expand(batch, -1).gather(1, origin)
            merged = True
            x = x + block.ls2(block.mlp(block.norm2(x)))
        x = torch.gather(x, 1, origin.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return model.forward_head(model.norm(x), pre_logits=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--r", type=int, default=13)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval().to(device, dtype)
    tie_self_attention(model, 3.0)
    pixels = photo_batch(args.batch, model.patch_embed.img_size[0]).to(device, dtype)
    at_mlp, at_block = sharing_weights(model), sharing_weights(model)
    tokenmerge.apply(at_mlp, "tome", r=args.r)
    tokenmerge.apply(at_block, "tome", r=args.r, adapter_options={"merge_at": "block"})
    configs = {
        "none": lambda: features(model, pixels),
        "hooks, merge_at=mlp": lambda: features(at_mlp, pixels),
        "hooks, merge_at=block": lambda: features(at_block, pixels),
        "wrapper (ToMe's order)": functools.partial(ToMeOrder(model, args.r), pixels),
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    names = list(configs)
    with torch.no_grad():
        for index in range(args.rounds + 1):
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                sync()
                start = time.perf_counter()
                configs[name]()
                sync()
                if index:
                    seconds[name].append(time.perf_counter() - start)
        reference = configs["none"]().float()
        print(f"{args.model}, r={args.r}, batch {args.batch}, {device} {args.dtype}, "
              f"{torch.get_num_threads()} threads, {args.rounds} rounds (medians)")  # fmt: skip
        base = statistics.median(seconds["none"])
        for name in names:
            median = statistics.median(seconds[name])
            cosine = F.cosine_similarity(configs[name]().float(), reference, dim=-1).mean()
            print(f"{name:<24} {median:8.4f} s  x{base / median:.3f}  cos {cosine.item():.4f}")


if __name__ == "__main__":
    main()
