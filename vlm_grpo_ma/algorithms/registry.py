"""Name -> function registries, so a config can choose an algorithm by name.

Modelled on verl's ``register_adv_est`` / ``register_policy_loss``: a decorator registers a pure
function under a string, and ``get_*`` looks it up with an error that lists what exists.

Three registries live here:

* advantage estimators (``register_adv_est`` / ``get_adv_est``). Every registered estimator has the
  tree signature ``fn(rewards [B, K, M], **kwargs) -> (thought_adv [B, K], answer_adv [B, K, M])``;
* policy losses (``register_policy_loss`` / ``get_policy_loss``), signature of
  :func:`vlm_grpo_ma.algorithms.policy_loss.clipped_policy_loss`;
* KL estimators (``register_kl_estimator`` / ``get_kl_estimator``), signature
  ``fn(logp [...], ref_logp [...], *, clamp) -> kl [...]``.
"""

from __future__ import annotations

from typing import Callable, Dict, TypeVar

F = TypeVar("F", bound=Callable)


class Registry:
    """A named table of functions, filled by a decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under ``name`` (re-registering the same function is a no-op)."""

        def decorator(fn: F) -> F:
            existing = self._table.get(name)
            if existing is not None and existing is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered to {existing.__qualname__}")
            self._table[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable:
        try:
            return self._table[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {sorted(self._table)}") from None

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table


ADV_ESTIMATORS = Registry("advantage estimator")
POLICY_LOSSES = Registry("policy loss")
KL_ESTIMATORS = Registry("KL estimator")


def register_adv_est(name: str) -> Callable[[F], F]:
    """Register an advantage estimator ``fn(rewards [B, K, M], **kw) -> (thought_adv, answer_adv)``."""
    return ADV_ESTIMATORS.register(name)


def get_adv_est(name: str) -> Callable:
    """The advantage estimator registered under ``name`` (KeyError listing the known names)."""
    return ADV_ESTIMATORS.get(name)


def register_policy_loss(name: str) -> Callable[[F], F]:
    """Register a policy loss with the signature of ``clipped_policy_loss``."""
    return POLICY_LOSSES.register(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered under ``name`` (KeyError listing the known names)."""
    return POLICY_LOSSES.get(name)


def register_kl_estimator(name: str) -> Callable[[F], F]:
    """Register a per-token KL estimator ``fn(logp, ref_logp, *, clamp) -> kl``."""
    return KL_ESTIMATORS.register(name)


def get_kl_estimator(name: str) -> Callable:
    """The KL estimator registered under ``name`` (KeyError listing the known names)."""
    return KL_ESTIMATORS.get(name)
