"""The ``tokenmerge`` command end to end on tiny presets: exit codes, outputs, JSON, errors; and
its command plugins (tokenmerge-bench's ``bench`` and ``visualize``, broken or missing ones)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokenmerge import cli
from tokenmerge.cli import Command, Listing, load_commands, main
from tokenmerge.errors import PluginWarning
from tokenmerge.extend import hookimpl

TINY = ["--model", "tiny-unet", "--rounds", "1", "--timesteps", "500", "--trajectory-steps", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _error_line(capsys, library_progress: bool = False) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    if library_progress:  # transformers draws its own loading bars on stderr
        lines = [line for line in lines if "it/s]" not in line]
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("tokenmerge: error: ")
    return lines[0]


# ---------------------------------------------------------------------------------- help, list
@pytest.mark.parametrize("command", [[], ["list"], ["bench"], ["visualize"]])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: tokenmerge" in capsys.readouterr().out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_list_names_strategies_adapters_plugins_and_presets(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for expected in ("strategies:", "retom", "tome", "random", "adapters:", "diffusers_unet",
                     "[extra: diffusers]", "plugins:", "tokenmerge.strategies", "from tokenmerge",
                     "presets", "sd15", "sdxl", "tiny-unet", "dit-xl-2", "pixart-alpha-512",
                     "sd3-medium", "flux-dev-cut", "tiny-flux"):  # fmt: skip
        assert expected in out


def test_list_json(capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {s["name"] for s in listing["strategies"]} >= {"retom", "tome", "random"}
    unet = next(a for a in listing["adapters"] if a["name"] == "diffusers_unet")
    assert unet == {**unet, "available": True, "extra": "diffusers", "status": "available"}
    plugin = next(p for p in listing["plugins"] if p["name"] == "tokenmerge.strategies")
    assert plugin["distribution"] == "tokenmerge" and plugin["version"]
    assert "retom" in plugin["strategies"]
    assert [p["name"] for p in listing["presets"]] == [
        "sd15", "sd21", "sdxl", "dit-xl-2", "pixart-alpha-512", "sd3-medium", "flux-dev-cut",
        "tiny-unet", "tiny-dit", "tiny-pixart", "tiny-sd3", "tiny-flux", "vit-b-16", "deit-s-16",
        "tiny-vit", "reference-denoiser", "reference-vit",
    ]  # fmt: skip
    cut = next(p for p in listing["presets"] if p["name"] == "flux-dev-cut")
    assert "depth cut" in cut["notes"]


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("tokenmerge")
    assert script.exists(), "pip install -e . should have created the tokenmerge command"
    done = subprocess.run([str(script), "list"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "retom" in done.stdout


# ---------------------------------------------------------------------------------- command plugins
class _EntryPoint:
    """A stand-in for an ``importlib.metadata.EntryPoint`` of the ``tokenmerge.commands`` group."""

    def __init__(self, name: str, plugin: object = None, error: Exception | None = None):
        self.name, self.value, self.dist = name, f"test_cli:{name}", None
        self._plugin, self._error = plugin, error

    def load(self) -> object:
        if self._error is not None:
            raise self._error
        return self._plugin


class _HelloCommands:
    @hookimpl
    def tokenmerge_register_commands(self, register):
        def run(args):
            print(f"hello {args.who}")
            return 0

        register(
            Command(
                name="hello",
                help="say hello",
                configure=lambda parser: parser.add_argument("who"),
                run=run,
                listing=lambda: Listing(
                    key="greetings",
                    title="greetings",
                    items=[{"name": "hi", "description": "short"}],
                ),
            )
        )


def _with_entry_points(monkeypatch, *extra: _EntryPoint, keep_installed: bool = True) -> None:
    installed = list(cli._entry_points()) if keep_installed else []
    monkeypatch.setattr(cli, "_entry_points", lambda: [*installed, *extra])


def test_a_command_plugin_adds_a_subcommand_and_a_section_of_list(monkeypatch, capsys):
    _with_entry_points(monkeypatch, _EntryPoint("hello", _HelloCommands()))
    assert main(["hello", "world"]) == 0
    assert capsys.readouterr().out == "hello world\n"
    assert main(["list"]) == 0
    assert "greetings:\n  hi  short\n" in capsys.readouterr().out
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["greetings"] == [{"name": "hi", "description": "short"}]
    assert listing["presets"]  # the bench's section is still there


class _RaisingCommands:
    @hookimpl
    def tokenmerge_register_commands(self, register):
        raise RuntimeError("boom")


@pytest.mark.parametrize(
    "entry_point, reason",
    [
        (_EntryPoint("broken", error=ImportError("no module named x")), "ImportError"),
        (_EntryPoint("broken", _RaisingCommands()), "RuntimeError: boom"),
        (_EntryPoint("broken", _HelloCommands()), "'hello' is already registered"),
    ],
    ids=["import", "hook", "duplicate"],
)
def test_a_broken_command_plugin_warns_with_its_name_and_is_skipped(
    entry_point, reason, monkeypatch, capsys
):
    first = _EntryPoint("hello", _HelloCommands())
    _with_entry_points(monkeypatch, first, entry_point)
    with pytest.warns(PluginWarning, match=f"command plugin 'broken'.*skipped.*{reason}"):
        assert main(["list"]) == 0
    assert "greetings:" in capsys.readouterr().out  # the plugins that did load still work
    with pytest.warns(PluginWarning):
        assert main(["hello", "you"]) == 0


def test_command_plugins_ignore_the_strategy_autoload_switch():
    # the suite sets it (tests/conftest.py) to keep strategy listings hermetic; the commands stay
    assert os.environ["TOKENMERGE_DISABLE_PLUGIN_AUTOLOAD"] == "1"
    assert list(load_commands()) == ["list", "bench", "compare", "visualize"]


def test_bench_without_tokenmerge_bench_says_what_is_missing_in_one_line(monkeypatch, capsys):
    _with_entry_points(monkeypatch, keep_installed=False)

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    for command in (["bench"], ["visualize", "--help"]):
        assert main(command) == 2
        line = _error_line(capsys)
        assert (
            f"'tokenmerge {command[0]}' comes with tokenmerge-bench, which is not installed" in line
        )
        assert line.endswith("pip install -e benchmarks")
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    assert (
        "bench, compare and visualize come with tokenmerge-bench (from a tokenmerge checkout:"
        in (help_text)
    )
    assert main(["list"]) == 0  # the library's own command needs nothing else
    assert "presets" not in capsys.readouterr().out


#: imports that --help, --version and parsing must not pull in (torch alone takes a second)
HEAVY = ("torch", "numpy", "diffusers", "timm", "transformers", "matplotlib", "tqdm", "PIL")
_HELP_SCRIPT = """
import json, sys
from tokenmerge import cli
for argv in (['--help'], ['--version'], ['bench', '--help'], ['compare', '--help'],
             ['visualize', '--help'], ['list', '--help']):
    try:
        cli.main(argv)
    except SystemExit as done:
        assert done.code == 0, (argv, done.code)
print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))))
"""


def _heavy_imports_of_help() -> list[str]:
    script = _HELP_SCRIPT.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_version_and_parsing_import_no_torch():
    # the package's __init__ loads the library's names on first use, cli.py imports the
    # registry only for `list`, and tokenmerge-bench's command module and every configure stay
    # light: no torch, no model or plotting library until a command runs
    assert _heavy_imports_of_help() == []


def test_version_names_tokenmerge_and_the_command_plugins_distributions(capsys):
    from tokenmerge._version import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    bench = importlib.metadata.version("tokenmerge-bench")
    assert capsys.readouterr().out.splitlines() == [
        f"tokenmerge {__version__}",
        f"tokenmerge-bench {bench} (bench, compare, visualize)",
    ]


def test_version_without_tokenmerge_bench_names_tokenmerge_only(monkeypatch, capsys):
    _with_entry_points(monkeypatch, keep_installed=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.split() == ["tokenmerge", cli.__version__]


def test_visualize_help_lists_only_the_presets_it_draws_on(capsys):
    from tokenmerge_bench.presets import PRESETS

    with pytest.raises(SystemExit):
        main(["visualize", "--help"])
    model_help = " ".join(capsys.readouterr().out.split("  --model MODEL")[1].split())
    model_help = model_help.split(" --size")[0].replace("- ", "-")  # argparse wraps at hyphens
    for name, preset in PRESETS.items():
        assert (name in model_help) is (not preset.classifier), name
    assert "tiny-vit" not in model_help and "tiny-unet" in model_help


@pytest.mark.parametrize("model", ["tiny-vit", "reference-vit"])
def test_visualize_refuses_a_classifier_preset_in_one_line(model, tmp_path, capsys):
    assert main(["visualize", "--model", model, "-o", str(tmp_path / "v.png")]) == 2
    line = _error_line(capsys)
    assert f"--model {model}: an image classifier, and tokenmerge visualize draws on" in line
    assert "tiny-unet" in line and "tiny-vit" not in line.split("give one of")[1].split("(")[0]
    assert not (tmp_path / "v.png").exists()


def test_visualize_lists_only_its_presets_for_an_unknown_name(tmp_path, capsys):
    assert main(["visualize", "--model", "tiny-unte", "-o", str(tmp_path / "v.png")]) == 2
    line = _error_line(capsys)
    assert "unknown preset 'tiny-unte'" in line and "did you mean 'tiny-unet'" in line
    assert "tiny-vit" not in line


# ---------------------------------------------------------------------------------- bench
ROW_FIELDS = {
    "label": str,
    "kind": str,
    "strategy": str,
    "variant": str,
    "ratio": float,
    "config": (dict, type(None)),
    "seconds": float,
    "speedup": float,
    "seconds_samples": list,
    "seconds_min": float,  # the spread of the timed rounds around the median
    "seconds_max": float,
    "overhead_ms": (dict, type(None)),
    "overhead_percent": (float, type(None)),
    "peak_memory_mb": (float, type(None)),
    "block_error": (float, type(None)),
    "output_error": (float, type(None)),
    "trajectory_error": (float, type(None)),
    "held_out_loss": (dict, type(None)),  # the reference denoiser only
    "held_out_loss_increase": (float, type(None)),
    "merged_blocks": int,
    "tokens": str,
    "kernels_planning": (float, type(None)),  # per merged site, counted on the meta device
    "kernels_reusing": (float, type(None)),
    "syncs": (int, type(None)),
}


def _check_schema(data: dict) -> None:
    assert set(data) == {
        "tokenmerge_version", "model", "machine", "settings", "rows", "run_seconds",
    }  # fmt: skip
    assert {"name", "description", "source", "notes", "attention", "class", "input"} <= set(
        data["model"]
    )
    assert {"device", "torch", "threads", "platform"} <= set(data["machine"])
    assert data["run_seconds"] > 0
    for row in data["rows"]:
        assert set(row) == set(ROW_FIELDS), row
        for name, kind in ROW_FIELDS.items():
            assert isinstance(row[name], kind), (name, row[name])


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(
        ["bench", *TINY, "--strategies", "retom", "tome", "--ratios", "0", "0.5",
         "--peer", "tomesd", "--json", str(out / "r.json"), "--plot", str(out / "p.png"),
         "--no-progress"]
    )  # fmt: skip
    return code, out


def test_bench_writes_table_json_and_plot(bench_run, capsys):
    code, out = bench_run
    assert code == 0
    data = json.loads((out / "r.json").read_text())
    _check_schema(data)
    assert [row["label"] for row in data["rows"]] == [
        "none", "retom 0", "retom 0.5", "tome 0", "tome 0.5", "tomesd 0", "tomesd 0.5",
    ]  # fmt: skip
    assert (out / "p.png").read_bytes()[:8] == PNG_MAGIC
    rows = {row["label"]: row for row in data["rows"]}
    assert all(row["syncs"] == 0 for row in rows.values())
    # retom plans every second step; tome and tomesd at every step; nothing merges at ratio 0
    assert rows["retom 0.5"]["kernels_planning"] > rows["retom 0.5"]["kernels_reusing"] > 0
    assert rows["retom 0.5"]["kernels_reusing"] <= 12
    assert rows["tome 0.5"]["kernels_planning"] > 0 and rows["tome 0.5"]["kernels_reusing"] is None
    assert rows["tomesd 0.5"]["kernels_planning"] > 0
    assert rows["retom 0"]["kernels_planning"] is None and rows["none"]["kernels_planning"] is None
    assert "similarity-based" in data["model"]["attention"]


def test_bench_writes_no_file_unless_asked_and_reports_progress_on_stderr(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", *TINY, "--strategies", "tome", "--peer", "none", "--rounds", "2"]
    assert main(argv) == 0
    assert list(tmp_path.iterdir()) == []  # no plot unless --plot PATH
    captured = capsys.readouterr()
    # every phase says when it starts, on stderr; stdout holds the report alone
    phases = ["building the model (tiny-unet", "warm-up: 1 round(s)", "timed rounds: 2 of 2",
              "fidelity: 1 input(s)", "instrumented run:", "kernel counts:", "done"]  # fmt: skip
    starts = [line for line in captured.err.splitlines() if line.startswith("bench [")]
    for phase in phases:
        assert any(phase in line for line in starts), (phase, starts)
    assert "bench [" not in captured.out and "call/s" not in captured.out
    # medians with the spread of the timed rounds: "0.012 (0.011-0.013)"
    assert "s/forward (min-max)" in captured.out
    table = captured.out.split("s/forward (min-max)")[1]
    assert re.search(r"\b\d+\.\d{3} \(\d+\.\d{3}-\d+\.\d{3}\)", table)


def test_bench_no_progress_is_silent_on_stderr(tmp_path, capsys):
    argv = ["bench", *TINY, "--strategies", "tome", "--peer", "none", "--no-progress"]
    assert main(argv) == 0
    assert capsys.readouterr().err == ""


def test_bench_figures_are_consistent(bench_run):
    _, out = bench_run
    rows = {row["label"]: row for row in json.loads((out / "r.json").read_text())["rows"]}
    for row in rows.values():  # the spread of the timed rounds is kept next to the median
        assert row["seconds_min"] == min(row["seconds_samples"])
        assert row["seconds_max"] == max(row["seconds_samples"])
        assert row["seconds_min"] <= row["seconds"] <= row["seconds_max"]
    assert rows["none"]["speedup"] == 1.0 and rows["none"]["block_error"] is None
    for label in ("retom 0", "tome 0", "tomesd 0"):  # ratio 0 is exact: errors are zero
        assert rows[label]["output_error"] == 0.0
        assert rows[label]["trajectory_error"] == 0.0
        assert rows[label]["block_error"] is None  # no block merged
        assert rows[label]["merged_blocks"] == 0
    for label in ("retom 0.5", "tome 0.5", "tomesd 0.5"):
        row = rows[label]
        assert row["block_error"] > 0 and row["output_error"] > 0
        assert row["trajectory_error"] > 0
        assert row["merged_blocks"] == 3  # tiny-unet's full-resolution blocks
        assert row["tokens"] == "256->128"
        assert row["overhead_ms"]["plan"] > 0 and row["overhead_ms"]["merge"] > 0
        assert len(row["seconds_samples"]) == 1
    assert rows["retom 0.5"]["peak_memory_mb"] > 0


def test_bench_prints_the_table_and_what_weights_were_used(tmp_path, capsys):
    code = main(["bench", *TINY, "--strategies", "random", "--peer", "none", "--no-plot",
                 "--no-progress", "--attention", "as-loaded"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "random 0.5" in out and "speedup" in out and "run time:" in out
    assert "attention weights: the model's own weights" in out
    assert "tomesd" not in out


def test_bench_config_overrides(capsys):
    code = main(["bench", *TINY, "--strategies", "retom", "--peer", "none", "--no-plot",
                 "--no-progress", "--set", "cache_interval=1",
                 "--set", "window_size=4"])  # fmt: skip
    assert code == 0


def test_bench_a_saved_checkpoint(tmp_path, capsys):
    from tokenmerge_bench.presets import get_preset

    get_preset("tiny-unet").build().save_pretrained(tmp_path / "unet")
    code = main(["bench", *TINY[2:], "--model", str(tmp_path / "unet"), "--strategies", "retom",
                 "--peer", "none", "--no-plot", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "local checkpoint" in out and "the model's own weights" in out


def test_bench_strategy_variants_on_a_transformer(tmp_path, capsys):
    code = main(["bench", *TINY[2:], "--model", "tiny-dit", "--strategies", "tome", "retom",
                 "retom:sites.mlp=true", "--no-plot", "--no-progress",
                 "--json", str(tmp_path / "r.json")])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "retom+sites.mlp 0.5" in out and "tomesd" not in out  # auto: no tomesd on a DiT
    assert "256 image tokens" in out and "DDIM steps" in out
    data = json.loads((tmp_path / "r.json").read_text())
    _check_schema(data)
    rows = {row["label"]: row for row in data["rows"]}
    assert list(rows) == ["none", "tome 0.5", "retom 0.5", "retom+sites.mlp 0.5"]
    assert rows["retom+sites.mlp 0.5"]["config"]["sites"]["mlp"] is True
    assert rows["retom+sites.mlp 0.5"]["variant"] == "retom+sites.mlp"
    assert data["settings"]["strategies"] == ["tome", "retom", "retom:sites.mlp=true"]
    assert data["model"]["sampler"] == "DDIM"


def test_bench_a_cut_preset_says_so_in_the_header(capsys):
    from tokenmerge_bench.presets import get_preset
    from tokenmerge_bench.report import format_report
    from tokenmerge_bench.runner import BenchResult

    preset = get_preset("flux-dev-cut")
    model = {"name": preset.name, "description": preset.description, "class": "Flux",
             "source": "preset", "notes": preset.notes, "attention": "x", "input": "512 px",
             "sampler": "Euler (flow matching)"}  # fmt: skip
    machine = {"device": "cpu", "torch": "2", "threads": 1, "processor": "x86_64"}
    settings = {"dtype": "float32", "rounds": 1, "photos": ["astronaut"], "timesteps": [500],
                "trajectory_steps": 2}  # fmt: skip
    header = format_report(BenchResult("0", model, machine, settings, [], 1.0))
    assert "depth cut: 2 of FLUX.1-dev's 19 double-stream blocks" in header
    assert "2 Euler (flow matching) steps" in header


def test_bench_a_saved_transformer_checkpoint(tmp_path, capsys):
    from tokenmerge_bench.presets import get_preset

    get_preset("tiny-sd3").build().save_pretrained(tmp_path / "sd3")
    code = main(["bench", *TINY[2:], "--model", str(tmp_path / "sd3"), "--strategies", "tome",
                 "--no-plot", "--no-progress"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    # its size comes from its config (sample_size 32: 256 px), its sampler from its family
    assert "256 px (32 x 32 latent, patch 2" in out and "Euler (flow matching)" in out
    assert "tome 0.5" in out and "tomesd" not in out


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--strategies", "retomm"], "unknown strategy 'retomm'"),
        (["--ratios", "1.5"], "out of range"),
        (["--ratios", "half"], "not a number"),
        (["--model", "sd16"], "unknown preset 'sd16'"),
        (["--model", "/no/such/folder"], "no such file or folder"),
        (["--set", "cache_intervall=2"], "did you mean 'cache_interval'"),
        (["--set", "novalue"], "is not KEY=VALUE"),
        (["--rounds", "0"], "must be at least 1"),
        (["--timesteps", "1000"], "trained on timesteps 0..999"),
        (["--json", "/no-such-dir/r.json"], "does not exist"),
        (
            ["--photos", "moon"],
            "unknown photograph 'moon' for this model; --photos takes astronaut",
        ),
        (["--samples", "s.png"], "--samples saves images of the reference denoiser only"),
        (["--peer", "tomesdd"], "invalid choice"),
        (["--strategies", "retom:sites.mlpp=true"], "did you mean 'mlp'"),
        (["--strategies", "retom:sites.mlp"], "'sites.mlp' is not KEY=VALUE"),
        (["--strategies", "tomee:sites.mlp=true"], "unknown strategy 'tomee'"),
        (["--strategies", "retom:ratio=0.2"], "give ratios with --ratios"),
        (["--strategies", "retom", "retom:sites.mlp=false"], "configure the same merging"),
        (["--model", "tiny-flux", "--peer", "tomesd"], "tomesd patches only diffusers UNet"),
    ],
)
def test_bench_bad_arguments_give_one_line(arguments, expected, capsys):
    assert main(["bench", *TINY, "--no-progress", *arguments]) == 2
    assert expected in _error_line(capsys)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--set", "ratio=0.3"], "ratio has an option of its own; give it with --ratios"),
        (["--set", "ratio=0.3", "--strategies", "retom"], "e.g. --ratios 0.3"),
        (["--set", "strategy=tome"], "give it with --strategies"),
        (["--device", "nonsense"], "--device 'nonsense' is not a torch device"),
        (["--json", ""], "argument --json: the path is empty"),
        (["--plot", " "], "argument --plot: the path is empty"),
        (["--similarity-scale", "nan"], "'nan' is not a finite positive number"),
        (["--similarity-scale", "-1"], "'-1' is not a finite positive number"),
        (["--size", "8"], "image size 8 px is not a multiple of 8 of at least 16"),
        (["--model", "tiny-sd3", "--size", "8192"], "too large for this SD3 model"),
    ],
)
def test_bench_user_errors_are_one_line_with_status_2(arguments, expected, capsys):
    code = main(["bench", *TINY, "--no-progress", "--no-plot", "--peer", "none", *arguments])
    assert (code, expected in _error_line(capsys)) == (2, True)


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--size", "70"], "--size 70: VisionTransformer takes 64 x 64 px images only"),
        (["--set", "ratio=0.3", "--strategies", "retom"], "--set 'ratio=0.3'"),
        (["--device", "nonsense"], "is not a torch device"),
    ],
)
def test_classifier_bench_user_errors_are_one_line_with_status_2(arguments, expected, capsys):
    code = main(["bench", "--model", "tiny-vit", "--no-progress", "--no-plot", *arguments])
    assert (code, expected in _error_line(capsys)) == (2, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a CUDA GPU")
@pytest.mark.parametrize("command", ["bench", "visualize"])
def test_cuda_without_a_gpu_is_one_line_with_status_2(command, tmp_path, capsys):
    argv = [command, "--model", "tiny-unet", "--device", "cuda"]
    output = ["-o", str(tmp_path / "v.png")]
    argv += ["--no-plot", "--no-progress"] if command == "bench" else output
    assert main(argv) == 2
    assert "--device cuda: no cuda device is available" in _error_line(capsys)


def test_visualize_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    for arguments, expected in [
        (["--device", "nonsense"], "is not a torch device"),
        (["--output", ""], "argument --output/-o: the path is empty"),
        (["--similarity-scale", "inf"], "'inf' is not a finite positive number"),
        (["--set", "ratio=0.3"], "give it with --ratios"),
    ]:
        argv = ["visualize", "--model", "tiny-unet", "-o", str(tmp_path / "v.png"), *arguments]
        assert main(argv) == 2, arguments
        assert expected in _error_line(capsys)


def test_bench_folder_without_a_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["bench", "--model", str(tmp_path / "empty"), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert "holds no loadable model" in line and str(tmp_path / "empty") in line


def test_bench_a_saved_vit_checkpoint_as_a_classifier(tmp_path, capsys):
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=8)).save_pretrained(
        tmp_path / "vit"
    )  # fmt: skip
    code = main(["bench", "--model", str(tmp_path / "vit"), "--strategies", "tome", "--r", "4",
                 "--batch", "2", "--rounds", "1", "--no-progress", "--no-plot"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "ViTModel (local checkpoint: its own weights); the model's own weights" in out
    assert "tome r=4" in out and "17->9" in out  # 1 + 16 tokens, 4 merged in each of 2 blocks


# ---------------------------------------------------------------------------------- classifiers
TINY_VIT = ["--model", "tiny-vit", "--batch", "2", "--rounds", "1", "--no-progress"]


def test_classifier_bench_writes_table_json_and_plot(tmp_path, capsys):
    files = ["--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")]
    code = main(["bench", *TINY_VIT, "--strategies", "tome", "retom", "random", *files])
    assert code == 0
    out = capsys.readouterr().out
    for label in ("none", "tome r=12", "retom r=12", "random r=12"):
        assert label in out
    assert (tmp_path / "p.png").read_bytes().startswith(PNG_MAGIC)
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["settings"]["r"] == [12] and data["settings"]["batch"] == 2
    rows = {row["label"]: row for row in data["rows"]}
    assert rows["none"]["cosine"] is None and rows["none"]["speedup"] == 1.0
    for label in ("tome r=12", "retom r=12", "random r=12"):
        row = rows[label]
        assert row["tokens"] == "65->17"  # 64 patches + class token, 12 merged in each of 4 blocks
        assert 0.0 < row["cosine_min"] <= row["cosine"] <= 1.0 + 1e-6
        assert 0.0 <= row["top1_agreement"] <= 1.0
        assert row["config"]["r"] == 12 and row["config"]["sites"]["attn"] is True
        assert row["images_per_second"] == pytest.approx(2 / row["seconds"])


def test_classifier_bench_with_ratios(capsys):
    code = main(["bench", *TINY_VIT, "--strategies", "tome", "--ratios", "0", "0.25",
                 "--no-plot"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "tome 0 " in out and "tome 0.25" in out
    zero = next(line for line in out.splitlines() if line.startswith("tome 0 "))
    assert "1.0000" in zero  # ratio 0: bit-identical, cosine 1


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        (["--timesteps", "500"], "--timesteps apply to diffusion models only"),
        (["--photos", "coffee"], "--photos apply to diffusion models only"),
        (["--trajectory-steps", "2"], "--trajectory-steps apply to diffusion models only"),
        (["--samples", "s.png"], "--samples apply to diffusion models only"),
        (["--peer", "tomesd"], "--peer tomesd apply to diffusion models only"),
        (["--strategies", "tome", "--ratios", "0.6"], "merges more than half"),
    ],
)
def test_classifier_bench_rejects_what_does_not_apply(arguments, expected, capsys):
    assert main(["bench", *TINY_VIT, "--no-plot", *arguments]) == 2
    assert expected in _error_line(capsys)


def test_classifier_bench_takes_several_r(capsys):
    code = main(["bench", *TINY_VIT, "--strategies", "tome", "random", "--r", "4", "12",
                 "--no-plot"])  # fmt: skip
    assert code == 0
    labels = [line.split()[0:2] for line in capsys.readouterr().out.splitlines()]
    runs = [" ".join(cells) for cells in labels if cells and cells[0] in ("tome", "random")]
    assert runs == ["tome r=4", "random r=4", "tome r=12", "random r=12"]


def test_bench_r_is_for_classifiers(capsys):
    assert main(["bench", *TINY, "--r", "4", "--no-plot"]) == 2
    assert "--r sets tokens per block for classifiers" in _error_line(capsys)


def test_bench_unwritable_plot_fails_before_running(tmp_path, capsys):
    assert main(["bench", *TINY, "--plot", str(tmp_path)]) == 2
    assert "it is a folder" in _error_line(capsys)


def test_classifier_bench_compile_runs_each_configuration_with_its_own_hooks(monkeypatch, capsys):
    """Every configuration is compiled; the merged ones must not reuse the unmerged graph
    (torch.compile does not guard on module hooks by default)."""
    import torch

    eager_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: eager_compile(fn, backend="eager"))
    torch._dynamo.reset()
    code = main(["bench", *TINY_VIT, "--strategies", "tome", "--compile", "--no-plot"])
    torch._dynamo.reset()
    assert code == 0
    out = capsys.readouterr().out
    assert "torch.compile" in out
    row = next(line for line in out.splitlines() if line.startswith("tome r=12"))
    assert "65->17" in row and "1.000000  1.000000" not in row  # merged, so not identical


def test_diffusion_bench_compile_runs_each_configuration_with_its_own_hooks(monkeypatch, capsys):
    """The timed rounds call every configuration compiled; a merged one must run its own graph,
    with its hooks (torch.compile does not guard on module hooks by default, so without the
    bench turning the guards on it would run the unmerged graph and time no merging)."""
    from tokenmerge_bench import runner

    eager_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: eager_compile(fn, backend="eager"))
    seen: dict[int, list] = {}
    real_timed = runner.timed

    def timed(call, sync):
        elapsed, out = real_timed(call, sync)
        model = call.args[0]
        assert isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
        seen.setdefault(id(model), []).append(
            ("_tokenmerge_handle" in vars(model._orig_mod), out.clone())
        )
        return elapsed, out

    monkeypatch.setattr(runner, "timed", timed)
    guards = torch._dynamo.config.skip_nnmodule_hook_guards
    torch._dynamo.reset()
    code = main(
        ["bench", *TINY, "--strategies", "tome", "--peer", "none", "--compile", "--no-plot"]
    )
    torch._dynamo.reset()
    assert code == 0
    assert torch._dynamo.config.skip_nnmodule_hook_guards == guards  # restored
    assert "through torch.compile" in capsys.readouterr().out
    (plain,), (merged,) = (
        [calls for calls in seen.values() if calls[0][0] == patched] for patched in (False, True)
    )
    assert len(plain) == len(merged) >= 3  # warm-up rounds, then the timed one
    for (_, a), (_, b) in zip(plain, merged, strict=True):
        assert not torch.equal(a, b)  # merged: its own graph, with its hooks
