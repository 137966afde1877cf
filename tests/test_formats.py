"""Every named dataset format: a file in its published shape, passed with dataset.path=,
trains the matching stage on the tiny model; the real samples in ../shared/data train too;
bad rows stop the run (or are skipped and counted)."""

import gzip
import json

import pytest
from conftest import SHARED_DATA, cli, train

QUESTIONS = [f"问题{i}：{i}加{i}等于几？" for i in range(12)]


def answer(i: int) -> str:
    return f"{i}加{i}等于{2 * i}。希望这个回答对你有帮助！"


def published_rows(name: str) -> list:
    """Rows in each dataset's published shape (field names exactly as the source spells them)."""
    pairs = [(q, answer(i), "不知道。") for i, q in enumerate(QUESTIONS)]
    if name in ("belle", "alpaca_zh"):
        return [{"instruction": q, "input": "" if i % 2 else "请写出算式", "output": good} for i, (q, good, _) in enumerate(pairs)]
    if name == "ultrafeedback_binarized":
        return [
            {
                "prompt": q,
                "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": good}],
                "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": bad}],
                "score_chosen": 8.0,
                "score_rejected": 2.0,
            }
            for q, good, bad in pairs
        ]
    if name == "ultrafeedback_argilla":
        return [{"instruction": q, "chosen_response": good, "rejected_response": bad} for q, good, bad in pairs]
    if name == "stack_exchange_paired":
        return [{"qid": i, "question": q, "response_j": good, "response_k": bad} for i, (q, good, bad) in enumerate(pairs)]
    if name == "hh_rlhf":
        history = "\n\nHuman: 你好\n\nAssistant: 你好！有什么可以帮你？"
        return [
            {"chosen": f"{history}\n\nHuman: {q}\n\nAssistant: {good}", "rejected": f"{history}\n\nHuman: {q}\n\nAssistant: {bad}"}
            for q, good, bad in pairs
        ]
    if name == "sharegpt_preference":  # half LLaMA-Factory ({from, value} answers), half MedicalGPT (strings)
        return [
            {
                "conversations": [{"from": "human", "value": q}],
                "chosen": {"from": "gpt", "value": good} if i % 2 else good,
                "rejected": {"from": "gpt", "value": bad} if i % 2 else bad,
            }
            for i, (q, good, bad) in enumerate(pairs)
        ]
    raise KeyError(name)


def write(path, rows, as_array: bool) -> None:
    if as_array:
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


SHORT_RUN = ("max_steps=2", "per_device_train_batch_size=4", "per_device_eval_batch_size=4", "max_length=96")


def stage_overrides(stage: str) -> list:
    return [f"stage={stage}", *(f"{stage}.{setting}" for setting in SHORT_RUN)]


@pytest.mark.parametrize(
    "name, stage, suffix",
    [
        ("belle", "sft", ".jsonl"),
        ("alpaca_zh", "sft", ".json"),
        ("ultrafeedback_binarized", "dpo", ".parquet"),
        ("ultrafeedback_argilla", "dpo", ".jsonl"),
        ("stack_exchange_paired", "dpo", ".jsonl"),
        ("hh_rlhf", "dpo", ".jsonl.gz"),
        ("sharegpt_preference", "dpo", ".json"),
    ],
)
def test_each_format_trains_its_stage(tmp_path, name, stage, suffix):
    rows = published_rows(name)
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    else:
        write(path, rows, as_array=suffix == ".json")
    metrics = train(tmp_path / "run", *stage_overrides(stage), f"dataset={name}", f"dataset.path={path}", "dataset.test_size=4")
    assert metrics["train_loss"] > 0 and "eval_loss" in metrics
    assert metrics["data/skipped_rows"] == 0


def test_a_directory_path_reads_the_files_of_the_split(tmp_path):
    rows = published_rows("ultrafeedback_binarized")
    write(tmp_path / "train_prefs-00000.jsonl", rows[:8], as_array=False)
    write(tmp_path / "test_prefs-00000.jsonl", [{"broken": True}], as_array=False)  # not read: another split
    metrics = train(
        tmp_path / "run", *stage_overrides("dpo"), "dataset=ultrafeedback_binarized", f"dataset.path={tmp_path}", "dataset.test_size=0"
    )
    assert metrics["train_loss"] > 0


SHARED = [
    ("hh_rlhf", "preference/hh-rlhf/helpful-base/test.jsonl.gz", "dpo"),
    ("belle", "sft_zh/belle/dev1K.json", "sft"),
    ("alpaca_zh", "sft_zh/llamafactory/alpaca_zh_demo.json", "sft"),
    ("sharegpt_preference", "preference/llamafactory/dpo_en_demo.json", "dpo"),
    ("sharegpt_preference", "preference/llamafactory/dpo_zh_demo.json", "dpo"),
    ("sharegpt_preference", "preference/medicalgpt/dpo_zh_500.jsonl", "dpo"),
]


@pytest.mark.parametrize("name, relative, stage", SHARED)
def test_real_published_samples_train(tmp_path, name, relative, stage):
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent (the real data lives in ../shared/data beside the checkout)")
    metrics = train(
        tmp_path,
        *stage_overrides(stage),
        f"{stage}.max_length=256",
        f"dataset={name}",
        f"dataset.path={path}",
        "dataset.max_samples=24",
        "dataset.test_size=4",
    )
    assert metrics["train_loss"] > 0
    assert "eval_loss" in metrics or metrics["data/dropped_rows"] >= 4  # eval rows too long are dropped, and counted


def test_pairs_too_long_for_max_length_are_counted_not_silently_dropped(tmp_path):
    rows = published_rows("sharegpt_preference")
    rows[0]["conversations"][0]["value"] = "很长的问题。" * 200
    rows[1]["conversations"][0]["value"] = "很长的问题。" * 200
    path = tmp_path / "long.json"
    write(path, rows, as_array=True)
    metrics = train(tmp_path / "run", *stage_overrides("dpo"), "dataset=sharegpt_preference", f"dataset.path={path}", "dataset.test_size=0")
    assert metrics["data/dropped_rows"] == 2


def test_real_hh_rlhf_quirks_are_reported_then_skipped(tmp_path):
    """Some published HH-RLHF rows have replies that differ before the last turn: by default
    the run names the first one; skip_invalid drops and counts them all."""
    path = SHARED_DATA / "preference/hh-rlhf/helpful-base/test.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    from conftest import compose_config

    from rlhf.data import load_splits
    from rlhf.errors import UserError

    cfg = compose_config("stage=dpo", "dataset=hh_rlhf", f"dataset.path={path}")
    with pytest.raises(UserError, match=r"test.jsonl.gz, line \d+: field"):
        load_splits(cfg.dataset, kind="preference")
    cfg = compose_config("stage=dpo", "dataset=hh_rlhf", f"dataset.path={path}", "dataset.skip_invalid=true")
    splits = load_splits(cfg.dataset, kind="preference")
    assert splits.skipped_rows > 0
    assert len(splits.train) + len(splits.eval) + splits.skipped_rows == sum(1 for _ in gzip.open(path, "rt"))


def malformed_belle_file(tmp_path):
    rows = published_rows("belle")
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[3] = '{"instruction": "坏行", "input": "", "output": null}'
    lines[7] = "{this is not json"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_malformed_file_fails_fast_with_file_line_and_reason(tmp_path):
    path = malformed_belle_file(tmp_path)
    done = cli("dataset=belle", f"dataset.path={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error == (
        f"error: {path}, line 4: field 'output' is null (format belle reads instruction, input, output "
        "(JSON Lines); dataset.skip_invalid=true skips such rows)"
    )
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_skip_invalid_trains_and_counts_the_skipped_rows(tmp_path):
    path = malformed_belle_file(tmp_path)
    metrics = train(
        tmp_path / "run",
        *stage_overrides("sft"),
        "dataset=belle",
        f"dataset.path={path}",
        "dataset.skip_invalid=true",
        "dataset.test_size=0",
    )
    assert metrics["data/skipped_rows"] == 2


@pytest.mark.slow
def test_identical_chosen_and_rejected_are_invalid_rows(tmp_path, capsys):
    """A typical conversion mistake: DPO would sit at log 2 and learn nothing, without a word."""
    pair = {"prompt": "今天天气怎么样？", "chosen": "晴天。", "rejected": "晴天。"}
    same = tmp_path / "same.jsonl"
    write(same, [pair] * 40, as_array=False)
    done = cli("stage=dpo", "dataset=builtin_preference", f"dataset.path={same}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {same}, line 1:") and "identical" in error

    with pytest.raises(SystemExit):
        train(tmp_path / "skipping", "stage=dpo", f"dataset.path={same}", "dataset.skip_invalid=true")
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no valid rows to train on (40 invalid rows skipped: 40 x the chosen and rejected answers are identical)" in error

    mixed = tmp_path / "mixed.jsonl"
    write(mixed, [pair] * 5 + [{**pair, "rejected": f"不知道{i}。"} for i in range(20)], as_array=False)
    metrics = train(tmp_path / "rest", *stage_overrides("dpo"), f"dataset.path={mixed}", "dataset.skip_invalid=true", "dataset.test_size=0")
    assert metrics["data/skipped_rows"] == 5


def test_trl_conversational_rows_read_as_their_plain_twins():
    """TRL's conversational preference and prompt-completion rows give the records their plain-string
    forms give; `messages` splits off the last (assistant) turn."""
    from rlhf.data.formats import FORMATS

    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    plain = FORMATS["preference"].convert({"prompt": "2+2?", "chosen": "4.", "rejected": "5."})
    conversational = FORMATS["preference"].convert(
        {"prompt": user, "chosen": [{"role": "assistant", "content": "4."}], "rejected": [{"role": "assistant", "content": "5."}]}
    )
    assert conversational == {**plain, "prompt": user}
    assert plain["prompt"] == [{"role": "user", "content": "2+2?"}]
    completion = {"role": "assistant", "content": "4."}
    assert FORMATS["prompt_completion"].convert({"prompt": user, "completion": [completion]}) == {
        "prompt": user,
        "completion": [completion],
    }
    assert FORMATS["messages"].convert({"messages": [*user, completion]}) == {"prompt": user, "completion": [completion]}


@pytest.mark.parametrize(
    "fmt, row, reason",
    [
        (
            "preference",
            {"prompt": [{"role": "assistant", "content": "hi"}], "chosen": "a", "rejected": "b"},
            "should end with the user's turn",
        ),
        ("preference", {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "list of one assistant message"),
        ("messages", {"messages": [{"role": "user", "content": "q"}]}, "should end with an assistant message"),
    ],
)
def test_conversational_rows_of_the_wrong_shape_are_refused_with_the_reason(fmt, row, reason):
    from rlhf.data.formats import FORMATS, RowError

    with pytest.raises(RowError, match=reason):
        FORMATS[fmt].convert(row)


@pytest.mark.slow
def test_a_row_of_another_format_names_the_format_that_reads_it(tmp_path):
    """A conversational SFT file given the default (belle) format: the error names dataset.format=messages,
    not skip_invalid, which would drop every row."""
    path = tmp_path / "chat.jsonl"
    write(path, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 4, as_array=False)
    done = cli(f"dataset.path={path}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {path}, line 1: field 'instruction' is missing "
        "(format belle reads instruction, input, output (JSON Lines); the row reads as dataset.format=messages)"
    )
