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
# # moejax quickstart
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/colab/00_quickstart.ipynb)
#
# Route a batch of tokens, look at the gates and the expert loads, dispatch them to experts,
# then train a tiny routed language model on Python's own standard library for a few
# steps and plot it. Runs on a CPU in about a minute.
#
# On Colab the first cell installs moejax from https://github.com/moejax/moejax, keeping the
# runtime's jax (CPU, GPU or TPU); locally: `pip install -e .` from the repo root.

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
import matplotlib
import matplotlib.pyplot as plt
from moejax import routing, dispatch
print(jax.__version__, jax.devices()[0].platform, len(jax.devices()), 'devices')

# %% [markdown]
# ## 1. Route one group of tokens
# A router maps float32 logits `[S, E]` to a `Routing(gates, priority)`: `gates[s, e]` is
# token s's combine weight at expert e (exactly 0 = not routed).

# %%
S, E = 32, 8
logits = jax.random.normal(jax.random.PRNGKey(0), (S, E)) * 1.5
out = routing.top_k(logits, k=2)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].imshow(np.asarray(out.routing.gates).T, aspect='auto', cmap='viridis')
axes[0].set_xlabel('token'); axes[0].set_ylabel('expert'); axes[0].set_title('top-2 gates')
axes[1].bar(range(E), np.asarray(out.metrics['expert_load']))
axes[1].axhline(1 / E, color='k', ls='--'); axes[1].set_title('expert load')
plt.tight_layout(); plt.show()
print({k: float(v) for k, v in out.aux.items()})
print('experts/token', float(out.metrics['experts_per_token']), ' MaxVio', float(out.metrics['max_vio']))

# %% [markdown]
# ## 2. Expert choice balances by construction

# %%
ec = routing.expert_choice(logits, capacity=8)
print('expert load', np.round(np.asarray(ec.metrics['expert_load']), 3))
print('fanout per token', np.asarray(ec.routing.routed.sum(-1)))

# %% [markdown]
# ## 3. Dispatch under a capacity
# `dispatch.plan` turns a routing into static-shape indices: `dispatch(x) -> [E, C, D]`,
# `combine(y) -> [S, D]`; `kept` shows which assignments fit.

# %%
C = dispatch.capacity(S, 2, E, capacity_factor=1.0)
x = jax.random.normal(jax.random.PRNGKey(1), (S, 16))
for strategy in ['einsum', 'index', 'dropless']:
    plan = dispatch.plan(out.routing, C, strategy=strategy, max_fanout=2)
    y = plan.combine(plan.dispatch(x))
    print(f'{strategy:9s} kept {int(plan.kept.sum())}/{int(out.routing.routed.sum())} assignments,'
          f' buffer {plan.dispatch(x).shape}')

# %% [markdown]
# ## 4. Train a tiny routed LM on the stdlib corpus

# %%
import tempfile
from moejax.cli.lm_flags import build_train_config
from moejax.train import train
from moejax.train.metrics import read_jsonl
cfg = build_train_config(dict(config='tiny', router='top_k', steps=40, batch_size=8,
                              seq_len=64, eval_every=20, eval_batches=2, log_every=5,
                              sample_tokens=40, progress=False))
workdir = tempfile.mkdtemp()
summary = train(cfg, workdir)
print('validation loss (nats/byte):', round(summary['eval_loss'], 3))
print(repr(summary['sample']))

# %%
records = [r for r in read_jsonl(summary['metrics']) if 'loss' in r]
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
axes[0].plot([r['step'] for r in records], [r['loss'] for r in records]); axes[0].set_title('train loss')
axes[1].plot([r['step'] for r in records], [r['max_vio'] for r in records]); axes[1].set_title('MaxVio (mean over layers)')
plt.tight_layout(); plt.show()
assert records[-1]['loss'] < records[0]['loss']
