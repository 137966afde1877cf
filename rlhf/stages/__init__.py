"""The stages: a module here, named as `stage=<name>` selects it, defines

    run(context: rlhf.context.RunContext) -> dict   # trains, saves <context.run_dir>/final, returns final metrics

Adding a stage takes that module, its `conf/stage/<name>.yaml` (and `conf/<name>/` settings) and
its entry in rlhf.registry.STAGES. `chain` runs other stages as steps (rlhf/chain.py); it has an
entry too. Importing this package imports no stage module (and so no torch).
"""

import importlib

from rlhf.errors import UserError
from rlhf.registry import STAGES, available_stages


def get_stage(name: str):
    """The `run` function of stage `name`; an unknown name lists the valid ones. (`chain` runs
    through rlhf.chain, which needs the run machinery: rlhf.command dispatches it.)"""
    if name not in STAGES or STAGES[name].steps:
        raise UserError(f"stage={name} is not a stage; valid stages: {', '.join(available_stages())}")
    return importlib.import_module(f"{__name__}.{name}").run
