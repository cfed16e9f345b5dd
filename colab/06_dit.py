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
# # 06 · Diffusion Transformer with routed experts
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/moejax/moejax/blob/main/colab/06_dit.ipynb)
#
# A class-conditional **DiT** (Peebles & Xie 2023) on scikit-learn's 8×8 digits:
# patches → Transformer blocks conditioned on the timestep and the class through
# **adaLN-Zero**, whose MLPs are `moejax.nn.MoE` layers with any router. Trained
# with the DDPM epsilon loss, sampled with DDIM. Everything here is tiny and runs
# on a CPU in about a minute; `experiments/train_dit.py` is the real job and
# `experiments/reports/dit.md` compares the routers.

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
from moejax import diffusion, routing
from moejax.models.dit import DiT, DiTConfig, init_variables, sample
from moejax.nn.moe import MoEConfig
from moejax.data import get_image_data
print(jax.devices()[0], "routers:", routing.available())

# %% [markdown]
# ## The noise schedule
# `x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps`. The cosine schedule keeps more
# signal in the middle timesteps than the linear one.

# %%
cos = diffusion.DiffusionConfig(num_timesteps=1000, schedule="cosine")
lin = diffusion.DiffusionConfig(num_timesteps=1000, schedule="linear")
data = get_image_data("digits", batch_size=64, seed=0)
x0 = jnp.asarray(data.batch(0)["images"][:1])
ts = [0, 200, 400, 600, 800, 999]
fig, ax = plt.subplots(1, len(ts) + 1, figsize=(12, 2))
ax[0].plot(cos.alpha_bar(), label="cosine"); ax[0].plot(lin.alpha_bar(), label="linear")
ax[0].set_title("alpha bar"); ax[0].legend(fontsize=6)
for a, t in zip(ax[1:], ts):
  xt = diffusion.q_sample(x0, jnp.array([t]), jax.random.normal(jax.random.PRNGKey(0), x0.shape),
                          jnp.asarray(cos.alpha_bar()))
  a.imshow(np.asarray(xt[0, ..., 0]), cmap="gray", vmin=-1, vmax=1); a.set_title(f"t={t}"); a.axis("off")
plt.show()

# %% [markdown]
# ## A tiny routed DiT
# adaLN-Zero makes every block the identity at initialisation (the gates start
# at zero), so the untrained model predicts eps = 0. The router here is DTop-p
# when it is registered (its PI controller holds the mean fanout at `k`), else
# top-k; any name from `routing.available()` works the same way.

# %%
router = "dtop_p" if "dtop_p" in routing.available() else "top_k"
moe = MoEConfig(num_experts=4, expert_width=32, router=routing.build(router, {"k": 2}),
                group_size=64)
cfg = DiTConfig(image_size=8, channels=1, patch_size=2, num_classes=10, num_layers=2,
                d_model=32, num_heads=2, d_ff=64, moe=moe, frequency_dim=32)
model = DiT(cfg)
params, router_state = init_variables(model, jax.random.PRNGKey(0))
x4 = jnp.asarray(data.batch(0)["images"][:4])  # routing groups: 64 tokens = 4 images
out = model.apply({"params": params, "router_state": router_state}, x4,
                  jnp.array([10, 300, 600, 900]), jnp.array([3, 1, 4, 1]))
print("router:", router, " output shape:", out.shape, " max |output| at init:", float(jnp.abs(out).max()))

# %% [markdown]
# ## Training with the generic train step
# `make_dit_train_step` is `moejax.train.step.make_train_step` with the diffusion
# loss: the same `TrainState`, optimizer and controller updates as the LM.
# Timesteps are drawn stratified over the batch, so each step also reports the
# loss and the mean fanout per timestep bucket.

# %%
from moejax.tasks import dit as dit_loop
from moejax.train.state import OptimConfig, create_train_state
steps = 80
tcfg = dit_loop.DiTTrainConfig(
    model=cfg, diffusion=diffusion.DiffusionConfig(num_timesteps=1000),
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=10, total_steps=steps, weight_decay=0.0),
    batch_size=64, steps=steps, timestep_buckets=4, progress=False)
state = create_train_state(params, router_state, tcfg.optim.optimizer(), jax.random.PRNGKey(1))
train_step = dit_loop.make_dit_train_step(model, tcfg)
history = []
for i in range(steps):
  state, m = train_step(state, {k: jnp.asarray(v) for k, v in data.batch(i).items()})
  history.append(jax.device_get(m))
fig, ax = plt.subplots(1, 2, figsize=(9, 3))
ax[0].plot([h["loss"] for h in history]); ax[0].set_xlabel("step"); ax[0].set_ylabel("denoising loss")
ax[1].plot([h["fanout_by_t"] for h in history]); ax[1].set_xlabel("step"); ax[1].set_ylabel("experts/token")
ax[1].legend([f"t bucket {b}" for b in range(4)], fontsize=7)
plt.show()
print("last loss %.4f, fanout by t bucket (clean -> noisy):" % history[-1]["loss"],
      np.round(history[-1]["fanout_by_t"], 3))

# %% [markdown]
# ## DDIM samples and their quality
# `sample` runs DDIM in one jitted `lax.fori_loop`. A small classifier trained on
# the real digits scores the samples (class accuracy, Fréchet distance in its
# feature space); 80 steps of a tiny model give blurry digits and low scores —
# the report's runs train longer.

# %%
from moejax.eval import image_quality
labels = jnp.repeat(jnp.arange(10), 8)
imgs = np.asarray(sample(model, state.params, state.router_state, labels, jax.random.PRNGKey(2),
                         diffusion=tcfg.diffusion, num_steps=20))
grid = dit_loop.image_grid(imgs.reshape(10, 8, 8, 8, 1).transpose(1, 0, 2, 3, 4).reshape(80, 8, 8, 1), 10)
plt.figure(figsize=(5, 4)); plt.imshow(grid[..., 0], cmap="gray"); plt.axis("off"); plt.show()
train_x, train_y = dit_loop.real_images(tcfg, "train")
val_x, val_y = dit_loop.real_images(tcfg, "validation")
clf = image_quality.fit_classifier(train_x, train_y)
q = image_quality.sample_quality(clf, imgs, np.asarray(labels), train_x, heldout=val_x, num_classes=10)
print("classifier accuracy on real validation digits: %.3f" % clf.accuracy(val_x, val_y))
print("class accuracy of samples: %.3f   Frechet: %.2f (real-vs-real floor %.2f)"
      % (q["class_accuracy"], q["frechet"], q["real_frechet"]))

# %% [markdown]
# ## The real job
# ```
# python experiments/train_dit.py --router=dtop_p --k=2 --steps=1500 --workdir=runs/dit_dtopp
# python experiments/dit_compare.py --config=tiny --routers=top_k,top_p:0.3,dtop_p,dense --seeds=0,1
# ```
# writes metrics.jsonl (denoising loss, per-timestep loss and fanout),
# checkpoints (resumable, controller state included), a sample grid per class
# and the quality scores.
