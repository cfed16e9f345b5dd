# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Mixture-of-Depths (MoD) and MoDE
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/colab/05_mod.ipynb)
#
# A routed block (Raposo et al. 2024) gives each token a scalar score `r = w·x`;
# per sequence only the top-C tokens (C = 12.5% of the sequence) go through
# attention + MLP, **in their original order with their true positions**; their
# update is multiplied by `r` (the router's only gradient path) and the other
# tokens pass unchanged. In moejax this is expert choice with one expert: the
# selection is `routing.expert_choice.select_top_tokens`, the gather/scatter is
# `dispatch.plan`. Sampling cannot see the future, so a small predictor (or an
# auxiliary BCE on the router) makes the decision causal.

# %%
# Installs moejax where it is missing (Colab CPU, GPU or TPU runtimes), then only the
# packages the runtime lacks, keeping its jax (`moejax/colab.py` says how); locally
# (`pip install -e .`) this does nothing. MOEJAX_SOURCE may name another source.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("moejax") is None:
  subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                         os.getenv("MOEJAX_SOURCE", "git+https://github.com/moejax/moejax")])
  from moejax import colab; colab.install_requirements()

# %%
import time
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from moejax.nn.mod import MoDBlock, MoDConfig
from moejax import flops, decode
from moejax.models.lm import LMConfig, TransformerLM, init_variables
print(jax.devices())

# %% [markdown]
# ## One routed block: which tokens enter, what changes

# %%
block = MoDBlock(MoDConfig(capacity=0.25), num_heads=4, d_ff=64)
x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 32))
pos = jnp.arange(16)[None]
params = nn.meta.unbox(block.init(jax.random.PRNGKey(1), x, pos, train=False)["params"])
(out, chosen), inter = block.apply({"params": params}, x, pos, train=False,
                                   capture_intermediates=True, mutable=["intermediates"])
r = np.asarray(jnp.einsum("bld,d->bl", x, params["router"]))[0]
print("router scores:", np.round(r, 2))
print("chosen tokens (top-4, in order):", np.flatnonzero(chosen[0]))
print("block ran on", inter["intermediates"]["block"]["__call__"][0][0].shape, "(B, C, D)")
print("skipped tokens unchanged:", bool(jnp.all(jnp.where(chosen[0][:, None], True, out[0] == x[0]))))

# %% [markdown]
# ## FLOPs per forward pass, counted from shapes
#
# A routed block at ratio c costs about c × (projections + MLP) + c² ×
# (attention scores); with every other block at 12.5% the model costs a bit
# under 60% of the dense one.

# %%
for name, kw in [("tiny", dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, max_len=128)),
                 ("small", dict(num_layers=6, d_model=256, num_heads=8, d_ff=1024, max_len=256))]:
    dense = flops.flops_per_token(LMConfig(**kw))["total"]
    mod = flops.flops_per_token(LMConfig(**kw, mod=MoDConfig(capacity=0.125)))["total"]
    print(f"{name}: dense {dense/1e6:.2f} MFLOP/token, MoD {mod/1e6:.2f} -> {mod/dense:.1%} of dense")

# %% [markdown]
# ## A few training steps of a very small MoD LM
#
# The predictor (D → D/2 → 1, on `stop_gradient(x)`) learns the top-C decision
# with BCE; its accuracy against top-C is logged as `mod_pred_accuracy`. (Tens of
# steps only: the numbers are illustrative; see `experiments/reports/mod.md`.)

# %%
from moejax.tasks.lm import TrainConfig
from moejax.train.loop import train
from moejax.train.state import OptimConfig
from moejax.train.metrics import read_jsonl
model_cfg = LMConfig(num_layers=2, d_model=64, num_heads=4, d_ff=128, max_len=64,
                     mod=MoDConfig(capacity=0.125))
cfg = TrainConfig(model=model_cfg, optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, total_steps=40),
                  batch_size=8, seq_len=64, steps=40, log_every=10, eval_every=20,
                  eval_batches=2, checkpoint_every=1000, num_devices=1,
                  sample_tokens=32, progress=False)
import tempfile
summary = train(cfg, tempfile.mkdtemp(prefix="moejax_05_mod_"))  # a fresh workdir
for r in read_jsonl(summary["metrics"]):
    if "loss" in r:
        print(f"step {r['step']:3d} loss {r['loss']:.3f} predictor acc {r['mod_pred_accuracy']:.3f} "
              f"recall {r['mod_pred_recall']:.3f} causal capacity {r['mod_causal_capacity']:.3f}")
print("validation loss", round(summary["eval_loss"], 3))
print("sample (cached decoder, causal routing):", repr(summary["sample"]))

# %% [markdown]
# ## Cached decoding = the causal full forward pass
#
# `moejax.decode` keeps a KV cache per layer; a routed block writes keys/values
# only for the tokens that entered it and is skipped (`lax.cond`) otherwise.
# Its logits equal those of a full forward pass with the same causal decisions
# (`mod_routing="causal"`).

# %%
model = TransformerLM(model_cfg)
params, rs = summary["state"].params, summary["state"].router_state
tokens = jnp.asarray(np.frombuffer(b"def main(argv):\n    return 0\n", np.uint8)[None].astype(np.int32))
full = model.apply({"params": params, "router_state": rs}, tokens, mod_routing="causal")
cache = decode.init_cache(model_cfg, 1, tokens.shape[1])
logits, cache, dec = decode.prefill(model_cfg, params, rs, tokens[:, :4], cache)
steps = [logits]
for t in range(4, tokens.shape[1]):
    lt, cache, d = decode.decode_step(model_cfg, params, rs, tokens[:, t], jnp.int32(t), cache)
    steps.append(lt[:, None])
print("max |cached - full| =", float(jnp.abs(jnp.concatenate(steps, 1) - full).max()))
print("tokens stored by the routed block:", int((cache[1]["pos"] < 2**30).sum()), "of", tokens.shape[1])

# %% [markdown]
# ## Decode speed vs the dense model (same width and depth)
#
# On a CPU at batch 1 (untrained weights here, predictor calibrated to let about
# 12.5% in; `experiments/bench_decode.py` measures trained models).

# %%
shape = dict(num_layers=4, d_model=128, num_heads=4, d_ff=512, max_len=160)
timings = {}
for name, c in [("dense", LMConfig(**shape)), ("mod", LMConfig(**shape, mod=MoDConfig(capacity=0.125)))]:
    m = TransformerLM(c)
    prompt = jnp.asarray(np.frombuffer(b"import os\nimport sys\n", np.uint8)[None].astype(np.int32))
    p, s = init_variables(m, jax.random.PRNGKey(0), prompt)
    p = nn.meta.unbox(p)
    if c.mod is not None:
        calib = jax.random.randint(jax.random.PRNGKey(2), (4, 128), 32, 127)
        p = decode.calibrate_predictor(m, p, calib, 0.125)
    cache = decode.init_cache(c, 1, 160)
    lg, cache, _ = decode.prefill(c, p, s, prompt, cache)
    run = lambda: jax.block_until_ready(decode.decode_loop(c, p, s, lg[:, -1], cache, jnp.int32(prompt.shape[1]),
                                                           jax.random.PRNGKey(0), num_steps=64))
    _, _, d = run()
    best = min((lambda t0: (run(), time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range(3))
    timings[name] = 64 / best
    print(f"{name}: {64 / best:.0f} tokens/s" + (f", routed blocks ran for {float(d.mean()):.1%} of tokens" if d.size else ""))
print(f"speedup {timings['mod'] / timings['dense']:.2f}x")
