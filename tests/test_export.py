"""`python -m fastmcl.export`: the exported network's logits equal the cohort member's, in both formats; the
TorchScript file loads with torch alone; bad input ends in one line and exit 2."""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastmcl import export, train
from fastmcl.build import build_networks, load_run, resolve_saved
from fastmcl.models import build_cohort, extract_member
from support.runs import CLASSES, SAMPLES

pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
              pytest.mark.usefixtures("one_thread")]


@functools.cache
def trained(run_dir):
    """The trained cohort, objective and EMA copy of a run, built here from its checkpoint (not through export)."""
    _, cfg, state = load_run(run_dir, best=True)
    nets = build_networks(resolve_saved(cfg), CLASSES, SAMPLES)
    nets.cohort.load_state_dict(state["cohort"])
    nets.objective.load_state_dict(state["objective"])
    if nets.ema is not None:
        nets.ema.load_state_dict(state["ema"])
        nets.ema.eval()
    nets.cohort.eval()
    nets.objective.eval()
    return nets


def cohort_logits(run_dir, name: str, x: torch.Tensor) -> torch.Tensor:
    """Classifier `name` inside the trained cohort, as the method evaluates it."""
    nets = trained(run_dir)
    with torch.no_grad():
        extra = {"ema_outputs": nets.ema(x)} if nets.ema is not None else {}
        return nets.objective.eval_logits(nets.cohort(x), **extra)[name]


def exported_logits(path, x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, dict]:
    """Load the exported file as the README shows, in plain torch (+ fastmcl.models for the state_dict format)."""
    if fmt == "torchscript":
        extra = {"fastmcl.json": ""}
        net = torch.jit.load(str(path), _extra_files=extra).eval()
        meta = json.loads(extra["fastmcl.json"])
    elif fmt == "exported":
        extra = {"fastmcl.json": ""}
        net = torch.export.load(path, extra_files=extra).module()    # the eval-mode graph
        meta = json.loads(extra["fastmcl.json"])
    else:
        from fastmcl.models import Classifier
        saved = torch.load(path, weights_only=True)
        meta = saved["meta"]
        net = Classifier(meta["arch"], meta["num_classes"])
        net.load_state_dict(saved["state_dict"])
        net.eval()
    with torch.no_grad():
        return net(x), meta


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("method,member,other", [("lmcl", "net0", "net1"), ("one", "net1", "net0"),
                                                 ("pcl", "deployed", "net0")])
def test_exported_logits_equal_the_members(runs, tmp_path, method, member, other, fmt):
    out = tmp_path / "net.pt"
    assert export.main([str(runs[method]), "--member", member, "--format", fmt, "--out", str(out)]) == 0
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got, meta = exported_logits(out, x, fmt)
    name = "ema0" if member == "deployed" else member      # PCL deploys its first temporal mean
    expected = cohort_logits(runs[method], name, x)
    assert got.shape == (4, CLASSES)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert not torch.allclose(got, cohort_logits(runs[method], other, x), atol=1e-4)   # it is that member
    *_, state = load_run(runs[method], best=True)
    recorded = state.get("data") or {}
    assert meta["arch"] == "resnet32" and meta["num_classes"] == CLASSES and meta["image_size"] == 32
    assert meta["member"] == name and meta["deployed"] == (name == {"pcl": "ema0"}.get(method, "net0"))
    assert meta["method"] == method
    for key in ("class_names", "mean", "std"):
        assert meta[key] == recorded.get(key)


LOAD_WITH_TORCH_ALONE = {"torchscript": "torch.jit.load({path!r}, _extra_files=extra)",
                         "exported": "torch.export.load({path!r}, extra_files=extra).module()"}


@pytest.mark.parametrize("fmt", LOAD_WITH_TORCH_ALONE)
def test_loads_with_torch_alone(runs, tmp_path, fmt):
    out = tmp_path / "net.bin"
    assert export.main([str(runs["one"]), "--format", fmt, "--out", str(out)]) == 0
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import json, sys, torch\n"
        "sys.modules['fastmcl'] = None  # any import of fastmcl now fails\n"
        "extra = {'fastmcl.json': ''}\n"
        f"net = {LOAD_WITH_TORCH_ALONE[fmt].format(path=str(out))}\n"
        f"torch.save(net(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
        "print(json.loads(extra['fastmcl.json'])['member'])\n")
    done = subprocess.run([sys.executable, "-W", "ignore::DeprecationWarning", "-c", script], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "net0"
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), cohort_logits(runs["one"], "net0", x), rtol=0,
                               atol=1e-6)
    assert export.load_exported(out)[1]["member"] == "net0"


def test_default_output_goes_into_the_run_folder(runs):
    assert export.main([str(runs["one"] / "checkpoints" / "last.pt"), "--member", "net2"]) == 0
    net, meta = export.load_exported(runs["one"] / "export" / "net2.pt")
    assert meta["member"] == "net2" and not meta["deployed"]
    assert net(torch.zeros(1, 3, 32, 32)).shape == (1, CLASSES)


def test_metadata_of_an_imagefolder_run(tmp_path):
    names = ["ant", "bee", "cat", "dog"]
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for name in names:
            (tmp_path / "tree" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "tree" / split / name / f"{i}.png")
    argv = ["--method", "dml", "--data", str(tmp_path / "tree"), "--batch-size", "8", "--max-steps", "1",
            "--no-progress", "--workers", "0", "--out", str(tmp_path / "run")]
    assert train.main(argv) == 0
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "net.pt")]) == 0
    meta = torch.load(tmp_path / "net.pt", weights_only=True)["meta"]
    assert meta["class_names"] == names and meta["num_classes"] == 4 and meta["image_size"] == 32
    assert meta["val_resize"] is None                    # small images are resized whole, not centre-cropped
    assert len(meta["mean"]) == 3 and 0.4 < meta["mean"][0] < 0.6 and 0.2 < meta["std"][0] < 0.4


@pytest.mark.parametrize("layout", [dict(aux=True), dict(shared_stem=True, trunk_stages=None),
                                    dict(shared_stem=True, trunk_stages=1)])
@pytest.mark.parametrize("arch", ["resnet32", "wrn_16_2"])
def test_extract_member_every_layout(layout, arch):
    """MCL x n's branched layout (trunk = stem + layer1) and WRN's post-activation too, beyond the three runs."""
    torch.manual_seed(0)
    cohort = build_cohort([arch] * 2, 5, **layout)
    for m in cohort.modules():
        if isinstance(m, torch.nn.BatchNorm2d):      # running statistics that differ from the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        inside = cohort.eval()(x)
        for i in range(2):
            torch.testing.assert_close(extract_member(cohort, i)(x), inside[i].logits[-1], rtol=0, atol=1e-6)


def one_line_error(capsys, argv) -> str:
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastmcl: error: ") and "\n" not in err
    return err


def test_errors(runs, tmp_path, capsys):
    assert "no such run folder or checkpoint" in one_line_error(capsys, [str(tmp_path / "missing")])
    err = one_line_error(capsys, [str(runs["pcl"]), "--member", "net7"])
    assert all(name in err for name in ("ema0", "net0", "net1", "net2", "ema2"))
    assert "ens" in one_line_error(capsys, [str(runs["one"]), "--member", "ens"])
    torch.save({"model": torch.zeros(2)}, tmp_path / "other.pt")
    assert "not a fastmcl checkpoint" in one_line_error(capsys, [str(tmp_path / "other.pt")])
    (tmp_path / "empty").mkdir()
    assert "no checkpoints" in one_line_error(capsys, [str(tmp_path / "empty")])
