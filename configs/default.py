"""The paper's ImageNet recipe (§5): batch 128, momentum 0.9, weight decay 5e-4, lr 0.01 / 10 three
times."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Data.
  # "prepared" (`prepare`'s shards) | "tfds:NAME" (a dataset TFDS built; imagenet2012 is
  # tfds:imagenet2012) | "image_folder" | "synthetic". README: which to choose.
  config.dataset = "prepared"
  # prepared: prepare's --data_dir; tfds: the TFDS data directory ("" = TFDS's default);
  # synthetic: where to generate it ("" = WORKDIR/data).
  config.data_dir = ""
  config.train_split = "train"  # tfds only: TFDS split names, slices too ("train[:90%]")
  config.eval_split = ""  # tfds only: "" = "validation" where the dataset has one, else "test"
  config.stats_images = 10_000  # tfds only: training images sampled for the mean image and PCA
  config.num_classes = 1000
  config.image_size = 227  # the crop; the paper's "224" is an erratum (see README)
  config.resize_size = 256  # shorter side rescaled to this, then the central square
  config.synthetic_train_per_class = 300  # size of the generated "synthetic" set
  config.synthetic_val_per_class = 50
  config.synthetic_seed = 0  # the generated images; runs with other `seed`s train on the same ones
  config.num_parallel_calls = -1  # tf.data threads per map (-1 = autotune)
  config.channel_mean = (123.675, 116.28, 103.53)  # RGB in 0-255, when no prepared statistics exist
  config.mean_subtraction = "image"  # "image": the per-pixel mean image (the paper) | "channel"
  config.pca_noise_std = 0.1  # std of the paper's PCA colour-noise alphas; 0 turns it off
  config.eval_crops = 10  # 10: the paper's ten patches, softmax averaged | 1: the centre crop
  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.variant = "paper"  # "paper" | "torchvision"
  config.model.towers = 2  # paper: 2, or 1 for its one-GPU comparison net
  config.model.activation = "relu"
  config.model.lrn = True
  config.model.lrn_scope = (
    "tower"  # "tower": each tower over its own maps (the paper) | "all" (Caffe)
  )
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
  # Fine-tuning (used only when WORKDIR has no checkpoint yet; a resumed run ignores them).
  config.init_from = ""  # start from: a workdir of ours, or a .pth/.pt/.safetensors/.npz/.npy file
  config.freeze_all_but_last = 0  # > 0: train only the last k of the 8 layers (1: fc8 only)
  # Loop.
  config.seed = 0
  config.log_every_steps = 100
  config.eval_every_steps = 5000
  config.checkpoint_every_steps = 5000
  config.skip_nonfinite_steps = (
    False  # False: a NaN/Inf loss stops the run; True: skip such steps, count them
  )
  config.num_devices = (
    0  # 0: every device of every host; N: the first N (e.g. to restore elsewhere)
  )
  config.keep_checkpoints = 3  # the latest few; the best by val top-1 error is kept too
  return config
