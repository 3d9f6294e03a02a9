"""Which config a run uses: the built-in demo, or the user's.

Snakemake merges ``--configfile`` files over the Snakefile's ``config.yaml`` key
by key, so a user's config that lists its own datasets would keep the demo's
beside them, and the demo's small sizes (6 epochs, 2 mm registration) with
them. A command-line config that names ``datasets`` therefore replaces
``config.yaml`` whole: the run is the user's config over the schema's
documented defaults (the paper's values), and says so in its first line.
"""

from __future__ import annotations

import copy
from collections.abc import MutableMapping, Sequence
from typing import Any

DEMO_CONFIG = "config.yaml"


def use_config_in_effect(
    config: MutableMapping[str, Any],
    cli_files: Sequence[str],
    cli_config: dict[str, Any] | None,
    loaded: Sequence[str] = (),
) -> str:
    """Replace ``config`` (in place) by the command line's when one of its config
    files names ``datasets``; return the line that says what is in effect.

    ``cli_files``: the ``--configfile`` paths; ``cli_config``: what Snakemake
    merged from them and ``--config`` (``workflow.config_settings.overwrite_config``);
    ``loaded``: every config file Snakemake read (``workflow.configfiles``: without
    ``config.yaml`` when the working directory has none).
    """
    import yaml

    from medtx.errors import ConfigError

    own = []
    for path in cli_files:
        try:
            data = yaml.safe_load(open(path)) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read the config file ({err})") from err
        if isinstance(data, dict) and "datasets" in data:
            own.append(str(path))
    if own:
        config.clear()
        config.update(copy.deepcopy(cli_config or {}))
        files = ", ".join(map(str, cli_files))
        how = f"{files} ({', '.join(own)} names its datasets: the demo's {DEMO_CONFIG} is not used)"
    else:
        demo = [DEMO_CONFIG] if DEMO_CONFIG in map(str, loaded) else []
        how = ", ".join([*demo, *map(str, cli_files)]) or "none (schema defaults)"
    datasets = ", ".join(config.get("datasets") or {}) or "none"
    return f"medtx: config {how}; datasets: {datasets}"
