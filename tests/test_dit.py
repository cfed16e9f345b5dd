"""DiT: shapes, adaLN-Zero identity, diffusion math, DDIM, training, resume, quality."""
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import diffusion
from moejax import routing
from moejax import sharding
from moejax.data.images import digits_arrays
from moejax.eval import image_quality
from moejax.routing import TopK
from moejax.models import dit as dit_lib
from moejax.models.dit import DiT, DiTBlock, DiTConfig
from moejax.nn.attention import Attention
from moejax.nn.moe import MoEConfig
from moejax.tasks import dit as dit_task
from moejax.train import loop
from moejax.train.state import OptimConfig

# One routed model shared by the heavy tests, so that they share compiled
# steps: DTop-p when registered (variable fanout, a controller, a learned
# gamma), else top-k; routing groups of 2 images (32 patches).
ROUTER = "dtop_p" if "dtop_p" in routing.available() else "top_k"
MOE = MoEConfig(num_experts=4, expert_width=16,
                router=routing.build(ROUTER, {"k": 2}), group_size=32)


def tiny_config(moe=MOE, **kw):
  base = dict(image_size=8, channels=1, patch_size=2, num_classes=10,
              num_layers=2, d_model=16, num_heads=2, d_ff=32, moe=moe,
              moe_every=2, frequency_dim=16)  # block 0 dense, block 1 MoE
  base.update(kw)
  return DiTConfig(**base)


def tiny_train_config(**kw):
  base = dict(model=tiny_config(),
              diffusion=diffusion.DiffusionConfig(num_timesteps=100),
              optim=OptimConfig(learning_rate=3e-3, warmup_steps=0,
                                total_steps=30, weight_decay=0.0),
              batch_size=16, steps=4, log_every=1, eval_every=2,
              eval_batches=1, eval_repeats=1, checkpoint_every=2,
              timestep_buckets=4, sample_steps=2, samples_per_class=0,
              quality_samples_per_class=0, num_devices=1, progress=False)
  base.update(kw)
  return dit_task.DiTTrainConfig(**base)


# ---------------------------------------------------------------- model


def test_patchify_matches_loop_and_inverts():
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  p = 2
  got = np.asarray(dit_lib.patchify(jnp.asarray(x), p))
  ref = np.zeros((2, 16, p * p * 3), np.float32)
  for b in range(2):
    for i in range(4):
      for j in range(4):
        ref[b, i * 4 + j] = x[b, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(
      np.asarray(dit_lib.unpatchify(jnp.asarray(got), p, 3)), x)


@pytest.mark.parametrize("moe", [MOE, None], ids=["moe", "dense"])
def test_shapes_zero_init_and_per_image_fanout(moe):
  model = DiT(tiny_config(moe=moe))
  params, router_state = dit_lib.init_variables(model, jax.random.PRNGKey(0))
  params = nn.meta.unbox(params)
  forward = jax.jit(lambda p, x, t, y: model.apply(
      {"params": p, "router_state": router_state}, x, t, y,
      mutable=["router"]))
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 1))
  t, y = jnp.array([0, 50, 99, 7]), jnp.array([0, 3, 10, 9])
  out, coll = forward(params, x, t, y)
  chex.assert_shape(out, (4, 8, 8, 1))
  assert out.dtype == jnp.float32
  # adaLN-Zero: zero-initialised final layer -> the prediction starts at 0.
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  if moe is None:
    assert "router" not in coll
    return
  assert "layers_0" not in coll["router"]  # the dense block sows nothing
  fan = np.asarray(coll["router"]["layers_1"]["mlp"]["fanout"][0])
  chex.assert_shape(fan, (2, 32))  # groups of 2 images x 16 patches
  assert fan.min() >= 1 and fan.max() <= 4
  # Per-image fanout (what the per-timestep metrics bucket) averages to each
  # layer's experts_per_token, also for a trained-looking, non-trivial router.
  params = jax.tree.map(
      lambda p: p + 0.5 * jax.random.normal(jax.random.PRNGKey(7), p.shape),
      params)
  out, coll = forward(params, x, t, y)
  assert float(jnp.max(jnp.abs(out))) > 0
  layers = dit_task.router_outputs(coll["router"])
  per_image = np.asarray(dit_task.per_image_fanout(layers, 4))
  chex.assert_shape(per_image, (1, 4))  # [MoE layers, images]
  for row, layer in zip(per_image, layers.values()):
    np.testing.assert_allclose(row.mean(), float(
        layer["metrics"]["experts_per_token"]), rtol=1e-5)
  if ROUTER == "dtop_p":
    assert per_image.std() > 0  # variable fanout across images


def test_adaln_zero_block_is_identity_at_init_and_not_after():
  block = DiTBlock(num_heads=2, d_ff=32, moe=None)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16))
  c = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
  variables = jax.jit(lambda r: block.init({"params": r}, x, c, train=False))(
      jax.random.PRNGKey(2))
  apply = jax.jit(lambda v: block.apply(v, x, c, train=False))
  y = apply(variables)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  # With a non-zero modulation the block changes its input (the test can fail).
  params = jax.tree.map(lambda a: a, variables["params"])
  params["adaln"]["bias"] = jnp.ones_like(params["adaln"]["bias"])
  y2 = apply({**variables, "params": params})
  assert float(jnp.max(jnp.abs(y2 - x))) > 1e-3


def test_noncausal_attention_matches_full_softmax_reference():
  attn = Attention(num_heads=2, causal=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 8))
  pos = jnp.zeros((1, 5), jnp.int32)  # RoPE is the identity at position 0
  variables = jax.jit(attn.init)(jax.random.PRNGKey(1), x, pos)
  out, _ = jax.jit(attn.apply)(variables, x, pos)
  p = jax.tree.map(np.asarray, nn.meta.unbox(variables["params"]))
  xn = np.asarray(x[0], np.float64)
  q = np.einsum("ld,dhk->lhk", xn, p["query"]["kernel"])
  k = np.einsum("ld,dhk->lhk", xn, p["key"]["kernel"])
  v = np.einsum("ld,dhk->lhk", xn, p["value"]["kernel"])
  s = np.einsum("lhk,thk->hlt", q, k) / np.sqrt(4)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.einsum("hlt,thk->lhk", w, v)
  ref = np.einsum("lhk,hkd->ld", ref, p["out"]["kernel"])
  np.testing.assert_allclose(np.asarray(out[0]), ref, rtol=1e-4, atol=1e-5)
  # The causal default differs (the first token sees only itself).
  causal, _ = jax.jit(Attention(num_heads=2).apply)(variables, x,
                                                    jnp.arange(5)[None])
  assert not np.allclose(np.asarray(causal[0, 0]), ref[0], atol=1e-3)


def test_config_validation_names_field():
  with pytest.raises(ValueError, match="patch_size=3"):
    tiny_config(patch_size=3)
  with pytest.raises(ValueError, match="class_dropout=1"):
    tiny_config(class_dropout=1.0)
  with pytest.raises(ValueError, match="num_layers=0"):
    tiny_config(num_layers=0)
  with pytest.raises(ValueError, match="schedule='quadratic'"):
    diffusion.DiffusionConfig(schedule="quadratic")
  with pytest.raises(ValueError, match="num_timesteps=1"):
    diffusion.DiffusionConfig(num_timesteps=1)
  with pytest.raises(ValueError, match="timestep_buckets=3"):
    tiny_train_config(timestep_buckets=3)
  with pytest.raises(ValueError, match="batch_size=16 .* multiple of 32"):
    tiny_train_config(model=tiny_config(moe=MoEConfig(
        num_experts=4, expert_width=16, router=TopK(k=2), group_size=512)))
  with pytest.raises(ValueError, match="grad_accum=2 is not supported by "
                     "the DiT; allowed: 1"):
    tiny_train_config(grad_accum=2)


# ---------------------------------------------------------------- diffusion


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_alpha_bar(schedule):
  cfg = diffusion.DiffusionConfig(num_timesteps=50, schedule=schedule)
  ab = cfg.alpha_bar()
  assert ab.shape == (50,)
  assert np.all(np.diff(ab) < 0) and 0 < ab[-1] < ab[0] < 1
  assert ab[-1] < 0.01  # the last step is (nearly) pure noise
  if schedule == "cosine":
    s, t = 0.008, np.arange(1, 51) / 50
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    np.testing.assert_allclose(ab[:-1], (f(t) / f(0))[:-1], rtol=1e-5)


def test_v_prediction_roundtrip_and_q_sample():
  cfg = diffusion.DiffusionConfig(num_timesteps=100)
  ab = jnp.asarray(cfg.alpha_bar())
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x0 = jax.random.uniform(k1, (4, 8, 8, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 10, 50, 99])
  xt = diffusion.q_sample(x0, t, eps, ab)
  a = np.asarray(ab)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(np.asarray(xt), np.sqrt(a) * x0 + np.sqrt(1 - a) * eps,
                             rtol=1e-6)
  v = diffusion.target(x0, eps, t, ab, "v")
  np.testing.assert_allclose(
      np.asarray(diffusion.to_eps(v, xt, ab[t], "v")), np.asarray(eps),
      atol=1e-5)


def test_stratified_timesteps_fill_every_bucket_equally():
  t = diffusion.stratified_timesteps(jax.random.PRNGKey(3), 64, 1000)
  assert t.dtype == jnp.int32 and int(t.min()) >= 0 and int(t.max()) < 1000
  buckets = np.asarray(dit_task.bucket_of(t, 1000, 4))
  np.testing.assert_array_equal(np.bincount(buckets, minlength=4), [16] * 4)


def _oracle(x0_fixed, cfg):
  """A model of a one-point data set: its exact eps for any x_t."""
  ab = jnp.asarray(cfg.alpha_bar())

  def apply_fn(variables, x, t, labels):
    del variables, labels
    a = ab[t][:, None, None, None]
    return (x - jnp.sqrt(a) * x0_fixed) / jnp.sqrt(1 - a)
  return apply_fn


def test_ddim_recovers_the_data_point_and_is_deterministic():
  cfg = diffusion.DiffusionConfig(num_timesteps=100)
  x0 = jnp.linspace(-0.9, 0.9, 64).reshape(1, 8, 8, 1)
  apply_fn = _oracle(x0, cfg)
  labels = jnp.zeros((3,), jnp.int32)
  kw = dict(shape=(8, 8, 1), config=cfg, num_steps=10)
  a = diffusion.ddim_sample(apply_fn, {}, labels, jax.random.PRNGKey(0), **kw)
  chex.assert_shape(a, (3, 8, 8, 1))
  np.testing.assert_allclose(np.asarray(a), np.broadcast_to(x0, a.shape),
                             atol=1e-4)
  # Same key -> identical samples (also with eta > 0); other key -> other noise.
  kw.update(eta=1.0)
  b1 = diffusion.ddim_sample(apply_fn, {}, labels, jax.random.PRNGKey(1), **kw)
  b2 = diffusion.ddim_sample(apply_fn, {}, labels, jax.random.PRNGKey(1), **kw)
  np.testing.assert_array_equal(np.asarray(b1), np.asarray(b2))
  np.testing.assert_allclose(np.asarray(b1), np.broadcast_to(x0, a.shape),
                             atol=1e-3)
  # Guidance with a label-blind model equals unguided sampling.
  g = diffusion.ddim_sample(apply_fn, {}, labels, jax.random.PRNGKey(0),
                            shape=(8, 8, 1), config=cfg, num_steps=10,
                            guidance_scale=3.0, null_label=10)
  np.testing.assert_allclose(np.asarray(g), np.asarray(a), atol=1e-5)


def _mesh_state(cfg):
  """(mesh, model, state) placed as the loop places them (1 device), so
  that the tests share its compiled steps and sampler."""
  mesh = sharding.make_mesh(None, jax.devices()[:1])
  model = DiT(cfg.model)
  with jax.set_mesh(mesh):
    state = loop.build_state(cfg, model, mesh)
  return mesh, model, state


def test_model_sampler_shapes_and_determinism():
  # Routing groups of 2 images: 3 labels are padded to 4 and cut back.
  cfg = tiny_train_config()
  assert dit_lib.batch_multiple(cfg.model) == 2
  mesh, model, state = _mesh_state(cfg)
  with jax.set_mesh(mesh):
    params = jax.tree.map(  # non-zero outputs
        lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(5), p.shape),
        state.params)
    labels = np.array([0, 1, 2], np.int32)
    kw = dict(diffusion=cfg.diffusion, num_steps=cfg.sample_steps)
    rs = state.router_state
    s1 = dit_lib.sample(model, params, rs, labels, jax.random.PRNGKey(1), **kw)
    s2 = dit_lib.sample(model, params, rs, labels, jax.random.PRNGKey(1), **kw)
    s3 = dit_lib.sample(model, params, rs, labels, jax.random.PRNGKey(2), **kw)
  chex.assert_shape(s1, (3, 8, 8, 1))
  assert float(jnp.max(jnp.abs(s1))) <= 1.0
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))
  assert not np.allclose(np.asarray(s1), np.asarray(s3))


# ---------------------------------------------------------------- training


def _batch(i, size=16):
  tx, ty, _, _ = digits_arrays()
  idx = (np.arange(size) + i * size) % len(tx)
  return {"images": jnp.asarray(tx[idx]), "labels": jnp.asarray(ty[idx])}


def test_loss_decreases_and_fanout_by_timestep_is_consistent():
  cfg = tiny_train_config(steps=30)
  mesh, model, state = _mesh_state(cfg)
  step = dit_task.make_dit_train_step(model, cfg)
  eval_step = dit_task.make_dit_eval_step(model, cfg.diffusion, 4)
  put = lambda b: jax.device_put(b, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    val = [put(_batch(100))]
    before = dit_task.evaluate_dit(eval_step, state, val)["eval_loss"]
    for i in range(30):
      state, metrics = step(state, put(_batch(i)))
    after = dit_task.evaluate_dit(eval_step, state, val)
  assert after["eval_loss"] < 0.8 * before, (before, after["eval_loss"])
  assert before == pytest.approx(1.0, abs=0.15)  # zero prediction: E[eps^2]
  chex.assert_shape(metrics["loss_by_t"], (4,))
  chex.assert_shape(metrics["fanout_by_t"], (4,))
  # Stratified timesteps fill the buckets equally, so the bucket means
  # average to the step's means.
  np.testing.assert_allclose(float(jnp.mean(metrics["fanout_by_t"])),
                             float(metrics["experts_per_token"]), rtol=1e-5)
  np.testing.assert_allclose(float(jnp.mean(metrics["loss_by_t"])),
                             float(metrics["loss"]), rtol=1e-5)
  assert len(after["eval_layer_fanout_by_t"]) == 1  # one MoE layer
  np.testing.assert_allclose(np.mean(after["eval_fanout_by_t"]),
                             after["eval_experts_per_token"], rtol=1e-5)


def test_resume_is_exact_with_controller_state_and_writes_outputs(tmp_path):
  # With DTop-p, its PI controller state and learned gamma resume exactly too.
  name = ROUTER
  cfg = tiny_train_config(samples_per_class=2, quality_samples_per_class=2,
                          sample_classes=(0, 1), keep_checkpoints=3)
  workdir = tmp_path / "run"
  full = loop.train(cfg, str(workdir))
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints")
                if d.isdigit()) == [2, 4]
  if name == "dtop_p":
    assert full["state"].router_state  # the controller lives in the state
  # A crash after step 2's checkpoint: drop step 4 and run again.
  import shutil
  shutil.rmtree(workdir / "checkpoints" / "4")
  resumed = loop.train(cfg, str(workdir))
  assert resumed["resumed_from"] == 2
  for part in ("params", "opt_state", "router_state", "step", "data_index"):
    chex.assert_trees_all_equal(getattr(full["state"], part),
                                getattr(resumed["state"], part))
  assert full["eval_loss"] == resumed["eval_loss"]
  records = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
  assert "routing" in records[0]  # the effective routing comes first
  first = [r for r in records if "loss" in r][0]
  assert "fanout_by_t" in first and len(first["loss_by_t"]) == 4
  final = records[-1]
  assert final["final"] and "class_accuracy" in final and "frechet" in final
  for c in (0, 1):
    assert os.path.exists(workdir / "samples" / f"class_{c}.png")
  assert os.path.exists(workdir / "samples.png")
  summary = json.load(open(workdir / "summary.json"))
  assert summary["num_samples"] == 4 and summary["router"] == name


def test_dit_runs_through_the_shared_loop(tmp_path, monkeypatch):
  # The same loop as the LM: the DiT task names it, batches take the
  # per-process placement of `sharding.put_batch` under `jax.set_mesh`, and
  # the run writes the loop's outputs.
  cfg = tiny_train_config(steps=2)
  assert isinstance(loop.as_task(cfg), dit_task.DiTTask)
  placed = []

  def put_batch(batch, batch_sharding, local=False):
    placed.append(sharding.current_mesh() is not None)
    return put(batch, batch_sharding, local)

  put = sharding.put_batch
  monkeypatch.setattr(sharding, "put_batch", put_batch)
  out = loop.train(cfg, str(tmp_path))
  assert placed and all(placed)
  assert len(placed) == 2 + 1  # two train batches, one eval batch
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records if "loss" in r] == [1, 2]
  assert "routing" in records[0] and records[-1]["final"]
  assert all("images_per_s" in r for r in records if "loss" in r)
  assert os.path.exists(tmp_path / "summary.json")
  assert os.path.exists(out["plot"]) and out["resumed_from"] is None


# ---------------------------------------------------------------- quality


def test_classifier_is_accurate_on_real_digits():
  tx, ty, vx, vy = digits_arrays()
  clf = image_quality.fit_classifier(tx, ty)
  assert clf.accuracy(vx, vy) > 0.95
  assert image_quality.fit_classifier(tx, ty) is clf  # cached
  q = image_quality.sample_quality(clf, vx, vy, tx, heldout=vx,
                                   num_classes=10)
  assert q["class_accuracy"] > 0.95
  noise = np.random.default_rng(0).uniform(-1, 1, vx.shape)
  qn = image_quality.sample_quality(clf, noise, vy, tx, num_classes=10)
  assert qn["class_accuracy"] < 0.3
  assert qn["frechet"] > 10 * q["frechet"]


def test_frechet_distance_matches_1d_closed_form():
  rng = np.random.default_rng(0)
  a = rng.normal(0.0, 1.0, (400, 1))
  b = rng.normal(2.0, 3.0, (300, 1))
  ref = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
  assert image_quality.frechet_distance(a, b) == pytest.approx(ref, rel=1e-4)
  assert image_quality.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------- CLI


def test_every_registered_router_builds_a_dit_config():
  from absl import flags
  from moejax.cli import dit_flags
  before = {name: flags.FLAGS[name].default for name in flags.FLAGS}
  try:
    dit_flags.define_flags()
    base = {name: flags.FLAGS[name].default for name in flags.FLAGS}
  finally:  # leave the process-wide flag defaults as they were
    for name, default in before.items():
      flags.FLAGS.set_default(name, default)
  assert base["dataset"] is None and "patch_size" in base  # the config's
  # Routers registered by any module work through the registry unchanged.
  for router in routing.available() + ("dense",):
    values = dict(base, router=router, k=2)
    cfg = dit_flags.build_dit_train_config(values)
    assert cfg.dataset == "digits"
    assert cfg.model.image_size == 8 and cfg.model.num_classes == 10
    if router == "dense":
      assert cfg.model.moe is None and cfg.model.d_ff == 2 * 64
    else:
      assert cfg.model.moe.router.name == router
      assert cfg.model.moe.num_experts == 8
  with pytest.raises(ValueError, match="mod_capacity"):
    dit_flags.build_dit_train_config(dict(base, mod_capacity=0.5))
  with pytest.raises(ValueError, match="router='nope'"):
    dit_flags.build_dit_train_config(dict(base, router="nope"))
