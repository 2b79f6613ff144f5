"""Every registered method and task follows its written contract (methods.base.Method, tasks.common.Task): the
pipeline calls them through it, so a new file that drifts from it fails here, not in the middle of a run."""

import inspect
import typing

import pytest

from peftkit.methods import METHODS
from peftkit.methods.base import OPTIONAL, Method
from peftkit.tasks import TASKS
from peftkit.tasks.common import LabelKind, Task


def _protocol_functions(protocol) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(protocol, name))
        for name in protocol.__dict__
        if not name.startswith("_") and inspect.isfunction(getattr(protocol, name))
    }


def _accepts(function, protocol_signature: inspect.Signature) -> bool:
    """The function takes the protocol's parameters (less `self`) in the same positions."""
    wanted = [p for p in protocol_signature.parameters.values() if p.name != "self"]
    required = [p for p in wanted if p.default is p.empty and p.kind is not p.VAR_KEYWORD]
    try:
        inspect.signature(function).bind(*[None] * len(required))
    except TypeError:
        return False
    return True


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_follows_the_method_contract(name):
    method = METHODS[name]
    assert isinstance(method, Method), f"{name} lacks one of {sorted(typing.get_type_hints(Method))}"
    for function, signature in _protocol_functions(Method).items():
        assert _accepts(getattr(method, function), signature), f"{name}.{function}{signature}"
    assert typing.get_args(method.Config.model_fields["name"].annotation) == (name,), "method.name is its key"
    assert method.FORMAT in ("peft", "peftkit", "full")
    if not method.MERGEABLE:
        assert len(method.NOT_MERGEABLE_BECAUSE) > 40, "a method that cannot merge says why, and what instead"
    for hook, default in OPTIONAL.items():
        if not hasattr(method, hook):
            continue
        if default is None or callable(default):
            assert callable(getattr(method, hook)), f"{name}.{hook} is a hook: a function"
        else:
            assert isinstance(getattr(method, hook), type(default)), f"{name}.{hook}: a {type(default).__name__}"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_follows_the_task_contract(name):
    task = TASKS[name]
    assert isinstance(task, Task), f"{name} lacks one of {sorted(typing.get_type_hints(Task))}"
    for function, signature in _protocol_functions(Task).items():
        assert _accepts(getattr(task, function), signature), f"{name}.{function}{signature}"
    assert typing.get_args(task.Config.model_fields["type"].annotation) == (name,), "task.type is its key"
    assert task.METRICS and all(isinstance(m, str) for m in task.METRICS)
    default = task.Config(type=name)  # the section with every option at its default
    assert task.metrics(default) and set(task.metrics(default)) <= set(task.METRICS), "metrics(config): of METRICS"
    assert task.label_kind(default) in typing.get_args(LabelKind)
    assert set(task.COLUMNS) and all(isinstance(required, bool) for required in task.COLUMNS.values())
    assert task.LABEL_ROLE is None or task.LABEL_ROLE in task.COLUMNS
    assert task.SPLIT_BY is None or task.SPLIT_BY in task.COLUMNS


def test_the_contract_check_catches_a_drifted_module():
    import types

    drifted = types.SimpleNamespace(Config=METHODS["lora"].Config, FORMAT="peft", apply=lambda model: model)
    assert not isinstance(drifted, Method)  # no MERGEABLE
    drifted.MERGEABLE = True
    assert isinstance(drifted, Method)
    assert not _accepts(drifted.apply, _protocol_functions(Method)["apply"])  # apply(model) takes one argument
