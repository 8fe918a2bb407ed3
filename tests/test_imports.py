"""Import costs: ``spidr --help`` and the data pipeline must not pull in torch or the model code they do not use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "numpy", "scipy", "sklearn", "matplotlib", "soundfile", "soxr", "safetensors", "submitit")
MODEL_CODE = ("spidr.models.dinosr", "spidr.models.spidr", "spidr.models.loading", "spidr.models.convert",
              "spidr.models.hf_export", "spidr.models.s3prl_export", "spidr.models.build")
SUBCOMMANDS = ["manifest", "train", "submit", "plot-training", "export", "info", "extract", "evaluate", "probe", "abx",
               "items", "units-quality", "kmeans", "units", "compare-reports", "synth-corpus", "synth-lm-bench",
               "lm-units", "lm-train", "lm-score", "lm-study", "lm-eval", "lm-correlate", "demo", "learning-curve"]


def _modules_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return its JSON-printed result (``loaded`` = sys.modules names)."""
    script = textwrap.dedent(code) + "\nimport json, sys\nprint(json.dumps({'loaded': sorted(sys.modules), **extra}))"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    result = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True, env=env,
                            timeout=120)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _top_level(names: list[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def test_cli_help_imports_no_heavy_dependency():
    out = _modules_after("""
        import argparse
        import spidr.cli
        parser = spidr.cli.build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        extra = {'commands': list(sub.choices), 'help': parser.format_help()}
    """)
    assert not _top_level(out["loaded"]) & set(HEAVY), sorted(_top_level(out["loaded"]) & set(HEAVY))
    assert out["commands"] == SUBCOMMANDS
    for command in SUBCOMMANDS:
        assert command in out["help"]


def test_collate_does_not_import_the_models_or_the_checkpoint_code():
    out = _modules_after("import spidr.data.collate\nextra = {}")
    loaded = set(out["loaded"])
    assert "torch" in loaded  # collation builds tensors
    assert not loaded & set(MODEL_CODE), sorted(loaded & set(MODEL_CODE))


def test_lazy_package_attributes_resolve():
    out = _modules_after("""
        import spidr
        from spidr.models import DinoSR, load_model
        extra = {'same': spidr.DinoSR is DinoSR and spidr.load_model is load_model}
    """)
    assert out["same"]


def test_help_names_a_default_once_and_only_when_it_informs():
    import argparse

    from spidr.help_format import HelpFormatter

    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--layers", default=None, help="layers (default: every head's layer)")
    parser.add_argument("--out", default=None, help="output folder")
    parser.add_argument("--trust", action="store_true", help="allow unpickling")
    parser.add_argument("--set", action="append", default=[], help="an override")
    parser.add_argument("--voices", default="", help="comma-separated voices")
    text = " ".join(parser.format_help().split())
    assert "training steps (default: 300)" in text
    assert text.count("(default:") == 2  # --steps, and --layers's own words
    assert "(default: )" not in text
    assert "output folder --trust" in text
    assert "(default: False)" not in text
    assert "(default: [])" not in text


def test_dir_of_the_package_lists_its_public_names_not_its_imports():
    """dir(spidr) (a notebook's tab completion) listed Any, TYPE_CHECKING, annotations, importlib and _LAZY_EXPORTS
    beside the API."""
    import spidr

    names = dir(spidr)
    assert set(spidr.__all__) <= set(names)
    assert {"config"} <= set(names)  # (a subpackage imported by the package itself)
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib", "ModuleType", "_LAZY_EXPORTS"} & set(names)


def test_a_help_text_that_names_its_default_gets_no_second_one():
    """mut H02 (the '(default' check dropped: an option whose help already names its default, with a default that
    is not None, got a second '(default: ...)' that contradicts the first's wording)."""
    import argparse

    from spidr.help_format import HelpFormatter

    parser = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    parser.add_argument("--jobs", type=int, default=4, help="reader processes (default: 4, or fewer CPUs)")
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    text = " ".join(parser.format_help().split())
    assert "reader processes (default: 4, or fewer CPUs)" in text
    assert "training steps (default: 300)" in text
    assert text.count("(default:") == 2
