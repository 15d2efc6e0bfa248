"""A config.json of an earlier version reads as its run trained, by every reader."""

import copy
import json

import ml_collections
import pytest

from configs import default
from saf_jax import config_upgrade, guard, validation
from saf_jax.analysis import runs

# (field, the value a run written before the field existed used, another value: refused on
# resume if the field changes training, else None).
OLD_VALUES = (
  ('method.perturbation_scope', 'global', 'per_device'),
  # The SAM family's sections; a saf run does not read them.
  ('method.sam.rho', 0.05, None),
  ('method.msam.rho', 3.0, None),
  ('method.rwp.sigma', 0.01, None),
  ('method.rwp.lam', 0.5, None),
  ('method.asam.rho', 0.5, None),
  ('method.asam.eta', 0.01, None),
  ('method.asam.adaptive_params', 'weights', None),
  ('method.gsam.rho_max', 0.05, None),
  ('method.gsam.rho_min', 0.0, None),
  ('method.gsam.alpha', 0.1, None),
  ('method.looksam.rho', 0.05, None),
  ('method.looksam.k', 5, None),
  ('method.looksam.alpha', 0.7, None),
  ('method.esam.rho', 0.05, None),
  ('method.esam.beta', 0.6, None),
  ('method.esam.gamma', 0.5, None),
  ('analysis.sharpness_every_epochs', 0, None),
  ('analysis.rho', 0.05, None),
  ('analysis.sharpness_num_batches', 8, None),
  ('analysis.subset_seed', 0, None),
  ('checkpoint.every_steps', 0, None),
  ('mesh.param_sharding', 'replicated', None),
  ('method.saf.table_topk', 0, 3),
  ('method.saf.table_memmap', False, None),
  ('model.dtype', 'float32', 'bfloat16'),
  ('label_smoothing', 0.0, 0.1),
  ('input.image_size', -1, 32),
  ('input.shuffle_buffer', 16_384, 1024),
  ('eval.ema_decay', 0.0, 0.99),
  ('eval.train_accuracy', False, None),
  ('steps_per_dispatch', 1, 2),
  ('input.placement', 'host', None),
  ('method.saf.table_placement', 'host', None),
  ('mesh.device_memory_fraction', 0.25, None),
  ('input.accum_steps', 1, 2),
  ('method.accum_scope', 'accumulated', None),  # A saf run does not read it.
)


def get_field(tree, field):
  for key in field.split('.'):
    tree = tree[key]
  return tree


def _set(tree, field, value):
  *sections, name = field.split('.')
  for key in sections:
    tree = tree[key]
  tree[name] = value


def delete_field(tree, field):
  *sections, name = field.split('.')
  for key in sections:
    tree = tree[key]
  del tree[name]


def _write_old_config(workdir, fields):
  """The smoke SAF config as config.json, without ``fields`` (as an earlier version wrote)."""
  guard.write_config(default.get_config('method=saf,smoke'), str(workdir))
  path = workdir / 'config.json'
  old = json.loads(path.read_text())
  for field in fields:
    delete_field(old, field)
  path.write_text(json.dumps(old))
  return old


def test_every_added_field_has_its_old_value():
  assert {f: v for f, v, _ in OLD_VALUES} == config_upgrade.ADDED_FIELDS


def test_a_current_config_is_unchanged_and_the_argument_untouched():
  config = default.get_config('method=saf').to_dict()
  before = copy.deepcopy(config)
  assert config_upgrade.upgrade_config(config) == before
  old = copy.deepcopy(before)
  for field, _, _ in OLD_VALUES:
    delete_field(old, field)
  kept = copy.deepcopy(old)
  upgraded = config_upgrade.upgrade_config(old)
  assert old == kept
  for field, value, _ in OLD_VALUES:
    assert get_field(upgraded, field) == value, field


def test_a_config_of_the_first_version_is_valid_once_upgraded():
  old = default.get_config('smoke').to_dict()
  for field, _, _ in OLD_VALUES:
    delete_field(old, field)
  del old['analysis']  # The first version had no analysis section at all,
  for name in ('sam', 'asam', 'gsam', 'looksam', 'esam', 'msam', 'rwp'):  # nor the SAM family's.
    del old['method'][name]
  upgraded = ml_collections.ConfigDict(config_upgrade.upgrade_config(old))
  validation.validate_config(upgraded, num_devices=1)
  assert upgraded.analysis.to_dict() == {
    'sharpness_every_epochs': 0,
    'rho': 0.05,
    'sharpness_num_batches': 8,
    'subset_seed': 0,
  }


@pytest.mark.parametrize('field, old_value, other', OLD_VALUES)
def test_resume_reads_a_missing_field_as_its_old_value(tmp_path, field, old_value, other):
  _write_old_config(tmp_path, [field])
  config = default.get_config('method=saf,smoke')
  _set(config, field, old_value)
  guard.check_config(config, str(tmp_path))
  if other is not None:
    _set(config, field, other)
    with pytest.raises(
      ValueError, match=f'{field}: workdir has {old_value!r}, config has {other!r}'
    ):
      guard.check_config(config, str(tmp_path))


@pytest.mark.parametrize('field, old_value, other', OLD_VALUES)
def test_analysis_reads_a_missing_field_as_its_old_value(tmp_path, field, old_value, other):
  del other
  _write_old_config(tmp_path, [field])
  assert get_field(runs.read_config(str(tmp_path)), field) == old_value


def test_a_workdir_of_the_first_version_resumes_with_its_command(tmp_path):
  """Every section added since (SAM family and analysis too) reads as a rerun's config."""
  old = _write_old_config(tmp_path, [field for field, _, _ in OLD_VALUES])
  del old['analysis']
  for name in ('sam', 'asam', 'gsam', 'looksam', 'esam', 'msam', 'rwp'):
    del old['method'][name]
  (tmp_path / 'config.json').write_text(json.dumps(old))
  guard.check_config(default.get_config('method=saf,smoke'), str(tmp_path))
