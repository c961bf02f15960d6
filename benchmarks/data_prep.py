"""Time data preparation (validate → Arrow → tokenize with loss masks → pack) on a real file.

    python benchmarks/data_prep.py ../shared/data/alpaca --adapter alpaca [--num-proc 2]

Runs twice: the first pass fills the `datasets` cache, the second shows what a re-run costs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source")
    parser.add_argument("--adapter", default="alpaca")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args()
    # A fresh datasets cache, so the first pass measures real work (set before datasets is imported).
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="tunelab-bench-")

    from tunelab.config import load_config
    from tunelab.data.prepare import prepare
    from tunelab.models.build import load_tokenizer
    from tunelab.models.loading import resolve

    tokenizer = load_tokenizer(resolve("embedded"))
    cfg = load_config(None, [f"data.format={args.adapter}", f"data.source={args.source}", "data.bad_rows=skip",
                             f"data.max_length={args.max_length}", f"data.num_proc={args.num_proc or os.cpu_count()}"])
    for label in ("first run", "cached re-run"):
        start = time.time()
        data = prepare(cfg.data, tokenizer, cfg.run.seed)
        print(json.dumps({"pass": label, "seconds": round(time.time() - start, 1), "cpus": os.cpu_count(),
                          **{k: data.stats[k] for k in ("train_samples", "dropped", "train_tokens", "train_rows",
                                                        "packing_efficiency")}}))


if __name__ == "__main__":
    main()
