"""Experiment library: run specs × seeds, records, statistics, tables, plots.

The drivers in `experiments/` (compare_routers.py, compare_balance.py,
probmoe_report.py, mod_report.py, dit_compare.py, bench_router.py) build on
it:
  specs    `[LABEL=]ROUTER[,FLAG=VALUE...]` run specs and seed lists;
  runner   shared flags (seeds, out, workroot, compile cache), workdirs, JSON
           records, the seed-major run loop that skips recorded runs, and
           `train_record` (one run trained, timed, its metrics log read);
  stats    mean ± std over seeds, paired same-seed differences, `tail_mean`
           of a logged metric;
  tables   markdown tables (`paired_table`: same-seed differences);
  plots    headless matplotlib figures;
  timing   wall-clock timing of jitted calls for bench_*.py: interleaved
           rounds over variants (`interleaved`), `time_calls`, `timed`, and
           the shared `--repeats` / `--warmup` flags.

Axis legend: none (configuration, records and per-seed scalars).
"""
from moejax.experiment import plots, timing
from moejax.experiment.runner import (TrainedRun, base_values, define_flags,
                                      history, load_json, load_module,
                                      load_records, record_path, run_grid,
                                      run_name, save_json, seeds_flag, start,
                                      train_record, use_compile_cache, workdir)
from moejax.experiment.specs import (RunSpec, flag_parser, parse_runs,
                                     parse_seeds, parse_value)
from moejax.experiment.stats import (by_seed, format_ms, format_values,
                                     mean_std, paired_delta, tail_mean)
from moejax.experiment.tables import markdown_table, paired_table

__all__ = [
    "RunSpec", "TrainedRun", "base_values", "by_seed", "define_flags",
    "flag_parser", "format_ms", "format_values", "history", "load_json",
    "load_module", "load_records", "markdown_table", "mean_std",
    "paired_delta", "paired_table", "parse_runs", "parse_seeds", "parse_value", "plots",
    "record_path", "run_grid", "run_name", "save_json", "seeds_flag", "start",
    "tail_mean", "timing", "train_record", "use_compile_cache", "workdir",
]
