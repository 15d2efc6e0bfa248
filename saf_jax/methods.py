"""The methods: every name parsed once into a frozen ``Method``, each part's factory.

A method is a trajectory loss (none, SAF or MESA) with an optional SAM-family perturbation
(none, SAM, ASAM, GSAM, LookSAM, ESAM, MSAM or m-RWP): ``'sgd'``, ``'saf'``, ``'mesa'``,
``'sam'`` ..., and the compositions ``'saf+sam'`` ... ``'mesa+rwp'`` (the trajectory loss is
added to the objective whose perturbed gradient the SAM-family method takes). ``sgd`` names "no
trajectory loss, no perturbation"; the base optimizer (``config.optimizer.name``, SGD or
AdamW) is the same for every method.

``parse`` is the only place a name is taken apart; the training step, the train state, the
config checks, the analysis tools and the optimizer read the ``Method`` it returns.
``PERTURBATIONS`` maps each perturbation to the factory that wraps the base optimizer in
its transform (``saf_jax.transforms``).

Reference:
  Du et al, `Sharpness-Aware Training for Free <https://arxiv.org/abs/2205.14083>`_, 2022.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import optax

from saf_jax import transforms

TRAJECTORIES = ('saf', 'mesa')  # Algorithm 1 (SAF, Eq. 9); MESA (Eq. 10-13).


def _sam(base, hp, config, *, schedule, batch_axis_name):
  del config, schedule
  return transforms.sam(base, rho=hp.rho, batch_axis_name=batch_axis_name)


def _asam(base, hp, config, *, schedule, batch_axis_name):
  del config, schedule
  return transforms.asam(
    base,
    rho=hp.rho,
    eta=hp.eta,
    adaptive_params=hp.adaptive_params,
    batch_axis_name=batch_axis_name,
  )


def _gsam(base, hp, config, *, schedule, batch_axis_name):
  # The schedule's lowest learning rate: 0 at the end of a cosine or the start of a warm-up,
  # so that rho follows both; a constant schedule without warm-up keeps rho_max.
  opt = config.optimizer
  constant = opt.schedule == 'constant' and not opt.warmup_epochs
  return transforms.gsam(
    base,
    learning_rate=schedule,
    lr_max=opt.lr,
    lr_min=opt.lr if constant else 0.0,
    rho_max=hp.rho_max,
    rho_min=hp.rho_min,
    alpha=hp.alpha,
    batch_axis_name=batch_axis_name,
  )


def _looksam(base, hp, config, *, schedule, batch_axis_name):
  del config, schedule
  return transforms.looksam(
    base, rho=hp.rho, k=hp.k, alpha=hp.alpha, batch_axis_name=batch_axis_name
  )


def _esam(base, hp, config, *, schedule, batch_axis_name):
  del schedule
  return transforms.esam(
    base,
    rho=hp.rho,
    beta=hp.beta,
    gamma=hp.gamma,
    seed=config.seed,
    batch_axis_name=batch_axis_name,
  )


def _msam(base, hp, config, *, schedule, batch_axis_name):
  del config, schedule
  return transforms.msam(base, rho=hp.rho, batch_axis_name=batch_axis_name)


def _rwp(base, hp, config, *, schedule, batch_axis_name):
  del schedule
  return transforms.rwp(
    base, sigma=hp.sigma, lam=hp.lam, seed=config.seed, batch_axis_name=batch_axis_name
  )


# Each SAM-family perturbation and the factory of its transform:
# ``factory(base, hp, config, *, schedule, batch_axis_name)``, where ``hp`` is
# ``config.method.<name>`` and ``schedule`` the base optimizer's learning rate per step.
PERTURBATIONS: dict[str, Callable[..., optax.GradientTransformation]] = {
  'sam': _sam,
  'asam': _asam,
  'gsam': _gsam,
  'looksam': _looksam,
  'esam': _esam,
  'msam': _msam,  # Becker et al. 2024; one gradient per step, at a point set by the momentum.
  'rwp': _rwp,  # m-RWP, Li et al. 2024; a random perturbation, independent of the gradient.
}

# Every method name, in the order the configs and tools list them.
NAMES = (
  'sgd',
  *TRAJECTORIES,
  *PERTURBATIONS,
  *(f'{t}+{p}' for t in TRAJECTORIES for p in PERTURBATIONS),
)


@dataclasses.dataclass(frozen=True)
class Method:
  """A method name, taken apart.

  Attributes:
    name: the name, one of :data:`NAMES`.
    trajectory: ``'saf'``, ``'mesa'`` or None: the trajectory loss.
    perturbation: ``'sam'``, ``'asam'``, ``'gsam'``, ``'looksam'``, ``'esam'``, ``'msam'``,
      ``'rwp'`` or None.
  """

  name: str
  trajectory: str | None
  perturbation: str | None

  @property
  def saf(self) -> bool:
    """Whether the method keeps SAF's per-example logit table (Algorithm 1)."""
    return self.trajectory == 'saf'

  @property
  def mesa(self) -> bool:
    """Whether the method keeps MESA's EMA teacher (``ema_params``, Eq. 10)."""
    return self.trajectory == 'mesa'

  def optimizer(
    self,
    base: optax.GradientTransformation,
    config: Any,
    *,
    schedule: optax.Schedule,
    batch_axis_name: str | None = None,
  ) -> optax.GradientTransformation:
    """``base``, wrapped in the perturbation's transform if the method has one.

    Args:
      base: the base optimizer.
      config: the run's config (``method.<perturbation>``, ``optimizer``, ``seed``).
      schedule: the base optimizer's learning rate per step (GSAM's rho follows it).
      batch_axis_name: for the per-device perturbation scope, the mesh axis the transform
        averages its final gradient over (see ``transforms.sam``).

    Returns:
      ``base`` itself, or a transform whose ``update`` takes ``grad_fn``.
    """
    if self.perturbation is None:
      return base
    factory = PERTURBATIONS[self.perturbation]
    hp = config.method[self.perturbation]
    return factory(base, hp, config, schedule=schedule, batch_axis_name=batch_axis_name)


def parse(name: str | Method) -> Method:
  """Takes a method name apart (a ``Method`` passes through).

  Args:
    name: one of :data:`NAMES`, e.g. ``'sgd'``, ``'mesa'``, ``'gsam'`` or ``'saf+sam'``.

  Returns:
    The frozen ``Method``, e.g. ``Method('saf+sam', trajectory='saf', perturbation='sam')``.

  Raises:
    ValueError: for a name not in :data:`NAMES`, listing the known names.
  """
  if isinstance(name, Method):
    return name
  if name not in NAMES:
    raise ValueError(f'config.method.name must be one of {list(NAMES)}, got {name!r}.')
  first, _, second = name.partition('+')
  trajectory = first if first in TRAJECTORIES else None
  perturbation = second or (first if first in PERTURBATIONS else None)
  return Method(name=name, trajectory=trajectory, perturbation=perturbation)
