"""Every command in README.md runs as written, with small step counts.

Each fenced `bash` block runs top to bottom in its own working directory, a copy of one where the digits demo
(`make train`, shortened) has already run, with `configs/` and `examples/` linked in. Training commands get
`--max-steps 2` (3 when resuming) and, where the command does not set them, `--workers 0 --no-progress
--meta-mode off`. A template names a dataset the machine lacks as `/path/to/...`: the test substitutes a tiny stand-in
of the same kind (CIFAR-100 pickles, an ImageNet-style or a small ImageFolder tree) and adds `--batch-size 8` where
the command sets none, so every flag is parsed, resolved and trained with. `torchrun` commands are checked by
torchrun's own parser and by resolving the training arguments on the stand-in data; `make` targets other than
`train` by `make -n`; `tensorboard` by reading the runs' event files (`--inspect`). The blocks that export run once,
in the directory in which the `python` blocks are then executed. A README command the test does not know how to check
fails the test, and so does a relative link in the README to a file that does not exist.
"""
from __future__ import annotations

import csv
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastmcl import evaluate, export, train
from fastmcl.build import resolve
from fastmcl.config import parse_config
from fastmcl.pipeline import detect_source

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
LINKED = ("configs", "examples")          # repository folders the README's commands name by relative path

#: added to every training command that does not set them (`--max-steps` is always replaced: small step counts)
RUN_BUDGET = {"--workers": "0", "--no-progress": None, "--meta-mode": "off"}
#: added to templates (commands on a stand-in dataset) that do not set them
TEMPLATE_BUDGET = {"--batch-size": "8"}
#: per stand-in: what keeps it small (an ImageNet-style crop above the 64-px CIFAR-style limit)
STANDIN_BUDGET = {"/path/to/imagenet": {"--image-size": "72", "--neg-k": "64"}}


# -- the README -------------------------------------------------------------------------------------------------------
def fenced_blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def bash_blocks() -> list[list[list[str]]]:
    """Each bash block as its commands, each command as argv (comments dropped)."""
    return [[shlex.split(line, comments=True) for line in block.splitlines() if shlex.split(line, comments=True)]
            for block in fenced_blocks("bash")]


def block_id(block: list[list[str]]) -> str:
    return " | ".join(" ".join(argv[:4]) for argv in block)[:80]


# -- stand-ins for the datasets the README names as templates ---------------------------------------------------------
def write_jpegs(folder: Path, count: int, size: tuple[int, int], rng: np.random.Generator,
                name: str = "img{}.jpg") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name.format(i))


def make_cifar100(root: Path, rng: np.random.Generator) -> Path:
    """The python version's `train` and `test` pickles: 2 train and 1 test image of each of 100 classes."""
    root.mkdir(parents=True)
    for name, per_class in (("train", 2), ("test", 1)):
        labels = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": labels.tolist()}, f)
    return root


def make_imagefolder(root: Path, classes: list[str], train: int, val: int, size: tuple[int, int],
                     rng: np.random.Generator) -> Path:
    for cls in classes:
        write_jpegs(root / "train" / cls, train, size, rng)
        write_jpegs(root / "val" / cls, val, size, rng)
    return root


SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361"]


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("standins")
    return {
        "/path/to/cifar-100-python": make_cifar100(root / "cifar-100-python", rng),
        "/path/to/imagenet": make_imagefolder(root / "imagenet", SYNSETS, 6, 2, (112, 96), rng),
        "/path/to/my_dataset": make_imagefolder(root / "my_dataset", [f"class{i}" for i in range(10)], 4, 1,
                                                (32, 32), rng),
    }


def raw_imagenet(root: Path) -> Path:
    """ImageNet as downloaded: val/ flat, its classes in `LOC_val_solution.csv` (Kaggle's release)."""
    rng = np.random.default_rng(1)
    make_imagefolder(root, SYNSETS, 1, 0, (80, 64), rng)
    shutil.rmtree(root / "val")
    write_jpegs(root / "val", 8, (80, 64), rng, name="ILSVRC2012_val_0000000{}.JPEG")
    with open(root / "LOC_val_solution.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        for i in range(8):
            w.writerow([f"ILSVRC2012_val_0000000{i}", f"{SYNSETS[i % 4]} 1 2 3 4 {SYNSETS[i % 4]} 5 6 7 8"])
    return root


def substitute(argv: list[str], standins: dict[str, Path]) -> tuple[list[str], dict[str, str | None]]:
    """`argv` with every `/path/to/...` replaced by its stand-in, and the budget flags that come with it."""
    budget: dict[str, str | None] = {}
    out = []
    for arg in argv:
        if "/path/to/" in arg:
            key = next((k for k in standins if arg.startswith(k)), None)
            assert key is not None, f"README template path {arg!r} has no stand-in in tests/test_readme.py"
            arg = str(standins[key]) + arg[len(key):]
            budget.update(TEMPLATE_BUDGET)
            budget.update(STANDIN_BUDGET.get(key, {}))
        out.append(arg)
    return out, budget


def with_budget(args: list[str], budget: dict[str, str | None], max_steps: int) -> list[str]:
    """`args` with `--max-steps` set to `max_steps` and every budget flag the command does not set appended."""
    args = list(args)
    while "--max-steps" in args:
        i = args.index("--max-steps")
        del args[i:i + 2]
    for flag, value in budget.items():
        if flag not in args:
            args += [flag] if value is None else [flag, value]
    return args + ["--max-steps", str(max_steps)]


# -- the working directory --------------------------------------------------------------------------------------------
def link_repo_folders(work: Path) -> None:
    for name in LINKED:
        if not (work / name).exists():
            (work / name).symlink_to(REPO / name, target_is_directory=True)


#: training argv -> exit status, of the runs the fixtures made (a README command equal to one is not run twice)
_RAN: dict[tuple[str, ...], int] = {}


def train_ok(args: list[str]) -> None:
    rc = train.main(args)
    assert rc == 0, f"python -m fastmcl.train {' '.join(args)} -> exit {rc}"
    _RAN[tuple(args)] = rc


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A folder in which `make train` (the digits demo, shortened) has run: runs/latest exists."""
    work = tmp_path_factory.mktemp("demo")
    link_repo_folders(work)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        train_ok(with_budget([], RUN_BUDGET, 2))
    finally:
        os.chdir(cwd)
    return work


@pytest.fixture
def workdir(demo_dir, tmp_path, monkeypatch) -> Path:
    work = tmp_path / "work"
    shutil.copytree(demo_dir, work, symlinks=True)
    monkeypatch.chdir(work)
    return work


def make_target(argv: list[str]) -> str:
    """`make -n` of the command: the recipe make would run (the target exists and its arguments are accepted)."""
    done = subprocess.run(["make", "-n", "-C", str(REPO), *argv[1:]], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"
    return done.stdout


# -- running one README command ---------------------------------------------------------------------------------------
def run_command(argv: list[str], standins: dict[str, Path], work: Path) -> None:
    prog = argv[0]
    if prog == "make":
        recipe = make_target(argv)
        if argv[1:] == ["train"]:     # the demo, as the fixture ran it
            assert re.search(r"python -m fastmcl\.train\s*$", recipe, flags=re.M), recipe
            assert _RAN.get(tuple(with_budget([], RUN_BUDGET, 2))) == 0
        for arg in argv[2:]:          # make bench BENCH=file: the file exists
            if "=" in arg:
                assert (REPO / arg.split("=", 1)[1]).exists(), arg
        return
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser
        ns = get_args_parser().parse_args(argv[1:])
        assert ns.module and ns.training_script == "fastmcl.train", argv
        args, _ = substitute(ns.training_script_args, standins)
        cfg = parse_config(args)
        source = detect_source(cfg)
        resolve(cfg, cifar_style=source.cifar_style, demo=source.demo)
        return
    if prog == "tensorboard":
        exe = Path(sys.executable).with_name("tensorboard")
        done = subprocess.run([str(exe), *argv[1:], "--inspect"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Found event files" in done.stdout + done.stderr, done.stdout + done.stderr
        return
    assert prog == "python", f"README command {' '.join(argv)!r}: tests/test_readme.py has no check for {prog!r}"
    if argv[1] != "-m":               # a script of the repository, e.g. the own-loop example
        done = subprocess.run([sys.executable, *argv[1:]], cwd=work, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        return
    module, args = argv[2], argv[3:]
    args, budget = substitute(args, standins)
    if module == "fastmcl.train":
        args = with_budget(args, {**RUN_BUDGET, **budget}, 3 if "--resume" in args else 2)
        if _RAN.get(tuple(args)) != 0 or "--resume" in args or "--out" in args:
            train_ok(args)
    elif module == "fastmcl.evaluate":
        assert evaluate.main(args) == 0, argv
    elif module == "fastmcl.export":
        assert export.main(args) == 0, argv
    else:
        pytest.fail(f"README command {' '.join(argv)!r}: unknown module {module}")


def exports(block: list[list[str]]) -> bool:
    return any(argv[:3] == ["python", "-m", "fastmcl.export"] for argv in block)


@pytest.mark.parametrize("block", bash_blocks(), ids=block_id)
def test_bash_block_runs_as_written(block, standins, request):
    if exports(block):                # run once, by the fixture the python blocks need too
        assert (request.getfixturevalue("exported_dir") / "runs" / "latest" / "export").is_dir()
        return
    work = request.getfixturevalue("workdir")
    for argv in block:
        run_command(argv, standins, work)


def test_the_readme_has_commands_and_templates():
    """The test above cannot pass vacuously: the README's blocks are found, templates among them."""
    commands = [argv for block in bash_blocks() for argv in block]
    assert ["make", "train"] in commands and ["make", "test"] in commands
    assert any(argv[:3] == ["python", "-m", "fastmcl.export"] for argv in commands)
    assert any("/path/to/imagenet" in argv for argv in commands)
    assert fenced_blocks("python")


@pytest.fixture(scope="module")
def exported_dir(demo_dir, standins, tmp_path_factory) -> Path:
    """The demo folder after every bash block of the README that exports (their evaluate commands included)."""
    work = tmp_path_factory.mktemp("exported")
    shutil.copytree(demo_dir, work, symlinks=True, dirs_exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for argv in (argv for block in bash_blocks() if exports(block) for argv in block):
            run_command(argv, standins, work)
    finally:
        os.chdir(cwd)
    return work


@pytest.mark.parametrize("code", fenced_blocks("python"), ids=lambda code: code.strip().splitlines()[-1][:60])
def test_python_block_runs_as_written(code, exported_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(exported_dir, work, symlinks=True)
    monkeypatch.chdir(work)
    imagenet = None
    if "/path/to/imagenet" in code:
        imagenet = raw_imagenet(tmp_path / "imagenet")
        code = code.replace("/path/to/imagenet", str(imagenet))
    assert "/path/to/" not in code, "a python template in the README has no stand-in in tests/test_readme.py"
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    if imagenet is not None:          # the val/ preparation: every image now in its class folder
        assert sorted(p.name for p in (imagenet / "val").iterdir()) == SYNSETS
        assert len(list((imagenet / "val").glob("n*/*.JPEG"))) == 8


def test_relative_links_resolve():
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local, "the README links to docs/"
    assert [link for link in local if not (REPO / link).exists()] == []
