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
# # DTop-p: sparsity-controlled dynamic top-p routing
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/colab/02_dtop_p.ipynb)
#
# Fixed top-p keeps, per token, the shortest prefix of experts whose probability
# reaches p; its compute is not controlled. **DTop-p** (Jin et al. 2025) fixes that
# with three pieces:
#
# 1. *dynamic routing normalisation*: each token's logits are standardised over
#    the experts and scaled by a learned per-layer **gamma** (a param), so one p
#    gives different fanouts per layer;
# 2. top-p with renormalised weights (`moejax.routing.dtop_p`);
# 3. a **PI controller** on p (`moejax.control.PIController`, controller state,
#    not a param) that holds the mean fanout at the target k.
#
# This notebook runs on a CPU in about a minute: the controller's step response on
# a real tiny LM (weights frozen at initialisation; a new batch of text each step),
# and how gamma moves each layer's fanout. Training runs and the comparison with
# top-k and fixed top-p: `experiments/reports/dtop_p.md`.

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
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
from moejax import configs
from moejax.control import PIController
from moejax.data import get_lm_data
from moejax.routing import DTopP
from moejax.models.lm import LMConfig, TransformerLM
from moejax.nn.moe import MoEConfig
from moejax.routing import dtop_p, top_p
from moejax.train.step import router_outputs, router_states, update_router_state
print(jax.__version__, jax.devices()[0].platform)

# %% [markdown]
# ## 1. One group: fixed top-p vs DTop-p
# Random logits whose scale varies from token to token (some tokens confident,
# some not). Fixed top-p gives confident tokens one expert and unsure ones many;
# DTop-p standardises each token first, so only the *shape* of its logits matters.

# %%
k1, k2 = jax.random.split(jax.random.PRNGKey(0))
logits = jax.random.normal(k1, (4096, 16)) * jnp.exp(jax.random.normal(k2, (4096, 1)))
for name, out in [('top_p  p=0.5', top_p(logits, 0.5)),
                  ('dtop_p p=0.6 gamma=1', dtop_p(logits, 0.6, scale=1.0))]:
  fan = np.asarray(out.routing.routed.sum(-1))
  print(f'{name:22s} mean fanout {fan.mean():.2f}  per-token std {fan.std():.2f}')
  plt.hist(fan, bins=np.arange(0.5, 17.5), alpha=0.5, label=name)
plt.xlabel('experts per token'); plt.legend(); plt.show()

# %% [markdown]
# ## 2. Controller step response on a real tiny LM
# The `tiny` preset's LM with DTop-p routing in every block. Each step routes a new
# batch of Python standard-library source, and the method's own `update` (the code
# the train step runs, global scope) moves p from the mean fanout over all layers.
# The target steps from 2 to 3 experts at step 30. At gamma = 3 on every layer p
# must go near 0.9, where the fanout is very sensitive to p: the former
# defaults kp 0.5 / ki 0.2 ring there (period 2), the defaults (0.1 / 0.1) settle.

# %%
pre = configs.preset('tiny')
B, L = 4, pre['seq_len']
def build(method):
  moe = MoEConfig(num_experts=pre['num_experts'], expert_width=pre['expert_width'], router=method)
  return TransformerLM(LMConfig(num_layers=pre['num_layers'], d_model=pre['d_model'],
                                num_heads=pre['num_heads'], d_ff=pre['d_ff'], max_len=L, moe=moe))
model = build(DTopP(k=2))
data = get_lm_data('stdlib', seq_len=L, batch_size=B, max_bytes=1_000_000)
variables = model.init({'params': jax.random.PRNGKey(0), 'router': jax.random.PRNGKey(0)},
                       jnp.zeros((B, L), jnp.int32))
params0 = nn.meta.unbox(variables['params'])
state0 = variables['router_state']

def with_gamma(params, gammas):
  '''gammas: one value per MoE layer (layers_0, layers_1, ...).'''
  params = jax.tree.map(lambda x: x, params)
  for i, g in enumerate(gammas):
    params[f'layers_{i}']['mlp']['gamma'] = jnp.float32(g)
  return params

@jax.jit
def forward(params, router_state, tokens):
  _, coll = model.apply({'params': params, 'router_state': router_state}, tokens,
                        train=False, mutable=['router'])
  return {path: v['metrics'] for path, v in router_outputs(coll['router']).items()}

def controller(method):
  @jax.jit
  def update(router_state, metrics):
    layers = {path: {'metrics': m} for path, m in metrics.items()}
    return update_router_state(method, router_state, layers, jnp.int32(0))
  return update

def response(gamma, kp, ki, steps=60, switch=30):
  params = with_gamma(params0, [gamma] * pre['num_layers'])
  updates = [controller(DTopP(k=k, pi_kp=kp, pi_ki=ki)) for k in (2, 3)]
  state, fan, ps = state0, [], []
  for t in range(steps):
    m = forward(params, state, jnp.asarray(data.batch(t)['inputs']))
    state = updates[t >= switch](state, m)
    fan.append(np.mean([float(v['experts_per_token']) for v in m.values()]))
    ps.append(float(np.mean([s['p'] for s in router_states(state).values()])))
  return np.array(fan), np.array(ps)

runs = {(g, kp, ki): response(g, kp, ki) for g, kp, ki in
        [(1.0, 0.1, 0.1), (3.0, 0.1, 0.1), (3.0, 0.5, 0.2)]}
target = np.array([2] * 30 + [3] * 30)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for (g, kp, ki), (fan, ps) in runs.items():
  axes[0].plot(fan, label=f'gamma {g:g}, kp {kp:g}, ki {ki:g}')
  axes[1].plot(ps, label=f'gamma {g:g}, kp {kp:g}, ki {ki:g}')
  late = fan[45:]
  print(f'gamma {g:g} kp {kp:g} ki {ki:g}: fanout over steps 45-59 '
        f'{late.mean():.2f} +- {late.std():.2f} (target 3), final p {ps[-1]:.3f}')
axes[0].plot(target, 'k--', lw=1, label='target')
axes[0].set_ylabel('mean experts per token'); axes[1].set_ylabel('p')
for ax in axes: ax.set_xlabel('step'); ax.legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 3. gamma sets each layer's fanout
# At one fixed p, a larger gamma sharpens a layer's probabilities, so it needs
# fewer experts to reach p. Here every layer gets the same gamma (swept) and p is
# held at 0.6; then layer 0 alone gets a large gamma. In training the loss learns
# gamma per layer, which is how a single global p ends up with different fanouts
# per layer.

# %%
import flax.traverse_util as tu
def set_p(router_state, p):
  flat = tu.flatten_dict(router_state)
  return tu.unflatten_dict({k: (jnp.float32(p) if k[-1] == 'p' else v) for k, v in flat.items()})
state_p = set_p(state0, 0.6)
tokens = jnp.asarray(data.batch(0)['inputs'])
gammas = [0.25, 0.5, 1.0, 2.0, 4.0]
per_layer = np.array([[float(v['experts_per_token']) for v in
                       forward(with_gamma(params0, [g] * pre['num_layers']), state_p, tokens).values()]
                      for g in gammas])
one = [float(v['experts_per_token']) for v in
       forward(with_gamma(params0, [4.0] + [1.0] * (pre['num_layers'] - 1)), state_p, tokens).values()]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for i in range(per_layer.shape[1]):
  axes[0].plot(gammas, per_layer[:, i], 'o-', label=f'layer {i}')
axes[0].set_xscale('log'); axes[0].set_xlabel('gamma (all layers)'); axes[0].set_ylabel('experts per token at p = 0.6')
axes[0].legend(fontsize=8)
axes[1].bar(range(len(one)), one); axes[1].set_xlabel('layer'); axes[1].set_ylabel('experts per token')
axes[1].set_title('gamma 4 on layer 0, 1 elsewhere (p = 0.6)')
plt.tight_layout(); plt.show()
print('fanout per layer by gamma:'); print(np.round(per_layer, 2))
