"""k-fold: folds partition the training data (seeded, no leaks), the grid × folds runs aggregate
correctly, a killed k-fold resumes without retraining finished folds, and bad settings fail first."""

from __future__ import annotations

import json
from statistics import fmean, stdev

import pytest
from datasets import Dataset, DatasetDict

from tunelab.config import DataConfig, build_config, load_config
from tunelab.data.prepare import split
from tunelab.errors import TunelabError
from tunelab.stages import kfold, sft
from tunelab.tracking.report import format_kfold
from tunelab.tracking.status import CHECKPOINT_DONE


def _ids(n: int) -> Dataset:
    return Dataset.from_dict({"id": list(range(n))})


def _folds(n: int, k: int, seed: int, **data) -> list[tuple[list, list, list]]:
    """(train ids, validation ids, test ids) of each fold; the source's own validation split (-1) must be ignored."""
    examples = DatasetDict({"train": _ids(n), "validation": Dataset.from_dict({"id": [-1]}),
                            "test": Dataset.from_dict({"id": [-2]})})
    out = []
    for i in range(k):
        train, validation, test = split(examples, DataConfig(folds=k, fold=i, **data), seed)
        out.append((list(train["id"]), list(validation["id"]), list(test["id"])))
    return out


@pytest.mark.parametrize(("n", "k"), [(23, 4), (10, 2), (5, 5)])
def test_folds_partition_the_shuffled_training_data(n, k):
    folds = _folds(n, k, seed=3)
    validations = [v for _, v, _ in folds]
    # contiguous parts of the seeded shuffle, in order: their union is all of it, each row once
    assert sum(validations, []) == list(_ids(n).shuffle(seed=3)["id"])
    assert sorted(sum(validations, [])) == list(range(n))
    assert max(map(len, validations)) - min(map(len, validations)) <= 1
    for train, validation, test in folds:
        assert sorted(train + validation) == list(range(n)) and not set(train) & set(validation)
        assert test == [-2]


def test_sample_limits_apply_within_the_fold():
    (full_train, full_val, _), = _folds(20, 4, seed=0)[1:2]
    (train, val, _), = _folds(20, 4, seed=0, max_train_samples=5, max_eval_samples=2)[1:2]
    assert len(train) == 5 and set(train) <= set(full_train)
    assert len(val) == 2 and set(val) <= set(full_val)


def test_folds_follow_the_seed():
    assert _folds(20, 4, seed=0) == _folds(20, 4, seed=0)
    assert _folds(20, 4, seed=0) != _folds(20, 4, seed=1)


def test_too_few_rows_for_the_folds():
    with pytest.raises(TunelabError, match="data.folds=4: the training split has only 3 rows"):
        _folds(3, 4, seed=0)


BASE = ["data.format=samsum", "data.source=x"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.folds=1", "data.fold=0"], "data.folds: Input should be greater than or equal to 2"),
    (["data.folds=3", "data.fold=3"], "data.fold: got 3; must be below data.folds=3"),
    (["data.fold=0"], "data.fold: data.folds and data.fold are set together"),
    (["sweep={peft.rank: [8, 16]}"], "sweep.peft.rank: unknown key"),
    (["sweep={peft.r.x: [8]}"], "sweep.peft.r.x: unknown key"),
    (["sweep={data.fold: [0, 1]}"], "sweep.data.fold: set by tunelab kfold itself"),
    (["sweep={train.lr: []}"], "sweep.train.lr: List should have at least 1 item"),
])
def test_config_errors_name_the_field(overrides, message):
    with pytest.raises(TunelabError, match=message):
        load_config(None, BASE + overrides)


def test_sweep_accepts_nested_and_optional_sections():
    cfg = load_config(None, BASE + ["sweep={peft.r: [8, 16], train.early_stopping.patience: [1, 2]}"])
    assert kfold.grid(cfg.sweep) == [
        {"peft.r": 8, "train.early_stopping.patience": 1}, {"peft.r": 8, "train.early_stopping.patience": 2},
        {"peft.r": 16, "train.early_stopping.patience": 1}, {"peft.r": 16, "train.early_stopping.patience": 2},
    ]


def test_fold_config_sets_the_fold_its_folder_and_resumes_a_checkpoint(tmp_path):
    cfg = load_config(None, BASE + [f"run.dir={tmp_path}", "run.name=x", "sweep={peft.r: [8, 16]}"])
    checkpoint = tmp_path / "peft.r=8" / "fold-1" / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / CHECKPOINT_DONE).write_text('{"step": 2, "time": 0}')  # complete (a cut-short one is not resumed)
    fold = kfold.fold_config(cfg, {"peft.r": 8}, 3, 1, tmp_path)
    assert (fold.data.folds, fold.data.fold, fold.peft.r, fold.sweep) == (3, 1, 8, None)
    assert fold.run.path == tmp_path / "peft.r=8" / "fold-1" and fold.run.name == "x-peft.r=8-fold-1"
    assert fold.train.resume  # a killed fold continues from its checkpoint
    assert not kfold.fold_config(cfg, {"peft.r": 8}, 3, 0, tmp_path).train.resume


def test_aggregate_and_best_point():
    folds = [{"loss": 1.0, "rouge_l": 0.2}, {"loss": 3.0, "rouge_l": None}]
    agg = kfold.aggregate(folds)
    assert agg["loss"] == {"folds": [1.0, 3.0], "mean": 2.0, "std": stdev([1.0, 3.0])}
    assert agg["rouge_l"] == {"folds": [0.2, None], "mean": None, "std": None}  # no mean of a partial set
    points = [{"name": n, "params": {}, "after": kfold.aggregate(f)} for n, f in [
        ("a", [{"loss": 1.0, "exact_match": 0.5}, {"loss": 1.2, "exact_match": 0.7}]),
        ("b", [{"loss": 0.9, "exact_match": 0.1}, {"loss": 1.1, "exact_match": 0.3}]),
    ]]
    assert kfold.best_point(points, "loss")["name"] == "b"  # lower is better
    assert kfold.best_point(points, "exact_match")["name"] == "a"  # higher is better
    assert kfold.best_point(points, "rouge_l") is None


# ---- end to end on a tiny random Llama ----


def _cfg(folder, model_dir, task_dir, *overrides):
    return load_config(None, [
        f"model.name={model_dir}", f"data.source={task_dir}", "data.fields={messages: messages}",
        f"run.dir={folder}", "data.max_length=256", "data.max_train_samples=16", "data.max_eval_samples=4",
        "train.batch_size=2", "train.max_steps=2", "eval.generation_samples=2", "eval.max_new_tokens=4",
        *overrides,
    ])


def _run(cfg, folds: int, metric: str) -> dict:
    """`tunelab kfold --folds N --metric M`: the k-fold settings are config keys."""
    data = cfg.model_dump()
    data["kfold"] = {"folds": folds, "metric": metric}
    return kfold.run(build_config(data)).summary


def test_bad_settings_are_refused_before_training(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    monkeypatch.setattr(sft, "run", lambda cfg: pytest.fail("trained before checking"))
    cfg = _cfg(tmp_path / "k", tiny_model_dir, task_dir)
    allowed = "loss, perplexity, exact_match, rouge_l"
    with pytest.raises(TunelabError, match=f"--metric: got 'bleu'; the runs produce {allowed}"):
        _run(cfg, 2, "bleu")
    with pytest.raises(TunelabError, match="kfold.folds: Input should be greater than or equal to 2"):
        _run(cfg, 1, "loss")
    bad_point = _cfg(tmp_path / "k", tiny_model_dir, task_dir, "sweep={peft.r: [8, 0]}")
    with pytest.raises(TunelabError, match=r"grid point peft.r=0, fold 0.*\n.*peft.r: Input should be greater"):
        _run(bad_point, 2, "loss")
    same_folder = _cfg(tmp_path / "k", tiny_model_dir, task_dir, "sweep={peft.target_modules: [[q_proj], q_proj]}")
    with pytest.raises(TunelabError, match="two grid points get the same folder name"):
        _run(same_folder, 2, "loss")


@pytest.fixture(scope="module")
def sweep_result(tmp_path_factory, tiny_model_dir, task_dir):
    folder = tmp_path_factory.mktemp("kfold") / "sweep"
    cfg = _cfg(folder, tiny_model_dir, task_dir, "sweep={train.lr: [1.0e-6, 3.0e-3]}")
    return folder, _run(cfg, 2, "loss")


def test_sweep_times_folds_aggregates_every_metric(sweep_result):
    folder, result = sweep_result
    runs = {p.parent.relative_to(folder).as_posix() for p in folder.glob("*/*/summary.json")}
    assert runs == {"train.lr=1e-06/fold-0", "train.lr=1e-06/fold-1", "train.lr=0.003/fold-0", "train.lr=0.003/fold-1"}
    assert json.loads((folder / "kfold.json").read_text()) == result
    for point in result["points"]:
        summaries = [json.loads((folder / run / "summary.json").read_text()) for run in point["runs"]]
        for when in ("before", "after"):
            for metric in ("loss", "perplexity", "exact_match", "rouge_l"):
                values = [s["eval"][when][metric] for s in summaries]
                got = point[when][metric]
                assert got["folds"] == values
                assert got["mean"] == pytest.approx(fmean(values)) and got["std"] == pytest.approx(stdev(values))
    # the folds differ in data, the grid points only in the learning rate
    fold_losses = result["points"][0]["before"]["loss"]["folds"]
    assert fold_losses[0] != fold_losses[1]
    assert result["points"][0]["before"] == result["points"][1]["before"]
    means = {p["name"]: p["after"]["loss"]["mean"] for p in result["points"]}
    assert result["best"]["name"] == min(means, key=means.get) == "train.lr=0.003"


def test_kfold_reports(sweep_result):
    folder, result = sweep_result
    table = format_kfold(result)
    assert "2-fold cross-validation" in table and "best by mean loss (lower is better): train.lr=0.003" in table
    assert table.count("fold-1") == 2 and " ± " in table
    html = (folder / "kfold.html").read_text()
    assert "<script" not in html and "train.lr=0.003/fold-1/report.html" in html
    assert "train.lr=1e-06" in html and "Sweep" in html


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the stack handles it."""


def test_killed_kfold_resumes_and_retrains_only_unfinished_folds(tmp_path, tiny_model_dir, task_dir, monkeypatch):
    from tunelab.trainer import TunelabTrainer

    folder = tmp_path / "k"
    step = TunelabTrainer.training_step

    def dies_in_fold_1(self, *args, **kwargs):
        if "fold-1" in self.args.output_dir:
            raise Killed
        return step(self, *args, **kwargs)

    monkeypatch.setattr(TunelabTrainer, "training_step", dies_in_fold_1)
    with pytest.raises(Killed):
        _run(_cfg(folder, tiny_model_dir, task_dir), 2, "rouge_l")
    monkeypatch.setattr(TunelabTrainer, "training_step", step)
    assert (folder / "fold-0" / "summary.json").is_file() and not (folder / "fold-1" / "summary.json").exists()

    trained, real_run = [], sft.run
    monkeypatch.setattr(sft, "run", lambda cfg: trained.append(cfg.run.path.name) or real_run(cfg))
    first = _run(_cfg(folder, tiny_model_dir, task_dir), 2, "rouge_l")
    assert trained == ["fold-1"]
    steps = [r["step"] for r in map(json.loads, (folder / "fold-1" / "metrics.jsonl").read_text().splitlines())]
    assert steps.count(0) == 1  # the killed attempt's lines are gone, not duplicated
    again = _run(_cfg(folder, tiny_model_dir, task_dir), 2, "rouge_l")
    assert trained == ["fold-1"] and again == first
    assert first["points"][0]["runs"] == ["fold-0", "fold-1"] and first["best"]["name"] == kfold.NO_SWEEP

    with pytest.raises(TunelabError, match="holds a run of a different config"):
        _run(_cfg(folder, tiny_model_dir, task_dir, "train.lr=1e-3"), 2, "rouge_l")
