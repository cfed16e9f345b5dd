"""moejax and MaxText compiled ahead of time for the same TPU slice, mesh,
shape and batch: per-chip memory, XLA's FLOPs and bytes, and a roofline step.

Axis legend:
  L  layers (depth)
  E  experts
  D  model width

Run from a Python 3.12 virtual environment that has MaxText from PyPI (a peer
to measure against, never a dependency of moejax; the set-up is in
experiments/reports/tpu_peer.md), with this repository on PYTHONPATH, so that
both libraries compile with the same jax and libtpu:

  PYTHONPATH=. ~/venv-maxtext/bin/python experiments/peer_maxtext_aot.py \
      --topology=v5p-64 --remat=full,selective,none \
      --out=experiments/reports/tpu_peer.json \
      --markdown=experiments/reports/tpu_peer.md

Each row is one (library, slice, mesh, remat) compiled at 1 and 2 layers
(each compile in its own process, niced) and extrapolated linearly to the
shape's depth (the blocks are identical; MaxText with `scan_layers=false`, so
XLA counts every layer). Compiles are cached in the JSON (`compiles`, keyed by
their spec): a rerun compiles only what is missing (`--recompile` to redo).

The roofline, per chip: step = max(XLA FLOPs / peak FLOP/s, XLA bytes
accessed / HBM bandwidth, ICI traffic / ICI bandwidth) (`moejax.aot`).

MaxText settings for a like-for-like compare: its `mixtral` decoder block
(MoE in every layer), `attention=dot_product` (its default flash kernel is a
custom call XLA does not count), `scan_layers=false`, the capacity path
(`sparse_matmul=false`, `megablox=false`, `capacity_factor`), no dropout.
`remat_policy=none` on MaxText's command line is parsed to None, which its
unrolled decoder treats as full remat: the string is set back after parsing.
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

# The script's parts, beside it (experiments/ is not a package): peer_shapes
# (shapes, remat settings, layouts), peer_hlo (reading a compiled step),
# peer_moejax and peer_maxtext (each library's compile), peer_report (rows,
# tables, the report).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
  sys.path.insert(0, _HERE)

# pylint: disable=g-import-not-at-top,wrong-import-position
from peer_hlo import versions, largest_instructions  # noqa: E402,F401
from peer_maxtext import (  # noqa: E402,F401
    compile_maxtext, maxtext_argv, maxtext_mesh)
from peer_moejax import compile_moejax, moejax_config  # noqa: E402,F401
from peer_report import (  # noqa: E402,F401
    NOTES_MARK, extrapolate, markdown_table, report_markdown, row_of)
from peer_shapes import (  # noqa: E402,F401
    MAXTEXT_REMAT, REMAT, SHAPES, VARIANTS, expert_axis, spec_key)

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The script's flags (defined when it runs, not when a test imports it:
  another module loaded into the same process may own `--out`)."""
  flags.DEFINE_list("libraries", ["maxtext", "moejax"], "maxtext, moejax.")
  flags.DEFINE_list("topology", ["v5p-64"], "TPU slices (moejax.aot.TOPOLOGIES).")
  flags.DEFINE_list("remat", ["full", "none"], "Remat settings: full, "
                    "selective, selective_moe, none (REMAT maps each to both "
                    "libraries).")
  flags.DEFINE_string("shape", "paper", "Model shape: " + ", ".join(
      ("paper", "mixtral")))
  flags.DEFINE_list("moejax_variants", ["ep"], "moejax layouts (VARIANTS).")
  flags.DEFINE_list("maxtext_variants", ["ep"], "MaxText layouts: ep (data x "
                    "expert), fsdp (fsdp x expert).")
  flags.DEFINE_integer("loss_chunk", 256, "moejax LMConfig.loss_chunk (0 = "
                       "the plain cross-entropy).")
  flags.DEFINE_string("strategy", "", "moejax MoEConfig.strategy (e.g. "
                      "gather, index; '' = the config's).")
  flags.DEFINE_list("depths", ["1", "2"], "Compiled depths (extrapolated).")
  flags.DEFINE_bool("scan_peak", False, "Also compile each row at the full "
                    "depth with its layers scanned, for the true per-chip "
                    "memory (XLA counts a scanned body's FLOPs once, so "
                    "FLOPs and bytes stay extrapolated; not for remat none, "
                    "whose scan keeps every residual of its body).")
  flags.DEFINE_string("out", "experiments/reports/tpu_peer.json", "JSON path.")
  flags.DEFINE_string("markdown", "", "Markdown report path ('' = none).")
  flags.DEFINE_bool("recompile", False, "Compile again what the JSON has.")
  flags.DEFINE_bool("compile", True, "Compile what the JSON lacks (False: "
                    "write the report from the JSON's compiles alone).")
  flags.DEFINE_integer("nice", 10, "Niceness of the compile processes.")
  flags.DEFINE_integer("top_ops", 25, "Largest HLO instructions kept per "
                       "compile (by bytes accessed).")
  flags.DEFINE_string("one", "", "Internal: compile one spec (JSON) and print "
                      "its result as the last line.")


def specs(topology: str, chips: int) -> list[dict]:
  """Compile specs of every row (library x remat x variant) x depth (and
  the row's scanned full-depth compile with `--scan_peak`)."""
  shape = SHAPES[FLAGS.shape]
  expert = expert_axis(shape, chips)
  data = chips // expert
  depths = [int(d) for d in FLAGS.depths]
  out = []
  for remat in FLAGS.remat:
    for library in FLAGS.libraries:
      variants = (FLAGS.moejax_variants if library == "moejax" else
                  FLAGS.maxtext_variants)
      for variant in variants:
        spec = {"library": library, "topology": topology,
                "shape": FLAGS.shape, "remat": remat, "variant": variant,
                "data": data, "expert": expert}
        if library == "maxtext":  # one compile per MaxText remat policy
          spec["remat"] = MAXTEXT_REMAT.get(remat, remat)
        if library == "moejax":
          spec["loss_chunk"] = FLAGS.loss_chunk
          if FLAGS.strategy:
            spec["strategy"] = FLAGS.strategy
        row = [{**spec, "depth": d} for d in depths]
        if FLAGS.scan_peak and remat != "none":  # (see --scan_peak)
          row.append({**spec, "depth": shape.layers, "scan": True})
        out += [s for s in row if s not in out]
  return out


def compile_one(spec: dict) -> dict:
  """One spec compiled in this process (the result, or the error)."""
  t0 = time.perf_counter()
  fn = compile_maxtext if spec["library"] == "maxtext" else compile_moejax
  try:
    out = {"ok": True, **fn(spec, FLAGS.top_ops)}
  except Exception as e:  # noqa: BLE001 - a spec that does not compile
    out = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]}
  return {**out, "wall_s": time.perf_counter() - t0, "versions": versions()}


def run_compile(spec: dict) -> dict:
  """Compiles one spec in its own (niced) process; returns its result."""
  cmd = ["nice", "-n", str(FLAGS.nice), sys.executable,
         os.path.abspath(__file__), f"--one={json.dumps(spec)}",
         f"--top_ops={FLAGS.top_ops}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  last = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if not last:
    return {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:],
            "versions": {}}
  return json.loads(last[-1])


def main(argv):
  del argv
  if FLAGS.one:
    print(json.dumps(compile_one(json.loads(FLAGS.one))), flush=True)
    return
  from moejax import aot
  result = {"compiles": {}}
  if FLAGS.out and os.path.exists(FLAGS.out):
    with open(FLAGS.out) as f:
      result = json.load(f)
  compiles = result.setdefault("compiles", {})

  def save():
    if FLAGS.out:
      os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
      with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)

  firsts = []
  for topology in FLAGS.topology:
    chips = len(aot.topology_devices(topology)[1])
    for spec in specs(topology, chips):
      key = spec_key(spec)
      if spec["depth"] == int(FLAGS.depths[0]) and not spec.get("scan"):
        firsts.append(spec)
      if not FLAGS.compile or (key in compiles and compiles[key].get("ok")
                               and not FLAGS.recompile):
        continue
      print(f"compiling {key} ...", flush=True)
      compiles[key] = run_compile(spec)
      c = compiles[key]
      print(f"  {'ok' if c['ok'] else 'FAILED ' + c['error'][-300:]} "
            f"{c.get('wall_s', 0):.0f} s" + (
                f", peak {c['peak_bytes'] / 2**30:.2f} GiB, "
                f"{c['bytes_accessed'] / 2**30:.0f} GiB accessed"
                if c["ok"] else ""), flush=True)
      save()
  row_key = lambda r: spec_key({**r, "depth": 0, "scan": False})
  new_rows = [row_of(compiles, f, FLAGS.depths) for f in firsts]
  replaced = {row_key(r) for r in new_rows}
  result["rows"] = [r for r in result.get("rows", [])
                    if row_key(r) not in replaced] + new_rows
  result["table"] = markdown_table(result["rows"])
  save()
  print(result["table"])
  if FLAGS.markdown:
    notes = ""
    if os.path.exists(FLAGS.markdown):
      with open(FLAGS.markdown) as f:
        old = f.read()
      if NOTES_MARK in old:
        notes = old.split(NOTES_MARK, 1)[1].lstrip("\n")
    with open(FLAGS.markdown, "w") as f:
      f.write(report_markdown(result, "PYTHONPATH=. python " + " ".join(
          sys.argv), notes, FLAGS.shape, FLAGS.depths))
    print(f"wrote {FLAGS.markdown}")


if __name__ == "__main__":
  define_flags()
  app.run(main)