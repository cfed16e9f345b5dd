"""Experiment library: run specs × seeds, records, statistics, tables, plots.

The drivers in `experiments/` (compare_routers.py, compare_balance.py,
probmoe_report.py, mod_report.py, dit_compare.py, bench_router.py) build on
it:
  specs    `[LABEL=]ROUTER[,FLAG=VALUE...]` run specs and seed lists;
  runner   shared flags (seeds, out, workroot, compile cache), workdirs, JSON
           records and the seed-major run loop that skips recorded runs;
  stats    mean ± std over seeds, paired same-seed differences, `tail_mean`
           of a logged metric;
  tables   markdown tables;
  plots    headless matplotlib figures;
  timing   wall-clock timing of jitted calls (`time_calls`) for bench_*.py.

Axis legend: none (configuration, records and per-seed scalars).
"""
from moejax.experiment import plots, timing
from moejax.experiment.runner import (base_values, define_flags, load_json,
                                      load_module, load_records, record_path,
                                      run_grid, run_name, save_json,
                                      seeds_flag, start, use_compile_cache,
                                      workdir)
from moejax.experiment.specs import (RunSpec, flag_parser, parse_runs,
                                     parse_seeds, parse_value)
from moejax.experiment.stats import (by_seed, format_ms, format_values,
                                     mean_std, paired_delta, tail_mean)
from moejax.experiment.tables import markdown_table

__all__ = [
    "RunSpec", "base_values", "by_seed", "define_flags", "flag_parser",
    "format_ms", "tail_mean",
    "format_values", "load_json", "load_module", "load_records", "markdown_table",
    "mean_std", "paired_delta", "parse_runs", "parse_seeds", "parse_value", "record_path",
    "run_grid", "run_name", "save_json", "seeds_flag", "start", "use_compile_cache",
    "plots", "timing", "workdir",
]
