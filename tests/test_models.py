"""Models: published sizes, exact whole-network fusion, the public API's errors.

Speed: sizes are counted on abstract variables (`jax.eval_shape`, nothing
computed). Equivalence tests build the grown structure abstractly too and
fill it with random numpy values (random BN statistics, gammas and betas:
fusion bugs hide behind mean 0 / var 1), then run eagerly so that ops of
equal shape compile once for all architectures.

Tolerance: the training network and the fused one compute the same affine
maps with different summation orders in float32 (branches summed after
separate convs vs one conv). Rounding is ~1e-7 relative per op and stays
below ~1e-5 of the logit scale over a hundred layers, so we require
max |diff| <= 1e-4 * (1 + max |logit|). A fusion bug (a wrong pad value, a
missed BN, a misplaced group) changes the logits by O(1) of their scale.
"""

import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dyrep_jax.models import (
    MODEL_NAMES,
    count_macs,
    count_params,
    create_model,
    dbb_initial_branches,
    default_initial_branches,
    default_input_shape,
    fuse_network,
    init_variables,
    repvgg_training_branches,
)
from dyrep_jax.rep import RepError, allowed_branches, get_at, grow_slot, set_at
from dyrep_jax.rep.tree import structure_of, top_level_slots

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


def nest_first_3x3_block(variables, geometries):
    """Grow the kxk conv inside the first grown 3x3 block with every allowed branch."""
    params = variables["params"]
    path = next(p for p in top_level_slots(params)
                if "kxk" in get_at(params, p) and geometries[p].kernel_size == 3)
    inner = (*path, "kxk", "conv")
    geometry = geometries[path]

    def grow(v):
        block, stats = grow_slot(KEY, get_at(v["params"], inner), geometry,
                                 allowed_branches(geometry), path=inner)
        return {"params": set_at(v["params"], inner, block),
                "batch_stats": set_at(v["batch_stats"], inner, stats)}

    return jax.eval_shape(grow, variables), inner


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


def assert_fused_equals_training(name, model_kwargs, rule, input_shape, nest=True):
    model = create_model(name, **model_kwargs)
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

    expected = model.apply(variables, images, train=False)
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


@pytest.mark.parametrize("name", REPVGG_NUMERIC)
def test_fused_repvgg_equals_training_form(name):
    # RepVGG's own training form (kxk + 1x1 + id everywhere) plus one nested block
    assert_fused_equals_training(name, TINY, recording(default_initial_branches(name)),
                                 (32, 32, 3))


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


def test_repvgg_default_rule_is_training_form_and_deploy_is_plain():
    assert default_initial_branches("repvgg_a0") is repvgg_training_branches
    assert default_initial_branches("resnet18") is None
    params = abstract_variables(create_model("repvgg_a0", **TINY), (32, 32, 3))["params"]
    structure = structure_of(params)
    # (eval_shape returns dict keys sorted: compare branch sets)
    assert set(structure["stage0.conv"]) == {"1x1", "kxk"}  # stride 2: no identity
    assert set(structure["stage1_1.conv"]) == {"1x1", "kxk", "id"}
    assert len(structure) == len(top_level_slots(params)) == 22
    deploy = abstract_variables(create_model("repvgg_a0", **TINY, deploy=True), (32, 32, 3))
    assert structure_of(deploy["params"]) == {}
    assert deploy["batch_stats"] == {}


def test_init_variables_is_plain_dicts_and_growth_preserves_the_function():
    # same sizes as the equivalence tests above, so most eager ops are compiled already
    model = create_model("resnet18_cifar", **TINY)
    shape = (16, 16, 3)
    grown_paths = {("conv1", "conv"): ("1x1", "1x1_avg"), ("layer1_0", "conv2", "conv"): ("id",)}
    plain = init_variables(model, KEY, shape, lambda p, g: None)
    grown = init_variables(model, KEY, shape, lambda p, g: grown_paths.get(p))
    assert type(grown) is dict and set(grown) == {"params", "batch_stats"}
    assert all(type(node) is dict for node in (grown["params"], grown["params"]["layer1_0"]))
    assert structure_of(grown["params"]) == {"conv1.conv": ["1x1", "1x1_avg", "kxk"],
                                             "layer1_0.conv2.conv": ["kxk", "id"]}  # reference order
    images = jnp.asarray(np.random.default_rng(2).normal(size=(2, *shape)), jnp.float32)
    expected = model.apply(plain, images, train=False)
    got = model.apply(grown, images, train=False)
    assert float(jnp.max(jnp.abs(got - expected))) <= 1e-4 * (1 + float(jnp.max(jnp.abs(expected))))


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
