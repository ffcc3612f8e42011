"""Every config field, documented once. Experiment files in configs/ override these.

Run `python -m dyrep_jax.main --config configs/X.py --workdir DIR --config.a.b=value`.
A field that is not defined here is rejected before any work starts.
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "experiment"  # free-form name, recorded in checkpoints and fused/arch.json
    c.seed = 0  # one seed for init, data order, augmentation and structural decisions

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet18_cifar"  # see dyrep_jax.models.MODEL_NAMES
    c.model.width = 1.0  # multiplier on every conv width (small models for tests/quickstart)
    c.model.num_classes = 0  # 0 = take it from the dataset
    c.model.dtype = "float32"  # compute dtype: float32 or bfloat16 (params/BN stats stay f32)
    c.model.bn_group_size = 0  # network BNs: batch statistics over groups of N images; 0 = global batch

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "digits"  # digits | npz:PATH | cifar10 | cifar100 | imagenet2012 | synthetic:H,W,C,K,NTR,NTE
    c.data.data_dir = ""  # TFDS data dir ("" = TFDS_DATA_DIR or the TFDS default)
    c.data.augment = "cifar"  # none | cifar | imagenet | imagenet_strong
    c.data.image_size = 0  # output size of ImageNet-style crops (0 = native size)
    c.data.max_train_examples = 0  # 0 = all; else use the first N (small runs)
    c.data.max_test_examples = 0  # 0 = all
    c.data.color_jitter = 0.0  # augment=imagenet: brightness/contrast/saturation strength (0 = off)
    c.data.random_erasing = 0.0  # imagenet augments: prob. of erasing one box with per-pixel noise
    c.data.host_workers = 0  # host-augmented data: decode/augment in N grain processes (0 = threads)

    c.batch_size = 128  # global batch over all devices and hosts
    c.eval_batch_size = 256  # global
    c.num_epochs = 10

    c.optim = optim_fields()
    c.dyrep = dyrep_fields()
    c.checkpoint = checkpoint_fields()

    c.num_devices = 0  # 0 = all devices (of all hosts); N = first N local devices (1 host)
    c.log_every_steps = 50  # progress line (loss, images/s, ETA) every N steps
    c.profile_steps = ""  # "A,B": jax.profiler trace of global steps A..B (1 = first) in DIR/profile/
    c.compilation_cache_dir = "auto"  # JAX's persistent compile cache: "auto" = JAX_COMPILATION_CACHE_DIR
    # if set, else $XDG_CACHE_HOME (or ~/.cache)/dyrep_jax/jax_cache; "" = off; else this folder
    c.debug_fail_at_step = -1  # testing only: inject a NaN loss at this global step
    return c



def optim_fields() -> ml_collections.ConfigDict:
    """The `optim` group: optimizer and the reference lr schedule."""
    o = ml_collections.ConfigDict()
    o.name = "sgd"  # sgd | adamw
    o.lr = 0.1  # peak learning rate
    o.momentum = 0.9
    o.nesterov = False
    o.weight_decay = 1e-4
    o.decay_bn_and_bias = True  # False: decay only conv/dense kernels
    o.warmup_epochs = 0.0  # linear warmup length; the cosine then runs over the rest
    o.warmup_lr = 0.0  # lr of the first warmup step (the warmup rises from it to optim.lr)
    o.warmup_by_epoch = False  # True: warmup lr steps once per epoch, as the reference
    o.min_lr = 0.0  # cosine floor
    o.label_smoothing = 0.0
    o.grad_clip_norm = 0.0  # 0 = off
    return o

def dyrep_fields() -> ml_collections.ConfigDict:
    """`config.dyrep`: the controller (dyrep.ControllerConfig reads these)."""
    d = ml_collections.ConfigDict()
    d.mode = "dyrep"  # plain | dbb | rep | dyrep
    d.metric = "synflow"  # synflow (= synflow_stable) | synflow_naive | snip | grad_norm | random
    d.adjust_interval = 15  # epochs between adjustments
    d.max_adjust_epochs = 500  # no adjustment (nor recalibration) after this epoch
    d.grow_topk = 1  # slots grown per adjustment
    d.calib_batches = 20  # training batches for BN calibration of a new block
    d.dep_std_threshold = 0.02  # Dep acts when std of branch importances exceeds this
    d.dep_abs_threshold = 0.1  # ...and cuts branches below the mean and below this
    d.recal_bn_every_epoch = False  # recalibrate all BNs after epochs without adjustment
    d.recal_bn_batches = 200  # training batches for that recalibration (cumulative mean)
    return d


def checkpoint_fields() -> ml_collections.ConfigDict:
    """`config.checkpoint`: what checkpoint.make_manager keeps and how it saves."""
    k = ml_collections.ConfigDict()
    k.keep = 3  # latest N checkpoints kept (plus the best by test top-1)
    k.async_save = True
    return k
