"""Config checks as data: a ``Rule`` per field, and the loop that applies a table of them.

``saf_jax.validation`` declares the training config's rules, and ``saf_jax.data`` those of
``config.input``; both apply them with :func:`check`, so every error has one form:
``config.<field> must be <allowed values>, got <value>.`` This module imports neither JAX
nor TensorFlow.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import ml_collections


class _Missing:
  """The value of a field the config does not have."""

  def __repr__(self) -> str:
    return '<missing>'


MISSING = _Missing()


class Rule(NamedTuple):
  """The rule of one config field.

  Attributes:
    field: the dotted path of the field under ``config``, e.g. ``'method.saf.tau'``.
    check: ``check(value)``, True for an allowed value; for a cross-field rule,
      ``check(value, config, context)``.
    allowed: the allowed values, as the error message states them; for a cross-field
      rule, ``allowed(config, context)``.
    cross_field: whether ``check`` and ``allowed`` also take the config and the context
      (e.g. the devices a batch is split over).
  """

  field: str
  check: Callable[..., bool]
  allowed: str | Callable[..., str]
  cross_field: bool = False


def is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
  return isinstance(x, int | float) and not isinstance(x, bool)


def int_at_least(minimum: int) -> Callable[[Any], bool]:
  return lambda x: is_int(x) and x >= minimum


def one_of(values: Sequence[Any]) -> Callable[[Any], bool]:
  return lambda x: x in values


def lookup(config: ml_collections.ConfigDict, field: str) -> Any:
  """``config``'s value at the dotted ``field``, or ``MISSING``."""
  value = config
  for key in field.split('.'):
    if not isinstance(value, ml_collections.ConfigDict | dict) or key not in value:
      return MISSING
    value = value[key]
  return value


def check(config: ml_collections.ConfigDict, rules: Sequence[Rule], context: Any = None) -> None:
  """Raises ``ValueError`` for the first of ``rules`` that ``config`` breaks.

  Raises:
    ValueError: ``config.<field> must be <allowed>, got <value>.`` (``<missing>`` for a
      field the config does not have).
  """
  for rule in rules:
    value = lookup(config, rule.field)
    ok = rule.check(value, config, context) if rule.cross_field else rule.check(value)
    if not ok:
      allowed = rule.allowed(config, context) if rule.cross_field else rule.allowed
      raise ValueError(f'config.{rule.field} must be {allowed}, got {value!r}.')
