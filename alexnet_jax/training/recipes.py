"""The configs the package itself knows: the paper's recipe, and what each published net was
trained with and runs with.

They live in the package, not in configs/, because commands need them wherever they run:
`python -m alexnet_jax.convert` writes a published net's config beside its weights, and
`--config.init_from` compares a run's net with the one the weights were trained in. The
config files are these: configs/default.py is `paper()`, configs/torchvision_alexnet.py and
caffe_alexnet.py are `published(...)`, configs/gpu8.py and tpu_pod.py are `scaled(...)`.
"""

from __future__ import annotations

import ml_collections

from alexnet_jax.core.errors import UserInputError


def paper() -> ml_collections.ConfigDict:
  """The paper's ImageNet recipe (§5): batch 128, momentum 0.9, weight decay 5e-4, lr 0.01
  divided by 10 three times; the two-tower net of §3 with its LRN, pooling and dropout."""
  config = ml_collections.ConfigDict()
  # Data.
  # "prepared" (`prepare`'s shards) | "tfds:NAME" (a dataset TFDS built; imagenet2012 is
  # tfds:imagenet2012) | "image_folder" | "synthetic". docs/data.md: which to choose.
  config.dataset = "prepared"
  # prepared: prepare's --data_dir; tfds: the TFDS data directory ("" = TFDS's default);
  # synthetic: where to generate it ("" = WORKDIR/data).
  config.data_dir = ""
  config.stage_dir = ""  # a gs:// data_dir is copied here, once per host ("" = ~/.cache/...)
  config.train_split = "train"  # tfds only: TFDS split names, slices too ("train[:90%]")
  config.eval_split = ""  # tfds only: "" = "validation" where the dataset has one, else "test"
  config.stats_images = 10_000  # tfds only: training images sampled for the mean image and PCA
  config.num_classes = 1000
  config.image_size = 227  # the crop; the paper's "224" is an erratum (docs/model.md)
  config.resize_size = 256  # shorter side rescaled to this, then the central square
  config.synthetic_train_per_class = 300  # size of the generated "synthetic" set
  config.synthetic_val_per_class = 50
  config.synthetic_seed = 0  # the generated images; runs with other `seed`s train on the same ones
  config.num_parallel_calls = -1  # tf.data threads per map (-1 = autotune)
  config.channel_mean = (123.675, 116.28, 103.53)  # RGB in 0-255, when no prepared statistics exist
  config.mean_subtraction = "image"  # "image": the per-pixel mean image (the paper) | "channel"
  config.pca_noise_std = 0.1  # std of the paper's PCA colour-noise alphas; 0 turns it off
  config.eval_crops = 10  # 10: the paper's ten patches, softmax averaged | 1: the centre crop
  # Model: AlexNet's own fields (model/alexnet.py).
  config.model = ml_collections.ConfigDict()
  config.model.variant = "paper"  # "paper" | "torchvision"
  config.model.towers = 2  # paper: 2, or 1 for its one-GPU comparison net
  config.model.activation = "relu"
  config.model.lrn = True
  # "tower": each tower over its own maps (the paper) | "all" (Caffe)
  config.model.lrn_scope = "tower"
  config.model.lrn_k = 2.0
  config.model.lrn_n = 5
  config.model.lrn_alpha = 1e-4  # NOT divided by n (Caffe's and PyTorch's alpha is this times n)
  config.model.lrn_beta = 0.75
  config.model.overlapping_pool = True
  config.model.dropout_rate = 0.5
  config.model.init_std = 0.01
  config.model.bias_one = 1.0
  config.first_device = 0  # with num_devices: devices first..first+num_devices-1 (experiments)
  config.model_parallelism = 1  # mesh 'model' axis: 1, or 2 for one tower per device
  config.dtype = "float32"  # computation dtype: "float32" | "bfloat16"
  # "fast": hand-written pooling and LRN gradients | "plain": XLA's own (the reference); equal up to
  # rounding. "auto": fast on the CPU (measured 1.2x there), plain on GPUs and TPUs (unmeasured).
  config.ops_impl = "auto"
  # XLA:CPU's options for the steps and extraction: "auto" (model/backend.py's measured choice)
  # or a set of backend.CPU_OPTION_SETS, e.g. after `bench --compiler_options=...` on your CPU.
  config.cpu_compiler_options = "auto"
  # Optimisation: v <- 0.9 v - wd*lr*w - lr*g ; w <- w + v.
  config.batch_size = 128  # global, over all devices and hosts
  config.num_epochs = 90
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.learning_rate = 0.01
  config.momentum = 0.9
  config.weight_decay = 0.0005
  config.weight_decay_on_biases = False  # cuda-convnet decayed weights only
  config.lr_schedule = "piecewise"  # "piecewise" | "plateau" | "cosine" | "constant"
  config.lr_boundaries_epochs = (30, 60, 80)
  config.lr_decay_factor = 0.1
  config.plateau_patience = 2  # evaluations without improvement before dividing by 10
  config.plateau_max_drops = 3
  # Goyal et al. 2017's gradual warmup (none in the paper): the rate rises linearly over these
  # epochs from warmup_start_factor * learning_rate; the drops stay where they are.
  config.warmup_epochs = 0.0
  config.warmup_start_factor = 1.0
  # Fine-tuning (used only when WORKDIR has no checkpoint yet; a resumed run ignores them).
  config.init_from = ""  # start from: a workdir of ours, or a .pth/.pt/.safetensors/.npz/.npy file
  config.freeze_all_but_last = 0  # > 0: train only the last k of the 8 layers (1: fc8 only)
  # Loop.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  # False: a NaN/Inf loss stops the run; True: skip such steps, count them
  config.skip_nonfinite_steps = False
  # 0: every device of every host; N: the first N (e.g. to restore elsewhere)
  config.num_devices = 0
  config.keep_checkpoints = 3  # the latest few; the best by val top-1 error is kept too
  return config


PAPER_BATCH = 128  # the batch paper()'s learning rate was set for


def scaled(
  devices: int, per_device_batch: int = PAPER_BATCH, warmup_epochs: float = 0.0
) -> ml_collections.ConfigDict:
  """The paper's recipe data-parallel on `devices` devices: global batch `devices *
  per_device_batch`, k = that / 128 times the paper's, and k times its learning rate (the
  linear rule); the schedule's drops stay at the same epochs.

  The rule, by its sources: Krizhevsky 2014 ("One weird trick", arXiv:1404.5997, §5) writes
  that theory suggests sqrt(k) to keep the gradient's variance constant, but that for the
  batch sizes of his note (AlexNet-like nets, 128 per GPU on up to 8 GPUs) multiplying the
  rate by k worked best. Goyal et al. 2017 (arXiv:1706.02677) measured the same linear rule on
  ResNet-50 (their rate 0.1 * kn/256) with `warmup_epochs` of gradual warmup (theirs: 5) from
  the small batch's rate, rate/k. At one device and batch 128 it is `paper()`'s schedule.
  """
  config = paper()
  config.batch_size = devices * per_device_batch
  k = config.batch_size / PAPER_BATCH
  config.learning_rate *= k
  config.warmup_epochs = warmup_epochs
  config.warmup_start_factor = min(1.0, 1 / k)  # Goyal et al.'s start: the small batch's rate
  return config


def device_count(arg: str, config_file: str) -> int:
  """The device count a config file is given after its name (`--config=FILE:COUNT`)."""
  if not arg.isdigit() or int(arg) < 1:
    raise UserInputError(f"{config_file}:{arg}: give the number of devices after ':', e.g. :64")
  return int(arg)


# What each published net was trained with, over the paper's recipe. Its `model` settings are
# what the weights are known to compute with: `init_from` warns where a run's differ.
PUBLISHED = {
  "torchvision": {
    "model": {"variant": "torchvision", "lrn": False},
    "image_size": 224,
    "mean_subtraction": "channel",
    "channel_mean": (123.675, 116.28, 103.53),  # torchvision's (0.485, 0.456, 0.406) in 0-255
    "pca_noise_std": 0.0,  # torchvision trained without the paper's colour noise
    "eval_crops": 1,  # torchvision's published 56.5% top-1 is the centre crop's
    # torchvision's reference recipe: batch 256, weight decay 1e-4 on every parameter, /10
    # every 30 epochs.
    "batch_size": 256,
    "weight_decay": 1e-4,
    "weight_decay_on_biases": True,
    "lr_boundaries_epochs": (30, 60),
  },
  # The paper's net exported by us (`convert`): trained with whatever config wrote it.
  "torch_grouped": {"model": {"variant": "paper"}},
  "caffe": {
    "model": {
      "variant": "paper",
      "towers": 2,  # Caffe's groups
      "lrn": True,
      "lrn_scope": "all",  # Caffe normalises across all 96 (256) maps, not per tower
      "lrn_k": 1.0,
      "lrn_n": 5,
      "lrn_alpha": 1e-4 / 5,  # Caffe's alpha=1e-4 is divided by n=5
      "lrn_beta": 0.75,
      "bias_one": 0.1,  # Caffe's biases (1 "gave flat loss"), for layers trained afresh
    },
    "mean_subtraction": "channel",
    "channel_mean": (122.67891434, 116.66876762, 104.00698793),  # Caffe's mean image, RGB
    "pca_noise_std": 0.0,  # Caffe trained with crops and mirrors only
    "eval_crops": 1,  # Caffe's published 57.1% top-1 is the centre crop's
  },
}


def published(fmt: str) -> ml_collections.ConfigDict:
  """The config the weights of `fmt` (a layouts.FORMATS name) run with: the paper's recipe
  with the settings that net was trained with."""
  config = paper()
  config.update(PUBLISHED[fmt])
  return config


def trained_with(fmt: str) -> dict:
  """The `config.model` settings the weights of `fmt` are known to have been trained with."""
  return dict(PUBLISHED[fmt]["model"])
