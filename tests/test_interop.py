"""PyTorch interop (issue #8): import reference checkpoints, predict, export.

The reference code is not available here, so the PyTorch modules below
re-implement its naming and inference semantics: a DBB block with every branch
kind (BN-value padding in 1x1_kxk and 1x1_avg, as `BNAndPadLayer`), nesting
through `dbb_kxk.conv` and `dbb_1x1_kxk.conv2`, torchvision-named ResNets,
the CIFAR VGG-16 and MobileNet v1 names. Networks are built at width 0.25
(names do not depend on width; the importer reads the width off the stem).
Every weight and running statistic is random, so BN folding is exercised.

Tolerance: |ours - torch| <= 1e-4 * max(1, max |torch logits|) in float32,
unfused and fused (measured: about 1e-6 relative).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dyrep_jax import checkpoint as ckpt  # noqa: E402
from dyrep_jax.config_base import base_config  # noqa: E402
from dyrep_jax.dyrep import eligible_slots, pick_slots  # noqa: E402
from dyrep_jax.optim import cosine_schedule, make_optimizer  # noqa: E402
from dyrep_jax.tools import export_torch, import_torch, predict  # noqa: E402
from dyrep_jax.tools.convert import ConversionError, convert_state  # noqa: E402
from dyrep_jax.tools.fit import abstract_variables  # noqa: E402
from dyrep_jax.tools.names import naming_for  # noqa: E402
from dyrep_jax.tools.network_dir import load_network  # noqa: E402
from dyrep_jax.tools.torch_file import parse_reference  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BRANCHES = ("1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1", "id")
STATIC_DBB = ("1x1", "1x1_kxk", "1x1_avg", "kxk")
WIDTH = 0.25
RTOL = 1e-4

# ----------------------------------------------------------------------------- reference modules


class Part(nn.Module):
    """A container with named children (the reference builds these with add_module)."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


class BNAndPad(nn.Module):
    """BN, then pad H and W with the BN's value of 0 (reference BNAndPadLayer, eval mode)."""

    def __init__(self, channels, pad):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pad = pad

    def forward(self, x):
        y = self.bn(x)
        if self.pad == 0:
            return y
        bn, p = self.bn, self.pad
        value = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))
        y = F.pad(y, [p] * 4)
        v = value.view(1, -1, 1, 1)
        y[:, :, :p, :] = v
        y[:, :, -p:, :] = v
        y[:, :, :, :p] = v
        y[:, :, :, -p:] = v
        return y


class DBB(nn.Module):
    """A grown conv with the reference's module names; `inner` nests blocks.

    Branches are registered in the reference's order (1x1, 1x1_kxk, 1x1_avg, kxk, 1xk, kx1,
    id), so `named_modules()` lists convs as the reference's growth bookkeeping sees them.
    """

    def __init__(self, cin, cout, k, stride=1, pad=None, groups=1, branches=BRANCHES, inner=None):
        super().__init__()
        pad = k // 2 if pad is None else pad
        inner = inner or {}
        self.branches = tuple(b for b in BRANCHES if b in set(branches) | {"kxk"})
        self.k, self.stride, self.pad = k, stride, pad

        def conv(ci, co, size, s, p):
            return nn.Conv2d(ci, co, size, s, p, groups=groups, bias=False)

        if "1x1" in self.branches:
            self.dbb_1x1 = Part(conv=conv(cin, cout, 1, stride, 0), bn=nn.BatchNorm2d(cout))
        if "1x1_kxk" in self.branches:
            conv2 = (DBB(cin, cout, k, stride, 0, groups, inner["1x1_kxk"]) if "1x1_kxk" in inner
                     else conv(cin, cout, k, stride, 0))
            self.dbb_1x1_kxk = Part(conv1=conv(cin, cin, 1, 1, 0), bn1=BNAndPad(cin, pad),
                                    conv2=conv2, bn2=nn.BatchNorm2d(cout))
        if "1x1_avg" in self.branches:
            if groups < cout:
                self.dbb_1x1_avg = Part(conv=conv(cin, cout, 1, 1, 0), bn=BNAndPad(cout, pad),
                                        avg=nn.AvgPool2d(k, stride, 0), avgbn=nn.BatchNorm2d(cout))
            else:  # depthwise: pool the input directly
                self.dbb_1x1_avg = Part(avg=nn.AvgPool2d(k, stride, pad),
                                        avgbn=nn.BatchNorm2d(cout))
        kxk = (DBB(cin, cout, k, stride, pad, groups, inner["kxk"]) if "kxk" in inner
               else nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=True))
        self.dbb_kxk = Part(conv=kxk, bn=nn.BatchNorm2d(cout))
        if "1xk" in self.branches:
            self.dbb_1xk = Part(conv=nn.Conv2d(cin, cout, (1, k), stride, (0, pad), groups=groups,
                                               bias=False), bn=nn.BatchNorm2d(cout))
        if "kx1" in self.branches:
            self.dbb_kx1 = Part(conv=nn.Conv2d(cin, cout, (k, 1), stride, (pad, 0), groups=groups,
                                               bias=False), bn=nn.BatchNorm2d(cout))
        if "id" in self.branches:
            self.dbb_id = nn.BatchNorm2d(cout)

    def forward(self, x):
        out = 0
        for branch in self.branches:
            out = out + self.branch(branch, x)
        return out

    def branch(self, name, x):
        if name == "id":
            return self.dbb_id(x)
        m = getattr(self, {"1x1": "dbb_1x1", "kxk": "dbb_kxk", "1x1_kxk": "dbb_1x1_kxk",
                           "1x1_avg": "dbb_1x1_avg", "1xk": "dbb_1xk", "kx1": "dbb_kx1"}[name])
        if name == "1x1_kxk":
            return m.bn2(m.conv2(m.bn1(m.conv1(x))))
        if name == "1x1_avg":
            y = m.bn(m.conv(x)) if hasattr(m, "conv") else x
            return m.avgbn(m.avg(y))
        return m.bn(m.conv(x))


class Builder:
    """Makes each conv + BN of a reference network: plain, grown, static DBB or deploy."""

    def __init__(self, grown=None, dbb=False, deploy=False):
        self.grown, self.dbb, self.deploy = grown or {}, dbb, deploy

    def conv(self, path, cin, cout, k, stride=1, groups=1):
        pad = k // 2
        if self.deploy:
            return nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=True)
        if self.dbb and k == 3:
            return DBB(cin, cout, k, stride, pad, groups, STATIC_DBB)
        if path in self.grown:
            branches, inner = self.grown[path]
            return DBB(cin, cout, k, stride, pad, groups, branches, inner)
        return nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=False)

    def bn(self, channels, k):
        if self.deploy or (self.dbb and k == 3):
            return nn.Identity()
        return nn.BatchNorm2d(channels)


class RefBasicBlock(nn.Module):
    def __init__(self, make, prefix, cin, planes, stride):
        super().__init__()
        self.conv1 = make.conv(f"{prefix}.conv1", cin, planes, 3, stride)
        self.bn1 = make.bn(planes, 3)
        self.conv2 = make.conv(f"{prefix}.conv2", planes, planes, 3)
        self.bn2 = make.bn(planes, 3)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(make.conv(f"{prefix}.downsample.0", cin, planes, 1,
                                                      stride), make.bn(planes, 1))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefResNet18(nn.Module):
    """torchvision names: conv1, bn1, layer{1..4}.{0,1}.*, fc."""

    def __init__(self, make, num_classes=10):
        super().__init__()
        widths = [int(64 * WIDTH) * 2**i for i in range(4)]
        self.conv1 = make.conv("conv1", 3, widths[0], 7, 2)
        self.bn1 = make.bn(widths[0], 7)
        cin = widths[0]
        for stage, planes in enumerate(widths):
            blocks = [RefBasicBlock(make, f"layer{stage + 1}.{i}", cin if i == 0 else planes,
                                    planes, 2 if stage > 0 and i == 0 else 1) for i in range(2)]
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))
            cin = planes
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(x.mean(dim=(2, 3)))


VGG_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class RefVGG16(nn.Module):
    """features.conv{i}.conv / .bn1, features.fc.fc.0 (hidden Linear), classifier.linear1."""

    def __init__(self, make, num_classes=10):
        super().__init__()
        self.features = nn.Module()
        cin, index = 3, 0
        for item in VGG_LAYOUT:
            if item == "M":
                continue
            cout = int(item * WIDTH)
            self.features.add_module(f"conv{index}", Part(
                conv=make.conv(f"features.conv{index}.conv", cin, cout, 3), bn1=make.bn(cout, 3)))
            cin, index = cout, index + 1
        self.features.add_module("fc", Part(fc=nn.Sequential(nn.Linear(cin, int(512 * WIDTH)),
                                                             nn.ReLU())))
        self.classifier = Part(linear1=nn.Linear(int(512 * WIDTH), num_classes))

    def forward(self, x):
        index = 0
        for item in VGG_LAYOUT:
            if item == "M":
                x = F.max_pool2d(x, 2, 2)
                continue
            unit = getattr(self.features, f"conv{index}")
            x = F.relu(unit.bn1(unit.conv(x)))
            index += 1
        x = F.max_pool2d(x, 2, 1).flatten(1)
        return self.classifier.linear1(self.features.fc.fc(x))


MOBILENET_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1),
                    (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class RefMobileNetV1(nn.Module):
    """model.0.{0,1} stem; model.{i}.{0,1,3,4} depthwise conv, BN, pointwise conv, BN; fc."""

    def __init__(self, make, num_classes=10):
        super().__init__()
        cin = int(32 * WIDTH)
        layers = [nn.Sequential(make.conv("model.0.0", 3, cin, 3, 2), make.bn(cin, 3), nn.ReLU())]
        for i, (channels, stride) in enumerate(MOBILENET_BLOCKS, start=1):
            cout = int(channels * WIDTH)
            layers.append(nn.Sequential(
                make.conv(f"model.{i}.0", cin, cin, 3, stride, groups=cin), make.bn(cin, 3),
                nn.ReLU(), make.conv(f"model.{i}.3", cin, cout, 1), make.bn(cout, 1), nn.ReLU()))
            cin = cout
        self.model = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.model(x).mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- helpers


TINY_VARS = (0.0, 1e-7)  # BN channels 0 and 1: dead, near-zero variance


def randomized(model, seed, tiny_var=True):
    """Random weights and non-trivial BN statistics everywhere; eval mode.

    With `tiny_var`, channel 0 of every BN is dead (running var 0) and channel 1 nearly so
    (1e-7): there eps alone sets the scale, so a conversion or fusion that drops or changes
    eps is off by 10x or infinitely. Their gammas are scaled by sqrt(var + eps) so that the
    BN's effective gain stays in [0.5, 1.2], as on the other channels: the network's logits
    keep their usual size and the existing tolerance holds unchanged.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, low, high):
        return low + (high - low) * torch.rand(shape, generator=gen)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(rand(c, 0.5, 1.2))
                m.bias.copy_(rand(c, -0.3, 0.3))
                m.running_mean.copy_(rand(c, -0.3, 0.3))
                m.running_var.copy_(rand(c, 0.5, 2.0))
                m.num_batches_tracked.fill_(7)
                if tiny_var:
                    tiny = torch.tensor(TINY_VARS[:c])
                    m.running_var[:len(tiny)] = tiny
                    m.weight[:len(tiny)] *= torch.sqrt(tiny + m.eps)
            elif isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(rand(m.bias.shape, -0.2, 0.2))
    return model.eval()


def dbb_graph(model):
    return [(name, [int(b in m.branches) for b in BRANCHES])
            for name, m in model.named_modules() if isinstance(m, DBB)]


def save_reference(model, path, graph=True, wrap="model", prefix="", epoch=3):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    if wrap is None:
        obj = state
    else:
        obj = {wrap: state, "epoch": epoch, "optimizer": {"state": {}, "param_groups": []}}
        if graph:
            obj["dyrep"] = {"dbb_graph": dbb_graph(model)}
    torch.save(obj, path)
    return str(path)


def torch_logits(model, images):
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def import_ok(arch, checkpoint, out, *extra):
    rc = import_torch.main(["--arch", arch, "--checkpoint", checkpoint, "--out", str(out), *extra])
    assert rc == 0
    return str(out)


def our_logits(directory, images, tmp, fused=False):
    x_path, y_path = os.path.join(tmp, "x.npy"), os.path.join(tmp, "y.npy")
    np.save(x_path, images)
    args = ["--checkpoint", directory, "--images", x_path, "--output", y_path, "--batch-size", "3"]
    assert predict.main(args + (["--fused"] if fused else [])) == 0
    return np.load(y_path)


def assert_close(ours, ref):
    scale = max(1.0, float(np.max(np.abs(ref))))
    err = float(np.max(np.abs(ours - ref)))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert err <= RTOL * scale, f"max |diff| {err} (scale {scale})"
    return err / scale


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype(np.float32)


RESNET_GROWN = {
    "conv1": (("1x1", "1x1_avg", "kxk"), None),  # 7x7 stride-2 stem
    "layer1.0.conv1": (BRANCHES, {"kxk": ("1x1", "1xk", "id")}),  # every kind + nested kxk
    "layer2.0.conv1": (("1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1"),
                       {"1x1_kxk": ("1x1_avg", "kxk")}),  # stride 2, nested 1x1_kxk conv2
    "layer3.1.conv2": (("kxk", "id"), None),
}


@pytest.fixture(scope="module")
def resnet(tmp_path_factory, images):
    tmp = tmp_path_factory.mktemp("resnet")
    model = randomized(RefResNet18(Builder(RESNET_GROWN)), seed=1)
    path = save_reference(model, tmp / "resnet18.pth.tar")
    out = import_ok("resnet18", path, tmp / "run")
    return {"model": model, "file": path, "dir": out, "tmp": str(tmp),
            "torch": torch_logits(model, images)}


# ----------------------------------------------------------------------------- import + predict


def test_resnet18_grown_matches_pytorch_unfused_and_fused(resnet, images):
    unfused = our_logits(resnet["dir"], images, resnet["tmp"])
    fused = our_logits(resnet["dir"], images, resnet["tmp"], fused=True)
    print("resnet18 rel. error unfused", assert_close(unfused, resnet["torch"]),
          "fused", assert_close(fused, resnet["torch"]))
    np.testing.assert_allclose(fused, unfused, rtol=0, atol=RTOL * max(1, np.abs(unfused).max()))


def test_imported_run_records_arch_structure_and_epoch(resnet):
    with open(os.path.join(resnet["dir"], "arch.json")) as f:
        arch = json.load(f)
    assert arch["model"] == "resnet18" and arch["num_classes"] == 10
    assert arch["width"] == WIDTH and arch["with_bn_after_3x3"] is True
    assert arch["image_shape"] == [224, 224, 3] and arch["epoch"] == 3
    config = base_config()
    o = config.optim
    tx = make_optimizer(name=o.name, schedule=cosine_schedule(o.lr, 10), momentum=o.momentum,
                        weight_decay=o.weight_decay)
    manager = ckpt.make_manager(os.path.join(resnet["dir"], "checkpoints"), async_save=False)
    step, state, meta = ckpt.restore(manager, tx.init)  # as training resumes
    assert step == 0 and meta["epoch"] == 3 and meta["model"] == "resnet18"
    structure = meta["structure"]
    assert structure["layer1_0.conv1.conv"] == list(BRANCHES)
    assert structure["layer1_0.conv1.conv.kxk.conv"] == ["1x1", "kxk", "1xk", "id"]
    assert structure["layer2_0.conv1.conv.1x1_kxk.conv2"] == ["1x1_avg", "kxk"]
    assert structure["conv1.conv"] == ["1x1", "1x1_avg", "kxk"]
    assert len(structure) == 6
    assert "bn" in state["params"]["layer2_0"]["downsample"]


def test_export_round_trip_loads_into_plain_reference(resnet, images):
    out = os.path.join(resnet["tmp"], "deploy.pt")
    assert export_torch.main(["--checkpoint", resnet["dir"], "--out", out]) == 0
    state = torch.load(out, weights_only=True)
    assert list(state)[:4] == ["conv1.weight", "conv1.bias", "layer1.0.conv1.weight",
                               "layer1.0.conv1.bias"]
    assert "layer2.0.downsample.0.bias" in state and "fc.weight" in state
    plain = RefResNet18(Builder(deploy=True)).eval()
    plain.load_state_dict(state, strict=True)
    print("resnet18 round trip rel. error",
          assert_close(torch_logits(plain, images), resnet["torch"]))


def test_predict_infers_arch_without_arch_json_and_reads_fused_exports(resnet, images, tmp_path):
    bare = shutil.copytree(resnet["dir"], tmp_path / "workdir")
    os.remove(bare / "arch.json")  # like a training workdir: meta.model only
    assert_close(our_logits(str(bare), images, str(tmp_path)), resnet["torch"])
    net = load_network(resnet["dir"], fuse=True)
    ckpt.save_fused(str(tmp_path / "fused"), net.variables, net.arch)
    assert_close(our_logits(str(tmp_path / "fused"), images, str(tmp_path)), resnet["torch"])


VGG_GROWN = {"features.conv1.conv": (BRANCHES, {"kxk": ("1x1", "kxk")})}


@pytest.mark.parametrize("case", ["plain", "grown", "dbb"])
def test_vgg16_cifar_matches_pytorch(case, images, tmp_path):
    make = {"plain": Builder(), "grown": Builder(VGG_GROWN), "dbb": Builder(dbb=True)}[case]
    model = randomized(RefVGG16(make), seed=2)
    path = save_reference(model, tmp_path / "vgg.pth.tar", graph=case == "grown")
    out = import_ok("vgg16_cifar", path, tmp_path / "run", *(["--dbb"] if case == "dbb" else []))
    ref = torch_logits(model, images)
    print(f"vgg {case} rel. error unfused", assert_close(our_logits(out, images, tmp_path), ref),
          "fused", assert_close(our_logits(out, images, tmp_path, fused=True), ref))


MOBILENET_GROWN = {
    "model.2.0": (("1x1", "1x1_kxk", "1x1_avg", "kxk", "1xk", "kx1"), None),  # depthwise, s2
    "model.3.0": (("1x1_avg", "kxk", "id"), None),
}


def test_mobilenet_v1_grown_depthwise_matches_pytorch_and_round_trips(images, tmp_path):
    model = randomized(RefMobileNetV1(Builder(MOBILENET_GROWN)), seed=3)
    out = import_ok("mobilenet_v1", save_reference(model, tmp_path / "m.pth.tar"),
                    tmp_path / "run")
    ref = torch_logits(model, images)
    print("mobilenet grown rel. error unfused", assert_close(our_logits(out, images, tmp_path),
                                                            ref),
          "fused", assert_close(our_logits(out, images, tmp_path, fused=True), ref))
    deploy = str(tmp_path / "m.pt")
    assert export_torch.main(["--checkpoint", out, "--out", deploy]) == 0
    plain = RefMobileNetV1(Builder(deploy=True)).eval()
    plain.load_state_dict(torch.load(deploy, weights_only=True), strict=True)
    print("mobilenet round trip rel. error", assert_close(torch_logits(plain, images), ref))


def test_python_m_entry_imports_a_plain_mobilenet(tmp_path):
    model = randomized(RefMobileNetV1(Builder()), seed=4)
    path = save_reference(model, tmp_path / "plain.pth.tar", graph=False, prefix="module.",
                          wrap="state_dict")
    env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-m", "dyrep_jax.tools.import_torch", "--arch",
                           "mobilenet_v1", "--checkpoint", path, "--out", str(tmp_path / "run"),
                           "--num-classes", "10"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "imported 164 tensors" in done.stdout and "width 0.25" in done.stdout
    with open(tmp_path / "run" / "arch.json") as f:
        assert json.load(f)["model"] == "mobilenet_v1"
    assert os.listdir(tmp_path / "run" / "checkpoints")


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def small_state():
    """A plain MobileNet's state_dict and the pieces to convert it without writing files."""
    model = randomized(RefMobileNetV1(Builder()), seed=5)
    return {k: v.clone() for k, v in model.state_dict().items()}


def convert(obj):
    from dyrep_jax.models import create_model

    ref = parse_reference(obj)
    model = create_model("mobilenet_v1", num_classes=10, width=WIDTH)
    template = abstract_variables(model, (32, 32, 3))
    return ref, convert_state(ref.state, naming_for("mobilenet_v1"), template["params"])


def test_wrappers_and_module_prefix_are_accepted(small_state):
    plain = convert(small_state)[1].variables
    for obj in ({"model": small_state, "epoch": 5},
                {"state_dict": {f"module.{k}": v for k, v in small_state.items()}},
                {f"module.{k}": v for k, v in small_state.items()}):
        ref, converted = convert(obj)
        assert ref.epoch == (5 if "model" in obj else 0)
        np.testing.assert_array_equal(converted.variables["params"]["block3"]["pw"]["conv"]["kernel"],
                                      plain["params"]["block3"]["pw"]["conv"]["kernel"])


def test_unexpected_and_missing_keys_are_refused_by_name(small_state, tmp_path, capsys):
    state = dict(small_state)
    state["model.1.0.extra"] = torch.zeros(3)
    del state["model.2.1.running_var"]
    del state["fc.bias"]
    with pytest.raises(ConversionError) as err:
        convert(state)
    assert err.value.unexpected == ["model.1.0.extra"]
    assert err.value.missing == ["model.2.1.running_var", "fc.bias"]
    path = str(tmp_path / "bad.pth.tar")
    torch.save({"model": state, "epoch": 1}, path)
    rc = import_torch.main(["--arch", "mobilenet_v1", "--checkpoint", path,
                            "--out", str(tmp_path / "run")])
    message = capsys.readouterr().err
    assert rc == 2
    for key in ("model.1.0.extra", "model.2.1.running_var", "fc.bias"):
        assert key in message
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_leftover_branch_tensors_and_wrong_shapes_are_refused(small_state, tmp_path, capsys):
    state = dict(small_state)
    state["model.1.0.dbb_1x1.conv.weight"] = torch.zeros(8, 1, 1, 1)  # half a branch, no kxk
    with pytest.raises(ConversionError) as err:
        convert(state)
    assert "model.1.0.dbb_kxk.conv.weight" in err.value.missing
    assert "model.1.0.weight" in err.value.unexpected  # the plain weight would be dropped
    state = dict(small_state)
    state["model.4.1.weight"] = torch.ones(5)
    path = str(tmp_path / "shape.pth.tar")
    torch.save(state, path)
    assert import_torch.main(["--arch", "mobilenet_v1", "--checkpoint", path,
                              "--out", str(tmp_path / "run")]) == 2
    assert "model.4.1" in capsys.readouterr().err


def test_inconsistent_graph_wrong_classes_and_dbb_hint(tmp_path, capsys):
    model = randomized(RefVGG16(Builder(VGG_GROWN)), seed=6)
    graph = dbb_graph(model)
    graph[0] = (graph[0][0], [1, 0, 0, 1, 0, 0, 0])
    path = str(tmp_path / "graph.pth.tar")
    torch.save({"model": model.state_dict(), "epoch": 1, "dyrep": {"dbb_graph": graph}}, path)
    args = ["--arch", "vgg16_cifar", "--checkpoint", path, "--out", str(tmp_path / "run")]
    assert import_torch.main(args) == 2
    err = capsys.readouterr().err
    assert "dbb_graph" in err and "features.conv1.conv" in err
    good = save_reference(model, tmp_path / "good.pth.tar")
    assert import_torch.main(["--arch", "vgg16_cifar", "--checkpoint", good, "--out",
                              str(tmp_path / "run"), "--num-classes", "100"]) == 2
    assert "classifier.linear1.weight" in capsys.readouterr().err
    static = save_reference(randomized(RefVGG16(Builder(dbb=True)), 7), tmp_path / "dbb.pth.tar",
                            graph=False)
    assert import_torch.main(["--arch", "vgg16_cifar", "--checkpoint", static, "--out",
                              str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "features.conv0.bn1.weight" in err and "--dbb" in err


def test_predict_reports_bad_directories_and_images(resnet, tmp_path, capsys):
    x = str(tmp_path / "x.npy")
    y = str(tmp_path / "y.npy")
    np.save(x, np.zeros((2, 32, 32, 3), np.float32))
    assert predict.main(["--checkpoint", str(tmp_path / "nope"), "--images", x,
                         "--output", y]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert predict.main(["--checkpoint", str(tmp_path), "--images", x, "--output", y]) == 2
    assert "holds no network" in capsys.readouterr().err
    np.save(x, np.zeros((32, 32, 3), np.float32))
    assert predict.main(["--checkpoint", resnet["dir"], "--images", x, "--output", y]) == 2
    assert "add a batch axis" in capsys.readouterr().err
    np.save(x, np.zeros((2, 32, 32, 1), np.float32))
    assert predict.main(["--checkpoint", resnet["dir"], "--images", x, "--output", y]) == 2
    assert "expects 3" in capsys.readouterr().err
    assert not os.path.exists(y)


# ----------------------------------------------------------------------------- not a checkpoint


class NotATensor:
    """A pickled object that weights-only loading refuses."""


def import_error(path, tmp_path, capsys, *extra):
    rc = import_torch.main(["--arch", "mobilenet_v1", "--checkpoint", str(path),
                            "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    return err


def test_files_that_are_not_pytorch_checkpoints_never_suggest_trust_pickle(
        small_state, tmp_path, capsys):
    import pickle
    import zipfile

    rng = np.random.default_rng(0)
    (tmp_path / "random.pth").write_bytes(rng.integers(0, 256, 4096, np.uint8).tobytes())
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}))
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("readme.txt", "not a checkpoint")
    good = tmp_path / "good.pth"
    torch.save(small_state, good)
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    for name in ("random.pth", "plain.pkl"):
        for extra in ((), ("--trust-pickle",)):
            err = import_error(tmp_path / name, tmp_path, capsys, *extra)
            assert "is not a PyTorch checkpoint" in err and "--trust-pickle" not in err
    err = import_error(tmp_path / "other.zip", tmp_path, capsys)
    assert "zip archive but not a PyTorch checkpoint" in err and "--trust-pickle" not in err
    err = import_error(tmp_path / "cut.pth", tmp_path, capsys)
    assert "truncated or damaged" in err and "--trust-pickle" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_trust_pickle_is_offered_only_when_safe_loading_refuses_objects(tmp_path, capsys):
    path = tmp_path / "objects.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": NotATensor()}, path)
    err = import_error(path, tmp_path, capsys)
    assert "holds Python objects other than tensors" in err and "NotATensor" in err
    assert "pass --trust-pickle" in err
    legacy = tmp_path / "legacy.pth"  # the pre-zip torch.save format still loads...
    torch.save({"x": torch.zeros(1)}, legacy, _use_new_zipfile_serialization=False)
    err = import_error(legacy, tmp_path, capsys)  # ...and is refused for its content only
    assert "missing keys" in err and "PyTorch checkpoint" not in err


def test_export_torch_out_folder_and_checkpoint_file_are_refused_in_one_line(
        resnet, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    assert export_torch.main(["--checkpoint", resnet["dir"], "--out", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a folder; give a file path such as" in err and err.count("\n") == 1
    assert export_torch.main(["--checkpoint", resnet["file"], "--out",
                              str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "is a file; expected a directory" in err and "import_torch" in err
    assert not os.listdir(folder) and not os.path.exists(tmp_path / "m.pt")
# ----------------------------------------------------------------------------- Dep parity (#12)
# The reference's importance and Dep rule, written out here on a torch block with its
# naming; our importer reads the block, and our Dep and cut must decide the same and keep
# the block's function. BNs include a dead (var 0) and a near-zero-variance channel.

DEP_GAMMAS = {"1x1": 0.02, "1x1_kxk": 0.04, "1x1_avg": 0.3, "1xk": 0.8, "kx1": 0.5, "id": 0.06}


def reference_last_bn(block, name):
    """The BN whose gamma the reference reads as branch `name`'s weight."""
    if name == "id":
        return block.dbb_id
    return getattr(getattr(block, f"dbb_{name}"), {"1x1_kxk": "bn2", "1x1_avg": "avgbn"}.get(name, "bn"))


def reference_importance(block):
    """Mean |gamma| of each present branch's last BN over that of kxk's BN; kxk is 1."""
    kxk = block.dbb_kxk.bn.weight.abs().mean().item()
    return {b: 1.0 if b == "kxk" else reference_last_bn(block, b).weight.abs().mean().item() / kxk
            for b in block.branches}


def reference_dep_cut(importance, std_threshold=0.02, abs_threshold=0.1):
    """Valid = non-kxk values other than exactly 1; torch's (unbiased) std of them must exceed
    the threshold (NaN under 2 values: no cut); cut those below their mean and the bound."""
    valid = torch.tensor([v for b, v in importance.items() if b != "kxk" and v != 1.0],
                         dtype=torch.float64)
    if not bool(valid.std() > std_threshold):
        return set()
    mean = valid.mean().item()
    return {b for b, v in importance.items() if b != "kxk" and v < mean and v < abs_threshold}


def reference_cut(block, names):
    """The reference's bookkeeping of a cut that importances see: branches gone, kxk BN reset."""
    block.branches = tuple(b for b in block.branches if b not in names)
    with torch.no_grad():
        bn = block.dbb_kxk.bn
        bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1.0)


def dep_block():
    """All seven kinds, a nested kxk block, chosen last-BN gammas, tiny BN variances."""
    block = randomized(DBB(4, 4, 3, branches=BRANCHES, inner={"kxk": ("1x1", "id")}), seed=5,
                       tiny_var=False)  # its own tiny variances below, gammas as chosen
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        for name, gamma in DEP_GAMMAS.items():
            reference_last_bn(block, name).weight.copy_(gamma * signs)
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var[:2] = torch.tensor([0.0, 1e-7])  # dead, near-zero
    return block


def import_block(block):
    from dyrep_jax.tools.convert import KeyReader, read_slot

    state = {f"blk.{k}": v.detach().numpy().copy() for k, v in block.state_dict().items()}
    reader = KeyReader(state)
    params, stats = read_slot(reader, "blk", {})
    assert not reader.missing and not reader.unexpected()
    return params, stats


def test_dep_importance_decision_and_cut_match_the_reference():
    from dyrep_jax.rep import ConvGeometry, branch_importance, cut_branches, dep_decision
    from dyrep_jax.rep.apply import apply_slot_branchwise

    block = dep_block()
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 4)).astype(np.float32)
    ref_out = torch_logits(block, x).transpose(0, 2, 3, 1)
    geom = ConvGeometry(4, 4, 3)
    params, stats = import_block(block)
    ours = branch_importance(params)
    theirs = reference_importance(block)
    assert ours.keys() == theirs.keys() and ours == pytest.approx(theirs, rel=1e-6)
    to_cut = dep_decision(ours, 0.02, 0.1)
    assert set(to_cut) == reference_dep_cut(theirs) == {"1x1", "1x1_kxk", "id"}
    params, stats = cut_branches(params, stats, to_cut)
    assert_close(np.asarray(apply_slot_branchwise(params, stats, x, geom, False)[0]), ref_out)
    reference_cut(block, to_cut)
    after, theirs_after = branch_importance(params), reference_importance(block)
    assert after == pytest.approx(theirs_after, rel=1e-6)
    assert set(dep_decision(after, 0.02, 0.1)) == reference_dep_cut(theirs_after) == set()
    plain, plain_stats = cut_branches(params, stats, [b for b in params if b != "kxk"])
    assert set(plain) == {"kernel", "bias"} and plain_stats == {}
    assert_close(np.asarray(apply_slot_branchwise(plain, {}, x, geom, False)[0]), ref_out)
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=True)  # loads into a plain torch conv with bias
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(np.asarray(plain["kernel"]).transpose(3, 2, 0, 1)))
        conv.bias.copy_(torch.tensor(np.asarray(plain["bias"])))
    assert_close(torch_logits(conv, x).transpose(0, 2, 3, 1), ref_out)


# ----------------------------------------------------------------------------- Rep parity (#12)
# The reference's growth choice, written out here: every nn.Conv2d with a square kernel > 1
# whose module name holds "dbb" fewer than twice keeps a score, averaged since the last
# adjustment, in a dict filled in `named_modules()` order (every such conv has a gradient
# from the first step on). The dict's items are sorted high to low by a stable sort and the
# first one grows, so a tie goes to the conv registered first. The grown block has all seven
# branches when the conv pads by k // 2, else only 1x1_kxk, 1x1_avg and kxk; the identity
# needs in == out channels and stride 1. Our side maps slot paths to torch module names
# through `names.py` (the conv unit) and the DBB's module names (nested convs).

NESTED_TORCH = {"kxk": "dbb_kxk", "1x1_kxk": "dbb_1x1_kxk"}  # branches holding a nested conv


def reference_eligible(model):
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size[0] == m.kernel_size[1] > 1
            and name.count("dbb") < 2]


def reference_grow_choice(model, score_of):
    records = {name: score_of[name] for name in reference_eligible(model)}
    return sorted(records.items(), key=lambda item: item[1], reverse=True)[0][0]


def reference_grown_branches(conv):
    branches = set(BRANCHES)
    if conv.padding[0] != conv.kernel_size[0] // 2:
        branches -= {"1x1", "1xk", "kx1", "id"}
    if conv.in_channels != conv.out_channels or conv.stride[0] != 1:
        branches.discard("id")
    return [b for b in BRANCHES if b in branches]


def torch_name_of(path, naming):
    """Our slot path (unit..., 'conv', [branch, conv key]...) -> the torch module name."""
    cut = path.index("conv")
    rest = path[cut + 1:]
    nested = "".join(f".{NESTED_TORCH[b]}.{c}" for b, c in zip(rest[::2], rest[1::2],
                                                                 strict=True))
    return naming.unit(path[:cut]).conv + nested


def our_grow_choice(params, naming, score_of):
    """pick_slots over eligible_slots order, scores looked up by the slot's torch name."""
    paths = eligible_slots(params)
    scores = np.array([score_of[torch_name_of(p, naming)] for p in paths])
    return torch_name_of(pick_slots(scores, paths, 1)[0], naming)


def as_host_copy(params):
    """Params as the trainer's host copy holds them (`to_host` is a tree_map)."""
    return jax.tree_util.tree_map(np.asarray, params)


GROW_MODELS = {"vgg16_cifar": lambda: RefVGG16(Builder(VGG_GROWN)),
               "mobilenet_v1": lambda: RefMobileNetV1(Builder(MOBILENET_GROWN))}


def grow_case(arch, resnet):
    """(torch model, our imported params) of a grown network with the reference naming."""
    if arch == "resnet18":
        return resnet["model"], as_host_copy(load_network(resnet["dir"]).variables["params"])
    from dyrep_jax.models import create_model

    model = randomized(GROW_MODELS[arch](), seed=8)
    template = abstract_variables(create_model(arch, num_classes=10, width=WIDTH), (32, 32, 3))
    ref = parse_reference(model.state_dict())
    converted = convert_state(ref.state, naming_for(arch), template["params"])
    return model, as_host_copy(converted.variables["params"])


def score_draws(names, trials, seed, levels=None):
    """Random scores keyed by torch name: continuous, or from `levels` values (many ties)."""
    rng = np.random.default_rng(seed)
    for _ in range(trials):
        values = (rng.standard_normal(len(names)) if levels is None
                  else rng.integers(0, levels, len(names)).astype(np.float64))
        yield dict(zip(names, values.tolist(), strict=True))


@pytest.mark.parametrize("arch", ["resnet18", "vgg16_cifar", "mobilenet_v1"])
def test_same_scores_grow_the_same_conv_as_the_reference(arch, resnet):
    model, params = grow_case(arch, resnet)
    naming = naming_for(arch)
    ref_names = reference_eligible(model)
    ours = [torch_name_of(p, naming) for p in eligible_slots(params)]
    assert sorted(ours) == sorted(ref_names) and len(set(ours)) == len(ours)
    for name in ("conv1.dbb_kxk.conv", "layer1.0.conv1.dbb_1x1_kxk.conv2"):  # 7x7; pad 0
        assert arch != "resnet18" or name in ours
    for score_of in score_draws(ref_names, 200, seed=0):
        assert our_grow_choice(params, naming, score_of) == reference_grow_choice(model, score_of)


TIE_ORDER_DEVIATION = pytest.mark.xfail(strict=True, reason=(
    "our tie order is eligible_slots(params) order, i.e. the params' sorted dict keys "
    "(conv10 before conv2, block10 before block2, MobileNet's stem last); the reference's is "
    "module registration order. Reported to the coordinator (issue 12)."))


@pytest.mark.parametrize("arch", ["resnet18", pytest.param("vgg16_cifar", marks=TIE_ORDER_DEVIATION),
                                  pytest.param("mobilenet_v1", marks=TIE_ORDER_DEVIATION)])
def test_tied_scores_grow_the_conv_the_reference_registers_first(arch, resnet):
    model, params = grow_case(arch, resnet)
    naming = naming_for(arch)
    ref_names = reference_eligible(model)
    ties = 0
    for score_of in [dict.fromkeys(ref_names, 0.0), *score_draws(ref_names, 200, 1, levels=3)]:
        top = max(score_of.values())
        ties += sum(v == top for v in score_of.values()) > 1
        ours, theirs = our_grow_choice(params, naming, score_of), reference_grow_choice(
            model, score_of)
        assert ours == theirs, f"tie at {top}: we grow {ours}, the reference {theirs}"
    assert ties > 100  # the draws do exercise ties
    ours = [torch_name_of(p, naming) for p in eligible_slots(params)]
    assert ours == ref_names


def test_growing_the_reference_choice_keeps_the_imported_logits(resnet, images):
    from dyrep_jax.calibration import calibrate_block
    from dyrep_jax.dyrep import ControllerConfig, adjust
    from dyrep_jax.rep.introspect import slot_geometries
    from dyrep_jax.rep.tree import dotted, get_at

    net = load_network(resnet["dir"])
    variables, naming = as_host_copy(net.variables), naming_for("resnet18")
    target = "layer1.0.conv1.dbb_1x1_kxk.conv2"  # nested and padding-free: the narrow rule
    score_of = next(score_draws(reference_eligible(resnet["model"]), 1, seed=2))
    score_of[target] = max(score_of.values()) + 1.0
    assert reference_grow_choice(resnet["model"], score_of) == target
    paths = eligible_slots(variables["params"])
    scores = np.array([score_of[torch_name_of(p, naming)] for p in paths], np.float32)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    geoms = {k: v.geometry for k, v in slot_geometries(net.model, variables, x).items()}
    calib = np.random.default_rng(3).standard_normal((2, 8, 32, 32, 3)).astype(np.float32)

    def calibrate(current, path):
        return calibrate_block(net.model, current, path, geoms, iter(calib))

    cfg = ControllerConfig.from_config(base_config(), mode="rep", grow_topk=1, calib_batches=2)
    new, decisions = adjust(jax.random.PRNGKey(0), variables, geoms, scores, paths, cfg,
                            calibrate, grow=True, cut=False)
    [record] = decisions
    grown = next(p for p in paths if dotted(p) == record["slot"])
    assert torch_name_of(grown, naming) == target
    conv = resnet["model"].get_submodule(target)
    assert list(get_at(new["params"], grown)) == reference_grown_branches(conv)
    after = np.asarray(net.model.apply(new, images, train=False))  # torch is the reference
    print("resnet18 grow at", target, "rel. error", assert_close(after, resnet["torch"]))
