import pytest

from lit_vae.registry import Registry, UnknownNameError


@pytest.fixture
def registry() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("round")
    class Round:
        def __init__(self, radius: float = 1.0) -> None:
            self.radius = radius

    @reg.register("square")
    def square(side: float = 2.0) -> dict:
        return {"side": side}

    return reg


def test_names_sorted_contains_len(registry: Registry) -> None:
    assert registry.names() == ["round", "square"]
    assert list(registry) == ["round", "square"]
    assert "round" in registry
    assert "hexagon" not in registry
    assert len(registry) == 2


def test_build_passes_kwargs(registry: Registry) -> None:
    assert registry.build("round", radius=3.0).radius == 3.0
    assert registry.build("square", side=5.0) == {"side": 5.0}


def test_duplicate_name_raises(registry: Registry) -> None:
    with pytest.raises(ValueError, match="widget 'round' is already registered"):
        registry.register("round")(object)


def test_unknown_name_lists_registered_names(registry: Registry) -> None:
    with pytest.raises(KeyError) as info:
        registry.get("hexagon")
    assert isinstance(info.value, UnknownNameError)
    assert str(info.value) == "unknown widget 'hexagon'; registered widget names: round, square"


def test_user_registration_from_outside_the_package() -> None:
    from lit_vae.posteriors import POSTERIORS, LogVarHead

    name = "test_user_log_var"

    @POSTERIORS.register(name)
    class UserHead(LogVarHead):
        pass

    try:
        head = POSTERIORS.build(name, latent_dim=3)
        assert isinstance(head, UserHead)
        assert head.num_params == 6
    finally:
        POSTERIORS._entries.pop(name)


def test_from_config_by_name_and_by_target(registry: Registry) -> None:
    assert registry.from_config({"name": "round", "radius": 4.0}).radius == 4.0
    built = registry.from_config({"_target_": "collections.OrderedDict", "a": 1}, "shape", b=2)
    assert dict(built) == {"a": 1, "b": 2}


def test_from_config_errors_name_the_key(registry: Registry) -> None:
    with pytest.raises(
        ValueError,
        match=r"shape.name='hexagon' is not a registered widget; "
        r"allowed: round, square",
    ):
        registry.from_config({"name": "hexagon"}, "shape")
    with pytest.raises(ValueError, match=r"shape needs 'name' \(one of: round, square\)"):
        registry.from_config({}, "shape")
    with pytest.raises(ValueError, match=r"shape._target_='no.such.Thing' cannot be imported"):
        registry.from_config({"_target_": "no.such.Thing"}, "shape")
