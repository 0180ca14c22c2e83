"""Regenerate the documentation's figures from today's defaults: ``make figures``.

Every picture under ``docs/images/`` that shows what tokenmerge does today is made here, by the
``tokenmerge`` command a reader can run, so a change of defaults is one command away from the
pages. Figures of a past study (its plot or samples, dated on its page) are listed in
``STUDIES`` with the page that dates them; ``tests/test_docs_figures.py`` checks that every image
the docs show is one or the other.

    python benchmarks/docs_figures.py                  # all of them (about 8 minutes, 2 cores)
    python benchmarks/docs_figures.py quality-digit-dit-50   # one
    python benchmarks/docs_figures.py --list           # names, files and commands

``compare`` figures also print their table (PSNR, SSIM and digits recognised against the
unmerged images), the figures the quality page quotes next to them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"


@dataclass(frozen=True)
class Figure:
    """One picture: the ``tokenmerge`` command line that draws it, and the file it becomes."""

    name: str
    line: str  # the command line after `tokenmerge`, without --output

    @property
    def argv(self) -> list[str]:
        return self.line.split()

    @property
    def path(self) -> Path:
        return IMAGES / f"{self.name}.png"

    @property
    def command(self) -> str:
        return self.argv[0]


def _compare(model: str, ratio: float) -> Figure:
    line = (
        f"compare --model {model} --prompt 2 --prompt 3 --prompt 5 --prompt 8 --seeds 0 1 "
        f"--strategies retom tome todo random --ratios {ratio} --no-progress"
    )
    return Figure(f"quality-{model}-{round(ratio * 100)}", line)


#: the digit denoisers (learned attention, trained on MNIST): the quality page's grids
DIGIT_MODELS = ("digit-dit", "digit-flux")

FIGURES: tuple[Figure, ...] = (
    Figure(
        "merges-sd15",
        "visualize --model sd15 --size 256 --ratio 0.5 --strategies retom tome todo random",
    ),
    *(_compare(model, ratio) for model in DIGIT_MODELS for ratio in (0.25, 0.5, 0.75)),
)

#: figures of one past study, kept as that study's record: file -> the page that dates them
STUDIES: dict[str, str] = {
    "sd15-speed-vs-error-512.png": "benchmarks.md",
    "reference-denoiser-samples.png": "reference-models.md",
}


def _small_png(source: Path, target: Path) -> None:
    """Store ``source`` with a 256-colour palette: a tenth of the size, no visible change here."""
    from PIL import Image

    with Image.open(source) as image:
        image.convert("RGB").quantize(colors=256).save(target, optimize=True)


def _table(results: Path) -> str:
    # no seconds: on these tiny models merging costs more than it saves (benchmarks.md times
    # models large enough to gain)
    rows = ["| config | PSNR dB | SSIM | recognised |", "| --- | --- | --- | --- |"]
    for entry in json.loads(results.read_text())["configurations"]:
        if entry["config"] is None:
            continue  # the unmerged images: the reference of every other row
        recognised = entry.get("recognised")
        shown = "-" if recognised is None else f"{recognised:.0%}"
        rows.append(f"| {entry['label']} | {entry['psnr']:.2f} | {entry['ssim']:.3f} | {shown} |")
    return "\n".join(rows)


def make(figure: Figure) -> None:
    """Run the figure's command into a scratch folder and store its picture in docs/images."""
    from tokenmerge.cli import main

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / ("out.png" if figure.command == "visualize" else "out")
        status = main([*figure.argv, "--output", str(out)])
        if status != 0:
            raise SystemExit(f"{figure.name}: `tokenmerge {figure.line}` failed")
        if figure.command == "compare":
            print(_table(out / "results.json"))
            out = out / "grid.png"
        _small_png(out, figure.path)
    print(f"wrote {figure.path.relative_to(IMAGES.parents[1])}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="figures to make (default: every one)")
    parser.add_argument("--list", action="store_true", help="list the figures and exit")
    args = parser.parse_args(argv)
    known = {figure.name: figure for figure in FIGURES}
    if args.list:
        for figure in FIGURES:
            print(f"{figure.name}: docs/images/{figure.path.name}: tokenmerge {figure.line}")
        return 0
    unknown = sorted(set(args.names) - set(known))
    if unknown:
        parser.error(f"unknown figures {unknown}; known: {sorted(known)}")
    for name in args.names or list(known):
        make(known[name])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
