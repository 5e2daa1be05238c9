"""Reading a config: a YAML file (or a shipped config by name) + ``section.key=value`` overrides, coerced to
the schema's types (did-you-mean for unknown keys), validated; and the run's name."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from distmnist.core.config.schema import Config, identity, known_keys, validate
from distmnist.core.errors import DistMnistError

# The checkout this file is in, if it is one: <repo>/src/distmnist/core/config/loading.py -> <repo>.
_CHECKOUT = Path(__file__).resolve().parents[4]
# The shipped configs of that checkout. Installed, they are the package distmnist.configs (see resolve_path).
SHIPPED_CONFIGS = _CHECKOUT / "configs"


def resolve_path(path: str | Path) -> Path:
    """A config file as given, else configs/NAME[.yaml] under the cwd, else a shipped config by name
    (`fashion` -> fashion.yaml of the package distmnist.configs)."""
    p = Path(path)
    if p.is_file():
        return p
    for c in (Path("configs") / p, (Path("configs") / p).with_suffix(".yaml")):
        if c.is_file():
            return c
    shipped = _shipped_configs()
    if shipped is not None and p.name:
        for name in (p.as_posix(), p.with_suffix(".yaml").as_posix()):
            c = shipped.joinpath(name)
            if c.is_file():
                return c  # a pathlib.Path unless the package is imported from a zip file
    names = []
    if shipped is not None:
        names = sorted(f.name[:-5] for f in shipped.iterdir() if f.name.endswith(".yaml"))
    hint = f" (shipped configs: {', '.join(names)})" if names else ""
    raise DistMnistError(f"config file {path} does not exist{hint}")


def _shipped_configs() -> Any:
    """The folder of the shipped configs (a Path or an importlib.resources Traversable); None if none.

    Installed (wheel), they are the package distmnist.configs (configs/ of the repo, see pyproject.toml). Run
    from a checkout (editable install, or PYTHONPATH=src), that checkout's configs/ is used directly: the same
    folder an editable install maps distmnist.configs to, whereas with PYTHONPATH=src the import would find no
    distmnist.configs, or another checkout's one through that checkout's editable install.
    """
    in_checkout = (_CHECKOUT / "src").is_dir() and (_CHECKOUT / "pyproject.toml").is_file()
    if in_checkout and SHIPPED_CONFIGS.is_dir():
        return SHIPPED_CONFIGS
    try:
        return importlib.resources.files("distmnist.configs")
    except ModuleNotFoundError:
        return None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema defaults, then the YAML file, then the overrides; validated."""
    flat: dict[str, Any] = {}
    if path is not None:
        p = resolve_path(path)
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise DistMnistError(f"config file {p} is not valid YAML: {_first_line(err)}") from None
        except RecursionError:  # PyYAML recurses once per level: a few hundred nested [ or { exhaust the stack
            raise DistMnistError(f"config file {p} nests lists or mappings too deeply to be a config") from None
        except (OSError, UnicodeDecodeError) as err:
            raise DistMnistError(f"cannot read config file {p}: {err}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise DistMnistError(f"config file {p} must hold a mapping of sections, not {type(data).__name__}")
        flat.update(_flatten(data, source=str(p)))
    from_file = dict(flat)
    for item in overrides:
        key, value = parse_override(item)
        flat[key] = value
    cfg = config_from_flat(flat)
    if cfg.run.name is None:
        cfg.run.name = run_name(Path(path).stem if path is not None else "default", from_file, cfg)
    return cfg


def run_name(stem: str, from_file: dict[str, Any], cfg: Config) -> str:
    """`stem`, or `stem-<digest>` when `cfg` computes something else than the config file alone: the digest
    (8 hex digits of a sha256) of the trajectory keys and train.parallel that the overrides changed."""
    try:
        base = identity(config_from_flat(from_file))
    except DistMnistError:  # the file alone is not a valid config: every key of the run counts
        base = {}
    changed = {k: v for k, v in identity(cfg).items() if base.get(k, _UNSET) != v}
    if not changed:
        return stem
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


_UNSET = object()



def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise DistMnistError(f"override {item!r} is not key=value (example: optim.lr=0.1)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise DistMnistError(f"override {item!r} has no key (example: optim.lr=0.1)")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text  # a plain string such as a path with odd characters
    except RecursionError:  # see load_config; the value itself is too long to repeat
        raise DistMnistError(f"override {key!r}: the value nests lists or mappings too deeply") from None
    return key, value


def config_from_flat(flat: dict[str, Any]) -> Config:
    cfg = Config()
    for key, value in flat.items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def _flatten(data: dict, source: str, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if not isinstance(k, str):
            raise DistMnistError(f"{source}: key {k!r} is not a name")
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_section(key):
            out.update(_flatten(v, source, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def _is_section(key: str) -> bool:
    return key in {f.name for f in dataclasses.fields(Config)} and dataclasses.is_dataclass(
        getattr(Config(), key)
    )



def _set(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    target: Any = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(target)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            close = [k for k in known_keys() if k.split(".")[-1] == parts[-1] or k.startswith(key)]
            hint = f"; did you mean {close[0]}?" if close else f"; known keys under {where}: " + ", ".join(
                sorted(names)
            )
            raise DistMnistError(f"unknown config key {key!r}{hint}")
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(target))
            if dataclasses.is_dataclass(getattr(target, part)):
                raise DistMnistError(f"config key {key!r} is a section: set its keys, e.g. {key}.<name>=...")
            setattr(target, part, _coerce(key, value, hints[part]))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise DistMnistError(f"unknown config key {key!r}: {'.'.join(parts[: i + 1])} is not a section")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if isinstance(value, (int, str)) and not isinstance(value, bool) and args[0] is int:
            value = [value] if isinstance(value, int) else value
        if not isinstance(value, list):
            raise DistMnistError(f"config key {key!r} must be a list (example: {key}=[128,128]), got {value!r}")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise DistMnistError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DistMnistError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise DistMnistError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise DistMnistError(f"config key {key!r} must be a string, got {value!r}")
    raise AssertionError(f"unsupported schema type {tp} for {key}")



def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# The first line of a run's config.yaml: which strategy, how many processes, which device wrote it.
RUN_HEADER = re.compile(r"^# distmnist run: strategy=(\w+) world_size=(\d+) device=(\S+)")


def run_config_text(cfg: Config, strategy: str, world_size: int, device: str, path: Path) -> str:
    """A run's config.yaml: the header line, then the resolved config (`distmnist train -c path` reruns it)."""
    return (
        f"# distmnist run: strategy={strategy} world_size={world_size} device={device}\n"
        f"# the resolved config: `distmnist train -c {path}` runs it again (with the strategy above)\n"
        + to_yaml(cfg)
    )


def read_run_header(first_line: str) -> dict[str, Any] | None:
    """strategy / world_size / device of a run's config.yaml first line (None for any other line)."""
    m = RUN_HEADER.match(first_line)
    if m is None:
        return None
    return {"strategy": m.group(1), "world_size": int(m.group(2)), "device": m.group(3)}
