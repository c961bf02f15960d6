"""What `tunelab train` prints: the run folder first, one line per log step, no library noise unless -v."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

NOISE = ("FutureWarning", "DeprecationWarning", "UserWarning", "No module named 'kernels'", "{'loss'",
         "save_embedding_layers", "absl")


@pytest.fixture(scope="module")
def train_output(tmp_path_factory, tiny_model_dir, task_dir) -> str:
    tmp = tmp_path_factory.mktemp("terminal")
    recipe = tmp / "tiny.yaml"
    recipe.write_text(
        f"model: {{name: {tiny_model_dir}}}\n"
        f"data: {{format: custom, fields: {{messages: messages}}, source: {task_dir}, max_length: 256,\n"
        "       max_train_samples: 16, max_eval_samples: 4}\n"
        "train: {batch_size: 2, max_steps: 4, logging_steps: 2, eval_every: 4}\n"
        "eval: {generation_samples: 1, max_new_tokens: 2}\n"
        f"run: {{dir: {tmp / 'run'}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRANSFORMERS_VERBOSITY", "WANDB_MODE")}  # a shell's
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", str(recipe)], cwd=tmp, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env)  # one stream, in the order printed
    assert done.returncode == 0, done.stdout
    return done.stdout


def test_no_library_warnings_by_default(train_output):
    for noise in NOISE:
        assert noise not in train_output


def test_the_run_folder_comes_first_and_each_log_step_is_one_line(train_output):
    lines = [line for line in re.split(r"[\r\n]", train_output) if line.strip()]
    assert lines[0].startswith("run folder: ") and lines[0].endswith("/run")
    steps = [line for line in lines if re.match(r"step \d+/4 ", line)]
    assert [line.split()[1] for line in steps if "loss" in line and "validation" not in line] == ["2/4", "4/4"]
    assert re.search(r"step 2/4 +loss \d+\.\d+ +lr [\d.e+-]+ +[\d,]+ tok/s +ETA \d+:\d\d", train_output)
    assert re.search(r"step 4/4 +validation loss \d+\.\d+", train_output)


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_shows_library_warnings(verbose):
    code = ("from tunelab.cli import _quiet_libraries; import logging, warnings; "
            f"_quiet_libraries({verbose}); "
            "warnings.warn_explicit('old api', FutureWarning, 'x.py', 1, module='transformers.modeling_utils'); "
            "logging.getLogger('bitsandbytes.backends').warning('no kernels')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert ("old api" in err and "no kernels" in err) == verbose
