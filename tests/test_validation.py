"""Bad configs fail with an error naming the field and the allowed values."""

import json

import ml_collections
import pytest

from configs import default
from saf_jax import guard, validation


@pytest.mark.parametrize(
  'field, value, match',
  [
    ('method.name', 'adam', r"config.method.name must be one of \['sgd', 'saf', 'mesa', 'sam'"),
    ('model.name', 'vgg', r"config.model.name must be one of \['cnn', .*'resnet18'"),
    ('input.dataset', 'svhn', r'config.input.dataset must be one of'),
    ('input.augment', 'mixup', r'config.input.augment must be one of'),
    ('method.saf.E_tilde', 0, r'config.method.saf.E_tilde must be an integer >= 1, got 0'),
    ('method.saf.tau', 0.0, r'config.method.saf.tau must be a number > 0'),
    ('method.saf.lam', -0.1, r'config.method.saf.lam must be a number >= 0'),
    ('method.saf.table_dtype', 'float16', r'config.method.saf.table_dtype must be one of'),
    ('input.batch_size', 0, r'config.input.batch_size must be an integer >= 1, got 0'),
    ('optimizer.name', 'lamb', r"config.optimizer.name must be one of \['sgd', 'adamw'\]"),
    ('optimizer.lr', -1.0, r'config.optimizer.lr must be a number > 0'),
    ('num_epochs', 0, r'config.num_epochs must be an integer >= 1'),
    ('log_every_steps', 0, r'config.log_every_steps must be an integer >= 1, got 0'),
    ('model.width', 0, r'config.model.width must be an integer >= 1, got 0'),
    ('optimizer.b2', 1.0, r'config.optimizer.b2 must be in \[0, 1\), got 1.0'),
    ('mesh.data', 2, r'config.mesh.data must be -1 or an integer in \[1, 1\], got 2'),
    ('mesh.param_sharding', 'fsdp', r"config.mesh.param_sharding must be one of \['replicated'\]"),
    ('method.saf.table_topk', -1, r'config.method.saf.table_topk must be an integer >= 0'),
    ('checkpoint.every_steps', -5, r'config.checkpoint.every_steps must be an integer >= 0'),
    ('eval.ema_decay', 1.0, r'config.eval.ema_decay must be a number in \[0, 1\) \(0 = no model'),
    ('eval.ema_decay', -0.5, r'config.eval.ema_decay must be a number in \[0, 1\)'),
  ],
)
def test_saf_config_errors(field, value, match):
  config = default.get_config('method=saf')
  section, _, name = field.rpartition('.')
  target = config
  for part in filter(None, section.split('.')):
    target = target[part]
  with config.unlocked():
    target[name] = value
  with pytest.raises(ValueError, match=match):
    validation.validate_config(config, num_devices=1)


@pytest.mark.parametrize(
  'field, value',
  [
    ('augment', 'autoaugment'),
    ('dataset', 'svhn_cropped'),
    ('num_train_examples', 0),
    ('crop_padding', -1),
  ],
)
def test_bad_input_values_name_the_field(field, value):
  """Checked here, before any data is loaded; saf_jax.data takes a validated config."""
  config = default.get_config()
  config.input[field] = value
  with pytest.raises(ValueError, match=f'config.input.{field} must be '):
    validation.validate_config(config, num_devices=1)


def test_a_missing_field_is_named_not_defaulted():
  """No hidden default: a config.json of an earlier version is upgraded before it is read."""
  config = default.get_config().to_dict()
  del config['input']['shuffle_buffer']
  with pytest.raises(
    ValueError, match=r'config.input.shuffle_buffer must be an integer >= 1 \(examples\), got <m'
  ):
    validation.validate_config(ml_collections.ConfigDict(config), num_devices=1)


@pytest.mark.parametrize('beta', [0.0, 1.0, 1.5, -0.2])
def test_mesa_ema_decay_outside_open_unit_interval(beta):
  config = default.get_config('method=mesa')
  config.method.mesa.ema_decay = beta
  with pytest.raises(
    ValueError, match=r'config.method.mesa.ema_decay must be in the open interval'
  ):
    validation.validate_config(config, num_devices=1)


def test_mesa_tau_and_lam_are_checked():
  config = default.get_config('method=mesa')
  config.method.mesa.tau = -1.0
  with pytest.raises(ValueError, match='config.method.mesa.tau'):
    validation.validate_config(config, num_devices=1)


def test_batch_must_divide_over_devices():
  config = default.get_config()
  config.input.batch_size = 100
  with pytest.raises(ValueError, match=r'divisible by the number of devices \(8\)'):
    validation.validate_config(config, num_devices=8)


def test_several_processes_use_every_device_and_split_the_batch():
  config = default.get_config()
  config.mesh.data = 4
  with pytest.raises(ValueError, match=r'config.mesh.data must be -1 or 8 \(every device of'):
    validation.validate_config(config, num_devices=8, num_processes=2)
  config.mesh.data = -1
  validation.validate_config(config, num_devices=8, num_processes=2)
  config.input.batch_size = 6
  config.input.eval_batch_size = 999  # Divides over 3 devices but not over 2 processes.
  with pytest.raises(ValueError, match=r'eval_batch_size must be divisible by the number of pro'):
    validation.validate_config(config, num_devices=3, num_processes=2)


def test_defaults_are_valid():
  for arg in ('method=sgd', 'method=saf', 'method=mesa', 'method=saf,smoke', 'smoke'):
    validation.validate_config(default.get_config(arg), num_devices=1)


@pytest.mark.parametrize(
  'method, field, value, match',
  [
    ('sam', 'method.sam.rho', -0.05, r'config.method.sam.rho must be a number >= 0, got -0.05'),
    ('asam', 'method.asam.eta', -0.01, r'config.method.asam.eta must be a number >= 0'),
    ('asam', 'method.asam.adaptive_params', 'biases', r"must be one of \['weights', 'kernels'"),
    ('looksam', 'method.looksam.k', 0, r'config.method.looksam.k must be an integer >= 1, got 0'),
    ('looksam', 'method.looksam.alpha', -1.0, r'config.method.looksam.alpha must be a number'),
    ('esam', 'method.esam.beta', 0.0, r'config.method.esam.beta must be in \(0, 1\], got 0.0'),
    ('esam', 'method.esam.gamma', 1.5, r'config.method.esam.gamma must be in \(0, 1\], got 1.5'),
    ('gsam', 'method.gsam.alpha', -0.1, r'config.method.gsam.alpha must be a number >= 0'),
    ('gsam', 'method.gsam.rho_min', 0.1, r'config.method.gsam.rho_min must be <= config'),
    ('saf+sam', 'method.sam.rho', -1.0, r'config.method.sam.rho must be a number >= 0'),
    ('sam', 'method.perturbation_scope', 'local', r"perturbation_scope must be one of \['global'"),
  ],
)
def test_sam_family_config_errors(method, field, value, match):
  config = default.get_config(f'method={method}')
  section, _, name = field.rpartition('.')
  target = config
  for part in section.split('.'):
    target = target[part]
  target[name] = value
  with pytest.raises(ValueError, match=match):
    validation.validate_config(config, num_devices=1)


def test_per_device_scope_needs_a_batch_that_splits_over_the_devices():
  config = default.get_config('method=sam')
  config.method.perturbation_scope = 'per_device'
  config.input.batch_size = 100
  with pytest.raises(ValueError, match=r'config.input.batch_size must be divisible by the numb'):
    validation.validate_config(config, num_devices=8)
  config.input.batch_size = 96
  config.input.eval_batch_size = 800
  validation.validate_config(config, num_devices=8)


def test_config_argument_errors():
  with pytest.raises(ValueError, match=r"method must be one of \['sgd', 'saf', 'mesa', 'sam'"):
    default.get_config('method=sam+saf')
  with pytest.raises(ValueError, match='allowed: method=<name>, smoke'):
    default.get_config('fast')


def test_incompatible_workdir_is_refused(tmp_path):
  config = default.get_config('method=saf,smoke')
  guard.write_config(config, str(tmp_path))
  before = (tmp_path / 'config.json').read_text()
  other = default.get_config('method=saf,smoke')
  other.method.saf.E_tilde = 3
  other.model.width = 16
  with pytest.raises(
    ValueError, match=r'(?s)method.saf.E_tilde: workdir has 2, config has 3.*model.width'
  ):
    guard.check_config(other, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == before
  # Fields that do not change training may differ (a resumed run may evaluate less often).
  same = default.get_config('method=saf,smoke')
  same.eval.every_epochs = 2
  guard.check_config(same, str(tmp_path))


def test_workdir_of_a_release_without_newer_fields_is_accepted(tmp_path):
  """A config.json written before method.saf.table_topk existed resumes as table_topk=0."""
  config = default.get_config('method=saf,smoke')
  guard.write_config(config, str(tmp_path))
  path = tmp_path / 'config.json'
  old = json.loads(path.read_text())
  del old['method']['saf']['table_topk']
  path.write_text(json.dumps(old))
  guard.check_config(config, str(tmp_path))
  config.method.saf.table_topk = 3
  with pytest.raises(ValueError, match='method.saf.table_topk: workdir has 0, config has 3'):
    guard.check_config(config, str(tmp_path))


def _smoke_config_with_analysis(**fields):
  """The smoke config (512 train examples, batch 64) with `config.analysis` fields replaced.

  Built from a plain dict, as `saf_jax.tools.analyze` reads a config.json, so that values of
  another type than the default's (1.5, 'a') reach the validation.
  """
  config = default.get_config('smoke').to_dict()
  config['analysis'].update(fields)
  return ml_collections.ConfigDict(config)


@pytest.mark.parametrize(
  'field, value, match',
  [
    (
      'sharpness_every_epochs',
      -1,
      r'config.analysis.sharpness_every_epochs must be an integer >= 0 \(0 = off\), got -1',
    ),
    (
      'sharpness_every_epochs',
      1.5,
      r'config.analysis.sharpness_every_epochs must be an integer >= 0 \(0 = off\), got 1.5',
    ),
    (
      'sharpness_every_epochs',
      True,
      r'config.analysis.sharpness_every_epochs must be an integer >= 0 \(0 = off\), got True',
    ),
    ('rho', 0, r'config.analysis.rho must be a number > 0, got 0\.'),
    ('rho', -0.1, r'config.analysis.rho must be a number > 0, got -0.1'),
    ('rho', '0.05', r"config.analysis.rho must be a number > 0, got '0.05'"),
    (
      'sharpness_num_batches',
      0,
      r'config.analysis.sharpness_num_batches must be an integer >= 1, got 0',
    ),
    ('subset_seed', 'a', r"config.analysis.subset_seed must be an integer, got 'a'"),
    ('subset_seed', 1.0, r'config.analysis.subset_seed must be an integer, got 1.0'),
  ],
)
def test_analysis_config_errors(field, value, match):
  config = _smoke_config_with_analysis(**{field: value})
  with pytest.raises(ValueError, match=match):
    validation.validate_config(config, num_devices=1)


def test_sharpness_batches_up_to_the_training_set_are_valid():
  # 8 x 64 = 512: exactly the smoke config's training set.
  validation.validate_config(_smoke_config_with_analysis(sharpness_num_batches=8), num_devices=1)


def test_analysis_fields_are_checked_even_when_training_does_not_measure():
  """`python -m saf_jax.tools.analyze` reads rho and the subset from the config of any run."""
  config = _smoke_config_with_analysis(sharpness_every_epochs=0, rho=-0.1)
  with pytest.raises(ValueError, match='config.analysis.rho'):
    validation.validate_config(config, num_devices=1)
  # The batch count against the training set needs the data: training checks it once the
  # data is loaded, before anything is written (test_analyze.py), whatever the config says.
  config = _smoke_config_with_analysis(sharpness_every_epochs=1, sharpness_num_batches=9)
  validation.validate_config(config, num_devices=1)


def test_train_accuracy_is_refused_for_streamed_imagenet():
  config = default.get_config()
  config.input.dataset = 'imagenet2012'
  config.input.augment = 'inception_crop'
  config.eval.train_accuracy = True
  with pytest.raises(
    ValueError,
    match=r"config.eval.train_accuracy must be False for the streamed dataset 'imagenet2012' "
    r'\(True needs a dataset held in memory\), got True',
  ):
    validation.validate_config(config, num_devices=1)


def test_a_changed_model_ema_is_refused_on_resume_but_eval_fields_are_free(tmp_path):
  """The model EMA is part of the checkpointed state; how often to evaluate is not."""
  config = default.get_config()
  guard.write_config(config, str(tmp_path))
  config.eval.every_epochs = 3
  config.eval.train_accuracy = True
  guard.check_config(config, str(tmp_path))
  config.eval.ema_decay = 0.99
  with pytest.raises(ValueError, match=r'eval.ema_decay: workdir has 0.0, config has 0.99'):
    guard.check_config(config, str(tmp_path))
  # A config.json written before the field existed resumes with the model EMA off.
  with open(tmp_path / 'config.json') as f:
    old = json.load(f)
  del old['eval']['ema_decay']
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(old, f)
  config.eval.ema_decay = 0.0
  guard.check_config(config, str(tmp_path))


def _int_fields(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _int_fields(value, f'{prefix}{key}.')
    elif isinstance(value, int) and not isinstance(value, bool):
      yield f'{prefix}{key}'


@pytest.mark.parametrize('arg', ['method=saf', 'method=mesa,smoke', 'method=looksam'])
@pytest.mark.parametrize('value', [0, -1])
def test_every_integer_field_at_zero_and_minus_one_names_itself_or_passes(arg, value):
  """No field value crashes validation (e.g. ZeroDivisionError at batch_size=0)."""
  fields = list(_int_fields(default.get_config(arg)))
  assert 'input.batch_size' in fields and 'method.saf.E_tilde' in fields
  for field in fields:
    config = default.get_config(arg)
    section, _, name = field.rpartition('.')
    target = config
    for part in filter(None, section.split('.')):
      target = target[part]
    target[name] = value
    try:
      validation.validate_config(config, num_devices=1)
    except ValueError as e:
      assert f'config.{field} ' in str(e), (field, str(e))
