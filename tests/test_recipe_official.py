"""recipe=official: exactly the fields docs/authors_code.md lists change, and the result is valid.

The expected differences are written out here, field by field, from the page's "What
recipe=official sets" table; each case compares the flattened ConfigDicts of
``recipe=paper`` (the default) and ``recipe=official``.
"""

import pytest

from configs import cifar, imagenet
from saf_jax import validation

METHODS = ('sgd', 'sam', 'saf', 'mesa', 'saf+sam', 'mesa+sam')


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _differences(paper, official) -> dict:
  """{field: (paper value, official value)} for every field whose value differs."""
  a, b = _flatten(paper.to_dict()), _flatten(official.to_dict())
  assert a.keys() == b.keys()  # The recipe adds and removes no field.
  return {key: (a[key], b[key]) for key in a if a[key] != b[key]}


def _model_ema(method: str, decay: float) -> dict:
  # MESA's teacher is the authors' model EMA already (test_ema/*): no second copy.
  return {} if method.startswith('mesa') else {'eval.ema_decay': (0.0, decay)}


@pytest.mark.parametrize('model', cifar.MODELS)
@pytest.mark.parametrize('method', METHODS)
def test_cifar_official_changes_exactly_the_documented_fields(model, method):
  arg = f'dataset=cifar100,model={model},method={method}'
  paper = cifar.get_config(arg)
  official = cifar.get_config(f'{arg},recipe=official')
  assert _differences(cifar.get_config(f'{arg},recipe=paper'), paper) == {}
  assert _differences(paper, official) == {
    'label_smoothing': (0.0, 0.1),
    'optimizer.warmup_epochs': (0, 3),
    'method.saf.E_start': (5, 6),
    'method.mesa.E_start': (5, 6),
    **_model_ema(method, 0.9995),
  }
  validation.validate_config(official, num_devices=1, check_input=False)


@pytest.mark.parametrize('model', imagenet.MODELS)
@pytest.mark.parametrize('method', METHODS)
def test_imagenet_official_changes_exactly_the_documented_fields(model, method):
  arg = f'model={model},method={method}'
  paper = imagenet.get_config(arg)
  official = imagenet.get_config(f'{arg},recipe=official')
  assert _differences(imagenet.get_config(f'{arg},recipe=paper'), paper) == {}
  if model == 'vit_s32':
    expected = {'method.saf.E_start': (150, 151), 'method.mesa.E_start': (150, 151)}
  else:  # run.sh's SAF and MESA commands.
    expected = {
      'method.saf.E_tilde': (3, 2),
      'method.saf.E_start': (10, 6),
      'method.mesa.lam': (0.3, 0.8),
      'method.mesa.E_start': (10, 6),
    }
  assert _differences(paper, official) == {**expected, **_model_ema(method, 0.9998)}
  validation.validate_config(official, num_devices=8, check_input=True)


def test_official_recipe_arguments():
  for module, arg in ((cifar, 'model=wrn28_10'), (imagenet, 'model=resnet50')):
    with pytest.raises(ValueError, match=r"recipe must be one of \['paper', 'official'\]"):
      module.get_config(f'{arg},recipe=authors')
    smoke = module.get_config(f'{arg},method=saf,recipe=official,smoke')
    assert smoke.method.saf.E_start == 0 and smoke.label_smoothing == 0.1
  with pytest.raises(ValueError, match='recipe=official applies to budget=paper only'):
    cifar.get_config('budget=cpu,recipe=official')
  assert cifar.get_config('budget=cpu,recipe=paper').to_dict() == (
    cifar.get_config('budget=cpu').to_dict()
  )
