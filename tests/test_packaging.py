"""The wheel a user installs: built from a copy of the project, installed outside the repository, and run from there.

The editable install the tests otherwise run hides a file left out of the package (a JSON of the lexicon, a phone
map): it reads the source tree. So every file under ``src/spidr`` must be in the wheel, and the installed copy must
work with the repository out of reach.
"""

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version("setuptools").split(".")[:2])
    except Exception:  # not installed, or a version we cannot read
        return (0,)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if _setuptools_version() < (77,):
        pytest.skip("needs setuptools >= 77 in this environment (the build runs without network isolation)")
    project = tmp_path_factory.mktemp("project")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                            str(project)], capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    # setuptools announces the end of support for deprecated pyproject fields this way (a build that will break)
    for warning in ("SetuptoolsDeprecationWarning", "BuildBackendWarning"):
        assert warning not in built.stdout + built.stderr, built.stdout + built.stderr
    (path,) = out.glob("spidr-*.whl")
    return path


def test_wheel_holds_every_source_file_and_its_metadata(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = ROOT / "src"
    tracked = subprocess.run(["git", "ls-files", "spidr"], cwd=source, capture_output=True, text=True, check=False)
    if tracked.returncode == 0 and tracked.stdout:
        expected = set(tracked.stdout.split())  # what the project holds, not a stray file of this working tree
    else:  # not a git checkout (an unpacked release)
        expected = {p.relative_to(source).as_posix() for p in (source / "spidr").rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts}
    assert expected - names == set()
    info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
    metadata = zipfile.ZipFile(wheel).read(f"{info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    assert f"{info}/licenses/LICENSE" in names
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "spidr = spidr.cli:main" in entry_points


def test_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                                str(site), str(wheel)], capture_output=True, text=True, check=False)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # The package's data files, read through the installed copy: the lexicon, the phone maps, the corpus words.
    # (-I: no PYTHONPATH, no user site, no current folder; the path is put first by hand.)
    script = (f"import sys; sys.path.insert(0, {str(site)!r})\n"
              "import spidr\n"
              "from spidr.corpus import language, phones, text\n"
              "print(spidr.__file__)\n"
              "print(len(language.lexicon().content_words()), len(phones.phone_inventory()),"
              " len(text.sentences('0', 3)))\n")
    ran = subprocess.run([sys.executable, "-I", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         check=False)
    assert ran.returncode == 0, ran.stderr
    module_file, counts = ran.stdout.splitlines()
    assert Path(module_file).is_relative_to(site)
    assert all(int(n) > 0 for n in counts.split())
    cli = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); "
                          "sys.argv = ['spidr', '--help']; from spidr.cli import main; main()"],
                         cwd=tmp_path, capture_output=True, text=True, check=False)
    assert cli.returncode == 0, cli.stderr
    assert "synth-lm-bench" in cli.stdout
