"""Every public module, class, function and method of the package has its own docstring."""

import importlib
import inspect
import pkgutil

import opacus

OPTIONAL = {"opacus.lightning"}  # needs pytorch-lightning


def _modules():
    for info in pkgutil.walk_packages(opacus.__path__, prefix="opacus."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        try:
            yield importlib.import_module(info.name)
        except ImportError:
            if info.name not in OPTIONAL:
                raise


def _public_objects():
    yield opacus
    for module in _modules():
        yield module
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield obj
            elif inspect.isclass(obj):
                yield obj
                for attr, member in vars(obj).items():
                    if attr.startswith("_"):
                        continue
                    if isinstance(member, (classmethod, staticmethod)):
                        member = member.__func__
                    if isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member):
                        yield member


def _name(obj):
    module = getattr(obj, "__module__", None) or ""
    return f"{module}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


def test_every_public_object_has_a_docstring():
    missing = sorted({_name(obj) for obj in _public_objects() if not (obj.__doc__ or "").strip()})
    assert not missing, f"{len(missing)} public objects without a docstring:\n" + "\n".join(missing)
