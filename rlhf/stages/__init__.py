"""The stages. Each module here is one stage, named as `stage=<module>` selects it, and defines

    run(cfg, run_dir: pathlib.Path) -> dict   # trains, saves <run_dir>/final, returns final metrics

Adding a stage takes this module and its `conf/stage/<name>.yaml`; nothing else lists stages.
"""

import importlib
import pkgutil

from rlhf.errors import UserError


def available_stages() -> list:
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def get_stage(name: str):
    """The `run` function of stage `name`; an unknown name lists the valid ones."""
    if name not in available_stages():
        raise UserError(f"stage={name} is not a stage; valid stages: {', '.join(available_stages())} (and chain, which runs several)")
    return importlib.import_module(f"{__name__}.{name}").run
