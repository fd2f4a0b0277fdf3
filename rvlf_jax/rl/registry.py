"""Name -> function tables, so a GRPO variant (reward, advantage estimator, loss aggregation) is an
addition to a table rather than a branch in a training step."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar('F', bound=Callable)


class Registry(Generic[F]):
  """A table of functions of one kind, filled with the `register` decorator.

  Usage:
    ESTIMATORS = Registry('advantage estimator')

    @ESTIMATORS.register('grpo')
    def grpo(rewards_bg): ...

    ESTIMATORS.get('grpo')(rewards_bg)
  """

  def __init__(self, kind: str, reserved: tuple[str, ...] = ()):
    self.kind = kind
    self._reserved = frozenset(reserved)
    self._fns: dict[str, F] = {}

  def register(self, name: str, *, override: bool = False) -> Callable[[F], F]:
    """Decorator that files a function under `name`; a second use of a name is an error."""
    if name in self._reserved:
      raise ValueError(f'{name!r} is reserved and cannot name a {self.kind}.')

    def add(fn: F) -> F:
      if name in self._fns and not override:
        raise ValueError(f'A {self.kind} named {name!r} is already registered '
                         f'({self._fns[name].__module__}.{self._fns[name].__qualname__}).')
      self._fns[name] = fn
      return fn

    return add

  def get(self, name: str) -> F:
    if name not in self._fns:
      raise KeyError(f'Unknown {self.kind} {name!r}; registered: {self.names()}.')
    return self._fns[name]

  def names(self) -> list[str]:
    return sorted(self._fns)

  def __contains__(self, name: str) -> bool:
    return name in self._fns
