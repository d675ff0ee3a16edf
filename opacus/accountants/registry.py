"""Name -> accountant class registry ("rdp", "prv", "gdp")."""

from typing import Dict, Type

from opacus.accountants.accountant import IAccountant
from opacus.accountants.gdp import GaussianAccountant
from opacus.accountants.prv import PRVAccountant
from opacus.accountants.rdp import RDPAccountant

__all__ = [
    "create_accountant",
    "register_accountant",
    "IAccountant",
    "GaussianAccountant",
    "PRVAccountant",
    "RDPAccountant",
]

_ACCOUNTANTS: Dict[str, Type[IAccountant]] = {
    "rdp": RDPAccountant,
    "gdp": GaussianAccountant,
    "prv": PRVAccountant,
}


def register_accountant(mechanism: str, accountant: Type[IAccountant], force: bool = False):
    """Make ``create_accountant(mechanism)`` build ``accountant`` (``force`` to replace one).

    Args:
        mechanism: the registry name.
        accountant: a subclass of ``IAccountant``.
        force: replace an accountant already registered under that name.

    Raises:
        ValueError: ``accountant`` is not an ``IAccountant`` subclass, or the name is taken and
            ``force`` is False.
    """
    if not (isinstance(accountant, type) and issubclass(accountant, IAccountant)):
        raise ValueError(
            "opacus.accountants.register_accountant: accountant must be a subclass of "
            f"IAccountant, got {accountant!r}."
        )
    if mechanism in _ACCOUNTANTS and not force:
        raise ValueError(
            f"opacus.accountants.register_accountant: {mechanism!r} is already registered "
            f"({_ACCOUNTANTS[mechanism].__name__}); pass force=True to replace it."
        )
    _ACCOUNTANTS[mechanism] = accountant


def create_accountant(mechanism: str) -> IAccountant:
    """A fresh accountant for ``mechanism`` ("rdp", "prv", "gdp" or a registered name).

    Args:
        mechanism: the registry name.

    Returns:
        a new accountant with an empty history.

    Raises:
        ValueError: no accountant is registered under ``mechanism``.
    """
    if mechanism not in _ACCOUNTANTS:
        raise ValueError(
            f"opacus.accountants.create_accountant: unknown accountant {mechanism!r}; choose "
            f"one of {sorted(_ACCOUNTANTS)} or register it with register_accountant()."
        )
    return _ACCOUNTANTS[mechanism]()
