"""The run plot (WORKDIR/run.png): a title naming the run, the mean fanout
drawn over the target line, legends outside the curves."""
import matplotlib

matplotlib.use("Agg")

from moejax.train import metrics  # noqa: E402


def _records():
  records = [{"step": 0, "routing": {"router": "dtop_p", "k": 2, "p": 0.5}}]
  for step in range(1, 30):
    records.append({"step": step, "loss": 5.0 - 0.1 * step,
                    "experts_per_token": 2.0, "kept_per_token": 1.9,
                    "layer_fanout": [2.0, 2.0], "drop_fraction": 0.05,
                    "max_vio": 0.3})
  records.append({"step": 29, "eval_loss": 2.5})
  return records


def test_run_figure_title_zorder_and_legends(tmp_path):
  fig = metrics.run_figure(_records(), target_fanout=2.0,
                           title="runs/dtop_p")
  fig.canvas.draw()
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert "runs/dtop_p" in title and "dtop_p k=2 p=0.5" in title
  fanout_ax = fig.axes[1]
  lines = {l.get_label(): l for l in fanout_ax.get_lines()}
  assert lines["mean fanout"].get_zorder() > lines["target"].get_zorder()
  renderer = fig.canvas.get_renderer()
  for ax in fig.axes:
    legend = ax.get_legend()
    assert legend is not None
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_ylabel()
  path = metrics.plot_run(_records(), str(tmp_path / "run.png"), 2.0)
  assert (tmp_path / "run.png").stat().st_size > 0 and path.endswith("run.png")


def _assert_legends_outside(fig, count):
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  legends = [(ax, ax.get_legend()) for ax in fig.axes if ax.get_legend()]
  assert len(legends) == count
  for ax, legend in legends:
    box = legend.get_window_extent(renderer)
    assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()


def test_dtop_p_report_figure_legends_below_the_curves():
  """experiments/dtop_p_plots.py: each panel's legend under it (the twin
  axis' p curve in panel (b)'s legend too)."""
  import os
  from moejax.experiment import load_module
  plots = load_module(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), "experiments", "dtop_p_plots.py"))

  def run(n, **extra):
    return {"history": [{"step": s, "loss": 1.0,
                         "experts_per_token": 4.0 + (s % 10) / 100,
                         "p": 0.5 + 0.4 * s / n, **extra}
                        for s in range(5, n + 1, 5)]}

  runs = {(label, seed): run(600) for seed in (0, 1)
          for label in ("dtop_p_global", "dtop_p_pinit0.9")}
  runs.update({("dtop_p_layer", s): run(600, p_layer=[0.5, 0.7, 0.9])
               for s in (0, 1)})
  runs[("dtop_p_2000", 1)] = run(2000)
  fig = plots.controller_figure(runs)
  _assert_legends_outside(fig, 3)
  labels = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
  assert labels == ["mean fanout (every 5th step)", "p"]
