"""Models: published sizes, exact whole-network fusion, the public API's errors.

Speed: sizes are counted on abstract variables (`jax.eval_shape`, nothing
computed). Equivalence tests build the grown structure abstractly too and
fill it with random numpy values (random BN statistics, gammas and betas:
fusion bugs hide behind mean 0 / var 1), then run eagerly so that ops of
equal shape compile once for all architectures.

The training network's reference output is computed branch by branch
(`apply_slot_branchwise` for every slot, nested blocks included), never via
the fused inference path, so fusion is checked independently.

Tolerance: the training network and the fused one compute the same affine
maps with different summation orders in float32 (branches summed after
separate convs vs one conv). Rounding is ~1e-7 relative per op and stays
below ~1e-5 of the logit scale over a hundred layers, so we require
max |diff| <= 1e-4 * (1 + max |logit|). A fusion bug (a wrong pad value, a
missed BN, a misplaced group) changes the logits by O(1) of their scale.
"""

import itertools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyrep_jax.dyrep import eligible_slots
from dyrep_jax.models import (
    MODEL_NAMES,
    count_macs,
    count_params,
    create_model,
    dbb_initial_branches,
    default_input_shape,
    fuse_network,
    init_variables,
)
from dyrep_jax.rep import RepConv, RepError, allowed_branches, get_at, grow_slot, set_at
from dyrep_jax.rep.apply import apply_slot_branchwise
from dyrep_jax.rep.tree import structure_of, to_plain_dict, top_level_slots

KEY = jax.random.PRNGKey(0)
REPVGG_NAMES = tuple(n for n in MODEL_NAMES if n.startswith("repvgg"))

# Published parameter counts (millions, 1000 classes unless CIFAR: 10 classes).
PUBLISHED_PARAMS = {
    "vgg16_cifar": 14.99, "resnet18": 11.69, "resnet34": 21.80, "resnet50": 25.56,
    "resnet101": 44.55, "resnet18_cifar": 11.17, "mobilenet_v1": 4.23,
}
# RepVGG paper, deploy form; the paper truncates (not rounds) to two decimals.
PUBLISHED_REPVGG_DEPLOY = {
    "repvgg_a0": 8.30, "repvgg_a1": 12.78, "repvgg_a2": 25.49, "repvgg_b0": 14.33,
    "repvgg_b1": 51.82, "repvgg_b1g2": 41.36, "repvgg_b1g4": 36.12, "repvgg_b2": 80.31,
    "repvgg_b2g4": 55.77, "repvgg_b3": 110.96,
}
PUBLISHED_MACS = {"vgg16_cifar": 313e6, "resnet18": 1.82e9, "resnet50": 4.11e9,
                  "mobilenet_v1": 569e6}


def abstract_variables(model, input_shape, rule=None):
    return jax.eval_shape(lambda key: init_variables(model, key, input_shape, rule), KEY)


def shapes_of(tree):
    return jax.tree_util.tree_map(lambda leaf: tuple(leaf.shape), tree)


# ---------------------------------------------------------------- published sizes


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_matches_published(name):
    model = create_model(name)
    count = count_params(abstract_variables(model, default_input_shape(name)))
    assert abs(count / 1e6 - PUBLISHED_PARAMS[name]) <= 0.01, count


@pytest.mark.parametrize("name", REPVGG_NAMES)
def test_repvgg_deploy_count_matches_paper(name):
    shape = default_input_shape(name)
    training = abstract_variables(create_model(name), shape)
    fused = jax.eval_shape(fuse_network, training)
    count = count_params(fused)
    assert abs(count / 1e6 - PUBLISHED_REPVGG_DEPLOY[name]) <= 0.01, count
    assert int(count / 1e4) == round(PUBLISHED_REPVGG_DEPLOY[name] * 100), count
    # training form has strictly more parameters (the 1x1 and identity branches)
    assert count_params(training) > count
    deploy = abstract_variables(create_model(name, deploy=True), shape)
    assert deploy["batch_stats"] == {}
    assert shapes_of(deploy["params"]) == shapes_of(fused["params"])


@pytest.mark.parametrize("name", sorted(PUBLISHED_MACS))
def test_mac_count_matches_published(name):
    model = create_model(name)
    shape = default_input_shape(name)
    macs = count_macs(model, abstract_variables(model, shape), shape)
    assert abs(macs / PUBLISHED_MACS[name] - 1) < 0.01, macs


def test_macs_count_every_branch_at_its_resolution():
    model = create_model("resnet18_cifar", width=0.125)
    shape = (16, 16, 3)
    path = ("layer2_0", "conv1", "conv")  # 3x3 stride 2, 8 -> 16 channels, 16x16 -> 8x8
    rule = lambda p, g: ("1x1", "1x1_kxk", "1x1_avg", "1xk", "kx1") if p == path else None  # noqa: E731
    plain = count_macs(model, abstract_variables(model, shape), shape)
    grown = count_macs(model, abstract_variables(model, shape, rule), shape)
    cin, cout, out_px, in_px = 8, 16, 8 * 8, 16 * 16
    expected = (
        out_px * cin * cout  # 1x1 (strided)
        + in_px * cin * cin + out_px * 9 * cin * cout  # 1x1_kxk: 1x1 at input, 3x3 at output
        + in_px * cin * cout  # 1x1_avg: its 1x1 at input, the pool is free
        + 2 * out_px * 3 * cin * cout  # 1x3 and 3x1
    )
    assert grown - plain == expected


# ---------------------------------------------------------------- exact fusion

ALL = "all"
BRANCH_SETS = (ALL, ("1x1", "id"), ("1x1_kxk",), ("1x1_avg", "1xk", "kx1"))


def cycling_rule(every=3):
    """Grow every `every`-th slot, cycling through BRANCH_SETS; remember geometries."""
    calls = itertools.count()
    seen = {}

    def rule(path, geometry):
        seen[path] = geometry
        index = next(calls)
        if index % every:
            return None
        wanted = BRANCH_SETS[(index // every) % len(BRANCH_SETS)]
        allowed = allowed_branches(geometry)
        chosen = allowed if wanted == ALL else tuple(b for b in wanted if b in allowed)
        return chosen or None

    rule.seen = seen
    return rule


def recording(rule):
    seen = {}

    def wrapped(path, geometry):
        seen[path] = geometry
        return rule(path, geometry)

    wrapped.seen = seen
    return wrapped


def first_3x3_block(params, geometries):
    """Path of the first top-level 3x3 slot that is a block."""
    return next(p for p in top_level_slots(params)
                if "kxk" in get_at(params, p) and geometries[p].kernel_size == 3)


def nest_at(variables, path, geometry):
    """Grow the plain slot at `path` (abstract variables) with every allowed branch."""

    def grow(v):
        block, stats = grow_slot(KEY, get_at(v["params"], path), geometry,
                                 allowed_branches(geometry), path=path)
        return {"params": set_at(v["params"], path, block),
                "batch_stats": set_at(v["batch_stats"], path, stats)}

    return jax.eval_shape(grow, variables)


def nest_first_3x3_block(variables, geometries):
    """Grow the kxk conv inside the first grown 3x3 block with every allowed branch."""
    path = first_3x3_block(variables["params"], geometries)
    inner = (*path, "kxk", "conv")
    return nest_at(variables, inner, geometries[path]), inner


def branchwise_logits(model, variables, images):
    """Inference logits with every slot computed branch by branch (the reference semantics)."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not (isinstance(module, RepConv) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x = args[0]
        params = to_plain_dict(module.variables["params"])
        stats = to_plain_dict(module.variables.get("batch_stats", {}))
        y, _ = apply_slot_branchwise(params, stats, x.astype(module.dtype),
                                     module.geometry(x.shape[-1]), train=False)
        return y

    with nn.intercept_methods(interceptor):
        return model.apply(variables, images, train=False)


def random_fill(tree, seed=0):
    """Concrete random values for abstract variables, scaled to keep activations O(1)."""
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        if name == "var":
            return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        return (rng.normal(size=shape) * 0.2).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(make, tree)


def assert_fused_equals_training(name, model_kwargs, rule, input_shape, nest=True, abstract=None):
    model = create_model(name, **model_kwargs)
    if abstract is None:
        abstract = abstract_variables(model, input_shape, rule)
    if nest:
        abstract, inner = nest_first_3x3_block(abstract, rule.seen)
        assert "kxk" in get_at(abstract["params"], inner)
    assert structure_of(abstract["params"]), "no slot was grown"
    variables = random_fill(abstract)
    images = np.random.default_rng(1).normal(size=(2, *input_shape)).astype(np.float32)

    fused = fuse_network(variables)
    assert set(fused) == {"params"}
    deploy = create_model(name, **model_kwargs, deploy=True)
    assert shapes_of(fused["params"]) == shapes_of(abstract_variables(deploy, input_shape)["params"])

    expected = branchwise_logits(model, variables, images)
    got = deploy.apply(fused, images)
    assert got.dtype == expected.dtype == jnp.float32
    scale = float(jnp.max(jnp.abs(expected)))
    assert float(jnp.max(jnp.abs(got - expected))) <= 1e-4 * (1 + scale)


TINY = dict(num_classes=5, width=0.125)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in REPVGG_NAMES])
def test_fused_network_equals_training_network(name):
    shape = (16, 16, 3) if name.endswith("cifar") else (32, 32, 3)
    assert_fused_equals_training(name, TINY, cycling_rule(), shape)


# Every RepVGG variant is the same code at other depths, widths and groups, and
# its fused structure is checked against the deploy model for all ten above;
# numerically we run one A variant and one groupwise B variant by default to
# keep the file fast (DYREP_TEST_ALL_MODELS=1 runs all ten).
REPVGG_NUMERIC = (REPVGG_NAMES if os.environ.get("DYREP_TEST_ALL_MODELS") == "1"
                  else ("repvgg_a0", "repvgg_b1g4"))


def repvgg_nested_twice(name, input_shape):
    """RepVGG's training form with one block's kxk slot grown, and its kxk grown again."""
    model = create_model(name, **TINY)
    rule = recording(lambda path, geometry: None)
    abstract = abstract_variables(model, input_shape, rule)
    outer = ("stage1_1", "conv_kxk", "conv")
    geometry = rule.seen[outer]
    abstract = nest_at(abstract, outer, geometry)
    abstract = nest_at(abstract, (*outer, "kxk", "conv"), geometry)
    return abstract, outer


@pytest.mark.parametrize("name", REPVGG_NUMERIC)
def test_fused_repvgg_equals_training_form(name):
    # timm's block (kxk conv-BN + 1x1 conv-BN + identity BN) everywhere, one kxk slot
    # grown into a DyRep block whose kxk is grown again (nesting depth 2)
    abstract, outer = repvgg_nested_twice(name, (32, 32, 3))
    assert "kxk" in get_at(abstract["params"], (*outer, "kxk", "conv"))
    assert_fused_equals_training(name, TINY, None, (32, 32, 3), nest=False, abstract=abstract)


@pytest.mark.parametrize("name", ["resnet18_cifar", "mobilenet_v1"])
def test_static_dbb_baseline_fuses_exactly(name):
    kwargs = dict(TINY, with_bn_after_3x3=False)
    rule = recording(dbb_initial_branches)
    assert_fused_equals_training(name, kwargs, rule, (16, 16, 3), nest=False)
    variables = abstract_variables(create_model(name, **kwargs), (16, 16, 3), rule)
    three_by_three = [p for p, g in rule.seen.items() if g.kernel_size == 3]
    assert three_by_three
    for path in three_by_three:
        assert set(get_at(variables["params"], path)) == {"1x1", "1x1_kxk", "1x1_avg", "kxk"}
        assert "bn" not in get_at(variables["params"], path[:-1])  # BN after 3x3 removed


# ---------------------------------------------------------------- API behaviour


def test_repvgg_is_timm_block_and_only_kxk_convs_are_dyrep_targets():
    params = abstract_variables(create_model("repvgg_a0", **TINY), (32, 32, 3))["params"]
    assert structure_of(params) == {}  # no DyRep block at init: the branches are fixed parts
    assert set(params["stage0"]) == {"conv_kxk", "conv_1x1"}  # stride 2: no identity
    assert set(params["stage1_1"]) == {"conv_kxk", "conv_1x1", "identity"}
    assert set(params["stage1_1"]["identity"]) == {"scale", "bias"}  # a BN, not a slot
    blocks = [k for k in params if k.startswith("stage")]
    assert len(blocks) == 22
    assert eligible_slots(params) == [(b, "conv_kxk", "conv") for b in blocks]
    # the kxk slot nests twice: a slot inside one block is eligible, inside two it is not
    abstract, outer = repvgg_nested_twice("repvgg_a0", (32, 32, 3))
    eligible = eligible_slots(abstract["params"])
    inner = (*outer, "kxk", "conv")
    assert (*outer, "1x1_kxk", "conv2") in eligible and (*inner, "1x1_kxk", "conv2") not in eligible
    assert (*inner, "kxk", "conv") not in eligible
    assert not {outer, inner} & set(eligible)  # blocks now
    deploy = abstract_variables(create_model("repvgg_a0", **TINY, deploy=True), (32, 32, 3))
    assert structure_of(deploy["params"]) == {}
    assert deploy["batch_stats"] == {}


def test_init_variables_is_plain_dicts_in_branch_order():
    model = create_model("resnet18_cifar", **TINY)
    shape = (16, 16, 3)
    grown_paths = {("conv1", "conv"): ("1x1", "1x1_avg"), ("layer1_0", "conv2", "conv"): ("id",)}
    grown = init_variables(model, KEY, shape, lambda p, g: grown_paths.get(p))
    assert type(grown) is dict and set(grown) == {"params", "batch_stats"}
    assert all(type(node) is dict for node in (grown["params"], grown["params"]["layer1_0"]))
    assert structure_of(grown["params"]) == {"conv1.conv": ["1x1", "1x1_avg", "kxk"],
                                             "layer1_0.conv2.conv": ["kxk", "id"]}  # reference order


def test_train_mode_updates_batch_stats_and_bf16_returns_float32_logits():
    model = create_model("mobilenet_v1", num_classes=4, width=0.125, dtype=jnp.bfloat16)
    shape = (16, 16, 3)
    variables = abstract_variables(model, shape, dbb_initial_branches)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype("float32")}
    images = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
    logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert logits.shape == (2, 4) and logits.dtype == jnp.float32
    logits, updates = jax.eval_shape(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]), variables, images)
    assert logits.dtype == jnp.float32
    assert shapes_of(updates["batch_stats"]) == shapes_of(variables["batch_stats"])


def test_vgg_accepts_small_inputs_and_any_channel_count():
    model = create_model("vgg16_cifar", num_classes=10, width=0.125)
    for shape in [(16, 16, 1), (32, 32, 3), (64, 64, 3)]:
        variables = abstract_variables(model, shape)
        images = jax.ShapeDtypeStruct((2, *shape), jnp.float32)
        logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
        assert logits.shape == (2, 10)


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'resnet19'") as info:
        create_model("resnet19")
    for name in MODEL_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names"):
        default_input_shape("nope")


def test_bad_model_arguments_are_refused():
    with pytest.raises(ValueError, match="width"):
        create_model("resnet18", width=0)
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ValueError, match="height, width, channels"):
        init_variables(create_model("resnet18"), KEY, (32, 32))


@pytest.mark.parametrize("name", ["resnet18", "vgg16_cifar", "repvgg_a0", "mobilenet_v1"])
def test_wrong_input_rank_or_channels_fails_clearly(name):
    model = create_model(name, **TINY)
    variables = abstract_variables(model, (32, 32, 3))

    def run(shape):
        images = jax.ShapeDtypeStruct(shape, jnp.float32)
        return jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)

    with pytest.raises(RepError, match=r"expected a batch of images .*got shape \(32, 32, 3\)"):
        run((32, 32, 3))
    with pytest.raises(RepError, match="input has 1 channels but the slot's kernel expects 3"):
        run((2, 32, 32, 1))


def test_fuse_network_refuses_a_batchnorm_without_a_conv():
    variables = {
        "params": {"norm": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}},
        "batch_stats": {"norm": {"mean": jnp.zeros(3), "var": jnp.ones(3)}},
    }
    with pytest.raises(RepError, match="norm: BatchNorm not after a 'conv' slot"):
        fuse_network(variables)


# ---------------------------------------------------------------- initialization


def assert_std(values, expected, what):
    """Sample std within 6 standard errors (uniform/normal samples) plus 1%."""
    values = np.asarray(values, np.float64).ravel()
    tolerance = 6 * 0.71 / np.sqrt(values.size) + 0.01  # std error of a normal's sample std
    assert abs(values.std() / expected - 1) <= tolerance, (what, values.std(), expected)


def block_convs_and_bns(tree, path=()):
    """(path, node) of every conv (4-d kernel) and every BN (scale) inside a block tree."""
    for key, node in tree.items():
        here = (*path, key)
        if "kernel" in node:
            yield "conv", here, node
        elif "scale" in node:
            yield "bn", here, node
        else:
            yield from block_convs_and_bns(node, here)


def test_static_dbb_blocks_start_at_pytorch_defaults():
    # as the reference's convert_to_dbb: new modules, so every conv is U(+-1/sqrt(fan_in))
    # (kaiming_uniform a=sqrt(5)), the kxk conv's bias too, every BN gamma 1 / beta 0
    model = create_model("resnet18_cifar", num_classes=4, width=0.5, with_bn_after_3x3=False)
    variables = init_variables(model, KEY, (8, 8, 3), dbb_initial_branches)
    params, stats = variables["params"], variables["batch_stats"]
    blocks = [p for p in top_level_slots(params) if "kxk" in get_at(params, p)]
    assert len(blocks) == 17  # the 3x3 stem and the 16 3x3 convs of the residual blocks
    pooled = {}
    for path in blocks:
        for kind, where, node in block_convs_and_bns(get_at(params, path)):
            if kind == "bn":
                assert np.all(node["scale"] == 1) and np.all(node["bias"] == 0), where
                bn_stats = get_at(stats, (*path, *where))
                assert np.all(bn_stats["mean"] == 0) and np.all(bn_stats["var"] == 1), where
                continue
            kernel = np.asarray(node["kernel"])
            fan_in = int(np.prod(kernel.shape[:-1]))
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(kernel).max() <= bound, where
            pooled.setdefault((where[-2] if len(where) > 1 else where[-1], fan_in), []).append(
                kernel.ravel() * np.sqrt(3 * fan_in))  # unit std if U(-bound, bound)
            if "bias" in node:
                assert where == ("kxk", "conv")
                assert 0 < np.abs(node["bias"]).max() <= bound
    assert ("kxk", 9 * 256) in pooled and ("1x1", 256) in pooled  # every branch kind seen
    for key, values in pooled.items():
        assert_std(np.concatenate(values), 1.0, key)


def dense_kernel(params, name):
    return np.asarray(params[name]["kernel"]), np.asarray(params[name]["bias"])


def test_classifier_and_conv_init_follow_the_reference_models():
    # VGG-16 (NAS-style 'goog'): Linear U(+-1/sqrt(out)), bias 0, conv N(0, sqrt(2/(k*k*out)))
    params = init_variables(create_model("vgg16_cifar", num_classes=10, width=0.5), KEY,
                            (32, 32, 3))["params"]
    for name, out in (("fc1", 256), ("fc2", 10)):
        kernel, bias = dense_kernel(params, name)
        assert np.abs(kernel).max() <= 1 / np.sqrt(out) and np.all(bias == 0)
        assert_std(kernel, 1 / np.sqrt(3 * out), name)
    assert_std(params["conv12"]["conv"]["kernel"], np.sqrt(2 / (9 * 256)), "conv12")
    assert np.all(params["conv12"]["bn"]["scale"] == 1)
    # MobileNetV1 ('goog' too): the classifier bound is 1/sqrt(classes)
    params = init_variables(create_model("mobilenet_v1", num_classes=100, width=0.25), KEY,
                            (32, 32, 3))["params"]
    kernel, bias = dense_kernel(params, "fc")
    assert np.abs(kernel).max() <= 0.1 and np.all(bias == 0)
    assert_std(kernel, 1 / np.sqrt(300), "mobilenet fc")
    dw = params["block12"]["dw"]["conv"]["kernel"]  # depthwise: fan_out = 9 * channels
    assert_std(dw, np.sqrt(2 / (9 * dw.shape[-1])), "depthwise")
    # ResNet (torchvision): fc left at PyTorch's default, U(+-1/sqrt(in)) for weight and bias
    params = init_variables(create_model("resnet18", num_classes=100, width=0.5), KEY,
                            (32, 32, 3))["params"]
    kernel, bias = dense_kernel(params, "fc")
    bound = 1 / np.sqrt(kernel.shape[0])
    assert np.abs(kernel).max() <= bound and 0 < np.abs(bias).max() <= bound
    assert_std(kernel, bound / np.sqrt(3), "resnet fc")
    assert_std(params["layer4_1"]["conv2"]["conv"]["kernel"], np.sqrt(2 / (9 * 256)), "resnet")


def test_repvgg_init_is_timms():
    # timm: convs N(0, sqrt(2 / (k*k*out/groups))), every BN of a RepVggBlock gamma
    # N(0.1, 0.1) and beta N(0, 0.1), head N(0, 0.01) with bias 0
    params = init_variables(create_model("repvgg_b1g4", num_classes=50, width=0.25), KEY,
                            (32, 32, 3))["params"]
    grouped = params["stage3_1"]["conv_kxk"]["conv"]["kernel"]  # layer 12: groupwise
    assert grouped.shape[2] * 4 == grouped.shape[3] == 128
    assert_std(grouped, np.sqrt(2 / (9 * 128 / 4)), "grouped kxk")
    assert_std(params["stage3_0"]["conv_1x1"]["conv"]["kernel"], np.sqrt(2 / 128), "1x1")
    bns = [node for key, block in params.items() if key.startswith("stage")
           for node in (block["conv_kxk"]["bn"], block["conv_1x1"]["bn"], block.get("identity"))
           if node is not None]
    scales = np.concatenate([np.asarray(n["scale"]) for n in bns])
    biases = np.concatenate([np.asarray(n["bias"]) for n in bns])
    assert abs(scales.mean() - 0.1) < 6 * 0.1 / np.sqrt(scales.size)
    assert abs(biases.mean()) < 6 * 0.1 / np.sqrt(biases.size)
    assert_std(scales, 0.1, "bn scale")
    assert_std(biases, 0.1, "bn bias")
    kernel, bias = dense_kernel(params, "fc")
    assert_std(kernel, 0.01, "head")
    assert np.all(bias == 0)


# ---------------------------------------------------------------- ghost BN


def test_bn_group_size_normalizes_each_group_on_its_own():
    # A RepVGG block holds both kinds of the network's own BN (a ConvBN's `bn` and the
    # identity BN). With only those mixing images, a batch of 4 in groups of 2 must give
    # exactly what two separate batches of 2 give; running statistics move by the
    # average of the two groups' updates.
    from dyrep_jax.models.repvgg import RepVGGBlock

    ghost, whole = RepVGGBlock(8, bn_group_size=2), RepVGGBlock(8)
    images = np.random.default_rng(4).normal(size=(4, 6, 6, 8)).astype(np.float32)
    variables = whole.init(KEY, images)
    assert set(variables["batch_stats"]) == {"conv_kxk", "conv_1x1", "identity"}

    def train_apply(block, x):
        return block.apply(variables, x, train=True, mutable=["batch_stats"])

    out, updates = train_apply(ghost, images)
    halves = [train_apply(whole, images[i:i + 2]) for i in (0, 2)]
    np.testing.assert_allclose(out, np.concatenate([h[0] for h in halves]), rtol=1e-5,
                               atol=1e-5)
    expected_stats = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, halves[0][1], halves[1][1])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           updates, expected_stats)
    whole_out, _ = train_apply(whole, images)
    assert np.abs(np.asarray(whole_out) - np.asarray(out)).max() > 1e-2
    # inference ignores the group size
    np.testing.assert_array_equal(ghost.apply(variables, images), whole.apply(variables, images))


@pytest.mark.parametrize("name", ["resnet18_cifar", "vgg16_cifar", "mobilenet_v1", "repvgg_a0"])
def test_bn_group_size_reaches_the_networks_bns(name):
    # a training batch of 6 cannot be split into groups of 4: the network's BNs refuse it
    model = create_model(name, **TINY, bn_group_size=4)
    variables = abstract_variables(model, (16, 16, 3))
    images = jax.ShapeDtypeStruct((6, 16, 16, 3), jnp.float32)
    with pytest.raises(RepError, match="batch of 6 images is not a multiple of "
                                       "model.bn_group_size=4"):
        jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                       variables, images)
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                   variables, jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32))


def test_bn_group_size_must_be_a_count():
    with pytest.raises(ValueError, match="bn_group_size must be an integer >= 0"):
        create_model("resnet18", bn_group_size=-1)
