"""Load and validate the one pipeline config (JSON Schema, shared with the Snakefile's ``validate``).

Defaults live in the schema (filled in by validation) and in ``config/config.yaml``; code reads the
validated dict and never invents its own defaults.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from turbotrain.utils.errors import ConfigError
from turbotrain.utils.hashing import config_hash  # noqa: F401  (re-exported for the Snakefile)

SCHEMA_PATH = Path(__file__).with_name("schemas") / "config.schema.yaml"


def load_schema() -> dict:
    with open(SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


def _with_defaults(validator_class):
    """A validator that also fills schema defaults, as Snakemake's ``validate(set_default=True)``."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def validate_config(config: dict, source: str = "<config>") -> dict:
    """Validate ``config`` in place (filling defaults); raise ConfigError naming the key on failure."""
    schema = load_schema()
    errors = sorted(_Validator(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"{source}: invalid configuration:"]
        for err in errors[:10]:
            key = ".".join(str(p) for p in err.absolute_path) or "<top level>"
            lines.append(f"  - {key}: {_explain(err, schema)}")
        raise ConfigError("\n".join(lines))
    check_config(config, source)
    return config


def check_config(config: dict, source: str = "<config>") -> dict:
    """Checks across keys that the schema cannot express (run after schema validation).

    The Snakefile validates with Snakemake's ``validate`` (schema only) and then calls this too.
    """
    problems = []
    primary = config["dataset"]["name"]
    if "primary" in config.get("extra_datasets", {}) or primary == "primary":
        problems.append("dataset names: 'primary' is reserved (pretrain.variants.<name>.datasets uses it for the "
                        "fine-tuning dataset); rename that dataset")
    if primary in config.get("extra_datasets", {}):
        problems.append(f"extra_datasets.{primary}: this name is the primary dataset's (dataset.name); "
                        "an extra dataset needs a name of its own (its raw data and cache folders are named after it)")
    # The Snakemake rule that generates (or downloads) raw data writes `<root>/<name>` for one root.
    for kind in ("synthetic", "download"):
        roots = {}
        for key, ds in [("dataset", config["dataset"]),
                        *((f"extra_datasets.{n}", e) for n, e in config.get("extra_datasets", {}).items())]:
            if ds["source"] == kind:
                roots.setdefault(ds["root"], key)
        if len(roots) > 1:
            (root_a, key_a), (root_b, key_b) = list(roots.items())[:2]
            problems.append(f"{key_b}.root: {root_b!r} differs from {key_a}.root {root_a!r}; every {kind} dataset "
                            "keeps its raw data under the same root (the data rules write <root>/<name>)")
    problems += _pretraining_data_problems(config)
    problems += _budget_problems(config)
    if problems:
        raise ConfigError("\n".join([f"{source}: invalid configuration:", *(f"  - {p}" for p in problems)]))
    return config


def _pretraining_data_problems(config: dict) -> list[str]:
    """Pretraining variants the experiment grid uses must name configured datasets.

    Only variants the groups use: a config merged on top of another (config/paper.yaml) inherits
    variants it does not run, and their datasets need not exist there.
    """
    known = ["primary", config["dataset"]["name"], *config.get("extra_datasets", {})]
    used = {p for group in config.get("experiments", {}).get("groups", []) for p in group.get("pretrain", [])}
    variants = config.get("pretrain", {}).get("variants", {})
    return [f"pretrain.variants.{name}.datasets: {missing!r} is not a configured dataset (have {known}: "
            "dataset.name and the keys of extra_datasets)"
            for name in sorted(used & set(variants))
            for missing in variants[name].get("datasets", []) if missing not in known]


def _budget_problems(config: dict) -> list[str]:
    """Groups name defined budgets; a matched budget's pretraining is split against joint training
    (the pretraining job is shared by the runs of one budget), so pretrained runs under it are joint."""
    budgets = config.get("experiments", {}).get("budgets", {})
    problems = []
    for i, group in enumerate(config.get("experiments", {}).get("groups", [])):
        for name in group.get("budget", ["schedule"]):
            if name != "schedule" and name not in budgets:
                problems.append(f"experiments.groups[{i}].budget: {name!r} is not in experiments.budgets "
                                f"(have {sorted(budgets)}, or 'schedule')")
            elif (name in budgets and budgets[name]["policy"] == "matched" and "multistage" in group.get("recipe", [])
                  and any(config["pretrain"]["variants"].get(p, {}).get("type", "none") != "none"
                          for p in group.get("pretrain", []))):
                problems.append(f"experiments.groups[{i}]: the matched budget {name!r} splits pretraining against "
                                "joint fine-tuning; pretrained multistage runs need a group of their own")
    return problems


def _explain(err: jsonschema.ValidationError, schema: dict | None = None) -> str:
    if err.validator in ("additionalProperties", "unevaluatedProperties"):
        allowed = sorted(_property_names(err.schema, schema or {}))
        message = err.message.replace("Unevaluated properties", "Additional properties")
        return f"{message} (allowed keys: {', '.join(allowed)})"
    if err.validator == "enum":
        return f"{err.instance!r} is not one of {err.validator_value}"
    if err.validator == "type":
        return f"expected {err.validator_value}, got {type(err.instance).__name__} {err.instance!r}"
    return err.message


def _property_names(sub: dict, schema: dict) -> set[str]:
    """Keys a (sub)schema allows, following local ``$ref`` s (``unevaluatedProperties`` composes them)."""
    names = set(sub.get("properties", {}))
    ref = sub.get("$ref", "")
    if ref.startswith("#/"):
        target = schema
        for part in ref[2:].split("/"):
            target = target.get(part, {})
        names |= _property_names(target, schema)
    return names


def set_by_path(config: dict, dotted: str, value: Any) -> None:
    """``set_by_path(cfg, "train.lr", 1e-3)`` for command-line overrides."""
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def read_yaml_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path) as fh:
            return yaml.safe_load(fh) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def merge_config(base: dict, update: dict) -> dict:
    """``update`` merged into ``base`` in place, as Snakemake merges ``--configfile`` s: nested
    mappings key by key, every other value (lists included) replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_config(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def load_config(paths: str | Path | list, overrides: list[str] | None = None) -> dict:
    """Read one YAML or several (merged in order, as ``snakemake --configfile A B`` does), apply
    ``key.sub=value`` overrides (values parsed as YAML), validate."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    config: dict = {}
    for path in paths:
        merge_config(config, read_yaml_config(path))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        set_by_path(config, key, yaml.safe_load(raw))
    return validate_config(config, " + ".join(str(p) for p in paths))
