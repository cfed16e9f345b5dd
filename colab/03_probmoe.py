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
# # ProbMoE: exact-k and dynamic-k probabilistic routing
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/colab/03_probmoe.ipynb)
#
# ProbMoE (Zhao et al., ICML 2026) replaces top-k's hard choice by a
# **distribution over k-subsets**: each expert gets an independent inclusion
# probability `p_e = sigmoid(r_e)`, conditioned on the subset having exactly k
# members (the conditional-Bernoulli distribution)
#
# `P(S | |S| = k) = prod_{e in S} p_e prod_{e not in S} (1 - p_e) / Z_k`.
#
# `moejax.routing` computes `log Z_k` and the exact marginals `P(e in S)` with an
# O(E k) log-space table per token, samples exact k-subsets, and trains with
# straight-through gates (value: the sample times softmax; gradient: the exact
# marginals). Dynamic-k draws the size from `Z_k / sum Z` over a range.
#
# This notebook runs on a CPU in about a minute: the distribution against brute
# force, samples against marginals, and a tiny training run. The comparison with
# top-k and the fine-tuning experiment: `experiments/reports/probmoe.md`.

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
import itertools
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from moejax import routing
from moejax.routing import probmoe as ek  # helpers beside the public API
print(jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## 1. The distribution, against enumeration
# One token, six experts, k = 2: the 15 subsets' probabilities by brute force, and
# the table's `log Z_k` and marginals. The marginals are not the `p_e`, and not
# softmax: conditioning on the size couples the experts.

# %%
r = np.array([1.5, 0.8, 0.0, -0.4, -1.2, -2.0])
k = 2
p = 1 / (1 + np.exp(-r))
subsets = list(itertools.combinations(range(6), k))
weights = np.array([np.prod([p[e] if e in s else 1 - p[e] for e in range(6)]) for s in subsets])
Z = weights.sum()
brute_m = np.array([sum(w for w, s in zip(weights, subsets) if e in s) for e in range(6)]) / Z
x = jnp.asarray(r[None], jnp.float32)
print('log Z_k  brute %.6f  table %.6f' % (np.log(Z), routing.exact_k_log_partition(x, k)[0]))
m = np.asarray(routing.exact_k_marginals(x, k)[0])
print('marginals brute', np.round(brute_m, 5)); print('marginals table', np.round(m, 5), ' sum', m.sum())
softmax = np.exp(r) / np.exp(r).sum()
plt.figure(figsize=(7, 3))
for i, (name, v) in enumerate([('P(e in S), k=2', m), ('sigmoid(r)', p), ('softmax(r)', softmax)]):
  plt.bar(np.arange(6) + 0.27 * (i - 1), v, width=0.27, label=name)
plt.xlabel('expert'); plt.legend(); plt.show()

# %% [markdown]
# ## 2. Exact samples against the marginals
# The backward walk through the table draws an exact k-subset per token; every
# sample has exactly k members. 20 000 draws of the same token: subset frequencies
# against the enumerated probabilities, and (dynamic-k, sizes 1..4) the size
# frequencies against `Z_k / sum Z`.

# %%
n = 20000
xs = jnp.broadcast_to(x, (n, 6))
z = np.asarray(ek.sample_subsets(xs, k, k, jax.random.PRNGKey(0)))
assert (z.sum(-1) == k).all()
freq = np.array([np.mean(np.all(z == np.isin(np.arange(6), s), axis=1)) for s in subsets])
print('max |frequency - probability| over the 15 subsets: %.4f (3 s.e. ~ %.4f)'
      % (np.abs(freq - weights / Z).max(), 3 * np.sqrt((weights / Z).max() / n)))
zd = np.asarray(ek.sample_subsets(xs, 1, 4, jax.random.PRNGKey(1)))
log_zk = np.asarray(ek.size_log_partitions(x, 4)[0])
size_p = np.exp(log_zk[1:] - np.logaddexp.reduce(log_zk[1:]))
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
axes[0].bar(np.arange(15) - 0.2, weights / Z, 0.4, label='enumerated')
axes[0].bar(np.arange(15) + 0.2, freq, 0.4, label='sampled')
axes[0].set_xticks(range(15)); axes[0].set_xticklabels([''.join(map(str, s)) for s in subsets], fontsize=7)
axes[0].set_title('exact-k subsets (k = 2)'); axes[0].legend()
axes[1].bar(np.arange(1, 5) - 0.2, size_p, 0.4, label='Z_k / sum Z')
axes[1].bar(np.arange(1, 5) + 0.2, np.bincount(zd.sum(-1), minlength=5)[1:] / n, 0.4, label='sampled')
axes[1].set_title('dynamic-k sizes, range [1, 4]'); axes[1].legend()
plt.tight_layout(); plt.show()
print('dynamic-k: mean size %.3f, expected %.3f; MAP size %d (logits > 0: %d)'
      % (zd.sum(-1).mean(), (np.arange(1, 5) * size_p).sum(),
         int(ek.dynamic_k_map(x, 1, 4)[0]), int((r > 0).sum())))

# %% [markdown]
# ## 3. Straight-through gates
# In training, `exact_k(logits, k, rng=key)` returns gates that equal
# softmax at the sampled experts and are exactly 0 elsewhere; their gradient
# flows through the exact marginals (`stop_gradient(z - m) + m`) and through the
# softmax. The marginals' derivative is the covariance of the subset indicator,
# which the custom VJP computes exactly (checked here against enumeration).

# %%
out = routing.exact_k(x, k, rng=jax.random.PRNGKey(3))
print('gates', np.round(np.asarray(out.routing.gates[0]), 4))
c = np.arange(6.0)
grad = np.asarray(jax.grad(lambda v: jnp.sum(routing.exact_k_marginals(v, k) * c))(x))[0]
zs = np.array([np.isin(np.arange(6), s) for s in subsets], float)
cov = (zs * (weights / Z)[:, None]).T @ zs - np.outer(brute_m, brute_m)
print('d(m . c)/dr  custom VJP', np.round(grad, 5)); print('             Cov(z) c  ', np.round(cov @ c, 5))

# %% [markdown]
# ## 4. A tiny training run
# A two-block LM on Python standard-library bytes, exact-k (k = 2 of 8 experts)
# against top-k with the same k and dynamic-k over [1, 2], 30 steps each (a CPU smoke test, not a
# comparison: see the report for that). Inference uses top-k for both.

# %%
from moejax.routing import ExactK, TopK, DynamicK
from moejax.models import LMConfig
from moejax.nn import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train import OptimConfig, train
from moejax.train.metrics import read_jsonl
import tempfile
def config(router):
  model = LMConfig(num_layers=2, d_model=64, num_heads=2, d_ff=256, max_len=64,
                   moe=MoEConfig(num_experts=8, expert_width=64, router=router))
  return TrainConfig(model=model, optim=OptimConfig(learning_rate=3e-3, warmup_steps=5, total_steps=30),
                     batch_size=8, seq_len=64, steps=30, log_every=2, eval_every=1000,
                     eval_batches=2, checkpoint_every=1000, sample_tokens=0, progress=False, num_devices=1)
results = {}
for name, router in [('top_k', TopK(k=2)), ('exact_k', ExactK(k=2)), ('dynamic_k [1,2]', DynamicK(k=2, k_min=1, k_max=2))]:
  out = train(config(router), tempfile.mkdtemp())
  hist = [h for h in read_jsonl(out['metrics']) if 'loss' in h]
  results[name] = hist
  print(f"{name:16s} validation loss {out['eval_loss']:.3f}  training fanout (last) {hist[-1]['experts_per_token']:.2f}")
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
for name, hist in results.items():
  axes[0].plot([h['step'] for h in hist], [h['loss'] for h in hist], label=name)
  axes[1].plot([h['step'] for h in hist], [h['experts_per_token'] for h in hist], label=name)
axes[0].set_ylabel('training loss'); axes[1].set_ylabel('experts per token (training)')
for ax in axes: ax.set_xlabel('step'); ax.legend()
plt.tight_layout(); plt.show()
