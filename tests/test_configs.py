"""The config registry (`moejax.configs`): every name resolves into the frozen
config dataclasses; the presets keep their numbers."""
import dataclasses

import pytest

from moejax import configs
from moejax.models.lm import LMConfig
from moejax.nn.moe import MoEConfig
from moejax.tasks.lm import TrainConfig
from moejax.train.state import OptimConfig


@pytest.mark.parametrize("name", configs.names())
def test_every_name_resolves_into_the_frozen_dataclasses(name):
  cfg = configs.get(name)
  assert isinstance(cfg, TrainConfig)
  assert isinstance(cfg.model, LMConfig) and isinstance(cfg.optim, OptimConfig)
  assert cfg.model.moe is None or isinstance(cfg.model.moe, MoEConfig)
  assert cfg.seq_len <= cfg.model.max_len
  assert cfg.optim.total_steps == cfg.steps
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.model.num_layers = 1  # type: ignore[misc]
  entry = configs.entry(name)
  assert entry.summary
  if entry.pod_mesh is not None:
    assert entry.config(num_layers=1).model.num_layers == 1


def test_presets_keep_their_numbers():
  for name in ("tiny", "small"):
    pre, cfg = configs.preset(name), configs.get(name)
    m = cfg.model
    assert (m.num_layers, m.d_model, m.num_heads, m.d_ff, m.moe_every) == (
        pre["num_layers"], pre["d_model"], pre["num_heads"], pre["d_ff"],
        pre["moe_every"])
    assert (m.moe.num_experts, m.moe.expert_width, m.moe.router.k) == (
        pre["num_experts"], pre["expert_width"], pre["k"])
    assert m.moe.router.name == "top_k" and m.max_len == pre["seq_len"]
    assert (cfg.seq_len, cfg.batch_size, cfg.steps) == (
        pre["seq_len"], pre["batch_size"], pre["steps"])
    assert (cfg.optim.learning_rate, cfg.optim.warmup_steps) == (
        pre["learning_rate"], pre["warmup_steps"])
    # every other field at its dataclass default
    assert cfg.dataset == "stdlib" and cfg.mesh is None and m.vocab_size == 256


def test_unknown_name_lists_the_registry():
  with pytest.raises(ValueError, match="config='huge' is unknown; allowed: "
                     "tiny, small, paper_dtop_p"):
    configs.get("huge")


def test_first_dense_layers_makes_the_first_blocks_dense():
  cfg = configs.get("deepseek_moe_16b").model
  assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1)
  assert cfg.num_moe_layers == cfg.num_layers - 1
  with pytest.raises(ValueError, match="first_dense_layers=5 is out of range"):
    dataclasses.replace(configs.get("tiny").model, first_dense_layers=5)


# --- overrides and config files -------------------------------------------


def test_overrides_parse_by_field_type_and_replace_together():
  cfg = configs.override(configs.get("tiny"), configs.parse_assignments([
      "model.num_layers=2", "model.moe.router=dtop_p",
      "model.moe.router.p_init=0.3", "model.moe.shared_width=none",
      "optim.b2=0.99", "progress=false", "sample_prompt=class ",
      "seq_len=256"]))
  assert cfg.model.num_layers == 2 and cfg.optim.b2 == 0.99
  router = cfg.model.moe.router
  assert router.name == "dtop_p" and router.k == 2 and router.p_init == 0.3
  assert cfg.progress is False and cfg.sample_prompt == "class "
  # seq_len carries max_len along (as --seq_len does); steps the schedule
  assert cfg.seq_len == cfg.model.max_len == 256
  cfg = configs.override(cfg, {"steps": 20})
  assert cfg.steps == cfg.optim.total_steps == cfg.optim.warmup_steps == 20
  # a dense config from a routed one, and a nested dict
  assert configs.override(cfg, {"model.moe": "none"}).model.moe is None
  nested = configs.override(cfg, {"model": {"moe": {"router": {
      "name": "top_p", "p": 0.5}}}})
  assert nested.model.moe.router.name == "top_p"
  assert nested.model.moe.router.p == 0.5


@pytest.mark.parametrize("assignment, message", [
    ("model.num_layer=3", "model.num_layer='3' is not a config field; "
     "allowed: model.num_layers, model.d_model"),
    ("model.num_layers=abc", "model.num_layers='abc' is not an integer; "
     "allowed: integer"),
    ("model.num_layers=0", "num_layers=0 is out of range; allowed: integer "
     ">= 1"),
    ("optim.b1=fast", "optim.b1='fast' is not a number; allowed: number"),
    ("progress=maybe", "progress='maybe' is not a bool; allowed: true or "
     "false"),
    ("model.moe.router=bogus", "model.moe.router='bogus' is not a router; "
     "allowed: dtop_p"),
    ("model.moe.router.p=0.5", "model.moe.router.p='0.5' is not a config "
     "field; allowed: model.moe.router.k"),
    ("model=big", "model='big' cannot be set as a whole; allowed: its "
     "fields model.NAME=VALUE"),
    ("model.num_layers", "override 'model.num_layers' is not PATH=VALUE"),
])
def test_bad_overrides_are_one_line_naming_the_field(assignment, message):
  with pytest.raises(ValueError) as e:
    configs.override(configs.get("tiny"),
                     configs.parse_assignments([assignment]))
  assert message in str(e.value) and "\n" not in str(e.value)


def test_an_override_of_a_dense_configs_moe_is_refused():
  with pytest.raises(ValueError, match="model.moe.num_experts='4' sets a "
                     "field of model.moe, which is None"):
    configs.override(configs.get("paper_mod"), {"model.moe.num_experts": "4"})


def test_config_files_python_and_yaml(tmp_path):
  yaml_file = tmp_path / "run.yaml"
  yaml_file.write_text("base: small\nmodel:\n  num_layers: 3\n  moe:\n"
                       "    router: {name: top_p, p: 0.5}\n"
                       "optim: {learning_rate: 1e-3}\nsteps: 7\n")
  cfg = configs.load(str(yaml_file))
  assert cfg.model.num_layers == 3 and cfg.model.d_model == 256  # small's
  assert cfg.model.moe.router.name == "top_p" and cfg.model.moe.router.k == 4
  assert cfg.optim.learning_rate == 1e-3  # YAML reads 1e-3 as a string
  assert cfg.steps == cfg.optim.total_steps == 7
  overrides_py = tmp_path / "overrides.py"
  overrides_py.write_text("def config():\n  return {'model.num_layers': 1, "
                          "'batch_size': 4}\n")
  cfg = configs.load(str(overrides_py))
  assert cfg.model.num_layers == 1 and cfg.batch_size == 4
  assert cfg.model.d_model == configs.get("tiny").model.d_model
  full_py = tmp_path / "full.py"
  full_py.write_text(
      "import dataclasses\nfrom moejax import configs\n"
      "def config():\n  cfg = configs.get('paper_et', num_layers=2)\n"
      "  return dataclasses.replace(cfg, seed=5)\n")
  cfg = configs.load(str(full_py))
  assert cfg.model.num_layers == 2 and cfg.seed == 5
  assert cfg.model.moe.router.name == "expert_threshold"


@pytest.mark.parametrize("text, message", [
    ("model: [1, 2\n", "is not valid YAML"),
    ("model: {num_layers: many}\n", "model.num_layers='many' is not an "
     "integer"),
    ("- 1\n", "gives a list; allowed: a TrainConfig or a dict of overrides"),
    ("base: huge\n", "config='huge' is unknown"),
])
def test_bad_config_files_are_one_line(tmp_path, text, message):
  path = tmp_path / "bad.yaml"
  path.write_text(text)
  with pytest.raises(ValueError) as e:
    configs.load(str(path))
  assert message in str(e.value) and "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match="no such file"):
    configs.load(str(tmp_path / "missing.yaml"))
  broken = tmp_path / "broken.py"
  broken.write_text("def config(:\n")
  with pytest.raises(ValueError, match="does not load: SyntaxError"):
    configs.load(str(broken))
