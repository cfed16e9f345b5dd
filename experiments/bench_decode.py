"""Decode tokens/s of a Mixture-of-Depths LM vs the dense LM of the same shape.

  python experiments/bench_decode.py --config=tiny --batch_sizes=1,8 \
      --out=experiments/reports/mod/bench_decode.json

Both models use the cached decoder of `moejax.decode` (prefill, then one
jit-compiled `lax.fori_loop` of `TransformerLM.decode` steps). The MoD model
routes every `--mod_every`-th block at `--mod_capacity`; at decode time a
routed block runs (under `lax.cond`) only when a token enters it by the causal
rule. Its weights come from `--params` (an .npz written by
`experiments/mod_report.py` from a trained run; several files are merged) or,
without one, are random with the predictor's output bias calibrated on
validation text so that the causal rule lets about `--mod_capacity` of the
tokens in (the dense model's weights do not change its speed). Timings are
the best of `--repeats` interleaved runs (dense, MoD, ... in turn), on
whatever device JAX uses; `speedup` = MoD tokens/s / dense tokens/s measured
in the same run. `--skip=mask` rows show the MoD model computing every routed
block and masking (no skipping).

Writes a table to stdout and JSON (`rows` and per batch size `speedup`).

Axis legend:
  B  batch
  P  prompt length
  N  decode steps timed
"""
from __future__ import annotations

import json
import os

from absl import app, flags  # noqa: E402

from moejax.experiment import timing

flags.DEFINE_string("config", "tiny", "Model preset (tiny or small).")
flags.DEFINE_string("batch_sizes", "1,8", "Comma-separated batch sizes.")
flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (P).")
flags.DEFINE_integer("new_tokens", 128, "Decode steps timed (N).")
timing.define_flags(repeats=5)  # the best round is kept
flags.DEFINE_float("mod_capacity", 0.125, "MoD capacity fraction.")
flags.DEFINE_integer("mod_every", 2, "Every n-th block routed.")
flags.DEFINE_string("mod_causal", "predictor", "predictor or router.")
flags.DEFINE_list("params", [], "Trained MoD params (.npz files to merge).")
flags.DEFINE_string("dataset", "stdlib", "Prompts come from its validation set.")
flags.DEFINE_bool("mask_rows", True, "Also time the MoD model with skip=mask.")
flags.DEFINE_string("out", "experiments/out/bench_decode.json", "JSON output.")
FLAGS = flags.FLAGS


def load_npz_params(paths):
  """Merges .npz files of flat 'a/b/c' keys into one nested params dict."""
  import numpy as np
  params = {}
  for path in paths:
    with np.load(path) as data:
      for key in data.files:
        node = params
        *parents, leaf = key.split("/")
        for p in parents:
          node = node.setdefault(p, {})
        node[leaf] = data[key]
  return params


def main(argv):
  del argv
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from moejax import configs, decode, flops
  from moejax.data import get_lm_data
  from moejax.models.lm import LMConfig, TransformerLM, init_variables
  from moejax.nn.mod import MoDConfig

  pre = configs.preset(FLAGS.config)
  length = FLAGS.prompt_len + FLAGS.new_tokens + 1
  base = dict(num_layers=pre["num_layers"], d_model=pre["d_model"],
              num_heads=pre["num_heads"], d_ff=pre["d_ff"],
              max_len=max(length, pre["seq_len"]))
  dense_cfg = LMConfig(**base)
  mod_cfg = LMConfig(**base, mod=MoDConfig(capacity=FLAGS.mod_capacity,
                                           causal=FLAGS.mod_causal),
                     mod_every=FLAGS.mod_every)
  batch_sizes = [int(b) for b in FLAGS.batch_sizes.split(",")]
  data = get_lm_data(FLAGS.dataset, seq_len=FLAGS.prompt_len,
                     batch_size=max(batch_sizes), seed=0)
  prompts = np.asarray(next(iter(data.eval_batches(1)))["inputs"], np.int32)

  models = {}
  for name, cfg in (("dense", dense_cfg), ("mod", mod_cfg)):
    model = TransformerLM(cfg)
    params, rs = init_variables(model, jax.random.PRNGKey(0),
                                jnp.asarray(prompts[:1]))
    models[name] = (cfg, model, nn.meta.unbox(params), rs)
  cfg, model, params, rs = models["mod"]
  if FLAGS.params:
    loaded = jax.tree.map(jnp.asarray, load_npz_params(FLAGS.params))
    if jax.tree.structure(loaded) != jax.tree.structure(params):
      raise ValueError(f"--params {FLAGS.params} do not match the {FLAGS.config} "
                       "MoD model's parameter tree")
    params, source = loaded, "trained"
  else:
    calib = get_lm_data(FLAGS.dataset, seq_len=pre["seq_len"], batch_size=8,
                        seed=1)
    tokens = jnp.asarray(next(iter(calib.eval_batches(1)))["inputs"])
    params = decode.calibrate_predictor(model, params, tokens,
                                        FLAGS.mod_capacity)
    source = "random, predictor bias calibrated"
  models["mod"] = (cfg, model, params, rs)

  variants = [("dense", "dense", "cond"), ("mod", "mod", "cond")]
  if FLAGS.mask_rows:
    variants.append(("mod_mask", "mod", "mask"))
  rows = []
  print(f"device: {jax.devices()[0].device_kind}; MoD weights: {source}")
  for batch in batch_sizes:
    prompt = jnp.asarray(prompts[:batch])
    prepared = {}
    for label, name, skip in variants:
      cfg, _, params, rs = models[name]
      cache = decode.init_cache(cfg, batch, length)
      logits, cache, _ = decode.prefill(cfg, params, rs, prompt, cache,
                                        skip=skip)

      def run(cfg=cfg, params=params, rs=rs, logits=logits, cache=cache,
              skip=skip):
        out = decode.decode_loop(cfg, params, rs, logits[:, -1], cache,
                                 jnp.int32(FLAGS.prompt_len),
                                 jax.random.PRNGKey(0),
                                 num_steps=FLAGS.new_tokens, skip=skip)
        return jax.block_until_ready(out)
      _, _, dec = run()  # compile
      prepared[label] = (run, float(np.asarray(dec).mean()) if dec.size
                         else 1.0)
    best = {label: min(t.wall) for label, t in timing.interleaved(
        {label: run for label, (run, _) in prepared.items()},
        FLAGS.repeats).items()}
    for label, (_, realised) in prepared.items():
      tps = batch * FLAGS.new_tokens / best[label]
      rows.append({"model": label, "batch": batch, "tokens_per_s": tps,
                   "ms_per_step": 1e3 * best[label] / FLAGS.new_tokens,
                   "decode_capacity": realised if label != "dense" else 1.0})

  per_tok = {n: flops.flops_per_token(models[n][0], FLAGS.prompt_len
                                      + FLAGS.new_tokens)["total"]
             for n in ("dense", "mod")}
  speedup = {}
  for batch in batch_sizes:
    tps = {r["model"]: r["tokens_per_s"] for r in rows if r["batch"] == batch}
    speedup[str(batch)] = tps["mod"] / tps["dense"]
    if "mod_mask" in tps:
      speedup[f"{batch}_mask"] = tps["mod_mask"] / tps["dense"]
  print(f"{'model':10s} {'batch':>5s} {'tokens/s':>10s} {'ms/step':>8s} "
        f"{'routed-block capacity':>22s}")
  for r in rows:
    print(f"{r['model']:10s} {r['batch']:5d} {r['tokens_per_s']:10.1f} "
          f"{r['ms_per_step']:8.3f} {r['decode_capacity']:22.3f}")
  for key, value in speedup.items():
    print(f"speedup MoD/dense at batch {key}: {value:.2f}x")
  result = {"config": FLAGS.config, "device": jax.devices()[0].device_kind,
            "mod_capacity": FLAGS.mod_capacity, "mod_every": FLAGS.mod_every,
            "mod_causal": FLAGS.mod_causal, "weights": source,
            "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
            "repeats": FLAGS.repeats, "rows": rows, "speedup": speedup,
            "train_flops_per_token_ratio": per_tok["mod"] / per_tok["dense"]}
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
