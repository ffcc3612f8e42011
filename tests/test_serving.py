"""The jax.export serving artifact and predict's input guards (issue 15 item 6, issue 16 item 6).

One tiny fused network (resnet18_cifar at width 1/8, init weights) is written
as training writes DIR/fused: orbax params + arch.json (with mean/std) +
model.jaxexport. Tolerance for exported vs. in-process logits: 1e-5 relative
(same program lowered twice; measured 0).
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dyrep_jax import checkpoint as ckpt
from dyrep_jax import models, serving
from dyrep_jax.tools import predict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (32, 32, 3)
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("run") / "fused")
    model = models.create_model("resnet18_cifar", num_classes=10, width=0.125)
    variables = models.init_variables(model, jax.random.PRNGKey(0), SHAPE)
    deploy = models.create_model("resnet18_cifar", num_classes=10, width=0.125, deploy=True)
    fused_vars = jax.tree_util.tree_map(np.asarray, models.fuse_network(variables))
    arch = {"model": "resnet18_cifar", "num_classes": 10, "width": 0.125,
            "image_shape": list(SHAPE), "mean": MEAN, "std": STD}
    ckpt.save_fused(directory, fused_vars, arch)
    path = serving.write_exported(directory, deploy, fused_vars, SHAPE)
    forward = jax.jit(lambda x: deploy.apply(fused_vars, x, train=False))
    return {"dir": directory, "file": path, "logits": lambda x: np.asarray(forward(x))}


def images(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, *SHAPE)).astype(np.float32)


def assert_close(ours, ref):
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(ref).max()))


def run_predict(tmp_path, x, *args):
    x_path, y_path = str(tmp_path / "x.npy"), str(tmp_path / "y.npy")
    np.save(x_path, x)
    rc = predict.main(["--images", x_path, "--output", y_path, *args])
    return rc, (np.load(y_path) if rc == 0 else None)


def test_export_file_has_a_symbolic_batch_and_matches_the_fused_network(fused):
    assert fused["file"] == os.path.join(fused["dir"], "model.jaxexport")
    exported = serving.load_exported(fused["file"])
    assert serving.exported_image_shape(exported) == SHAPE
    assert not isinstance(exported.in_avals[0].shape[0], int)  # symbolic batch
    for n in (1, 5):
        x = images(n, seed=n)
        assert_close(np.asarray(exported.call(x)), fused["logits"](x))


def test_the_docstring_snippet_loads_and_runs_the_file(fused):
    snippet = [line.strip() for line in serving.__doc__.split("plain JAX")[1].splitlines()
               if line.startswith("    ")]
    assert len(snippet) == 3
    code = "\n".join(snippet).replace("DIR/fused/model.jaxexport", fused["file"])
    scope = {"images": images(2)}
    exec(code, scope)  # noqa: S102 - the documented three lines, as a user runs them
    assert_close(np.asarray(scope["logits"]), fused["logits"](images(2)))


@pytest.mark.parametrize("batch_size", [2, 5])
def test_predict_exported_equals_predict_on_the_fused_dir(fused, tmp_path, batch_size):
    x = images(5)
    rc, from_export = run_predict(tmp_path, x, "--exported", fused["file"],
                                  "--batch-size", str(batch_size))
    assert rc == 0
    assert_close(from_export, fused["logits"](x))
    rc, from_dir = run_predict(tmp_path, x, "--checkpoint", fused["dir"])
    assert rc == 0
    assert_close(from_dir, from_export)


def test_exported_runs_without_model_code(fused, tmp_path):
    np.save(tmp_path / "x.npy", images(3))
    script = ("import sys; from dyrep_jax.tools import predict; "
              f"rc = predict.main(['--exported', {fused['file']!r}, '--images', "
              f"{str(tmp_path / 'x.npy')!r}, '--output', {str(tmp_path / 'y')!r}]); "
              "assert 'dyrep_jax.models' not in sys.modules; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr
    real = str(tmp_path / "y.npy")
    assert f"to {real} " in done.stdout  # np.save added .npy: the message says so
    assert_close(np.load(real), fused["logits"](images(3)))


@pytest.mark.parametrize("source", ["--checkpoint", "--exported"])
def test_wrong_image_shape_and_nonfinite_values_are_refused_in_one_line(
        fused, tmp_path, capsys, source):
    where = fused["dir"] if source == "--checkpoint" else fused["file"]
    x = np.zeros((2, 16, 16, 3), np.float32)
    assert run_predict(tmp_path, x, source, where)[0] == 2
    err = capsys.readouterr().err
    assert "(16, 16, 3)" in err and "(32, 32, 3)" in err and err.count("\n") == 1
    x = images(4)
    x[2, 0, 0, 1] = np.nan
    x[3, 5, 5, 0] = np.inf
    assert run_predict(tmp_path, x, source, where)[0] == 2
    err = capsys.readouterr().err
    assert "NaN or inf in 2 of 4 images (first: index 2)" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "y.npy")


def test_raw_pixels_warn_and_normalize_applies_the_networks_mean_std(fused, tmp_path, capsys):
    pixels = np.random.default_rng(1).integers(0, 256, (3, *SHAPE), dtype=np.uint8)
    rc, _ = run_predict(tmp_path, pixels.astype(np.float32), "--exported", fused["file"])
    assert rc == 0 and "WARNING: image values reach 255" in capsys.readouterr().err
    rc, _ = run_predict(tmp_path, pixels, "--checkpoint", fused["dir"])
    assert rc == 0 and "uint8 pixels but --normalize was not given" in capsys.readouterr().err
    expected = fused["logits"](((pixels / 255.0 - MEAN) / STD).astype(np.float32))
    for source, where in (("--checkpoint", fused["dir"]), ("--exported", fused["file"])):
        rc, logits = run_predict(tmp_path, pixels, source, where, "--normalize")
        assert rc == 0 and "WARNING" not in capsys.readouterr().err
        assert_close(logits, expected)
    assert run_predict(tmp_path, images(2), "--exported", fused["file"], "--normalize")[0] == 2
    assert "--normalize expects uint8 pixels" in capsys.readouterr().err


def test_missing_output_folder_fails_before_loading_anything(tmp_path, capsys):
    np.save(tmp_path / "x.npy", images(1))
    rc = predict.main(["--checkpoint", str(tmp_path / "no-such-run"), "--images",
                       str(tmp_path / "x.npy"), "--output", str(tmp_path / "missing" / "y.npy")])
    err = capsys.readouterr().err
    assert rc == 2 and "--output folder does not exist" in err and "no-such-run" not in err


def test_a_file_given_as_checkpoint_or_a_folder_as_exported_says_what_is_expected(
        fused, tmp_path, capsys):
    x = images(1)
    assert run_predict(tmp_path, x, "--checkpoint", fused["file"])[0] == 2
    err = capsys.readouterr().err
    assert "is a file; expected a directory" in err and "--exported" in err
    assert "no such directory" not in err
    assert run_predict(tmp_path, x, "--exported", fused["dir"])[0] == 2
    assert "is a directory; pass the file inside it" in capsys.readouterr().err
    not_export = tmp_path / "junk.jaxexport"
    not_export.write_bytes(os.urandom(256))
    assert run_predict(tmp_path, x, "--exported", str(not_export))[0] == 2
    assert "is not a jax.export artifact" in capsys.readouterr().err
    assert run_predict(tmp_path, x, "--exported", fused["file"], "--fused")[0] == 2
    assert "--fused applies to --checkpoint only" in capsys.readouterr().err
