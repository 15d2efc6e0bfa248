r"""The paper's CIFAR-10/100 rows: ResNet-18, Wide-ResNet-28-10 and PyramidNet-110.

Table 3 of Du et al. 2022 (accuracy, mean ± std over 3 seeds; images/s on their GPUs),
trained with the hyperparameters of their Table 4: 200 epochs, batch 128, peak learning
rate 0.05 with cosine decay, SGD (momentum 0.9), weight decay 5e-4 (1e-3 for
Wide-ResNet-28-10), "basic" augmentation (4-pixel pad, random crop, horizontal flip);
SAM's rho 0.05 (0.1 for Wide-ResNet-28-10, 0.2 for PyramidNet-110); SAF and MESA with
``tau = 5``, ``E_tilde = 3``, ``E_start = 5``, ``lam = 0.3`` (SAF) / ``0.8`` (MESA) and
MESA's ``ema_decay = 0.9995``.

The rows (``PAPER_TABLE_3``: accuracy %, images/s):

===============  =======  ==================  ===================
model            method   CIFAR-10            CIFAR-100
===============  =======  ==================  ===================
resnet18         sgd      95.61 ± 0.02, 3289  78.32 ± 0.02, 3314
resnet18         sam      96.50 ± 0.08, 1657  80.18 ± 0.08, 1690
resnet18         saf      96.37 ± 0.02, 3213  80.06 ± 0.05, 3248
resnet18         mesa     96.24 ± 0.02, 2780  79.79 ± 0.09, 2793
wrn28_10         sgd      96.50 ± 0.05, 732   81.67 ± 0.18, 739
wrn28_10         sam      97.07 ± 0.11, 367   83.51 ± 0.04, 370
wrn28_10         saf      97.08 ± 0.15, 727   83.81 ± 0.04, 729
wrn28_10         mesa     97.16 ± 0.23, 617   83.59 ± 0.24, 625
pyramidnet110    sgd      96.66 ± 0.09, 394   81.94 ± 0.06, 401
pyramidnet110    sam      97.25 ± 0.15, 194   84.61 ± 0.06, 198
pyramidnet110    saf      97.34 ± 0.06, 391   84.71 ± 0.01, 397
pyramidnet110    mesa     97.46 ± 0.09, 332   84.73 ± 0.14, 339
===============  =======  ==================  ===================

Arguments (comma separated, after the file name):
  dataset=cifar10|cifar100   (default cifar10)
  model=resnet18|wrn28_10|pyramidnet110   (default resnet18)
  method=sgd|sam|saf|mesa|...   any of saf_jax.methods.NAMES (default saf); the
                             other SAM-family methods keep their defaults from
                             configs/default.py (the paper cites, not reruns, them).
  data=tfds|jpeg             tfds (default): TFDS cifar10/cifar100, downloaded on a normal
                             machine. jpeg: CIFAR-10 from the quality-75 JPEG copy
                             ../shared/data/cifar10-jpeg.tar.gz (CIFAR10_JPEG; another path
                             with --config.input.dataset=folder:PATH), decoded once into
                             <data_dir>/saf_jax_folder_cache.
  budget=paper|cpu           paper (default): the Table 3 rows above. cpu: the pre-registered
                             CPU comparison below (fixes its own model and data).
  recipe=paper|official      paper (default): Table 4 as above. official: what the authors'
                             code (github.com/AngusDujw/SAF, SAF_train.py) does that these
                             fields can express: label smoothing 0.1, a 3-epoch warm-up,
                             E_start 6 (their --kl_start_epoch 5 counts epochs from 0) and
                             the model EMA (0.9995, Table 4's beta) evaluated. budget=paper
                             only; docs/authors_code.md lists what it cannot express.
  smoke                      one step on a few examples (tests, with tfds mock data).

budget=cpu: SAF's regime on a 2-core CPU
----------------------------------------

Flat-minimum methods help over-parameterised networks that fit their training set; a model
that under-fits is where every regulariser costs accuracy. This setting makes a small
network fit a small, class-balanced CIFAR-10 subset, and was fixed (with one SGD run to
check the fit) before any comparison was run:

* data: the JPEG copy of CIFAR-10; train on the first 128 files of each class (1,280
  images: batch 128 drops none), test on the first 500 files of each class (a fixed
  5,000-image test subset, to fit the time budget); no augmentation (with random flips,
  SGD needed 80 epochs and 8.1 minutes to fit: see docs/results.md);
* model: the ``cnn`` of ``saf_jax.models.cnn`` at width 24 (42,898 parameters, BatchNorm);
* Table 4's recipe: SGD momentum 0.9, peak lr 0.05, cosine decay, weight decay 5e-4,
  batch 128, SAM's rho 0.05, tau 5, lam 0.3 (SAF) / 0.8 (MESA), for CPU_BUDGET_EPOCHS
  (64) epochs of 10 steps;
* the paper's epoch counts scaled to the run by their fraction of its 200 epochs:
  ``E_start = round(5 E / 200)`` and ``E_tilde = max(1, round(3 E / 200))`` (2 and 1 at
  E = 64);
* EMA decays scaled so that the horizon ``1 / (1 - beta)`` is the same fraction of all steps
  as in the paper's 78,200-step runs: ``beta = 1 - (1 - beta_paper) * 78,200 / steps``.
  MESA's teacher: 0.9995 -> 0.9389; the evaluation model EMA (``config.eval.ema_decay``,
  timm's default 0.9998, what the authors' scripts report) -> 0.9756;
* evaluated every CPU_BUDGET_EVAL_EVERY (16) epochs, the last included: test top-1 of the
  trained weights, of the model EMA and (MESA) of its teacher, and train top-1 in eval mode
  on the unaugmented training images (``train_eval/accuracy``); SAM's sharpness (rho 0.05)
  on 4 fixed training batches every 8 epochs.

Run the comparison (docs/results.md, "CPU comparison on real CIFAR-10")::

  python -m saf_jax.tools.compare --config configs/cifar.py:budget=cpu \
      --methods sgd,sam,saf,mesa --seeds 0,1,2 --workdir runs/cifar_cpu

Run, e.g. the SAF row of Wide-ResNet-28-10 on CIFAR-100::

  python main.py --config configs/cifar.py:dataset=cifar100,model=wrn28_10,method=saf \
      --workdir runs/cifar100_wrn28_10_saf
"""

import pathlib

import ml_collections

from configs import default
from saf_jax import methods

DATASETS = ('cifar10', 'cifar100')
MODELS = ('resnet18', 'wrn28_10', 'pyramidnet110')
DATA = ('tfds', 'jpeg')
BUDGETS = ('paper', 'cpu')
RECIPES = ('paper', 'official')
# The quality-75 JPEG copy of CIFAR-10 kept beside the repository (../shared/data/README.md).
CIFAR10_JPEG = str(pathlib.Path(__file__).resolve().parents[2] / 'shared/data/cifar10-jpeg.tar.gz')

# (model, method) -> {dataset: (accuracy %, std, images/s)}, Table 3 of Du et al. 2022.
PAPER_TABLE_3 = {
  ('resnet18', 'sgd'): {'cifar10': (95.61, 0.02, 3289), 'cifar100': (78.32, 0.02, 3314)},
  ('resnet18', 'sam'): {'cifar10': (96.50, 0.08, 1657), 'cifar100': (80.18, 0.08, 1690)},
  ('resnet18', 'saf'): {'cifar10': (96.37, 0.02, 3213), 'cifar100': (80.06, 0.05, 3248)},
  ('resnet18', 'mesa'): {'cifar10': (96.24, 0.02, 2780), 'cifar100': (79.79, 0.09, 2793)},
  ('wrn28_10', 'sgd'): {'cifar10': (96.50, 0.05, 732), 'cifar100': (81.67, 0.18, 739)},
  ('wrn28_10', 'sam'): {'cifar10': (97.07, 0.11, 367), 'cifar100': (83.51, 0.04, 370)},
  ('wrn28_10', 'saf'): {'cifar10': (97.08, 0.15, 727), 'cifar100': (83.81, 0.04, 729)},
  ('wrn28_10', 'mesa'): {'cifar10': (97.16, 0.23, 617), 'cifar100': (83.59, 0.24, 625)},
  ('pyramidnet110', 'sgd'): {'cifar10': (96.66, 0.09, 394), 'cifar100': (81.94, 0.06, 401)},
  ('pyramidnet110', 'sam'): {'cifar10': (97.25, 0.15, 194), 'cifar100': (84.61, 0.06, 198)},
  ('pyramidnet110', 'saf'): {'cifar10': (97.34, 0.06, 391), 'cifar100': (84.71, 0.01, 397)},
  ('pyramidnet110', 'mesa'): {'cifar10': (97.46, 0.09, 332), 'cifar100': (84.73, 0.14, 339)},
}

# Table 4: what differs between the models.
_WEIGHT_DECAY = {'resnet18': 5e-4, 'wrn28_10': 1e-3, 'pyramidnet110': 5e-4}
_SAM_RHO = {'resnet18': 0.05, 'wrn28_10': 0.1, 'pyramidnet110': 0.2}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config of one Table 3 row; ``arg`` as described in the module docstring."""
  args = default.parse_args(
    arg,
    {
      'dataset': 'cifar10',
      'model': 'resnet18',
      'method': 'saf',
      'data': 'tfds',
      'budget': 'paper',
      'smoke': False,
      'recipe': 'paper',
    },
    {'dataset': DATASETS, 'model': MODELS, 'data': DATA, 'budget': BUDGETS, 'recipe': RECIPES},
  )
  if args['budget'] == 'cpu':
    if args['recipe'] != 'paper':
      raise ValueError(
        'config argument recipe=official applies to budget=paper only (budget=cpu scales '
        'its own epoch counts and EMA decays).'
      )
    return _cpu_budget(args)
  # Every field, with its unit, is defined there; this module sets the paper's values.
  config = default.get_config(f'method={args["method"]}')
  model = args['model']

  config.num_epochs = 200
  config.log_every_steps = 100

  config.input.dataset = _dataset(args)
  config.input.batch_size = 128
  config.input.eval_batch_size = 1000
  config.input.augment = 'crop_flip'
  config.input.crop_padding = 4

  config.model = ml_collections.ConfigDict({'name': model, 'dtype': 'float32'})
  if model == 'resnet18':
    config.model.width = 64  # The paper's ResNet-18 (11,173,962 params at 10 classes).
  if model == 'pyramidnet110':
    # alpha = 270 with basic blocks, as in the SAM papers' PyramidNet-110: 28,485,477
    # params at 10 classes (bottleneck blocks at depth 110 would have 18,323,787).
    config.model.alpha = 270
    config.model.bottleneck = False

  config.optimizer.lr = 0.05
  config.optimizer.schedule = 'cosine'
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = _WEIGHT_DECAY[model]

  config.method.saf.lam = 0.3
  config.method.saf.tau = 5.0
  config.method.saf.E_start = 5
  config.method.saf.E_tilde = 3
  config.method.mesa.lam = 0.8
  config.method.mesa.tau = 5.0
  config.method.mesa.E_start = 5
  config.method.mesa.ema_decay = 0.9995
  config.method.sam.rho = _SAM_RHO[model]

  # SAM's sharpness (Fig. 4b) on 8 batches after each epoch costs ~2% of an epoch here.
  config.analysis.sharpness_every_epochs = 1

  if args['recipe'] == 'official':
    _official_recipe(config)
  if args['smoke']:
    default.one_step_smoke(config)
  return config


def _official_recipe(config: ml_collections.ConfigDict) -> None:
  """recipe=official, in place: the authors' code's values that these fields can express.

  github.com/AngusDujw/SAF at 6e85600 has no CIFAR command (its SAF_train.py table is
  fixed at 1000 classes), so these are its defaults, and Table 4's beta as its model EMA;
  E_tilde (3) and lam (0.3 / 0.8) are already those of its argparse defaults and README.
  What no field expresses (Nesterov, the warm-up's 1e-4 start, per-epoch learning rates,
  the 1e-6 floor and 10 cool-down epochs, ...) is listed in docs/authors_code.md.
  """
  config.label_smoothing = 0.1  # SAF_train.py:226, --smoothing 0.1.
  config.optimizer.warmup_epochs = 3  # SAF_train.py:170, --warmup-epochs 3 (from 1e-4 there).
  # Their loss is on in 0-based epochs > kl_start_epoch (SAF_train.py:734; default 5, :308):
  # 1-based epochs > 6, i.e. E_start = 6 here.
  config.method.saf.E_start = 6
  config.method.mesa.E_start = 6
  # --model-ema evaluates an EMA of every run and reports it (SAF_train.py:654-659); Table 4
  # gives beta = 0.9995 for every method. MESA's teacher (test_ema/*) is that EMA already.
  if methods.parse(config.method.name).trajectory != 'mesa':
    config.eval.ema_decay = 0.9995


def _dataset(args: dict) -> str:
  """config.input.dataset for the arguments: TFDS, or the JPEG copy of CIFAR-10 (data=jpeg)."""
  if args['data'] == 'tfds':
    return args['dataset']
  if args['dataset'] != 'cifar10':
    raise ValueError(
      f'config argument data=jpeg reads CIFAR-10 only ({CIFAR10_JPEG}), got '
      f'dataset={args["dataset"]}; use data=tfds for {args["dataset"]}.'
    )
  return f'folder:{CIFAR10_JPEG}'


def _cpu_budget(args: dict) -> ml_collections.ConfigDict:
  """The pre-registered CPU comparison (budget=cpu); see the module docstring."""
  if args['model'] != 'resnet18' or args['dataset'] != 'cifar10':
    raise ValueError(
      'config argument budget=cpu fixes its own model and data (CIFAR-10 JPEG, CNN).'
    )
  config = default.get_config(f'method={args["method"]}')
  epochs = CPU_BUDGET_EPOCHS
  steps = epochs * CPU_BUDGET_TRAIN // 128
  config.num_epochs = epochs
  config.log_every_steps = 10
  config.input.dataset = f'folder:{CIFAR10_JPEG}'
  config.input.num_train_examples = CPU_BUDGET_TRAIN
  config.input.num_test_examples = CPU_BUDGET_TEST
  config.input.batch_size = 128
  config.input.eval_batch_size = 1000
  config.input.augment = 'none'
  config.model.name = 'cnn'
  config.model.width = CPU_BUDGET_WIDTH
  config.optimizer.lr = 0.05
  config.optimizer.schedule = 'cosine'
  config.optimizer.weight_decay = 5e-4
  fraction = epochs / _PAPER_EPOCHS
  config.method.saf.E_start = round(5 * fraction)
  config.method.saf.E_tilde = max(1, round(3 * fraction))
  config.method.saf.lam = 0.3
  config.method.mesa.E_start = round(5 * fraction)
  config.method.mesa.lam = 0.8
  config.method.mesa.ema_decay = _scaled_decay(0.9995, steps)
  config.method.sam.rho = 0.05
  config.eval.every_epochs = CPU_BUDGET_EVAL_EVERY
  config.eval.ema_decay = _scaled_decay(0.9998, steps)
  config.eval.train_accuracy = True
  config.checkpoint.every_epochs = CPU_BUDGET_EVAL_EVERY
  config.analysis.sharpness_every_epochs = 8
  config.analysis.sharpness_num_batches = 4
  if args['smoke']:
    default.one_step_smoke(config)
  return config


_PAPER_EPOCHS, _PAPER_STEPS = 200, 200 * 391  # Table 4: 200 epochs of 50,000 / 128.
CPU_BUDGET_EPOCHS = 64
CPU_BUDGET_TRAIN = 1280
CPU_BUDGET_TEST = 5000
CPU_BUDGET_WIDTH = 24
CPU_BUDGET_EVAL_EVERY = 16


def _scaled_decay(paper_decay: float, steps: int) -> float:
  """An EMA decay whose horizon 1 / (1 - decay) is the same fraction of the run as the paper's."""
  return round(1 - (1 - paper_decay) * _PAPER_STEPS / steps, 4)
