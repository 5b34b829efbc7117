"""What a sweep is, before any of it runs: the grid and sampled keys parsed, the trials listed with
their resolved and checked configs, and the sweep directory's identity (sweep.json). No Ray.

    sweep = plan_sweep(cfg)          # cfg.sweep holds the grid; every trial's config checked
    check_identity(sweep)            # the sweep directory holds this sweep or nothing

A trial is an ordinary vaedist run: its config is the base config with its overrides applied
(config_from_dict, as `--set` is), output.storage_path = the sweep directory and output.run_name =
the trial's name, `t<index>-<key=value>...`, fixed by its position in the trial list and its
values, so a restarted trial (or sweep) finds its run directory and resumes it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from vaedist import storage
from vaedist.config import Config, ConfigError, _parse_override, config_from_dict

SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.parquet"
TRIAL_FILE = "trial.json"
TUNE_DIR = "_tune"
# Keys the sweep sets itself for every trial, so a grid may not.
RESERVED_KEYS = ("output.storage_path", "output.run_name", "scaling.address")
# Path keys made absolute on the driver: a Tune trial runs in a working directory of its own.
PATH_KEYS = (("data", "shards_dir"), ("data", "mnist_dir"), ("data", "fashion_mnist_dir"), ("data", "download_dir"),
             ("data", "source_path"), ("output", "storage_path"))
# What may change between two runs of one sweep without making it another sweep: where it runs, where
# the raw files sit (the shards' manifest pins the data; `--mnist-dir` also comes from the environment),
# how many trials at once, how it is tracked, what is printed, and the later jobs' settings.
OPERATIONAL = ("scaling.address", "data.mnist_dir", "data.fashion_mnist_dir", "data.download_dir",
               "train.progress_every_steps", "output.latents_dir", "output.report_dir",
               "sweep.max_concurrent_trials", "sweep.max_trial_failures", "sweep.name", "sweep.grid",
               "sweep.sample", "encode.", "tracking.")
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
SIGNIFICANT_DIGITS = 4  # sampled floats are rounded, so trial names and tables stay readable


class SweepError(ConfigError):
    """A sweep's grid, samples or directory cannot be used; the message names the key, value or path."""


@dataclass
class Trial:
    index: int
    name: str
    overrides: dict[str, Any]
    """{key: value} this trial sets, in the sweep's key order."""
    config: Config

    @property
    def run_dir(self) -> str:
        return storage.join(self.config.output.storage_path, self.name)


@dataclass
class Sweep:
    name: str
    dir: str
    base: Config
    keys: list[str]
    """The swept keys, grid axes first, in the order given."""
    trials: list[Trial]
    sampled: dict[str, str] = field(default_factory=dict)
    """{key: its distribution as written}."""

    def identity(self) -> dict[str, Any]:
        """What sweep.json records and a rerun must match: the base config (less OPERATIONAL keys)
        and every trial's name and overrides."""
        flat = _flatten(self.base.to_dict())
        return {"name": self.name, "keys": self.keys, "sampled": self.sampled,
                "config": {k: v for k, v in flat.items() if not k.startswith(OPERATIONAL) and k not in OPERATIONAL},
                "trials": [{"name": t.name, "overrides": t.overrides} for t in self.trials]}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---------------------------------------------------------------------------------------------
# Parsing: 'key=v1,v2' and 'key=loguniform(a,b)'.

def split_values(text: str) -> list[str]:
    """'1e-3,3e-4' -> ['1e-3', '3e-4']; commas inside brackets or parentheses belong to a value:
    '[64],[128,64]' -> ['[64]', '[128,64]']."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return [p for p in parts if p]


def parse_value(key: str, raw: str) -> Any:
    """One value as `--set key=raw` reads it (YAML, plus Python numbers such as 3e-4)."""
    return _parse_override(f"{key}={raw}")[1]


def parse_axis(item: str, where: str) -> tuple[str, list[Any]]:
    """'train.lr=1e-3,3e-4' -> ('train.lr', [0.001, 0.0003])."""
    if "=" not in item:
        raise SweepError(f"{where} {item!r}: expected key=v1,v2,..., e.g. train.lr=1e-3,3e-4")
    key, raw = (s.strip() for s in item.split("=", 1))
    values = [parse_value(key, v) for v in split_values(raw)]
    if not values:
        raise SweepError(f"{where} {key}: the grid axis has no values; give e.g. {key}=a,b")
    dupes = sorted({json.dumps(v) for v in values if values.count(v) > 1})
    if dupes:
        raise SweepError(f"{where} {key}: value(s) {', '.join(dupes)} given twice")
    return key, values


@dataclass
class Distribution:
    kind: str
    args: list[Any]
    text: str

    def draw(self, rng: np.random.Generator) -> Any:
        if self.kind == "choice":
            return self.args[int(rng.integers(len(self.args)))]
        if self.kind == "randint":
            return int(rng.integers(self.args[0], self.args[1]))
        low, high = self.args
        value = math.exp(rng.uniform(math.log(low), math.log(high))) if self.kind == "loguniform" \
            else rng.uniform(low, high)
        return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def parse_sample(item: str, where: str) -> tuple[str, Distribution]:
    """'train.lr=loguniform(1e-4,3e-3)' -> ('train.lr', Distribution)."""
    if "=" not in item:
        raise SweepError(f"{where} {item!r}: expected key=loguniform(a,b), uniform(a,b), randint(a,b) or choice(...)")
    key, text = (s.strip() for s in item.split("=", 1))
    m = re.fullmatch(r"(\w+)\((.*)\)", text)
    if not m or m.group(1) not in DISTRIBUTIONS:
        raise SweepError(f"{where} {key}: {text!r} is not one of {', '.join(d + '(...)' for d in DISTRIBUTIONS)}")
    kind, args = m.group(1), [parse_value(key, a) for a in split_values(m.group(2))]
    if kind == "choice":
        if not args:
            raise SweepError(f"{where} {key}: choice() needs at least one value")
        return key, Distribution(kind, args, text)
    numeric = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if len(args) != 2 or not numeric or not args[0] < args[1]:
        raise SweepError(f"{where} {key}: {kind} takes two numbers low < high, got {text!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise SweepError(f"{where} {key}: loguniform needs low > 0, got {text!r}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise SweepError(f"{where} {key}: randint takes integers, got {text!r}")
    return key, Distribution(kind, args, text)


def merge_axes(config_items: list[str], cli_items: list[str]) -> list[str]:
    """The config's sweep.grid (or sweep.sample) with the command line's: a key given on both takes
    the command line's entry, in the config's place."""
    cli = {item.split("=", 1)[0].strip(): item for item in cli_items}
    merged = [cli.pop(item.split("=", 1)[0].strip(), item) for item in config_items]
    return merged + list(cli.values())


# ---------------------------------------------------------------------------------------------
# The trials.

def _format(value: Any) -> str:
    """A value as `--set` takes it back (JSON is YAML), used in overrides and trial names."""
    return json.dumps(value, separators=(",", ":"))


def trial_name(index: int, overrides: dict[str, Any]) -> str:
    """t003-lr=0.001-latent_dim=10: the index keeps it unique, the values make it readable."""
    parts = [f"{key.rsplit('.', 1)[-1]}={_format(value)}" for key, value in overrides.items()]
    slug = re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))
    if len(slug) > 80:  # long lists of values: a digest keeps names short and distinct
        slug = slug[:60] + "-" + hashlib.sha256(slug.encode()).hexdigest()[:8]
    return f"t{index:03d}" + (f"-{slug}" if slug else "")


def _absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    tree = json.loads(json.dumps(tree))
    for section, key in PATH_KEYS:
        value = tree.get(section, {}).get(key)
        if isinstance(value, str) and value:
            tree[section][key] = storage.absolute(value)
    return tree


def sweep_name(cfg: Config) -> str:
    return cfg.sweep.name or f"{cfg.output.run_name}-sweep"


def plan_sweep(cfg: Config) -> Sweep:
    """Every trial of the sweep cfg.sweep describes, each with its config built and checked: a key
    that does not exist, a value of the wrong type or out of range is an error naming the trial,
    the key and the value, before anything runs."""
    sc = cfg.sweep
    axes = [parse_axis(item, "sweep.grid") for item in sc.grid]
    samples = [parse_sample(item, "sweep.sample") for item in sc.sample]
    keys = [k for k, _ in axes] + [k for k, _ in samples]
    if not keys:
        raise SweepError("sweep: nothing to sweep; give --grid key=v1,v2 or --sample key=loguniform(a,b) "
                         "(or sweep.grid / sweep.sample in the config)")
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SweepError(f"sweep: {', '.join(twice)} both in the grid and sampled (or twice); sweep a key once")
    for key in keys:
        if key in RESERVED_KEYS or key.startswith("sweep."):
            raise SweepError(f"sweep: {key} cannot be swept; the sweep sets it for every trial")
    if sc.num_samples > 1 and not samples:
        raise SweepError(f"sweep.num_samples: {sc.num_samples} draws of nothing would repeat every grid point; "
                         "give --sample keys, or sweep train.seed in the grid")

    if sc.scheduler == "asha" and sc.asha_grace_epochs >= cfg.train.epochs and not any(
            k == "train.epochs" for k in keys):
        raise SweepError(f"sweep.asha_grace_epochs: {sc.asha_grace_epochs} must be fewer than train.epochs "
                         f"({cfg.train.epochs}); ASHA stops trials only before their last epoch")
    name = sweep_name(cfg)
    sweep_dir = storage.join(storage.absolute(cfg.output.storage_path), name)
    base_tree = _absolute_paths(cfg.to_dict())
    base = config_from_dict(base_tree)
    rng = np.random.default_rng(sc.seed)
    points = list(itertools.product(*[values for _, values in axes]))
    trials = []
    for draw in range(sc.num_samples):
        sampled = {key: dist.draw(rng) for key, dist in samples}
        for point in points:
            overrides = {**dict(zip([k for k, _ in axes], point)), **sampled}
            index = len(trials)
            tname = trial_name(index, overrides)
            items = [f"{k}={_format(v)}" for k, v in overrides.items()]
            try:
                trial_cfg = config_from_dict(base_tree, items + [f"output.storage_path={sweep_dir}",
                                                                 f"output.run_name={tname}"])
            except ConfigError as e:
                failing = str(e).split(":", 1)[0]
                where = "sweep.sample" if any(failing.startswith(k) for k, _ in samples) else "sweep.grid"
                raise SweepError(f"{where}: trial {tname} ({', '.join(items)}): {e}") from None
            trials.append(Trial(index, tname, overrides, trial_cfg))
    return Sweep(name, sweep_dir, base, keys, trials, {k: d.text for k, d in samples})


def with_cli(cfg: Config, grid: list[str] = (), sample: list[str] = (), **sweep_fields: Any) -> Config:
    """cfg with the command line's --grid / --sample merged into its sweep section, and other sweep
    fields set where given (not None)."""
    fields = {k: v for k, v in sweep_fields.items() if v is not None}
    try:
        sc = replace(cfg.sweep, grid=merge_axes(cfg.sweep.grid, list(grid)),
                     sample=merge_axes(cfg.sweep.sample, list(sample)), **fields)
    except ConfigError as e:
        raise SweepError(str(e)) from None
    return replace(cfg, sweep=sc)


# ---------------------------------------------------------------------------------------------
# The sweep directory: this sweep's, or nothing yet.

def read_identity(sweep_dir: str) -> dict[str, Any] | None:
    path = storage.join(sweep_dir, SWEEP_FILE)
    if not storage.exists(path):
        return None
    return storage.read_json_object(path, SweepError, "; it is not a vaedist sweep's record")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    if old.get("keys") != new["keys"] or old.get("sampled") != new["sampled"]:
        diffs.append(f"swept keys {old.get('keys')} {old.get('sampled') or ''} vs {new['keys']} {new['sampled'] or ''}")
    before = {t["name"]: t["overrides"] for t in old.get("trials", [])}
    after = {t["name"]: t["overrides"] for t in new["trials"]}
    if before != after:
        gone, added = sorted(set(before) - set(after)), sorted(set(after) - set(before))
        changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
        diffs.append("trials " + "; ".join(f"{what}: {', '.join(names[:4])}{' …' if len(names) > 4 else ''}"
                                           for what, names in (("only in the recorded sweep", gone),
                                                               ("only in this one", added), ("changed", changed))
                                           if names))
    config_old, config_new = old.get("config", {}), new["config"]
    for key in sorted(set(config_old) | set(config_new)):
        was, now = config_old.get(key, "<absent>"), config_new.get(key, "<absent>")
        if was != now:
            diffs.append(f"{key}: {was!r} recorded vs {now!r} now")
    return diffs


def check_identity(sweep: Sweep) -> bool:
    """True when the sweep directory already records this sweep (a resume), False when it is new or
    empty; a directory that holds another sweep's results (or anything else) is an error naming it."""
    recorded = read_identity(sweep.dir)
    if recorded is None:
        if storage.exists(sweep.dir) and storage.listdir(sweep.dir):
            raise SweepError(f"sweep directory {sweep.dir} exists and is not a vaedist sweep (no {SWEEP_FILE}); "
                             "choose another sweep name (--name / sweep.name)")
        return False
    diffs = _differences(recorded, json.loads(json.dumps(sweep.identity())))
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise SweepError(f"sweep directory {sweep.dir} holds another sweep's results ({shown}); choose another "
                         "sweep name (--name / sweep.name), or remove that directory to start over")
    return True


def write_identity(sweep: Sweep) -> None:
    storage.write_bytes(storage.join(sweep.dir, SWEEP_FILE),
                        (json.dumps(sweep.identity(), indent=2, sort_keys=True) + "\n").encode())
