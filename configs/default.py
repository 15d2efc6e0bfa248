r"""SAF (default), MESA, SGD or a SAM-family baseline on real Fashion-MNIST, small CNN, CPU.

The default run trains SAF (Du et al. 2022, Algorithm 1) for 8 epochs with the trajectory
loss active from epoch 3 (``E_start = 2``, ``E_tilde = 2``): the paper's CIFAR recipe
(Table 4: ``tau = 5``, ``lam = 0.3`` for SAF and 0.8 for MESA, SGD with momentum 0.9,
weight decay 5e-4, cosine decay, batch 128, lr 0.05) with the epoch counts (paper: 200
epochs, ``E_start = 5``, ``E_tilde = 3``) and MESA's EMA horizon scaled to a short run.
Measured on a 2-core CPU (docs/results.md, "Fashion-MNIST"): SAF reaches 0.906 test top-1
in 5 to 10 minutes.

Every method shares the model, init, data order, schedule and base optimizer, so runs
with one seed differ only by the method. SAM-family hyperparameters are the papers'
defaults (SAM, LookSAM, ESAM: rho 0.05; ASAM: rho 0.5, eta 0.01; MSAM: rho 3; m-RWP: sigma
0.01, lam 0.5), not tuned for this model.

Arguments (comma separated, after the file name), as big_vision's configs take them:
  method=NAME           the training method (default saf): sgd | saf | mesa | sam | asam
                        | gsam | looksam | esam | msam | rwp, or saf+X / mesa+X with X a
                        SAM-family method (e.g. saf+sam, mesa+rwp).
  smoke                 a few hundred examples, a tiny model, seconds to run (tests).

Run::

  python main.py --config configs/default.py --workdir runs/default
  python main.py --config configs/default.py:method=mesa --workdir runs/mesa
  python main.py --config configs/default.py:method=sam --workdir runs/sam
  python main.py --config configs/default.py:method=sgd,smoke --workdir /tmp/smoke \
      --config.optimizer.lr=0.1
"""

import ml_collections

from saf_jax import methods


def parse_args(arg: str | None, defaults: dict, choices: dict) -> dict:
  """Parses a config argument such as 'method=saf,smoke', as big_vision's configs take them.

  Args:
    arg: comma-separated ``key=value`` items and bare flags, or None.
    defaults: every allowed key with its default; a bool default makes the key a bare flag.
    choices: for some keys, the allowed values.

  Returns:
    ``defaults`` updated by ``arg``, e.g. {'method': 'saf', 'smoke': True}.

  Raises:
    ValueError: for an unknown key, or a value not in its ``choices``.
  """
  parsed = dict(defaults)
  allowed = ', '.join(k if isinstance(v, bool) else f'{k}=<name>' for k, v in defaults.items())
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    key = key.strip()
    if key not in parsed:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; allowed: {allowed}.')
    parsed[key] = value.strip() if sep else True
  for key, values in choices.items():
    if parsed[key] not in values:
      raise ValueError(f'config argument {key} must be one of {list(values)}, got {parsed[key]!r}.')
  return parsed


def one_step_smoke(config: ml_collections.ConfigDict) -> None:
  """Shrinks a paper config, in place, to one step of batch 4 on 4 examples, full-size model.

  The trajectory loss is on from that step (``E_start = 0``), so it is compiled and run.
  """
  config.num_epochs = 1
  config.log_every_steps = 1
  config.input.batch_size = 4
  config.input.eval_batch_size = 4
  config.input.num_train_examples = 4
  config.input.num_test_examples = 4
  config.analysis.sharpness_every_epochs = 0
  config.method.saf.E_start = 0
  config.method.mesa.E_start = 0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config; ``arg`` as described in the module docstring."""
  args = parse_args(arg, {'method': 'saf', 'smoke': False}, {'method': methods.NAMES})
  config = ml_collections.ConfigDict()

  # Run.
  config.seed = 0  # Init, data order and augmentation all derive from it.
  config.num_epochs = 8  # Epochs, counted from 1.
  config.log_every_steps = 50  # Steps between progress-bar loss updates.
  # Training steps per call of the compiled program (one lax.scan, metrics kept on the
  # device): fewer dispatches for short steps. Must divide the steps per epoch and
  # checkpoint.every_steps; SIGTERM and the progress bar act between calls.
  config.steps_per_dispatch = 1

  # Input.
  config.input = ml_collections.ConfigDict()
  # TFDS name, or 'folder:/path' for root/train/<class>/*.png|jpg and root/test/<class>/...
  # (or a .tar/.tar.gz archive of such a folder, decoded once into data_dir).
  config.input.dataset = 'fashion_mnist'
  # Folders: resize to this many pixels square (-1 = keep); ImageNet: crop size (-1 = 224).
  config.input.image_size = -1
  config.input.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data_dir.
  config.input.batch_size = 128  # Global batch size (all devices), examples.
  # Gradient accumulation: each step's batch as this many micro-batches, one at a time in
  # the compiled step (memory follows batch_size / accum_steps; saf_jax.accumulate). Must
  # divide the per-device batch. 1 = the whole batch at once.
  config.input.accum_steps = 1
  config.input.eval_batch_size = 1000  # Global, examples; the last batch is padded.
  # First N training examples (TFDS order); folders: N class-balanced. -1 = all.
  config.input.num_train_examples = -1
  config.input.num_test_examples = -1  # The same for the test split.
  config.input.augment = 'flip'  # 'none' | 'flip' | 'crop_flip'; ImageNet: 'inception_crop'.
  config.input.crop_padding = 4  # Pixels of zero padding for 'crop_flip'.
  config.input.prefetch = 2  # Batches placed on device ahead of the step (host placement).
  # 'device': the uint8 training set on every device, each batch gathered, augmented and
  # normalised inside the compiled step (in-memory datasets); 'host': the tf.data pipeline;
  # 'auto': 'device' when it fits (saf_jax.placement). Same ids and pixels either way.
  config.input.placement = 'auto'
  # Streamed datasets (ImageNet) only: encoded examples per shuffle window of each process.
  config.input.shuffle_buffer = 16_384

  # Model.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'cnn'  # See saf_jax.models.MODELS.
  config.model.width = 16  # Channels of the first block (the paper's ResNet-18: 64).
  # Computation dtype: 'bfloat16' for mixed precision (params, optimizer state, EMA and
  # every loss stay float32; the trajectory loss is always float32).
  config.model.dtype = 'float32'

  # Loss. Label smoothing of the cross-entropy term (0.1 in the paper's ImageNet commands);
  # the trajectory loss never uses it.
  config.label_smoothing = 0.0

  # Optimizer (the base optimizer of every method).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = 'sgd'  # 'sgd' | 'adamw'.
  config.optimizer.lr = 0.05  # Peak learning rate for the global batch.
  config.optimizer.momentum = 0.9  # SGD momentum (PyTorch convention, no dampening).
  config.optimizer.b1 = 0.9  # AdamW only.
  config.optimizer.b2 = 0.999  # AdamW only.
  config.optimizer.weight_decay = 5e-4  # SGD: L2 term added to the gradient; AdamW: decoupled.
  config.optimizer.decay_norm_and_bias = False  # Decay 1-D params (BN scale/bias, biases)?
  config.optimizer.schedule = 'cosine'  # 'cosine' | 'constant', over all steps.
  config.optimizer.warmup_epochs = 0  # Linear warm-up from 0, epochs.

  # Method.
  config.method = ml_collections.ConfigDict()
  config.method.name = args['method']  # See saf_jax.methods.NAMES.
  config.method.saf = ml_collections.ConfigDict()
  config.method.saf.lam = 0.3  # lambda, weight of the trajectory loss (Eq. 9).
  config.method.saf.tau = 5.0  # Temperature of the trajectory loss.
  config.method.saf.E_start = 2  # Trajectory loss added in epochs > E_start.
  config.method.saf.E_tilde = 2  # Targets are the logits from E_tilde epochs ago.
  config.method.saf.table_dtype = 'float32'  # 'float32' | 'bfloat16' | 'int8' (per-row affine).
  # 0: store all logits; k >= 1: only the k largest per example, plus the tail's mass at
  # temperature tau (saf_jax.logit_table; for many classes, e.g. ImageNet's 1000).
  config.method.saf.table_topk = 0
  config.method.saf.table_memmap = False  # Keep the table in workdir/saf_table (.npy).
  # 'device': the table is sharded over the devices and read and written inside the
  # compiled step; 'host': NumPy on the host (or memory-mapped); 'auto': 'device' when it
  # fits (saf_jax.placement). Same targets either way.
  config.method.saf.table_placement = 'auto'
  config.method.mesa = ml_collections.ConfigDict()
  config.method.mesa.lam = 0.8  # lambda (Eq. 13).
  config.method.mesa.tau = 5.0  # Temperature.
  config.method.mesa.E_start = 2  # Trajectory loss added in epochs > E_start.
  # beta of the EMA teacher (Eq. 10), per step. The paper's 0.9995 averages over ~2000
  # steps of a 78k-step CIFAR run; 0.998 keeps a ~500-step (one-epoch) horizon here.
  config.method.mesa.ema_decay = 0.998
  # SAM family (saf_jax.transforms). Each runs alone ('sam') or under SAF/MESA ('saf+sam':
  # the trajectory loss is part of the objective whose perturbed gradient is taken).
  # 'global': the perturbation uses the global batch's gradient; 'per_device': each
  # device uses its own shard's (m-sharpness, jax.shard_map). Same result on one device.
  config.method.perturbation_scope = 'global'
  # With input.accum_steps > 1: 'accumulated' perturbs with the whole batch's accumulated
  # gradient (big-batch SAM); 'per_microbatch' with each micro-batch's own (m-sharpness; not
  # for looksam, msam, rwp).
  config.method.accum_scope = 'accumulated'
  config.method.sam = ml_collections.ConfigDict()
  config.method.sam.rho = 0.05  # L2 radius of the perturbation (Foret et al. 2021).
  config.method.asam = ml_collections.ConfigDict()
  config.method.asam.rho = 0.5  # Radius in the adaptive norm (Kwon et al. 2021: 0.5-1.0).
  config.method.asam.eta = 0.01  # T_theta = |theta| + eta.
  config.method.asam.adaptive_params = 'weights'  # 'weights' (kernels + norm scales, the
  # authors' code) | 'kernels' | 'all'; the others get T = 1.
  config.method.gsam = ml_collections.ConfigDict()
  config.method.gsam.rho_max = 0.05  # rho at the peak learning rate (Zhuang et al. 2022).
  config.method.gsam.rho_min = 0.0  # rho at the final learning rate.
  config.method.gsam.alpha = 0.1  # Weight of the surrogate-gap ascent.
  config.method.looksam = ml_collections.ConfigDict()
  config.method.looksam.rho = 0.05  # Radius of the SAM steps (Liu et al. 2022).
  config.method.looksam.k = 5  # Steps between SAM gradients; 1 = SAM.
  config.method.looksam.alpha = 0.7  # Weight of the reused orthogonal component g_v.
  config.method.esam = ml_collections.ConfigDict()
  config.method.esam.rho = 0.05  # Radius (Du et al. 2022a).
  config.method.esam.beta = 0.6  # Fraction of parameter entries perturbed (SWP).
  config.method.esam.gamma = 0.5  # Fraction of the batch in the second gradient (SDS).
  # Momentum-SAM (Becker et al. 2024): one gradient per step, at theta - rho * v / ||v||
  # with v the base optimizer's momentum (SGD's buffer; AdamW's first moment).
  config.method.msam = ml_collections.ConfigDict()
  config.method.msam.rho = 3.0  # L2 radius; the authors' CIFAR runs with SGD (their configs).
  # m-RWP (Li et al., TMLR 2024): base(lam * grad(theta + eps) + (1 - lam) * grad(theta)),
  # eps ~ N(0, (sigma * ||filter||)^2) per output filter; two gradients per step.
  config.method.rwp = ml_collections.ConfigDict()
  config.method.rwp.sigma = 0.01  # Noise std relative to each filter's norm (authors' code).
  config.method.rwp.lam = 0.5  # Weight of the perturbed gradient (authors' --lambda).

  # Eval.
  config.eval = ml_collections.ConfigDict()
  config.eval.every_epochs = 1  # Test-set evaluation period, epochs (and after the last).
  # Decay of an evaluation-only EMA of params and batch_stats (timm's ModelEmaV2, what the
  # authors' scripts report), for any method, updated after every step and evaluated as
  # test_model_ema/*; 0 = off. MESA's teacher (method.mesa.ema_decay) is test_ema/*.
  config.eval.ema_decay = 0.0
  # Also evaluate the trained weights on the whole training split, unaugmented, in eval
  # mode (train_eval/*): how well the model fits its training set. In-memory data only.
  config.eval.train_accuracy = False

  # Analysis (saf_jax.analysis.sharpness; `python -m saf_jax.tools.analyze` for the other tools).
  config.analysis = ml_collections.ConfigDict()
  # Epochs between measurements of SAM's sharpness (Fig. 4b of Du et al. 2022), logged as
  # train/sam_sharpness (and after the last epoch); 0 = never.
  config.analysis.sharpness_every_epochs = 1
  config.analysis.rho = 0.05  # Radius of the measurement (Fig. 4b: 0.05), any method.
  config.analysis.sharpness_num_batches = 8  # Fixed train batches (input.batch_size each).
  config.analysis.subset_seed = 0  # Picks those batches; same for every method and seed.

  # Checkpoint.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 1  # Save period, epochs (and after the last).
  config.checkpoint.every_steps = 0  # Also save every N steps mid-epoch; 0 = never.
  config.checkpoint.max_to_keep = 2  # Checkpoints kept in workdir/checkpoints.

  # Mesh.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Devices on the 'data' axis; -1 = all devices (all processes).
  config.mesh.param_sharding = 'replicated'  # How the state is laid out on the mesh.
  # Share of one device's memory that the 'auto' placements may give to the training set
  # and SAF's table (saf_jax.placement); the rest is the model's.
  config.mesh.device_memory_fraction = 0.25

  # Multi-host (TPU pods, several GPU nodes): main.py calls jax.distributed.initialize()
  # when enabled, or when the JAX_COORDINATOR_ADDRESS environment variable is set. None
  # fields are auto-detected by JAX (TPU pods, SLURM, Open MPI).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False
  config.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
  config.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
  config.distributed.process_id = ml_collections.FieldReference(None, field_type=int)

  if args['smoke']:
    config.num_epochs = 4
    config.log_every_steps = 2
    config.input.batch_size = 64
    config.input.eval_batch_size = 128
    config.input.num_train_examples = 512
    config.input.num_test_examples = 256
    config.model.width = 8
    config.method.saf.E_start = 1
    config.method.saf.E_tilde = 2
    config.method.mesa.E_start = 1
    config.method.mesa.ema_decay = 0.9
  return config
