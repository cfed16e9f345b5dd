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
# # Balance without aux losses: loss-free bias and Expert Threshold
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/colab/04_balance.ipynb)
#
# Two controllers keep experts evenly loaded without an auxiliary loss:
#
# * **Loss-free balancing** (DeepSeek-V3): top-k chooses on `score + b`, combines with
#   the unbiased score; after each step `b_e += u * sign(mean(load) - load_e)`
#   (`moejax.control.SignBias`, `--router=loss_free`).
# * **Expert Threshold** (ET): each expert keeps an EMA of the cutoff expert choice would
#   use on the global batch (`moejax.control.ThresholdEMA`); tokens pass by
#   `logit > threshold`, one token at a time, so inference is causal
#   (`--router=expert_threshold`).
#
# Runs on a CPU in about a minute. The full comparison is
# `experiments/compare_balance.py` (report: `experiments/reports/balance.md`).

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
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from moejax import control, routing
from moejax.routing import LossFreeTopK, TopK, ExpertThreshold
from moejax.routing import losses
from moejax.routing import threshold as et
print(jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## 1. Loss-free bias on a skewed router
# A synthetic router whose logits favour expert 0 and starve expert 7. Each step routes a
# fresh batch with top-2 on `sigmoid(logits) + b`, measures the loads and applies the sign
# update (u = 1e-3). Without the bias the imbalance stays.

# %%
E, D, N, STEPS = 8, 16, 2048, 500
w = jax.random.normal(jax.random.PRNGKey(1), (D, E)) * 0.5
skew = jnp.linspace(1.5, -1.5, E)

def simulate(method):
  def step(state, key):
    x = jax.random.normal(key, (N, D))
    out = method.route(x @ w + skew, state, rng=None, train=True)
    load = out.metrics['expert_load']
    new = method.update({('l',): state}, {('l',): {'expert_load': load}}, 0)[('l',)]
    return (new if state else state), (losses.load_stats(load)['max_vio'], load)
  keys = jax.random.split(jax.random.PRNGKey(2), STEPS)
  return jax.jit(lambda s: jax.lax.scan(step, s, keys))(method.init_state(E))

lf = LossFreeTopK(k=2, score_fn='sigmoid')
none = TopK(k=2, balance='none', score_fn='sigmoid')
state_lf, (vio_lf, load_lf) = simulate(lf)
_, (vio_none, _) = simulate(none)
print('MaxVio, last 100 steps: loss-free %.3f   no balancing %.3f' % (
    vio_lf[-100:].mean(), vio_none[-100:].mean()))
print('bias:', np.round(np.asarray(state_lf['bias']), 3))
plt.figure(figsize=(6, 3))
plt.semilogy(vio_none, label='no balancing'); plt.semilogy(vio_lf, label='loss-free bias')
plt.axhline(0.15, color='k', ls=':'); plt.xlabel('step'); plt.ylabel('MaxVio'); plt.legend();

# %% [markdown]
# ## 2. Expert Threshold: cutoffs, the EMA, causal routing
# Training: each expert's cutoff is its k-th largest logit over the pool (k = N·f/E),
# computed exactly by a 32-step bisection on the float bits. The bias-corrected EMA of the
# cutoffs becomes the threshold; training routing keeps each expert's load within
# (1 ± C)·k; inference routes each token alone by `logit > threshold`.

# %%
f, C = 1, 0.5
k = et.pool_tokens_per_expert(N, f, E)
low, high = et.load_bounds(k, C)
ema = control.ThresholdEMA(beta=0.99)
w_et = jax.random.normal(jax.random.PRNGKey(3), (D, E))
bias_et = jnp.linspace(1.0, -1.0, E)

def et_step(state, key):
  logits = jax.random.normal(key, (N, D)) @ w_et + bias_et
  out = et.expert_threshold_train(logits, ema.value(state), k, capacity_bound=C,
                                  expert_choice=state['count'] == 0)
  cut = out.metrics['et_cutoff']
  new = ema.update(state, cut)
  return new, (cut, ema.value(new), out.routing.routed.sum(0))

keys = jax.random.split(jax.random.PRNGKey(100), 200)
state, (cut_hist, thr_hist, counts_hist) = jax.jit(
    lambda s: jax.lax.scan(et_step, s, keys))(ema.init(E))
counts_hist = np.asarray(counts_hist)
print(f'k = {k}, training bounds [{low}, {high}]; loads stayed within: ',
      bool(((counts_hist >= low) & (counts_hist <= high)).all()))
x = jax.random.normal(jax.random.PRNGKey(9999), (N, D))
causal = routing.expert_threshold(x @ w_et + bias_et, ema.value(state))
load = np.asarray(causal.routing.routed.sum(0))
print('causal routing on fresh tokens: mean fanout %.3f (target %d), MaxVio %.3f' % (
    float(causal.metrics['experts_per_token']), f, (load.max() - load.mean()) / load.mean()))
fig, ax = plt.subplots(1, 2, figsize=(10, 3))
ax[0].plot(np.asarray(cut_hist)[:, [0, 7]], alpha=0.4); ax[0].plot(np.asarray(thr_hist)[:, [0, 7]])
ax[0].set_title('cutoffs (thin) and EMA thresholds, experts 0 and 7'); ax[0].set_xlabel('step')
ax[1].bar(range(E), load); ax[1].axhline(N * f / E, color='k', ls=':')
ax[1].set_title('causal load per expert (fresh batch)');

# %% [markdown]
# Causality: change every other token and one token's routing does not move.

# %%
thr = ema.value(state)
a = routing.expert_threshold(x @ w_et + bias_et, thr).routing.gates[5]
x2 = jax.random.normal(jax.random.PRNGKey(4), x.shape).at[5].set(x[5])
b = routing.expert_threshold(x2 @ w_et + bias_et, thr).routing.gates[5]
print('token 5 routing unchanged:', bool(jnp.array_equal(a, b)))

# %% [markdown]
# ## 3. A tiny LM trained with ET and with loss-free top-k
# A few steps on Python's standard library (byte level), one CPU device. The controller
# states live in `TrainState.router_state` and are saved in the checkpoints.

# %%
import tempfile
from moejax.models import LMConfig
from moejax.nn import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.loop import train
from moejax.train.state import OptimConfig
from moejax.train.step import router_states

def tiny(router, shared):
  moe = MoEConfig(num_experts=4, expert_width=32, router=router, num_shared=shared)
  return TrainConfig(model=LMConfig(num_layers=1, d_model=32, num_heads=2, d_ff=64,
                                    max_len=32, moe=moe),
                     optim=OptimConfig(learning_rate=3e-3, warmup_steps=2, total_steps=10),
                     batch_size=8, seq_len=32, steps=10, log_every=4, eval_every=100,
                     eval_batches=1, checkpoint_every=100, sample_tokens=0,
                     progress=False, num_devices=1)

for name, router, shared in [('ET', ExpertThreshold(k=1, et_warmup_steps=3, et_beta=0.9), 1),
                             ('loss-free top-1', LossFreeTopK(k=1), 0)]:
  summary = train(tiny(router, shared), tempfile.mkdtemp())
  states = router_states(summary['state'].router_state)
  print(f"{name}: eval loss {summary['eval_loss']:.3f};",
        {'/'.join(p): {k: np.round(np.asarray(v), 3).tolist() for k, v in s.items()}
         for p, s in states.items()})
