"""absl flags of `experiments/train_dit.py` and their translation into configs.

The flags are those of `experiments/train_lm.py` (`lm_flags.define_flags()`:
`--router`, `--num_experts`, `--k`, `--p`, every router option, the MoE layer
options, `--steps`, `--seed`, `--workdir`, ...; routers registered later appear
there and work here unchanged) with DiT defaults (`--dataset=digits`, DiT
presets for `--config`) and the DiT's own flags below. The MoE layer config is
built by `lm_flags` exactly as for the LM. LM-only flags (`--seq_len`,
`--sample_tokens`, `--temperature`, `--mod_*`) are ignored, except that
`--mod_capacity > 0` is refused (no Mixture-of-Depths in the DiT yet).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Mapping

from absl import flags

from moejax.cli import lm_flags
from moejax.data import DataError
from moejax.diffusion import DiffusionConfig
from moejax.models.dit import DiTConfig
from moejax.train.dit_loop import DiTTrainConfig
from moejax.train.state import OptimConfig

# Presets on 8x8 digits. `tiny`: minutes on a CPU; `small`: the comparison of
# experiments/reports/dit.md (a GPU, or tens of minutes on a CPU). d_ff (the dense model's MLP) = k * expert_width
# matches the active FLOPs of a top-k MoE (SwiGLU).
DIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, d_model=64, num_heads=4, patch_size=2,
                 num_experts=8, expert_width=64, k=2, moe_every=1,
                 batch_size=64, learning_rate=2e-3, warmup_steps=50,
                 steps=300, num_timesteps=1000, sample_steps=25,
                 samples_per_class=16, quality_samples_per_class=30),
    "small": dict(num_layers=4, d_model=128, num_heads=4, patch_size=2,
                  num_experts=8, expert_width=128, k=2, moe_every=1,
                  batch_size=128, learning_rate=1e-3, warmup_steps=100,
                  steps=3000, num_timesteps=1000, sample_steps=50,
                  samples_per_class=16, quality_samples_per_class=100),
}

# name: (kind, default, help); defined unless `lm_flags` already defines it.
_DIT_FLAGS = {
    "num_layers": ("integer", None, "DiT blocks (default: preset)."),
    "d_model": ("integer", None, "DiT width D (default: preset)."),
    "num_heads": ("integer", None, "Attention heads (default: preset)."),
    "d_ff": ("integer", None, "Dense MLP width (default: k * expert_width, "
             "the active FLOPs of top-k)."),
    "patch_size": ("integer", None, "Patch size P (default: preset)."),
    "image_size": ("integer", None, "Image side (default: the data's)."),
    "upsample": ("integer", 1, "Nearest-neighbour upsampling of the images."),
    "max_examples": ("integer", None, "tfds: examples per split (None = all)."),
    "class_dropout": ("float", 0.1, "Label dropout for classifier-free "
                      "guidance, in [0, 1)."),
    "num_timesteps": ("integer", None, "Diffusion timesteps T (default: "
                      "preset)."),
    "schedule": ("string", "cosine", "Noise schedule: cosine or linear."),
    "prediction": ("string", "epsilon", "Model target: epsilon or v."),
    "timestep_buckets": ("integer", 4, "Timestep buckets of the per-t loss "
                         "and fanout metrics (must divide batch_size)."),
    "eval_repeats": ("integer", 2, "Passes over the validation batches."),
    "sample_steps": ("integer", None, "DDIM steps (default: preset)."),
    "samples_per_class": ("integer", None, "Images per class grid (default: "
                          "preset; 0 = none)."),
    "quality_samples_per_class": ("integer", None, "Samples per class scored "
                                  "by the classifier (default: preset)."),
    "guidance_scale": ("float", 1.0, "Classifier-free guidance w of the "
                       "samples (1 = off)."),
    "eta": ("float", 0.0, "DDIM eta (0 = deterministic)."),
    "num_devices": ("integer", None, "Use the first n devices (default all)."),
}

# Defaults of lm_flags that differ for the DiT.
_DIT_DEFAULTS = {"dataset": "digits", "log_every": 25, "eval_every": 250,
                 "eval_batches": 4, "checkpoint_every": 250,
                 "keep_checkpoints": 2, "workdir": "runs/dit"}


def define_flags() -> None:
  """Defines the LM flags (if not yet defined) plus the DiT's."""
  if "router" not in flags.FLAGS:
    lm_flags.define_flags()
  define = {"integer": flags.DEFINE_integer, "float": flags.DEFINE_float,
            "string": flags.DEFINE_string}
  for name, (kind, default, text) in _DIT_FLAGS.items():
    if name not in flags.FLAGS:
      define[kind](name, default, text)
  for name, default in _DIT_DEFAULTS.items():
    flags.FLAGS.set_default(name, default)
  flags.FLAGS["config"].help = ("Preset: " + ", ".join(sorted(DIT_PRESETS))
                                + " (DiT presets)")
  flags.FLAGS["dataset"].help = ("Images: digits (scikit-learn's 8x8), or "
                                 "tfds:mnist / tfds:cifar10 prepared on disk.")


def preset(name: str) -> dict[str, Any]:
  if name not in DIT_PRESETS:
    raise ValueError(f"config={name!r} is unknown; allowed: "
                     f"{', '.join(sorted(DIT_PRESETS))}")
  return dict(DIT_PRESETS[name])


def build_moe_config(values: Mapping[str, Any], pre: Mapping[str, Any]):
  """The MoE layer config (None for `--router=dense`), built by `lm_flags`."""
  if values["router"] == "dense":
    return None
  lm_values = dict(values)
  lm_values.update(config="tiny", mod_capacity=0.0)
  for key in ("num_experts", "expert_width", "k"):
    lm_values[key] = pre[key] if values.get(key) is None else values[key]
  return lm_flags.build_train_config(lm_values).model.moe


def build_dit_train_config(values: Mapping[str, Any]) -> DiTTrainConfig:
  """Builds the run's config from flag values (a dict of name -> value)."""
  pre = preset(values.get("config") or "tiny")
  pick = lambda key: pre[key] if values.get(key) is None else values[key]
  if values.get("mod_capacity"):
    raise ValueError(f"mod_capacity={values['mod_capacity']} is not supported "
                     "by the DiT yet; allowed: 0")
  moe = build_moe_config(values, pre)
  dataset = values.get("dataset") or "digits"
  image_size, channels, num_classes = data_shape(
      dataset, values.get("data_dir"), values.get("upsample") or 1,
      values.get("max_examples"))
  d_ff = values.get("d_ff") or pick("k") * pick("expert_width")
  model = DiTConfig(
      image_size=values.get("image_size") or image_size, channels=channels,
      patch_size=pick("patch_size"), num_classes=num_classes,
      num_layers=pick("num_layers"), d_model=pick("d_model"),
      num_heads=pick("num_heads"), d_ff=d_ff, moe=moe,
      moe_every=pick("moe_every"),
      class_dropout=values.get("class_dropout", 0.1),
      dtype=values.get("dtype") or "float32")
  diffusion = DiffusionConfig(num_timesteps=pick("num_timesteps"),
                              schedule=values.get("schedule") or "cosine",
                              prediction=values.get("prediction") or "epsilon")
  steps = pick("steps")
  optim = OptimConfig(learning_rate=pick("learning_rate"),
                      warmup_steps=min(pick("warmup_steps"), steps),
                      total_steps=steps, weight_decay=0.0)
  return DiTTrainConfig(
      model=model, diffusion=diffusion, optim=optim, dataset=dataset,
      data_dir=values.get("data_dir"), upsample=values.get("upsample") or 1,
      max_examples=values.get("max_examples"), batch_size=pick("batch_size"),
      steps=steps, seed=values.get("seed", 0),
      log_every=values.get("log_every") or 25,
      eval_every=values.get("eval_every") or 250,
      eval_batches=values.get("eval_batches") or 4,
      eval_repeats=values.get("eval_repeats") or 2,
      checkpoint_every=values.get("checkpoint_every") or 250,
      keep_checkpoints=values.get("keep_checkpoints") or 2,
      mesh=values.get("mesh"), num_devices=values.get("num_devices"),
      timestep_buckets=values.get("timestep_buckets") or 4,
      sample_steps=pick("sample_steps"),
      samples_per_class=pick("samples_per_class"),
      quality_samples_per_class=pick("quality_samples_per_class"),
      guidance_scale=values.get("guidance_scale", 1.0),
      eta=values.get("eta", 0.0), progress=values.get("progress", True))


def data_shape(dataset: str, data_dir: str | None, upsample: int,
               max_examples: int | None) -> tuple[int, int, int]:
  """(image side, channels, classes) of a data set (loads it; cached there)."""
  from moejax.data import get_image_data  # pylint: disable=g-import-not-at-top
  data = get_image_data(dataset, batch_size=1, data_dir=data_dir,
                        upsample=upsample, max_examples=max_examples)
  h, w, c = data.image_shape
  if h != w:
    raise DataError(f"{dataset}: images are {h}x{w}; the DiT wants square "
                    "images")
  return h, c, data.num_classes


def run(flag_values) -> int:
  """Runs the job; returns the process exit code (2 on bad input)."""
  values = flag_values.flag_values_dict()
  try:
    cfg = build_dit_train_config(values)
    from moejax.train.dit_loop import train_dit  # pylint: disable=g-import-not-at-top
    summary = train_dit(cfg, values["workdir"])
  except (ValueError, DataError, FileNotFoundError) as e:
    sys.stderr.write(f"error: {e}\n")
    return 2
  print(format_summary(summary, os.path.abspath(values["workdir"])))
  return 0


def format_summary(summary: Mapping[str, Any], workdir: str) -> str:
  """A short table of the run's results."""
  lines = [f"router: {summary['router']}   steps: {summary['steps']}",
           f"validation denoising loss: {summary['eval_loss']:.4f}"]
  if "eval_loss_by_t" in summary:
    lines.append("  by timestep bucket (low t -> high t): " + " ".join(
        f"{v:.4f}" for v in summary["eval_loss_by_t"]))
  if "eval_fanout_by_t" in summary:
    lines.append(f"experts per token: {summary['eval_experts_per_token']:.3f}"
                 "  by timestep bucket: " + " ".join(
                     f"{v:.3f}" for v in summary["eval_fanout_by_t"]))
  if "class_accuracy" in summary:
    lines.append(f"class accuracy of samples: {summary['class_accuracy']:.3f} "
                 f"(classifier on real validation: "
                 f"{summary['classifier_val_accuracy']:.3f})")
    lines.append(f"Frechet distance (classifier features): "
                 f"{summary['frechet']:.3f} (real validation: "
                 f"{summary.get('real_frechet', float('nan')):.3f})")
  if summary.get("images_per_s"):
    lines.append(f"throughput: {summary['images_per_s']:.0f} images/s over "
                 f"{summary['train_seconds']:.0f} s")
  if summary.get("resumed_from") is not None:
    lines.append(f"resumed from step {summary['resumed_from']}")
  lines += [f"metrics:     {summary['metrics']}",
            f"plot:        {summary['plot']}",
            f"samples:     {summary.get('samples_overview')}",
            f"checkpoints: {summary['checkpoints']}  (workdir {workdir})"]
  return "\n".join(lines)
