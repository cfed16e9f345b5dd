"""absl flags of `experiments/train_dit.py` and their translation into configs.

The flags are those of `experiments/train_lm.py` (`lm_flags.define_flags()`:
`--router`, `--num_experts`, `--k`, `--p`, every router option, the MoE layer
options, `--steps`, `--seed`, `--workdir`, ...; routers registered later appear
there and work here unchanged) with the DiT's presets for `--config` and the
DiT's own flags below. A flag left unset takes the preset's value or the
default of `DiTTrainConfig` (e.g. `dataset="digits"`) and the model configs. The MoE layer config is
built by `lm_flags` exactly as for the LM. LM-only flags (`--seq_len`,
`--sample_tokens`, `--temperature`, `--mod_*`) are ignored, except that
`--mod_capacity > 0` is refused (no Mixture-of-Depths in the DiT yet).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from absl import flags

from moejax.cli import app, defaults, lm_flags
from moejax.data import DataError
from moejax.diffusion import DiffusionConfig
from moejax.models.dit import DiTConfig
from moejax.tasks.dit import DiTTrainConfig, dit_loop
from moejax.train.config import LOOP_FIELDS

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

# The DiT's own flags, by config class: name -> help (the kind comes from the
# field's type), defaulting to None (the class's default); defined unless
# `lm_flags` already defines them.
DIT_RUN_FLAGS = defaults.table(DiTTrainConfig, {
    "upsample": "Nearest-neighbour upsampling of the images.",
    "max_examples": "tfds: examples per split (None = all).",
    "timestep_buckets": "Timestep buckets of the per-t loss and fanout "
                        "metrics (must divide batch_size).",
    "eval_repeats": "Passes over the validation batches.",
    "guidance_scale": "Classifier-free guidance w of the samples (1 = off).",
    "eta": "DDIM eta (0 = deterministic).",
    "num_devices": "Use the first n devices (None = all).",
})
DIT_MODEL_FLAGS = defaults.table(DiTConfig, {
    "class_dropout": "Label dropout for classifier-free guidance, in [0, 1).",
})
DIFFUSION_FLAGS = defaults.table(DiffusionConfig, {
    "schedule": "Noise schedule: cosine or linear.",
    "prediction": "Model target: epsilon or v.",
})
DIT_FLAGS = {**DIT_RUN_FLAGS, **DIT_MODEL_FLAGS, **DIFFUSION_FLAGS}
# Preset-driven flags (None = the preset's value).
_PRESET_FLAGS = {
    "num_layers": "DiT blocks (default: preset).",
    "d_model": "DiT width D (default: preset).",
    "num_heads": "Attention heads (default: preset).",
    "patch_size": "Patch size P (default: preset).",
    "num_timesteps": "Diffusion timesteps T (default: preset).",
    "sample_steps": "DDIM steps (default: preset).",
    "samples_per_class": "Images per class grid (default: preset; 0 = none).",
    "quality_samples_per_class": "Samples per class scored by the classifier "
                                 "(default: preset).",
}
_OTHER_FLAGS = {
    "d_ff": "Dense MLP width (default: k * expert_width, the active FLOPs of "
            "top-k).",
    "image_size": "Image side (default: the data's).",
}
# Fields of the run config set by the flags of `lm_flags.RUN_FLAGS` (the
# loop's, which every run config has, and the DiT's own).
_RUN_FIELDS = tuple(name for name in lm_flags.RUN_FLAGS
                    if name in {f.name for f in
                                dataclasses.fields(DiTTrainConfig)}
                    or (name in DiTTrainConfig.ALIASES
                        and name != "grad_accum"))  # the DiT's is 1


# LM-only flags, which the DiT ignores: left out of its `--help`
# (`--override` is refused: the DiT has no config registry).
LM_ONLY_FLAGS = ("seq_len", "sample_tokens", "temperature", "vocab_size",
                 "override",
                 *(n for n in lm_flags.LM_MODEL_FLAGS if n != "dtype"),
                 *lm_flags.MOD_FLAGS,
                 *(n for n in lm_flags.RUN_FLAGS if n not in _RUN_FIELDS))
# `--help`'s groups: the LM's plus the DiT's own flags.
HELP_GROUPS = {
    "model": tuple(dict.fromkeys((
        "config", "num_layers", "d_model", "num_heads", "patch_size",
        "d_ff", "image_size", "class_dropout",
        *lm_flags.HELP_GROUPS["model"][1:]))),
    "routing": lm_flags.HELP_GROUPS["routing"],
    "data": (*lm_flags.HELP_GROUPS["data"], "upsample", "max_examples"),
    "diffusion and samples": ("num_timesteps", "schedule", "prediction",
                              "timestep_buckets", "sample_steps",
                              "samples_per_class", "quality_samples_per_class",
                              "guidance_scale", "eta"),
    "training": (*lm_flags.HELP_GROUPS["training"], "eval_repeats"),
    "scale-out": lm_flags.HELP_GROUPS["scale-out"],
}


def define_flags() -> None:
  """Defines the LM flags (if not yet defined) plus the DiT's; the help of
  the shared run flags shows the DiT's defaults."""
  if "router" not in flags.FLAGS:
    lm_flags.define_flags()
  defaults.define({k: v for k, v in DIT_FLAGS.items() if k not in flags.FLAGS})
  for name, text in {**_PRESET_FLAGS, **_OTHER_FLAGS}.items():
    if name not in flags.FLAGS:
      flags.DEFINE_integer(name, None, text)
    flags.FLAGS[name].help = text  # the LM's size flags, as the DiT reads them
  flags.FLAGS.set_default("router", "top_k")
  flags.FLAGS["router"].help = "Router: " + ", ".join(lm_flags.router_names())
  for name in _RUN_FIELDS:
    flags.FLAGS[name].help = defaults.with_default(
        lm_flags.RUN_FLAGS[name][2], DiTTrainConfig, name)
  flags.FLAGS.set_default("workdir", "runs/dit")
  flags.FLAGS["config"].help = ("Preset: " + ", ".join(sorted(DIT_PRESETS))
                                + " (DiT presets)")
  flags.FLAGS["dataset"].help = defaults.with_default(
      "Images: digits (scikit-learn's 8x8), or tfds:mnist / tfds:cifar10 "
      "prepared on disk.", DiTTrainConfig, "dataset")


def preset(name: str) -> dict[str, Any]:
  if name not in DIT_PRESETS:
    raise ValueError(f"config={name!r} is unknown; allowed: "
                     f"{', '.join(sorted(DIT_PRESETS))}")
  return dict(DIT_PRESETS[name])


def build_dit_train_config(values: Mapping[str, Any]) -> DiTTrainConfig:
  """Builds the run's config from flag values (a dict of name -> value; a
  missing or None value takes the preset's, else the config's default)."""
  pre = preset(values["config"])
  pick = lambda key: pre[key] if values.get(key) is None else values[key]
  if values.get("override"):
    raise ValueError(f"override={values['override'][0]!r} is not supported by "
                     "the DiT; allowed: its flags (see --help)")
  if values.get("mod_capacity"):
    raise ValueError(f"mod_capacity={values['mod_capacity']} is not supported "
                     "by the DiT yet; allowed: 0")
  moe = lm_flags.build_moe_config(values, pick("k"), pick("num_experts"),
                                  pick("expert_width"))
  run = defaults.given(values, (*_RUN_FIELDS, *DIT_RUN_FLAGS))
  get = lambda name: run.get(name, defaults.field_default(DiTTrainConfig,
                                                          name))
  image_size, channels, num_classes = data_shape(
      get("dataset"), get("data_dir"), get("upsample"), get("max_examples"))
  model = DiTConfig(
      image_size=values.get("image_size") or image_size, channels=channels,
      patch_size=pick("patch_size"), num_classes=num_classes,
      num_layers=pick("num_layers"), d_model=pick("d_model"),
      num_heads=pick("num_heads"),
      d_ff=values.get("d_ff") or pick("k") * pick("expert_width"), moe=moe,
      moe_every=pick("moe_every"),
      **defaults.given(values, (*DIT_MODEL_FLAGS, "dtype")))
  diffusion = DiffusionConfig(num_timesteps=pick("num_timesteps"),
                              **defaults.given(values, DIFFUSION_FLAGS))
  optim = lm_flags.build_optim(dit_loop().optim, pick)
  loop = dataclasses.replace(
      dit_loop(), optim=optim, batch_size=pick("batch_size"),
      steps=optim.total_steps,
      **{name: run.pop(name) for name in LOOP_FIELDS if name in run})
  return DiTTrainConfig(
      model=model, loop=loop, diffusion=diffusion,
      sample_steps=pick("sample_steps"),
      samples_per_class=pick("samples_per_class"),
      quality_samples_per_class=pick("quality_samples_per_class"), **run)


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
  code, summary = app.train(lambda: build_dit_train_config(values),
                            values["workdir"])
  if code:
    return code
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
