"""The DiT task: a class-conditional DiT, its denoising loss, eval by
timestep, samples, quality scores and plots.

Axis legend:
  B  batch
  H, W, C  image height, width, channels
  T  diffusion timesteps
  NB timestep buckets (bucket b holds t in [b T / NB, (b + 1) T / NB))
  NL routed (MoE) layers
  G, S  routing groups and tokens per group of an MoE layer (G * S = B * L)

`DiTTrainConfig` is one DiT run; `DiTTask` gives the loop (`moejax.train.loop`,
the same loop as the LM's) the model, data, loss, eval, samples and plots. The
train step is `moejax.train.step.make_train_step` with the diffusion loss
(`loss_fn=`): the same `TrainState`, optimizer, controller updates (router
state from the step's globally reduced metrics) and checkpoints as the LM. Timesteps
are drawn stratified over the batch, so every bucket has B / NB examples and
the step logs the loss and the mean fanout (experts per token, from the MoE
layers' sown per-token `fanout`) per timestep bucket. Validation uses fixed
noise and timesteps (independent of the run's seed) so that runs compare on
the same draws.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import diffusion as diffusion_lib
from moejax.checks import check_int_fields, check_positive_ints
from moejax.data import get_image_data
from moejax.models.dit import DiT, DiTConfig, batch_multiple, sample
from moejax.train import metrics as metrics_lib
from moejax.train.config import LoopConfig, embed_loop
from moejax.train.state import OptimConfig, TrainState
from moejax.train.step import router_outputs, summarize
from moejax.train.task import Task

EVAL_SEED = 20240917  # validation noise/timesteps: the same for every run


def dit_loop() -> LoopConfig:
  """The DiT's loop defaults (where they differ from the LM's on purpose: a
  larger batch of small images, more steps, no weight decay)."""
  return LoopConfig(optim=OptimConfig(weight_decay=0.0), batch_size=64,
                    steps=1000, log_every=25, eval_every=250, eval_batches=4,
                    checkpoint_every=250, keep_checkpoints=2)


@embed_loop
@dataclasses.dataclass(frozen=True)
class DiTTrainConfig:
  """One DiT training run. Counts must be >= 1 unless noted.

  The loop's settings are `loop` (`dit_loop()`'s defaults), also this
  config's flat keywords and attributes, as `TrainConfig`'s.

  Attributes:
    model: the `DiTConfig` (its image shape must match the data's).
    loop: the loop's settings (`moejax.train.config.LoopConfig`); its
      `batch_size` B must be a multiple of `timestep_buckets` and of the
      number of devices; `grad_accum` must be 1.
    diffusion: the noise schedule and prediction target.
    dataset: `digits` or `tfds:mnist` / `tfds:cifar10` (prepared on disk).
    data_dir: tensorflow-datasets directory.
    upsample: nearest-neighbour factor on the images.
    max_examples: tfds: at most this many examples per split (None = all).
    eval_repeats: passes over the validation batches with fresh noise.
    timestep_buckets: NB.
    sample_steps: DDIM steps of the final samples.
    samples_per_class: images per class in the sample grids (0 = none).
    quality_samples_per_class: samples per class scored by the classifier
      (0 = no quality score).
    sample_classes: classes to draw (None = all).
    guidance_scale: classifier-free guidance w of the final samples (1 = off).
    eta: DDIM eta of the final samples.
  """
  model: DiTConfig = dataclasses.field(default_factory=DiTConfig)
  loop: LoopConfig = dataclasses.field(default_factory=dit_loop)
  diffusion: diffusion_lib.DiffusionConfig = dataclasses.field(
      default_factory=diffusion_lib.DiffusionConfig)
  dataset: str = "digits"
  data_dir: str | None = None
  upsample: int = 1
  max_examples: int | None = None
  eval_repeats: int = 2
  timestep_buckets: int = 4
  sample_steps: int = 50
  samples_per_class: int = 16
  quality_samples_per_class: int = 50
  sample_classes: tuple[int, ...] | None = None
  guidance_scale: float = 1.0
  eta: float = 0.0

  def task(self) -> DiTTask:
    return DiTTask(self)

  def __post_init__(self):
    check_positive_ints(self, ("eval_repeats", "timestep_buckets",
                               "sample_steps", "upsample"))
    if self.loop.grad_accum != 1:  # the timestep strata span the whole batch
      raise ValueError(f"grad_accum={self.loop.grad_accum} is not supported "
                       "by the DiT; allowed: 1")
    check_int_fields(self, ("samples_per_class", "quality_samples_per_class"),
                     0)
    unit = batch_multiple(self.model)
    if self.loop.batch_size % unit:
      raise ValueError(f"batch_size={self.loop.batch_size} is out of range; "
                       f"allowed: a multiple of {unit} (MoE group_size="
                       f"{self.model.moe.group_size} tokens of "
                       f"{self.model.num_patches} patches per image)")
    if self.loop.batch_size % self.timestep_buckets:
      raise ValueError(f"timestep_buckets={self.timestep_buckets} must divide "
                       f"batch_size={self.loop.batch_size}")
    if self.timestep_buckets > self.diffusion.num_timesteps:
      raise ValueError(f"timestep_buckets={self.timestep_buckets} is out of "
                       f"range; allowed: <= num_timesteps="
                       f"{self.diffusion.num_timesteps}")
    if self.sample_steps > self.diffusion.num_timesteps:
      raise ValueError(f"sample_steps={self.sample_steps} is out of range; "
                       f"allowed: <= num_timesteps="
                       f"{self.diffusion.num_timesteps}")
    if self.guidance_scale < 0:
      raise ValueError(f"guidance_scale={self.guidance_scale} is out of range; "
                       "allowed: >= 0")
    if self.eta < 0:
      raise ValueError(f"eta={self.eta} is out of range; allowed: >= 0")
    if self.sample_classes is not None:
      bad = [c for c in self.sample_classes
             if not 0 <= c < self.model.num_classes]
      if bad or not self.sample_classes:
        raise ValueError(f"sample_classes={self.sample_classes} is out of "
                         f"range; allowed: non-empty, each in [0, "
                         f"{self.model.num_classes})")

  @property
  def classes(self) -> tuple[int, ...]:
    if self.sample_classes is None:
      return tuple(range(self.model.num_classes))
    return tuple(self.sample_classes)


def bucket_of(t: jax.Array, num_timesteps: int, num_buckets: int) -> jax.Array:
  """int32[B] bucket index of timesteps t int32[B]."""
  return jnp.minimum(t * num_buckets // num_timesteps, num_buckets - 1)


def per_image_fanout(layers: dict[tuple[str, ...], dict[str, Any]],
                     batch: int) -> jax.Array | None:
  """float32[NL, B]: mean experts per token of each image in each MoE layer.

  The layers' groups are the batch reshaped (G * S = B * L, in order), so the
  sown `fanout` float32[G, S] reshapes to [B, L].
  """
  rows = [v["fanout"].reshape(batch, -1).mean(axis=-1)
          for v in layers.values() if "fanout" in v]
  return jnp.stack(rows) if rows else None


def make_dit_forward(model: DiT, diffusion: diffusion_lib.DiffusionConfig,
                     num_buckets: int, train: bool):
  """`forward(params, router_state, batch, rng) -> (loss, aux_loss, stats, layers)`.

  stats: per-bucket sums float32[NB] `loss_sum`, `count`, and with MoE layers
  `fanout_sum` (mean over layers of each image's mean fanout) and
  `layer_fanout_sum` float32[NL, NB].
  """
  alpha_bar = jnp.asarray(diffusion.alpha_bar())
  cfg = model.config

  def forward(params, router_state, batch, rng):
    x0, labels = batch["images"], batch["labels"]
    size = x0.shape[0]
    t_rng, noise_rng, drop_rng, router_rng = jax.random.split(rng, 4)
    t = diffusion_lib.stratified_timesteps(t_rng, size,
                                           diffusion.num_timesteps)
    noise = jax.random.normal(noise_rng, x0.shape, jnp.float32)
    x_t = diffusion_lib.q_sample(x0, t, noise, alpha_bar)
    if train and cfg.class_dropout > 0:
      drop = jax.random.bernoulli(drop_rng, cfg.class_dropout, (size,))
      labels = jnp.where(drop, cfg.null_label, labels)
    out, coll = model.apply(
        {"params": params, "router_state": router_state}, x_t, t, labels,
        train=train, rngs={"router": router_rng}, mutable=["router"])
    per_example = diffusion_lib.per_example_loss(
        out, diffusion_lib.target(x0, noise, t, alpha_bar,
                                  diffusion.prediction))
    layers = router_outputs(coll.get("router", {}))
    aux_loss = sum((v["aux_loss"] for v in layers.values()),
                   jnp.zeros((), jnp.float32))
    one_hot = jax.nn.one_hot(bucket_of(t, diffusion.num_timesteps,
                                       num_buckets), num_buckets)  # [B, NB]
    stats = {"loss_sum": per_example @ one_hot, "count": one_hot.sum(axis=0)}
    fanout = per_image_fanout(layers, size)
    if fanout is not None:
      stats["layer_fanout_sum"] = fanout @ one_hot
      stats["fanout_sum"] = fanout.mean(axis=0) @ one_hot
    return jnp.mean(per_example), aux_loss, stats, layers

  return forward


def make_dit_loss_fn(model: DiT, diffusion: diffusion_lib.DiffusionConfig,
                     num_buckets: int):
  """The training loss for `make_train_step(loss_fn=...)`.

  Extra metrics: `loss_by_t` float32[NB] and, with MoE layers, `fanout_by_t`
  float32[NB] (mean experts per token per timestep bucket).
  """
  forward = make_dit_forward(model, diffusion, num_buckets, train=True)

  def loss_fn(params, router_state, batch, rng):
    loss, aux_loss, stats, layers = forward(params, router_state, batch, rng)
    count = jnp.maximum(stats["count"], 1.0)
    extra = {"loss_by_t": stats["loss_sum"] / count}
    if "fanout_sum" in stats:
      extra["fanout_by_t"] = stats["fanout_sum"] / count
    return loss + aux_loss, (loss, aux_loss, extra, layers)

  return loss_fn


def make_dit_train_step(model: DiT, cfg: DiTTrainConfig, donate: bool = True,
                        mesh=None):
  """Jitted `train_step(state, batch) -> (state, metrics)`: the loop's step of
  the DiT task (`moejax.train.loop.make_step`); with `mesh`, the new state
  keeps the shardings of `moejax.train.loop.build_state`."""
  from moejax.train import loop  # pylint: disable=g-import-not-at-top
  return loop.make_step(DiTTask(cfg), model, mesh, donate)


def make_dit_eval_step(model: DiT, diffusion: diffusion_lib.DiffusionConfig,
                       num_buckets: int):
  """Jitted `eval_step(state, batch, rng) -> sums and routing scalars`."""
  forward = make_dit_forward(model, diffusion, num_buckets, train=False)

  def eval_step(state: TrainState, batch, rng):
    _, _, stats, layers = forward(state.params, state.router_state, batch, rng)
    out = dict(stats)
    out.update({k: v for k, v in summarize(layers).items() if jnp.ndim(v) == 0})
    return out

  return jax.jit(eval_step)


def evaluate_dit(eval_step, state: TrainState, batches, repeats: int = 1
                 ) -> dict[str, Any]:
  """Validation denoising loss, overall and per timestep bucket, with fanout.

  Every (repeat, batch) pair uses the key `fold_in(fold_in(EVAL_SEED, r), i)`.
  Returns `eval_loss`, `eval_loss_by_t` [NB], `eval_fanout_by_t` [NB],
  `eval_layer_fanout_by_t` [NL][NB] (with MoE layers) and `eval_<metric>`
  means of the routing scalars.
  """
  batches = list(batches)
  if not batches:
    raise ValueError("evaluation got no batches")
  base = jax.random.PRNGKey(EVAL_SEED)
  sums: dict[str, Any] = {}
  scalars: dict[str, float] = {}
  n = 0
  for r in range(repeats):
    for i, batch in enumerate(batches):
      rng = jax.random.fold_in(jax.random.fold_in(base, r), i)
      out = jax.device_get(eval_step(state, batch, rng))
      for key in ("loss_sum", "count", "fanout_sum", "layer_fanout_sum"):
        if key in out:
          sums[key] = sums.get(key, 0.0) + np.asarray(out.pop(key), np.float64)
      for key, value in out.items():
        scalars[key] = scalars.get(key, 0.0) + float(value)
      n += 1
  count = np.maximum(sums["count"], 1.0)
  result = {f"eval_{k}": v / n for k, v in scalars.items()}
  result["eval_loss"] = float(sums["loss_sum"].sum() / sums["count"].sum())
  result["eval_loss_by_t"] = (sums["loss_sum"] / count).tolist()
  if "fanout_sum" in sums:
    result["eval_fanout_by_t"] = (sums["fanout_sum"] / count).tolist()
    result["eval_layer_fanout_by_t"] = (sums["layer_fanout_sum"]
                                        / count[None]).tolist()
  return result


def image_grid(images: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
  """float[N, H, W, C] in [-1, 1] -> float[rows (H + pad), cols (W + pad), C] in [0, 1]."""
  n, h, w, c = images.shape
  rows = -(-n // cols)
  grid = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad, c),
                 np.float32)
  for i, img in enumerate(np.clip((np.asarray(images) + 1) / 2, 0, 1)):
    r, q = divmod(i, cols)
    y, x = pad + r * (h + pad), pad + q * (w + pad)
    grid[y:y + h, x:x + w] = img
  return grid


def save_grid(images: np.ndarray, cols: int, path: str, scale: int = 4) -> str:
  """Writes a PNG grid of images float[N, H, W, C] in [-1, 1]."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  grid = image_grid(images, cols)
  grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  if grid.shape[-1] == 1:
    plt.imsave(path, grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0)
  else:
    plt.imsave(path, grid)
  return path


def plot_dit_run(records: list[dict[str, Any]], path: str,
                 target_fanout: float | None = None) -> str:
  """PNG: train/validation denoising loss; fanout over steps; fanout by timestep."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  evals = [r for r in records if "eval_loss" in r]
  fan = any("loss" in r and "experts_per_token" in r for r in records)
  panels = 1 + fan + bool(evals and "eval_fanout_by_t" in evals[-1])
  fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.3),
                           squeeze=False)
  metrics_lib.plot_loss(axes[0, 0], records, "denoising loss (MSE)")
  if fan:
    metrics_lib.plot_fanout(axes[0, 1], records, target_fanout)
  if panels == 3:
    ax = axes[0, 2]
    by_t = evals[-1]["eval_fanout_by_t"]
    centers = (np.arange(len(by_t)) + 0.5) / len(by_t)
    ax.plot(centers, by_t, "o-", label="all layers")
    for i, row in enumerate(evals[-1].get("eval_layer_fanout_by_t", [])):
      ax.plot(centers, row, lw=0.8, alpha=0.6, label=f"layer {i}")
    ax.set_xlabel("t / T (1 = pure noise)")
    ax.set_ylabel("experts per token (validation)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def generate(model: DiT, state: TrainState, cfg: DiTTrainConfig,
             per_class: int, rng: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """`per_class` DDIM samples of each class in `cfg.classes`: (images, labels)."""
  labels = np.repeat(np.asarray(cfg.classes, np.int32), per_class)
  images = sample(model, state.params, state.router_state, labels, rng,
                  diffusion=cfg.diffusion, num_steps=cfg.sample_steps,
                  eta=cfg.eta, guidance_scale=cfg.guidance_scale)
  return np.asarray(jax.device_get(images)), labels


def write_sample_grids(images: np.ndarray, labels: np.ndarray,
                       cfg: DiTTrainConfig, workdir: str) -> dict[str, Any]:
  """One PNG grid per class plus an overview (a row per class)."""
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  n = cfg.samples_per_class
  cols = int(np.ceil(np.sqrt(n)))
  paths, rows = [], []
  for c in cfg.classes:
    mine = images[labels == c][:n]
    paths.append(save_grid(mine, cols, os.path.join(out_dir,
                                                    f"class_{c}.png")))
    rows.append(mine[:min(n, 10)])
  overview = save_grid(np.concatenate(rows), min(n, 10),
                       os.path.join(workdir, "samples.png"))
  return {"sample_grids": paths, "samples_overview": overview}


def score_samples(cfg: DiTTrainConfig, images: np.ndarray, labels: np.ndarray
                  ) -> dict[str, Any]:
  """Classifier accuracy per requested class and Fréchet distance (see
  `moejax.eval.image_quality`); the classifier is fit on the real train split,
  the validation split gives the real-vs-real floor of the distance."""
  from moejax.eval import image_quality  # pylint: disable=g-import-not-at-top
  n = cfg.quality_samples_per_class
  keep = np.concatenate([np.flatnonzero(labels == c)[:n] for c in cfg.classes])
  train_x, train_y = real_images(cfg, "train")
  val_x, val_y = real_images(cfg, "validation")
  classifier = image_quality.fit_classifier(train_x, train_y)
  scores = image_quality.sample_quality(
      classifier, images[keep], labels[keep], train_x, heldout=val_x,
      num_classes=cfg.model.num_classes)
  scores["classifier_val_accuracy"] = classifier.accuracy(val_x, val_y)
  return scores


def real_images(cfg: DiTTrainConfig, split: str, limit: int = 10000
                ) -> tuple[np.ndarray, np.ndarray]:
  """At most `limit` real images float32[N, H, W, C] of a split ("train" or
  "validation"), scaled and upsampled like the training batches, and labels."""
  def data(batch_size):
    return get_image_data(cfg.dataset, batch_size=batch_size, seed=0,
                          data_dir=cfg.data_dir, upsample=cfg.upsample,
                          max_examples=cfg.max_examples)
  probe = data(1)
  if split != "train":
    batch = next(data(min(limit, probe.num_val)).eval_batches(1))
    return batch["images"], batch["labels"]
  # Train batches of the first epoch (a batch may not exceed the validation
  # split): distinct examples, in that epoch's order.
  n = min(limit, probe.num_train)
  source = data(min(n, probe.num_val))
  batches = [source.batch(i) for i in range(-(-n // source.batch_size))]
  return (np.concatenate([b["images"] for b in batches])[:n],
          np.concatenate([b["labels"] for b in batches])[:n])


class DiTTask(Task):
  """Denoising: the mean diffusion loss (MSE), overall and per timestep bucket,
  with the fanout per bucket; DDIM samples per class and their quality."""
  name = "train dit"
  rate_key = "images_per_s"
  loss_format = ".4f"
  config: DiTTrainConfig

  def build_model(self) -> DiT:
    return DiT(self.config.model)

  def example_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """images float32[B, H, W, C], timesteps int32[B], labels int32[B]."""
    shape = (self.config.loop.batch_size,) + self.config.model.image_shape
    return (jnp.zeros(shape, jnp.float32), jnp.zeros(shape[:1], jnp.int32),
            jnp.zeros(shape[:1], jnp.int32))

  def step_key(self) -> tuple[Any, ...]:
    return (self.config.diffusion, self.config.timestep_buckets)

  def data(self):
    cfg = self.config
    data = get_image_data(cfg.dataset, batch_size=cfg.loop.batch_size,
                          seed=cfg.loop.seed, data_dir=cfg.data_dir,
                          upsample=cfg.upsample, max_examples=cfg.max_examples)
    if data.image_shape != cfg.model.image_shape:
      raise ValueError(f"data set {cfg.dataset!r} has images of shape "
                       f"{list(data.image_shape)} but the model wants "
                       f"{list(cfg.model.image_shape)}; set image_size/"
                       "channels (or upsample) to match")
    if data.num_classes != cfg.model.num_classes:
      raise ValueError(f"data set {cfg.dataset!r} has {data.num_classes} "
                       f"classes but the model has num_classes="
                       f"{cfg.model.num_classes}")
    return data

  def items_per_step(self) -> int:
    return self.config.loop.batch_size

  def loss_fn(self, model: DiT):
    return make_dit_loss_fn(model, self.config.diffusion,
                            self.config.timestep_buckets)

  def make_eval_step(self, model: DiT):
    return make_dit_eval_step(model, self.config.diffusion,
                              self.config.timestep_buckets)

  def evaluate(self, eval_step, state: TrainState, batches) -> dict[str, Any]:
    return evaluate_dit(eval_step, state, batches, self.config.eval_repeats)

  def outputs(self, model: DiT, state: TrainState, workdir: str
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Samples of every class in `cfg.classes`: `workdir/samples/class_<c>.png`
    (a grid per class), `workdir/samples.png` (a row per class), and the
    classifier's quality scores (in the final log record too)."""
    cfg = self.config
    per_class = max(cfg.samples_per_class, cfg.quality_samples_per_class)
    if not per_class:
      return {}, {}
    t0 = time.perf_counter()
    images, labels = generate(model, state, cfg, per_class,
                              jax.random.PRNGKey(cfg.loop.seed + 1))
    sample_seconds = time.perf_counter() - t0
    quality, grids = {}, {}
    if cfg.samples_per_class:
      grids = write_sample_grids(images, labels, cfg, workdir)
    if cfg.quality_samples_per_class:
      quality = score_samples(cfg, images, labels)
    quality["sample_seconds"] = sample_seconds
    return quality, grids

  def output_seconds(self, eval_batch_seconds: float,
                     compile_seconds: float) -> float:
    """The sampler compiles in about the train step's time and runs
    `sample_steps`
    model passes over the samples (an evaluation batch's cost per batch of
    images); the classifier's fit is left out."""
    cfg = self.config
    per_class = max(cfg.samples_per_class, cfg.quality_samples_per_class)
    if not per_class:
      return 0.0
    images = per_class * len(cfg.classes)
    return compile_seconds + cfg.sample_steps * max(
        images / cfg.loop.batch_size, 1.0) * eval_batch_seconds

  def plot(self, records, path: str, target_fanout: float | None) -> str:
    return plot_dit_run(records, path, target_fanout)
