"""Train a reference model: ``python benchmarks/train_reference.py {denoiser,classifier}``.

Seeded and reproducible (the model's initialisation comes from the seed, every batch, noise draw
and dropout from the seed and the step number, so a resumed run repeats exactly the steps an
uninterrupted one would take), shows a
progress bar, and saves a checkpoint every ``--save-every`` steps that ``--resume`` continues
from. At the end it writes the weights as fp16 safetensors and prints the held-out metrics and
the attention entropy.

The bundled weights were made with the defaults on a 2-core CPU (the denoiser beside an earlier
classifier, one thread each; the classifier alone, two threads); see docs/reference-models.md for
the commands and figures.

A script, not a module of any package: training is how the bundled weights were made, not
something the library or the bench does. It needs tokenmerge-bench (for the photographs, the
architectures and the metrics) with its ``train`` extra: ``pip install -e "benchmarks[train]"``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenmerge_bench.reference import data, digits, metrics, models

#: per model: steps, batch, peak learning rate, weight decay, and the fraction of the peak the
#: cosine decay ends at. The classifier's rate ends at half its peak: on the way down its
#: attention broadens as it fits its training rows ever more closely (from the same start, mean
#: entropy 0.756 of log N at step 1000, 0.774 at 3400 and 0.791 at 5000 of an 8000-step run
#: decaying to a tenth), and the reference models exist for their learned attention.
DEFAULTS = {
    "denoiser": dict(steps=2400, batch=32, lr=5e-4, weight_decay=0.0, lr_floor=0.1),
    "classifier": dict(steps=4000, batch=128, lr=1e-3, weight_decay=0.05, lr_floor=0.5),
    "digit-flux": dict(steps=1200, batch=64, lr=1e-3, weight_decay=0.0, lr_floor=0.1),
    "digit-dit": dict(steps=1200, batch=64, lr=1e-3, weight_decay=0.0, lr_floor=0.1),
    "digit-vit": dict(steps=2000, batch=128, lr=1e-3, weight_decay=0.05, lr_floor=0.1),
    "digit-judge": dict(steps=1500, batch=64, lr=2e-3, weight_decay=0.01, lr_floor=0.05),
}
WARMUP = 200


def _learning_rate(step: int, steps: int, peak: float, floor: float) -> float:
    """Linear warm-up, then cosine decay to ``floor`` times the peak."""
    if step < WARMUP:
        return peak * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _sincos_positions(model) -> None:
    """Start the classifier's learned position embedding from 2-D sine-cosine codes of each
    patch's column and row (the class token at zero), as MAE and big_vision's plain ViT do,
    instead of timm's small random values: a head can tell near patches from far ones from the
    first step. Measured on 1000-step runs: mean attention entropy 0.839 of log N at step 800
    against 0.867 from timm's initialisation."""
    positions = model.pos_embed  # (1, 1 + side * side, dim): the class token first
    side = int(round(math.sqrt(positions.shape[1] - 1)))
    quarter = positions.shape[-1] // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def codes(coordinate: torch.Tensor) -> torch.Tensor:
        angles = coordinate.flatten()[:, None].float() * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    with torch.no_grad():
        positions.zero_()
        positions[0, 1:, : 4 * quarter] = torch.cat([codes(columns), codes(rows)], dim=1)


# Every draw is made on the CPU from the step's generator and only then moved to the model's
# device, so a run on a GPU sees the same batches, noise and timesteps as one on the CPU.
def _denoiser_loss(model, photos, batch: int, generator: torch.Generator) -> torch.Tensor:
    clean = models.fold(data.denoiser_batch(photos, batch, generator))
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(
        0, models.NOISE_SCHEDULE["num_train_timesteps"], (batch,), generator=generator
    )
    device = next(model.parameters()).device
    noisy = metrics.add_noise(clean, noise, timesteps).to(device)
    labels = models.class_condition(batch, device)
    predicted = model(noisy, timestep=timesteps.to(device), class_labels=labels).sample
    return F.mse_loss(predicted, noise.to(device))


def _classifier_loss(model, photos, batch: int, generator: torch.Generator) -> torch.Tensor:
    crops, labels = data.classifier_batch(photos, batch, generator)
    device = next(model.parameters()).device
    return F.cross_entropy(model(crops.to(device)), labels.to(device))


def _digit_batch(images, labels, batch: int, generator: torch.Generator, shift: int):
    """A random batch, each digit moved by up to ``shift`` pixels (a blank border is padded)."""
    index = torch.randint(0, len(labels), (batch,), generator=generator)
    chosen = images[index]
    if shift:
        padded = F.pad(chosen, (shift,) * 4, value=-1.0)
        dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
        chosen = padded[..., dy : dy + chosen.shape[-2], dx : dx + chosen.shape[-1]]
    return chosen, labels[index]


def _digit_flow_loss(model, split, batch: int, generator: torch.Generator) -> torch.Tensor:
    clean, labels = _digit_batch(*split, batch, generator, shift=0)
    return digits.flow_loss(model, clean, labels, generator)


def _digit_class_loss(model, split, batch: int, generator: torch.Generator) -> torch.Tensor:
    images, labels = _digit_batch(*split, batch, generator, shift=2)
    device = next(model.parameters()).device
    return F.cross_entropy(model(images.to(device)), labels.to(device), label_smoothing=0.05)


def _evaluate_digits(kind: str, model) -> dict:
    if kind in ("digit-vit", "digit-judge"):
        # the judge learned from the held-out digits: it is measured on the training ones
        images, labels = digits.digit_split("train" if kind == "digit-judge" else "held_out")
        result = {"held_out_accuracy": metrics.accuracy(model, images, labels)}

        def run():
            with torch.no_grad():
                model(images[:256])

    else:
        result = digits.sample_quality(model)

        def run():
            labels = torch.arange(10).repeat(2)
            noise = torch.randn(20, 1, 28, 28, generator=torch.Generator().manual_seed(1))
            digits.sample(model, labels, noise, steps=4)

    if kind != "digit-judge":
        result["attention_entropy"] = _entropy(model, run)
    return result


def _entropy(model, run) -> dict:
    entropy = metrics.attention_entropy(model, run)
    return {
        name: {"nats": value, "keys": keys, "fraction_of_log_n": value / math.log(keys)}
        for name, (value, keys) in entropy.items()
    }


def _evaluate(kind: str, model, photos) -> dict:
    model.eval()
    if kind.startswith("digit-"):
        return _evaluate_digits(kind, model)
    if kind == "denoiser":
        held_out = data.denoiser_held_out(photos)
        losses = metrics.denoising_losses(model, held_out)
        result = {
            "held_out_loss": sum(losses.values()) / len(losses),
            "held_out_loss_per_timestep": losses,
        }

        def run():
            metrics.denoising_losses(model, held_out, timesteps=(900, 500, 100))
    else:
        crops, labels = data.classifier_held_out(photos)
        result = {"held_out_accuracy": metrics.accuracy(model, crops, labels)}

        def run():
            with torch.no_grad():
                model(crops)

    result["attention_entropy"] = _entropy(model, run)
    return result


def train(kind: str, args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = models.build_reference(kind)
    if kind in ("classifier", "digit-vit"):
        _sincos_positions(model)
    model.to(args.device)
    if kind.startswith("digit-"):
        photos = digits.digit_split("held_out" if kind == "digit-judge" else "train")
    else:
        photos = data.load_photo_set()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    checkpoint = Path(args.checkpoint or f"reference-checkpoints/{kind}.pt")
    start, elapsed, history = 0, 0.0, []
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True, map_location=args.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed, history = state["step"], state["seconds"], state["history"]
    step_loss = {
        "denoiser": _denoiser_loss,
        "classifier": _classifier_loss,
        "digit-flux": _digit_flow_loss,
        "digit-dit": _digit_flow_loss,
        "digit-vit": _digit_class_loss,
        "digit-judge": _digit_class_loss,
    }[kind]
    model.train()
    began = time.perf_counter() - elapsed
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=kind)
    running = None
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, args.steps, args.lr, args.lr_floor)
        # every draw of the step (batch, noise, and the model's own dropout from the global
        # generator) comes from the seed and the step: a resumed run repeats it exactly
        torch.manual_seed(args.seed * 1_000_003 + step)
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        loss = step_loss(model, photos, args.batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % 100 == 0:
            history.append((step + 1, running))
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step + 1,
                    "seconds": time.perf_counter() - began,
                    "history": history,
                },
                checkpoint,
            )
    bar.close()
    seconds = time.perf_counter() - began
    from safetensors.torch import save_file

    out = Path(args.out or models.weights_file(kind))
    state = {name: value.detach().half().contiguous() for name, value in model.state_dict().items()}
    save_file(state, str(out))
    result = {
        "kind": kind,
        "steps": args.steps,
        "batch": args.batch,
        "lr": args.lr,
        "lr_floor": args.lr_floor,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "threads": args.threads,
        "device": str(args.device),
        "train_seconds": round(seconds, 1),
        "weights": str(out),
        "loss_history": history,
    }
    # measured on the fp16 weights that ship
    shipped = models.build_reference(kind)
    shipped.load_state_dict({name: value.float() for name, value in state.items()})
    result.update(_evaluate(kind, shipped.to(args.device), photos))
    return result


def _usable_device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """``name`` as a device, or a parser error that says why it cannot be trained on."""
    try:
        device = torch.device(name)
    except RuntimeError:
        parser.error(f"--device {name!r} is not a torch device; use cpu, cuda, cuda:N or mps")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            seen = f"cuda:0 to cuda:{count - 1}" if count else "no GPU"
            parser.error(
                f"--device {name}: this torch ({torch.__version__}) sees {seen}; "
                "leave --device out to train on the CPU"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {name}: this torch has no usable MPS backend; try cpu")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/train_reference.py", description=__doc__.splitlines()[0]
    )
    parser.add_argument("kind", choices=sorted(DEFAULTS))
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument(
        "--lr-floor", type=float, help="where the cosine decay ends, a fraction of --lr"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--device", default="cpu", help="where to train: cpu (the default), cuda, cuda:1, mps..."
    )
    parser.add_argument("--checkpoint", help="default: reference-checkpoints/KIND.pt")
    parser.add_argument("--save-every", type=int, default=200)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--out", help="where the fp16 safetensors go (default: the bundled file)")
    parser.add_argument("--report", help="also write the metrics as JSON here")
    args = parser.parse_args(argv)
    for name, value in DEFAULTS[args.kind].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not 0.0 <= args.lr_floor <= 1.0:
        parser.error(f"--lr-floor is a fraction of --lr, from 0 to 1; got {args.lr_floor}")
    args.device = _usable_device(parser, args.device)
    result = train(args.kind, args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.report:
        Path(args.report).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
