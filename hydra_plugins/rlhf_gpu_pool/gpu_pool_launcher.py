"""`hydra/launcher=gpu_pool`: a sweep's jobs in parallel, one job per device, each job seeing
only its own device through CUDA_VISIBLE_DEVICES.

Hydra's basic launcher runs jobs one at a time, and the joblib launcher reuses its worker
processes, so a worker that has initialised CUDA on one GPU cannot move to another. Here every
job runs as Hydra's launchers run one (`hydra.core.utils.run_job` with the job's sweep config)
but in a fresh process, started after it has taken a free device from the pool and set
CUDA_VISIBLE_DEVICES; it hands the device back when it ends. At most len(devices) jobs run at
once.

`hydra.launcher.devices`: the device ids to share out (default: every visible GPU). Without a
list and without a GPU the jobs run one at a time, and a log line says so. A list on a machine
without GPUs still assigns the variable (each job's env.json records it), which is how the
tests check the pool on a CPU.
"""

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import open_dict

log = logging.getLogger(__name__)


@dataclass
class GPUPoolLauncherConf:
    _target_: str = "hydra_plugins.rlhf_gpu_pool.gpu_pool_launcher.GPUPoolLauncher"
    devices: list | None = None  # device ids to share out; None = every visible GPU


ConfigStore.instance().store(group="hydra/launcher", name="gpu_pool_schema", node=GPUPoolLauncherConf, provider="rlhf")


class GPUPoolLauncher(Launcher):
    def __init__(self, devices=None) -> None:
        self.devices = None if devices is None else [str(device) for device in devices]
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides, initial_job_idx: int) -> list:
        # Imported here, not at the top: Hydra imports every plugin module on every command, and a
        # plain install without the [cluster] extra must stay quiet (rlhf.extras names it up front).
        import cloudpickle  # pickles the task function of train.py by value, as the joblib launcher does

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        devices = self.devices if self.devices is not None else visible_gpus()
        if not devices:
            log.info("gpu_pool: no GPU visible and no hydra.launcher.devices given: the jobs run one at a time")
        log.info(f"gpu_pool: {len(job_overrides)} jobs on devices {devices or 'none'}, at most {max(1, len(devices))} at once")
        for index, overrides in enumerate(job_overrides):
            log.info(f"\t#{initial_job_idx + index} : {' '.join(filter_overrides(overrides))}")
        context = multiprocessing.get_context("spawn")  # a fresh interpreter per job: CUDA starts on its device
        with context.Manager() as manager:
            pool = manager.Queue()
            for device in devices or [None]:
                pool.put(device)
            with ProcessPoolExecutor(max_workers=max(1, len(devices)), mp_context=context, max_tasks_per_child=1) as executor:
                state = Singleton.get_state()
                futures = [
                    # cloudpickle (as the joblib launcher uses): the task function lives in train.py's __main__
                    executor.submit(run_on_a_device, pool, cloudpickle.dumps(job))
                    for job in (
                        (initial_job_idx + index, list(overrides), self.hydra_context, self.config, self.task_function, state)
                        for index, overrides in enumerate(job_overrides)
                    )
                ]
                return [future.result() for future in futures]


def visible_gpus() -> list:
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def run_on_a_device(pool, job: bytes) -> JobReturn:
    """One job in this (fresh) process, on a device taken from the pool and given back after."""
    import cloudpickle

    index, overrides, hydra_context, config, task_function, singleton_state = cloudpickle.loads(job)
    device = pool.get()
    try:
        if device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        setup_globals()
        Singleton.set_state(singleton_state)
        sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{index}"
            sweep_config.hydra.job.num = index
        HydraConfig.instance().set_config(sweep_config)
        return run_job(
            hydra_context=hydra_context,
            config=sweep_config,
            task_function=task_function,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    finally:
        pool.put(device)
