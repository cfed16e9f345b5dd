"""Multi-host on localhost: 2 processes x 4 CPU devices train a routed LM
through `jax.distributed` (per-process batch slices), save an orbax checkpoint
from both, restore it in both and go on; the result matches one process with
8 devices. Plus the distributed-initialisation argument checks."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import sharding

pytestmark = pytest.mark.slow  # two processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _write_text(path):
  rng = np.random.default_rng(0)
  words = ["def", "return", "self", "import", "class", "lambda", "yield",
           "value", "expert", "router", "(", ")", ":", "\n"]
  text = " ".join(rng.choice(words, size=12000))
  with open(path, "w") as f:
    f.write(text)


def test_maybe_initialize_distributed_argument_checks():
  assert not sharding.maybe_initialize_distributed(env={})
  assert not sharding.maybe_initialize_distributed(num_processes=1, env={})
  with pytest.raises(ValueError, match="missing: num_processes, process_id"):
    sharding.maybe_initialize_distributed("127.0.0.1:1234", env={})
  with pytest.raises(ValueError, match="process_id=2 is out of range"):
    sharding.maybe_initialize_distributed("127.0.0.1:1234", 2, 2, env={})
  with pytest.raises(ValueError, match="num_processes=0 is out of range"):
    sharding.maybe_initialize_distributed("127.0.0.1:1234", 0, 0, env={})
  with pytest.raises(ValueError, match="missing: process_id"):
    sharding.maybe_initialize_distributed(
        env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2"})


def test_cli_flags_reach_the_config():
  from moejax.cli import lm_flags
  cfg = lm_flags.build_train_config(
      {"config": "tiny", "router": "top_k", "expert_parallel": "shard_map",
       "mesh": "data:2,expert:4"})
  assert cfg.model.moe.expert_parallel == "shard_map"
  assert cfg.mesh == "data:2,expert:4"
  with pytest.raises(ValueError, match="expert_parallel='a2a' is not"):
    lm_flags.build_train_config({"config": "tiny", "router": "top_k",
                                 "expert_parallel": "a2a"})


def test_process_batch_rows_single_process_covers_the_batch():
  mesh = sharding.make_mesh("data:2,expert:4")
  assert sharding.process_batch_rows(16, sharding.batch_sharding(mesh)) == (0,
                                                                            16)


def test_two_processes_train_checkpoint_restore(tmp_path):
  data = tmp_path / "corpus.txt"
  _write_text(data)
  workdir = tmp_path / "run"
  port = _free_port()
  env = dict(os.environ)
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  procs, outs, log_paths = [], [], []
  for pid in range(2):
    out = tmp_path / f"out{pid}.json"
    outs.append(out)
    # Each worker writes its log to a file: with pipes read one after the
    # other, a worker blocked on a full pipe stalls the other in a collective.
    log_paths.append(tmp_path / f"log{pid}.txt")
    with open(log_paths[-1], "w") as log_file:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={pid}", f"--workdir={workdir}",
           f"--data=text:{data}", f"--out={out}",
           f"--cache_dir={tmp_path / f'cache{pid}'}"],
          env=env, stdout=log_file, stderr=subprocess.STDOUT))
  for p in procs:
    try:
      p.wait(timeout=400)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      tails = [path.read_text()[-3000:] for path in log_paths]
      pytest.fail("multi-host workers timed out; logs:\n" +
                  "\n---\n".join(tails))
  logs = [path.read_text() for path in log_paths]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-4000:]
  results = [json.loads(o.read_text()) for o in outs]
  for pid, r in enumerate(results):
    assert r["initialized"] and r["process_index"] == pid
    assert (r["process_count"], r["local_devices"], r["global_devices"]) == (
        2, 4, 8)
    assert r["resumed_from"] == 2 and r["step"] == 4
    assert not r["fully_addressable"] and r["w_in_local_shards"] == 4
  assert results[0]["eval_loss"] == results[1]["eval_loss"]
  assert results[0]["param_sq_sum"] == results[1]["param_sq_sum"]
  steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints")
                 if d.isdigit())
  assert 2 in steps and 4 in steps
  records = [json.loads(line) for line in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["loss"] for r in records if "loss" in r}
  assert sorted(losses) == [1, 2, 3, 4]

  # The same run in this one process on 8 devices, uninterrupted.
  from multihost_worker import tiny_config
  from moejax.train.loop import train
  ref = train(tiny_config(f"text:{data}", 4, "data:4,expert:2"),
              str(tmp_path / "ref"))
  ref_records = [json.loads(line) for line in
                 open(ref["metrics"]).read().splitlines()]
  ref_losses = {r["step"]: r["loss"] for r in ref_records if "loss" in r}
  for step in ref_losses:
    np.testing.assert_allclose(losses[step], ref_losses[step], rtol=1e-5)
  np.testing.assert_allclose(results[0]["eval_loss"], ref["eval_loss"],
                             rtol=1e-5)
  sq = sum(float(np.sum(np.asarray(x, np.float64) ** 2))
           for x in jax.tree.leaves(jax.device_get(ref["state"].params)))
  np.testing.assert_allclose(results[0]["param_sq_sum"], sq, rtol=1e-5)
