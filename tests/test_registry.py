"""The one registry mechanism: register, build from a name or a mapping, list, collisions."""

import pytest

import softprune
from softprune.errors import SoftpruneError
from softprune.registry import Registry
from softprune.schedules import schedule_from_dict


class Thing:
    def __init__(self, size: int = 1, *, colour: str = "red") -> None:
        self.size, self.colour = size, colour


def test_build_from_a_name_a_mapping_or_an_object():
    things = Registry("thing", instance_of=Thing)
    things.register("thing", Thing)
    assert things.build("thing", size=3).size == 3
    built = things.build({"kind": "thing", "colour": "blue"})
    assert (built.size, built.colour) == (1, "blue")
    assert things.build(built) is built
    assert list(things) == ["thing"] and "thing" in things and len(things) == 1
    assert things.get("thing") is Thing and things.get("other") is None and things.get(3) is None


def test_errors_name_the_registry_the_choices_and_the_option():
    things = Registry("thing", instance_of=Thing)
    things.register("thing", Thing)
    with pytest.raises(
        SoftpruneError, match="unknown thing 'thnig'; choose one of: thing. Did you mean 'thing'"
    ):
        things.build("thnig")
    with pytest.raises(
        SoftpruneError, match="thing 'thing' has no option 'color'; its options are: size, colour"
    ):
        things.build("thing", color="blue")
    with pytest.raises(SoftpruneError, match="needs 'kind'"):
        things.build({"size": 2})
    with pytest.raises(SoftpruneError, match="schedule kind 'linear' needs the option 'value'"):
        schedule_from_dict({"kind": "linear", "ramp": 0.5})  # a required option, not a TypeError
    with pytest.raises(SoftpruneError, match="already registered"):
        things.register("thing", dict)
    things.register("thing", dict, replace=True)
    assert things["thing"] is dict


def test_a_temporary_registration_is_undone_and_restores_what_it_replaced():
    things = Registry("thing")
    things.register("a", Thing)
    with things.temporarily("b", dict):
        assert things.names() == ["a", "b"]
    assert things.names() == ["a"]
    with things.temporarily("a", list, replace=True):
        assert things["a"] is list
    assert things["a"] is Thing


def test_register_criterion_refuses_a_taken_name():
    class Mine(softprune.Criterion):
        name = "l2"

    with pytest.raises(SoftpruneError, match="criterion named 'l2' is already registered"):
        softprune.register_criterion(Mine)
    assert softprune.CRITERIA["l2"] is not Mine
