"""Config validation: every key, type and number checked before anything heavy is built.

:func:`validate_train_config` and :func:`validate_eval_config` run first in ``lit-vae-train`` and
``lit-vae-eval``. A bad value raises :class:`ConfigError`, one line naming the key, the value and
what is allowed::

    data.batch_size=0: must be an integer >= 1
    posterior.min_raw='abc': must be a number
    trainer.devices=64: this machine has 2 CPU cores; allowed: 1..2, -1 (all) or auto

The checks come in three layers:

1. the top-level keys, the trainer's and optimizer's numbers and the devices the machine has:
   rules here, checked before torch or Lightning is imported;
2. every config group built by name or ``_target_`` (``data``, ``model.encoder``,
   ``model.decoder``, ``posterior``, ``prior``, ``likelihood``, ``regularizer``, ``optimizer``,
   ``scheduler``, ``callbacks.*``, ``logger.*``): the entry must exist, every option must be a
   parameter of its constructor, and every value must match the parameter's type annotation;
3. ranges: the constructors raise ``ValueError`` naming the key (the project's convention);
   :func:`config_errors` turns whatever a build step raises into a :class:`ConfigError`, and the
   optimizer and LR scheduler, which Lightning builds only when fitting starts, are built once
   here on a throwaway parameter.
"""

from __future__ import annotations

import collections.abc
import difflib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "EVAL_MODES",
    "NAN_POLICIES",
    "ConfigError",
    "check_options",
    "config_errors",
    "one_line",
    "validate_eval_config",
    "validate_train_config",
]


NAN_POLICIES = ("raise", "skip")
"""``nan_policy`` values: stop at a non-finite loss, or skip the batch (:mod:`lit_vae.guards`)."""
EVAL_MODES = ("test", "sample")
"""``lit-vae-eval`` modes."""


class ConfigError(ValueError):
    """A bad config value. The message is one line: the key, the value and what is allowed."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


def one_line(message: object) -> str:
    """``message`` with its lines joined by spaces and ANSI colour codes removed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(message))
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


# --------------------------------------------------------------------------------------------
# Value checks: each returns None when the value is fine, else what is allowed.

Check = Callable[[Any], "str | None"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def int_at_least(minimum: int, *, optional: bool = False, maximum: int | None = None) -> Check:
    """An integer in ``[minimum, maximum]`` (or ``null`` when ``optional``)."""

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        if _is_int(value) and value >= minimum and (maximum is None or value <= maximum):
            return None
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        return f"must be {'null or ' if optional else ''}an integer {bound}"

    return check


def number_in(
    low: float, high: float = float("inf"), *, low_open: bool = False, optional: bool = False
) -> Check:
    """A finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""

    def check(value: Any) -> str | None:
        if optional and value is None:
            return None
        if _is_number(value) and value == value and abs(value) != float("inf"):
            above = value > low if low_open else value >= low
            if above and value <= high:
                return None
        lower = f"> {low:g}" if low_open else f">= {low:g}"
        upper = f" and <= {high:g}" if high != float("inf") else ""
        return f"must be {'null or ' if optional else ''}a finite number {lower}{upper}"

    return check


def choice(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        if any(value == a and type(value) is type(a) for a in allowed):
            return None
        return f"allowed: {', '.join('null' if a is None else str(a) for a in allowed)}"

    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


def text(*, optional: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if (optional and value is None) or (isinstance(value, str) and value):
            return None
        return f"must be {'null or ' if optional else ''}a non-empty string"

    return check


def batches_limit(value: Any) -> str | None:
    """``limit_*_batches``, ``overfit_batches``: a fraction in [0, 1] or a count >= 0."""
    if value is None or (_is_int(value) and value >= 0):
        return None
    if isinstance(value, float) and 0.0 <= value <= 1.0:
        return None
    return "must be a fraction in [0.0, 1.0] or a number of batches >= 0"


def val_check_interval(value: Any) -> str | None:
    if value is None or (_is_int(value) and value >= 1):
        return None
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return None
    if isinstance(value, str | dict):
        return None  # a time interval; Lightning parses it
    return "must be a fraction of the epoch in (0.0, 1.0] or a number of batches >= 1"


def _check(key: str, value: Any, check: Check) -> None:
    problem = check(value)
    if problem is not None:
        raise ConfigError(f"{key}={value!r}: {problem}")


# --------------------------------------------------------------------------------------------
# Annotations as checks.


def _type_name(hint: Any) -> str | None:
    """What a value of type ``hint`` is, in words; ``None`` when there are no words for it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    simple = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        type(None): "null",
        Path: "a path",
        dict: "a mapping",
    }
    if hint in simple:
        return simple[hint]
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        literals = [v for a in args if typing.get_origin(a) is typing.Literal for v in a.__args__]
        others = [a for a in args if typing.get_origin(a) is not typing.Literal]
        names = [n for n in (_type_name(a) for a in others) if n is not None]
        if literals:
            names.insert(0, "one of " + ", ".join(dict.fromkeys(str(v) for v in literals)))
        return " or ".join(dict.fromkeys(names)) if names else None
    if origin in (list, tuple, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            inner = _type_name(args[0]) if len(set(args)) == 1 else None
            return f"a list of {len(args)} {_plural(inner)}" if inner else f"a list of {len(args)}"
        inner = _type_name(args[0]) if args else None
        return f"a list of {_plural(inner)}" if inner else "a list"
    return None


def _plural(name: str | None) -> str:
    plurals = {"an integer": "integers", "a number": "numbers", "a string": "strings"}
    return plurals.get(name or "", "values")


def conforms(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` (a plain config value) fits the annotation ``hint``; ``None`` when the
    annotation says nothing a config value could be checked against."""
    if hint is inspect.Parameter.empty or hint is Any:
        return None
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return isinstance(value, str)
    if hint is Path or hint is os.PathLike:
        return isinstance(value, str)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        results = [conforms(value, a) for a in args]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return False
            pairs = list(zip(value, args))
        else:
            pairs = [(v, args[0]) for v in value] if args else []
        results = [conforms(v, a) for v, a in pairs]
        if any(r is False for r in results):
            return False
        return None if any(r is None for r in results) else True
    if hint is dict or origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict)
    return None


def _parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named parameters of ``factory`` and whether it takes any keyword (``**kwargs``)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}, True
    named = {
        name: p
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name != "self"
    }
    var_keyword = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    return named, bool(var_keyword)


def _hints(factory: Callable[..., Any]) -> dict[str, Any]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    namespace: dict[str, Any] = {}
    try:
        from typing_extensions import Unpack

        namespace["Unpack"] = Unpack
    except ImportError:  # pragma: no cover - typing_extensions comes with Lightning
        pass
    try:
        return typing.get_type_hints(target, localns=namespace, include_extras=True)
    except Exception:  # unresolvable annotations: no type checks
        return {}


def _unpacked_keywords(hints: Mapping[str, Any], factory: Callable[..., Any]) -> dict[str, Any]:
    """Options a ``**kwargs: Unpack[SomeTypedDict]`` parameter takes, with their types."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return {}
    extra: dict[str, Any] = {}
    for p in signature.parameters.values():
        hint = hints.get(p.name)
        if p.kind is p.VAR_KEYWORD and hint is not None and typing.get_args(hint):
            typed_dict = typing.get_args(hint)[0]
            try:
                extra.update(typing.get_type_hints(typed_dict))
            except Exception:
                extra.update(dict.fromkeys(getattr(typed_dict, "__annotations__", {}), Any))
    return extra


def check_options(
    key: str, factory: Callable[..., Any], options: Mapping[str, Any], what: str
) -> None:
    """Every entry of ``options`` must be a parameter of ``factory`` with a fitting value.

    Args:
        key: where the options sit in the config (``posterior``), for messages.
        factory: the class or function they are passed to.
        options: the options from the config (``name``, ``_target_`` excluded).
        what: the entry, for messages (``posterior 'log_var'``).

    Raises:
        ConfigError: an unknown option (with the allowed ones and the closest match), or a value
            that does not fit the parameter's annotation.
    """
    named, takes_any = _parameters(factory)
    hints = _hints(factory)
    unpacked = _unpacked_keywords(hints, factory)
    known = {**{name: hints.get(name, Any) for name in named}, **unpacked}
    check_unknown = not takes_any or bool(unpacked)
    for option, value in options.items():
        if option not in known:
            if not check_unknown:
                continue
            allowed = sorted(known)
            close = difflib.get_close_matches(option, allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(
                f"{key}.{option}={value!r}: not an option of {what}{hint}; "
                f"options: {', '.join(allowed) or 'none'}"
            )
        hint_type = known[option]
        if conforms(value, hint_type) is False:
            described = _type_name(hint_type) or f"of type {hint_type}"
            raise ConfigError(f"{key}.{option}={value!r}: must be {described}")


# --------------------------------------------------------------------------------------------
# Config groups.


def _plain(config: Any) -> Any:
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return config


def _resolve_factory(
    key: str, config: Mapping[str, Any], registry: Any | None
) -> tuple[Callable[..., Any], str]:
    """The class or function a group config builds, and how to name it in messages."""
    names = ", ".join(registry.names()) if registry is not None else ""
    if "_target_" in config:
        target = config["_target_"]
        from hydra.utils import get_method

        try:
            return get_method(str(target)), f"{target}"
        except Exception as err:
            reason = one_line(err.__cause__ or err)
            allowed = f"or name: one of {names}" if names else ""
            raise ConfigError(
                f"{key}._target_={target!r}: cannot be imported ({reason}); allowed: the dotted "
                f"path of an importable class {allowed}".rstrip()
            ) from None
    if registry is None:
        raise ConfigError(f"{key}: needs a _target_ (the dotted path of a class)")
    if "name" not in config:
        raise ConfigError(f"{key}: needs 'name' (one of: {names}) or '_target_'")
    name = config["name"]
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(
            f"{key}.name={name!r}: not a registered {registry.kind}; allowed: {names}"
        )
    return registry.get(name), f"{registry.kind} {name!r}"


def check_group(
    key: str, config: Any, registry: Any | None, exclude: tuple[str, ...] = ()
) -> Callable[..., Any]:
    """Check one group config (``name`` or ``_target_`` plus options); returns its factory."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{key}={config!r}: must be a mapping with 'name' or '_target_'")
    factory, what = _resolve_factory(key, config, registry)
    options = {k: v for k, v in config.items() if k not in ("name", "_target_", *exclude)}
    options = {k: v for k, v in options.items() if not str(k).startswith("_")}
    check_options(key, factory, options, what)
    return factory


def _job_config(cfg: DictConfig) -> DictConfig:
    """The job's own keys: without Hydra's ``hydra`` node when a composed config carries it."""
    if "hydra" not in cfg:
        return cfg
    masked = OmegaConf.masked_copy(cfg, [str(key) for key in cfg if key != "hydra"])
    assert isinstance(masked, DictConfig)
    return masked


def _check_missing(cfg: DictConfig) -> None:
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        first = missing[0]
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"{first}: missing value (???){more}; give it, e.g. {first}=<value>")


def _check_resolves(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        message = str(err).split("\n    full_key:")[0]
        raise ConfigError(f"{key}: {message}") from None


# --------------------------------------------------------------------------------------------
# Trainer and devices.

PRECISIONS = (
    "64-true", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true",
    "64", "32", "16", "bf16", 64, 32, 16, None,
)  # fmt: skip

TRAINER_RULES: dict[str, Check] = {
    "num_nodes": int_at_least(1),
    "max_epochs": int_at_least(-1, optional=True),
    "min_epochs": int_at_least(0, optional=True),
    "max_steps": int_at_least(-1),
    "min_steps": int_at_least(0, optional=True),
    "check_val_every_n_epoch": int_at_least(1, optional=True),
    "val_check_interval": val_check_interval,
    "log_every_n_steps": int_at_least(1, optional=True),
    "num_sanity_val_steps": int_at_least(-1, optional=True),
    "accumulate_grad_batches": int_at_least(1),
    "gradient_clip_val": number_in(0.0, optional=True),
    "gradient_clip_algorithm": choice("norm", "value", None),
    "limit_train_batches": batches_limit,
    "limit_val_batches": batches_limit,
    "limit_test_batches": batches_limit,
    "limit_predict_batches": batches_limit,
    "overfit_batches": batches_limit,
    "reload_dataloaders_every_n_epochs": int_at_least(0),
    "precision": choice(*PRECISIONS),
    "deterministic": choice(True, False, "warn", None),
}


def _cpu_count() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)


def _available_devices(accelerator: str) -> tuple[int, str] | None:
    """How many devices ``accelerator`` has here, and their name; ``None``: not checked."""
    if accelerator == "cpu":
        return _cpu_count(), "CPU cores"
    if accelerator in ("gpu", "cuda", "mps"):
        import torch

        if accelerator == "mps":
            return (1 if torch.backends.mps.is_available() else 0), "MPS devices"
        return torch.cuda.device_count(), "CUDA GPUs"
    return None


def check_devices(trainer: Mapping[str, Any]) -> None:
    """``trainer.accelerator`` must exist here and ``trainer.devices`` fit what it has."""
    accelerator = trainer.get("accelerator", "auto")
    devices = trainer.get("devices", "auto")
    if not isinstance(accelerator, str):
        return
    available = _available_devices(accelerator)
    if available is None:
        return
    count, what = available
    if count == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator!r}: this machine has no {what}; allowed here: "
            "cpu or auto"
        )
    allowed = f"allowed: 1..{count}, -1 (all) or auto"
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if devices == "auto" or devices == -1:
        return
    if _is_int(devices):
        if 1 <= devices <= count:
            return
        raise ConfigError(
            f"trainer.devices={devices!r}: this machine has {count} {what}; {allowed}"
        )
    if isinstance(devices, list | tuple) and accelerator != "cpu":
        indices_ok = all(_is_int(d) and 0 <= d < count for d in devices)
        if devices and indices_ok and len(set(devices)) == len(devices):
            return
        raise ConfigError(
            f"trainer.devices={list(devices)!r}: device indices must be distinct integers in "
            f"0..{count - 1} (this machine has {count} {what})"
        )
    raise ConfigError(f"trainer.devices={devices!r}: {allowed}")


def check_trainer_values(trainer: Any) -> None:
    """The numbers and choices of ``cfg.trainer`` and the devices it asks for."""
    if not isinstance(trainer, Mapping) or "_target_" not in trainer:
        raise ConfigError("trainer: needs a _target_ (pytorch_lightning.Trainer) and its options")
    for option, rule in TRAINER_RULES.items():
        if option in trainer:
            _check(f"trainer.{option}", trainer[option], rule)
    check_devices(trainer)


def check_trainer_options(trainer: Mapping[str, Any]) -> None:
    """Every option of ``cfg.trainer`` must be a parameter of its ``_target_`` (imports it)."""
    check_group("trainer", trainer, None, exclude=("callbacks", "logger", "plugins", "profiler"))


# --------------------------------------------------------------------------------------------
# Optimizer and scheduler.

DATA_RULES: dict[str, Check] = {
    "batch_size": int_at_least(1),
    "eval_batch_size": int_at_least(1),
    "num_workers": int_at_least(0),
    "seed": int_at_least(0),
    "shuffle": boolean,
    "drop_last": boolean,
    "pin_memory": boolean,
    "on_device": boolean,
}
"""The loader options every lit-vae data module takes (``LoaderOptions``), checked before the
data module is imported; the data modules check all their options again when built."""

OPTIMIZER_RULES: dict[str, Check] = {
    "lr": number_in(0.0, low_open=True),
    "eps": number_in(0.0, low_open=True),
    "weight_decay": number_in(0.0),
    "momentum": number_in(0.0),
    "dampening": number_in(0.0),
    "alpha": number_in(0.0),
}

SCHEDULER_RULES: dict[str, dict[str, Check]] = {
    "step": {"step_size": int_at_least(1), "gamma": number_in(0.0, low_open=True)},
    "multistep": {"gamma": number_in(0.0, low_open=True)},
    "exponential": {"gamma": number_in(0.0, low_open=True)},
    "cosine": {"T_max": int_at_least(1), "eta_min": number_in(0.0)},
    "iwae": {
        "num_stages": int_at_least(1),
        "base": number_in(1.0),
        "decay_per_stage": number_in(0.0, 1.0, low_open=True),
        "budget": number_in(0.0, low_open=True),
    },
}


def check_optimization_values(optimizer: Any, scheduler: Any) -> None:
    """The numbers of ``optimizer`` and ``scheduler`` that lit-vae knows the ranges of."""
    if not isinstance(optimizer, Mapping):
        raise ConfigError(f"optimizer={optimizer!r}: must be a mapping with 'name' or '_target_'")
    for option, rule in OPTIMIZER_RULES.items():
        if option in optimizer:
            _check(f"optimizer.{option}", optimizer[option], rule)
    betas = optimizer.get("betas")
    if betas is not None and not (
        isinstance(betas, list | tuple)
        and len(betas) == 2
        and all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ConfigError(f"optimizer.betas={betas!r}: must be two numbers in [0, 1)")
    if scheduler:
        if not isinstance(scheduler, Mapping):
            raise ConfigError(f"scheduler={scheduler!r}: must be null or a mapping with 'name'")
        _check("scheduler.interval", scheduler.get("interval", "epoch"), choice("step", "epoch"))
        for option, rule in SCHEDULER_RULES.get(str(scheduler.get("name")), {}).items():
            if option in scheduler:
                _check(f"scheduler.{option}", scheduler[option], rule)


def check_optimization(optimizer: Any, scheduler: Any) -> None:
    """Check ``optimizer`` and ``scheduler`` against their constructors, then build both once
    on a throwaway parameter (Lightning builds them only when fitting starts)."""
    import torch

    from lit_vae.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler

    check_optimization_values(optimizer, scheduler)
    check_group("optimizer", optimizer, OPTIMIZERS)
    if scheduler:
        check_group("scheduler", scheduler, SCHEDULERS, exclude=("interval",))
    parameter = torch.nn.Parameter(torch.zeros(1))
    with config_errors("optimizer"):
        built = build_optimizer([parameter], optimizer)
    with config_errors("scheduler"):
        build_scheduler(built, scheduler)


# --------------------------------------------------------------------------------------------
# Whole configs.

MODEL_GROUPS = (
    ("model.encoder", "encoder"),
    ("model.decoder", "decoder"),
    ("posterior", "posterior"),
    ("prior", "prior"),
    ("likelihood", "likelihood"),
    ("regularizer", "regularizer"),
)


def _model_registries() -> dict[str, Any]:
    """The registries of the model's parts (imports torch, not Lightning)."""
    from lit_vae.likelihoods import LIKELIHOODS
    from lit_vae.nets import DECODERS, ENCODERS
    from lit_vae.posteriors import POSTERIORS
    from lit_vae.priors import PRIORS
    from lit_vae.regularizers import REGULARIZERS

    return {
        "encoder": ENCODERS,
        "decoder": DECODERS,
        "posterior": POSTERIORS,
        "prior": PRIORS,
        "likelihood": LIKELIHOODS,
        "regularizer": REGULARIZERS,
    }


def _get(config: Mapping[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"{dotted}: missing; every lit-vae-train config has it")
        node = node[part]
    return node


def _check_instantiated(group: str, config: Any) -> None:
    """``callbacks`` / ``logger``: a mapping of name → ``{_target_: ..., ...}`` or ``null``."""
    if config is None:
        return
    if not isinstance(config, Mapping):
        raise ConfigError(f"{group}={config!r}: must be a mapping of name: {{_target_: ...}}")
    for name, entry in config.items():
        if entry is not None:
            check_group(f"{group}.{name}", entry, None)


def _check_common_values(config: Mapping[str, Any]) -> None:
    _check("seed", config.get("seed"), int_at_least(0, maximum=2**32 - 1))
    evaluation = config.get("eval") or {}
    _check("eval.num_samples", evaluation.get("num_samples", 1000), int_at_least(1))
    _check("eval.chunk_size", evaluation.get("chunk_size"), int_at_least(1, optional=True))
    check_trainer_values(config.get("trainer"))


def validate_train_config(cfg: DictConfig) -> None:
    """Check the whole ``lit-vae-train`` config; raise :class:`ConfigError` on the first problem.

    Cheapest first: plain values (no torch), then the model's parts and the optimizer (torch),
    then data, trainer, callbacks and loggers (Lightning), so most mistakes are reported before
    the heavy libraries load.
    """
    cfg = _job_config(cfg)
    _check_missing(cfg)
    _check_resolves(cfg)
    config = _plain(cfg)
    _check("latent_dim", config.get("latent_dim"), int_at_least(1))
    _check("nan_policy", config.get("nan_policy", "raise"), choice(*NAN_POLICIES))
    _check("train", config.get("train", True), boolean)
    _check("test", config.get("test", True), boolean)
    _check("init_output_bias", config.get("init_output_bias", True), boolean)
    ckpt_path = config.get("ckpt_path")
    _check("ckpt_path", ckpt_path, text(optional=True))
    if ckpt_path not in (None, "last") and not Path(ckpt_path).is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path!r}: no such checkpoint file; allowed: null, last "
            "(<run dir>/checkpoints/last.ckpt) or the path of a .ckpt file"
        )
    _check("optimized_metric", config.get("optimized_metric"), text(optional=True))
    _check_common_values(config)
    data = _get(config, "data")
    if isinstance(data, Mapping) and "_target_" not in data:
        for option, rule in DATA_RULES.items():
            if option in data:
                _check(f"data.{option}", data[option], rule)
    check_optimization_values(_get(config, "optimizer"), config.get("scheduler"))

    registries = _model_registries()
    for key, family in MODEL_GROUPS:
        check_group(key, _get(config, key), registries[family])
    with config_errors("posterior"):  # the head's and the regularizer's own range checks
        registries["posterior"].from_config(
            _get(config, "posterior"), "posterior", latent_dim=config["latent_dim"]
        )
    with config_errors("regularizer"):
        registries["regularizer"].from_config(_get(config, "regularizer"), "regularizer")
    check_optimization(_get(config, "optimizer"), config.get("scheduler"))

    from lit_vae.data import DATAMODULES

    check_group("data", _get(config, "data"), DATAMODULES)
    check_trainer_options(config["trainer"])
    _check_instantiated("callbacks", config.get("callbacks"))
    _check_instantiated("logger", config.get("logger"))


def validate_eval_config(cfg: DictConfig) -> None:
    """Check the ``lit-vae-eval`` config; raise :class:`ConfigError` on the first problem."""
    cfg = _job_config(cfg)
    _check_missing(cfg)
    _check_resolves(cfg)
    config = _plain(cfg)
    _check("mode", config.get("mode"), choice(*EVAL_MODES))
    _check("n", config.get("n", 64), int_at_least(1))
    _check("output", config.get("output"), text(optional=True))
    _check("ckpt_path", config.get("ckpt_path"), text())
    if not Path(config["ckpt_path"]).is_file():
        raise ConfigError(f"ckpt_path={config['ckpt_path']!r}: no such checkpoint file")
    if not isinstance(config.get("data") or {}, Mapping):
        raise ConfigError(f"data={config.get('data')!r}: must be a mapping of data options")
    _check_common_values(config)
    check_trainer_options(config["trainer"])


# --------------------------------------------------------------------------------------------
# Build steps.


def _instance_of(err: BaseException, module: str, name: str) -> bool:
    """``isinstance(err, module.name)`` when that module is loaded (if it is not, nothing could
    have raised its exception), without importing it."""
    loaded = sys.modules.get(module)
    exception = getattr(loaded, name, None)
    return isinstance(exception, type) and isinstance(err, exception)


@contextmanager
def config_errors(key: str = "") -> Iterator[None]:
    """Turn what a build step raises for a bad config into a one-line :class:`ConfigError`.

    ``ValueError`` (the project's convention), ``TypeError`` (a bad keyword), Lightning's
    ``MisconfigurationException`` and Hydra's ``InstantiationException`` (its cause is used) are
    prefixed with ``key`` unless the message already names it. ``ConfigError`` and
    :class:`~lit_vae.data.DataError` pass through unchanged.
    """
    from hydra.errors import InstantiationException

    try:
        yield
    except Exception as err:
        cause: BaseException = err
        where = key
        if isinstance(err, InstantiationException):
            found = re.search(r"full_key: (\S+)", str(err))
            if found and (not key or found.group(1).startswith(key)):
                where = found.group(1)
            cause = err.__cause__ or err
        if isinstance(cause, ConfigError) or _instance_of(cause, "lit_vae.data", "DataError"):
            if cause is err:
                raise
            raise cause from None
        known = isinstance(cause, ValueError | TypeError) or _instance_of(
            cause, "lightning_fabric.utilities.exceptions", "MisconfigurationException"
        )
        if not known:
            raise
        message = one_line(cause)
        if where and not message.startswith(where):
            message = f"{where}: {message}"
        raise ConfigError(message) from err
