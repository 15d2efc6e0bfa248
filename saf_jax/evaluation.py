"""The end-of-epoch measurements: test accuracy of each set of weights, and SAM sharpness.

``evaluator`` measures the trained weights, MESA's teacher (the EMA in eval mode, Eq. 10),
the evaluation-only model EMA and, if asked, the training set; ``sharpness_probe`` measures
Fig. 4b's SAM sharpness on fixed training batches. Both return record fields for
``metrics.jsonl``.
"""

import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from saf_jax import experiment, sharding, train_state, train_steps
from saf_jax.analysis import sharpness


def evaluate(eval_fn, params, batch_stats, batches, batch_sharding) -> dict[str, float]:
  """Top-1 accuracy and mean cross-entropy over every (unpadded) example of ``batches``.

  Args:
    eval_fn: ``train_steps.eval_step`` of the model, jitted.
    params: the weights to evaluate.
    batch_stats: their BatchNorm statistics.
    batches: this process's batches (``image``, ``label``, ``mask``); with several
      processes they form global batches (``sharding.to_global``) and the totals are over
      all processes' examples.
    batch_sharding: the sharding of a global batch.

  Returns:
    ``{'accuracy': top-1 in [0, 1], 'loss': mean cross-entropy in nats}``.
  """
  totals = None
  for batch in batches:
    out = eval_fn(params, batch_stats, sharding.to_global(batch, batch_sharding))
    totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
  totals = jax.device_get(totals)
  return {
    'accuracy': float(totals['correct'] / totals['count']),
    'loss': float(totals['loss_sum'] / totals['count']),
  }


def evaluator(
  exp: experiment.Experiment, datasets: Any
) -> Callable[[train_state.TrainState], dict[str, float]]:
  """``state -> record fields``: accuracy and loss of every set of weights the run has.

  The fields are ``test/*`` (the trained weights), ``test_ema/*`` (MESA's teacher),
  ``test_model_ema/*`` (``config.eval.ema_decay > 0``) and ``train_eval/*``
  (``config.eval.train_accuracy``: the training set, unaugmented), each with
  ``accuracy`` and ``loss``. The evaluation step is compiled once.
  """
  config = exp.config
  eval_fn = jax.jit(functools.partial(train_steps.eval_step, exp.model))

  def measure(state: train_state.TrainState) -> dict[str, float]:
    # (prefix, split, (params, batch_stats)).
    evals = [('test', 'test', (state.params, state.batch_stats))]
    if exp.method.mesa:
      evals.append(('test_ema', 'test', (state.ema_params, state.ema_batch_stats)))
    if exp.model_ema_decay > 0:
      model_ema = (state.model_ema_params, state.model_ema_batch_stats)
      evals.append(('test_model_ema', 'test', model_ema))
    if config.eval.train_accuracy:
      evals.append(('train_eval', 'train', (state.params, state.batch_stats)))
    record = {}
    for prefix, split, (params, batch_stats) in evals:
      batches = datasets.test_batches(
        batch_size=config.input.eval_batch_size // jax.process_count(),
        split=split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      result = evaluate(eval_fn, params, batch_stats, batches, exp.batch_sharding)
      record.update({f'{prefix}/{k}': v for k, v in result.items()})
    return record

  return measure


def sharpness_probe(exp: experiment.Experiment, datasets) -> Callable | None:
  """``state -> record fields``: Fig. 4b's SAM sharpness on fixed training batches.

  The batches are unaugmented and kept on the host, placed per measurement, so no device
  memory is held between epochs. None when ``config.analysis.sharpness_every_epochs`` is 0.

  Raises:
    ValueError: if more sharpness batches are asked for than an epoch holds.
  """
  analysis, batch_size = exp.config.analysis, exp.config.input.batch_size
  if analysis.sharpness_every_epochs <= 0:
    return None
  max_batches = datasets.info.num_train // batch_size
  if analysis.sharpness_num_batches > max_batches:
    raise ValueError(
      f'config.analysis.sharpness_num_batches must be at most num_train // batch_size = '
      f'{max_batches}, got {analysis.sharpness_num_batches}.'
    )
  p, local_size = jax.process_index(), exp.local_batch_size
  local = slice(p * local_size, (p + 1) * local_size)
  subset = datasets.train_subset_batches(
    num_batches=analysis.sharpness_num_batches, batch_size=batch_size, seed=analysis.subset_seed
  )
  batches = [{k: b[k][local] for k in ('image', 'label')} for b in subset]
  fn = sharpness.model_sam_sharpness_fn(exp.model, rho=analysis.rho)

  def measure(state: train_state.TrainState) -> dict[str, float]:
    start = time.perf_counter()

    def on_mesh(batch):
      return fn(state.params, state.batch_stats, sharding.to_global(batch, exp.batch_sharding))

    measured = sharpness.batch_mean(on_mesh, batches)
    seconds = time.perf_counter() - start
    return {'train/sam_sharpness': measured['sharpness'], 'sharpness_time_sec': seconds}

  return measure
