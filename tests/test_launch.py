"""launch/: every script's dry run prints exactly the commands it would run (and they parse back
into the intended argv); the sweep runner's real path is checked with local shell commands."""

import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN = 'python -m heterrec_jax.train'


def _run(argv, env=None, cwd=ROOT):
  full_env = {**os.environ, **(env or {})}
  return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=60,
                        check=False)


def _lines(result):
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


# ---- tpu_pod.sh -----------------------------------------------------------------------------

def test_tpu_pod_dry_run_prints_the_gcloud_commands():
  out = _lines(_run(['bash', 'launch/tpu_pod.sh', '--dry-run', '--name', 'my-pod', '--zone',
                     'us-central2-b', '--project', 'proj', '--sync', '--setup', '--',
                     '--config', 'configs/paper.py', '--workdir', '/mnt/shared/runs/paper',
                     'data.path=/mnt/shared/data/amazon']))
  ssh = 'gcloud compute tpus tpu-vm ssh my-pod --zone us-central2-b --project proj --worker=all'
  assert out == [
      f"{ssh} --command 'mkdir -p heterrec_jax'",
      'gcloud compute tpus tpu-vm scp --recurse --zone us-central2-b --project proj '
      '--worker=all heterrec_jax configs launch requirements.txt my-pod:heterrec_jax/',
      f"{ssh} --command 'cd heterrec_jax && python3 -m venv venv && . venv/bin/activate && "
      'pip install -q -r requirements.txt && pip install -q -U "jax[tpu]==0.10.2"\'',
      f"{ssh} --command 'cd heterrec_jax && . venv/bin/activate && {TRAIN} --config "
      "configs/paper.py --workdir /mnt/shared/runs/paper data.path=/mnt/shared/data/amazon'",
  ]


def test_launch_readme_shows_the_commands_the_scripts_print():
  readme = (ROOT / 'launch' / 'README.md').read_text().splitlines()
  tpu = _lines(_run(['bash', 'launch/tpu_pod.sh', '--dry-run', '--name', 'my-pod', '--zone',
                     'us-central2-b', '--sync', '--setup', '--', '--config', 'configs/paper.py',
                     '--workdir', '/mnt/shared/runs/paper',
                     'data.path=/mnt/shared/data/amazon']))
  gpu = _lines(_run(['bash', 'launch/multi_gpu.sh', '--dry-run', '--hosts', 'gpu-a,gpu-b', '--',
                     '--config', 'configs/paper.py', '--workdir', '/shared/runs/paper']))
  for line in tpu + gpu:
    assert line in readme


def test_tpu_pod_quotes_arguments_so_they_survive_two_shells():
  out = _lines(_run(['bash', 'launch/tpu_pod.sh', '--name', 'p', '--zone', 'z', '--repo',
                     'my code', '--', '--workdir', "/runs/a b's"], env={'DRY_RUN': '1'}))
  assert len(out) == 1
  argv = shlex.split(out[0])
  assert argv[:9] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'p', '--zone', 'z',
                      '--worker=all']
  assert argv[9] == '--command'
  assert shlex.split(argv[10]) == ['cd', 'my code', '&&', '.', 'venv/bin/activate', '&&',
                                   'python', '-m', 'heterrec_jax.train', '--workdir',
                                   "/runs/a b's"]


def test_tpu_pod_requires_name_and_zone():
  result = _run(['bash', 'launch/tpu_pod.sh', '--dry-run', '--zone', 'z'])
  assert result.returncode == 2 and 'required' in result.stderr and not result.stdout


# ---- multi_gpu.sh ---------------------------------------------------------------------------

def test_multi_gpu_single_process_gets_no_distributed_env():
  out = _lines(_run(['bash', 'launch/multi_gpu.sh', '--dry-run', '--', '--config',
                     'configs/tiny.py']))
  assert out == [f'{TRAIN} --config configs/tiny.py']


def test_multi_gpu_one_process_per_local_gpu():
  out = _lines(_run(['bash', 'launch/multi_gpu.sh', '--gpus-per-host', '2', '--', '--workdir',
                     'runs/x'], env={'DRY_RUN': '1'}))
  assert out == [
      f'env JAX_COORDINATOR_ADDRESS=localhost:12355 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID={i} '
      f'CUDA_VISIBLE_DEVICES={i} {TRAIN} --workdir runs/x' for i in (0, 1)]


def test_multi_gpu_hosts_over_ssh():
  out = _lines(_run(['bash', 'launch/multi_gpu.sh', '--dry-run', '--hosts', 'gpu-a,gpu-b',
                     '--gpus-per-host', '2', '--coordinator', '10.0.0.1:9999', '--',
                     '--config', 'configs/paper.py']))
  expected = []
  for pid, (host, gpu) in enumerate([('gpu-a', 0), ('gpu-a', 1), ('gpu-b', 0), ('gpu-b', 1)]):
    expected.append(
        f"ssh {host} 'cd heterrec_jax && . venv/bin/activate && env "
        f'JAX_COORDINATOR_ADDRESS=10.0.0.1:9999 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID={pid} '
        f"CUDA_VISIBLE_DEVICES={gpu} {TRAIN} --config configs/paper.py'")
  assert out == expected


def test_multi_gpu_one_process_per_host_uses_the_first_host_as_coordinator():
  out = _lines(_run(['bash', 'launch/multi_gpu.sh', '--dry-run', '--hosts', 'a,b']))
  assert [shlex.split(line)[:2] for line in out] == [['ssh', 'a'], ['ssh', 'b']]
  assert [shlex.split(shlex.split(line)[2])[6:10] for line in out] == [
      ["env", "JAX_COORDINATOR_ADDRESS=a:12355", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={i}"]
      for i in (0, 1)]


# ---- sweep.py -------------------------------------------------------------------------------

PLAN = [f'{TRAIN} --config configs/tiny.py --workdir OUT/runs/m-seed{s} train.seed={s}'
        for s in range(3)]


def _sweep(tmp_path, *args):
  plan = tmp_path / 'plan.txt'
  if not plan.exists():
    plan.write_text('# a comment\n\n' + '\n'.join(PLAN) + '\n')
  return _run([sys.executable, str(ROOT / 'launch' / 'sweep.py'), '--plan', str(plan), *args],
              cwd=tmp_path)


def test_sweep_dry_run_round_robin_over_ssh_hosts(tmp_path):
  out = _lines(_sweep(tmp_path, '--machines', 'gpu-a,gpu-b', '--per-machine', '2', '--dry-run'))
  hosts = ['gpu-a', 'gpu-b', 'gpu-a']
  assert out == [f"ssh {h} 'cd heterrec_jax && . venv/bin/activate && {c}'"
                 for h, c in zip(hosts, PLAN)]
  assert not (tmp_path / 'logs').exists()


def test_sweep_dry_run_on_tpus(tmp_path):
  out = _lines(_sweep(tmp_path, '--kind', 'tpu', '--machines', 'pod-a,pod-b', '--zone', 'z',
                      '--project', 'proj', '--repo', 'code', '--venv', '', '--dry-run'))
  pods = ['pod-a', 'pod-b', 'pod-a']
  assert out == [f"gcloud compute tpus tpu-vm ssh {p} --zone z --project proj --worker=all "
                 f"--command 'cd code && {c}'" for p, c in zip(pods, PLAN)]


def test_sweep_skips_finished_runs(tmp_path):
  done = tmp_path / 'OUT' / 'runs' / 'm-seed1'
  done.mkdir(parents=True)
  (done / 'results.json').write_text('{}')
  out = _lines(_sweep(tmp_path, '--kind', 'local', '--dry-run'))
  assert out == [shlex.join(['bash', '-c', PLAN[0]]), shlex.join(['bash', '-c', PLAN[2]])]
  assert len(_lines(_sweep(tmp_path, '--kind', 'local', '--dry-run', '--no-skip-done'))) == 3


def test_sweep_runs_locally_with_logs_wall_times_and_concurrency(tmp_path):
  (tmp_path / 'w1').mkdir()
  # The first command succeeds only if the second one runs at the same time.
  wait_for_b = ("sh -c 'for i in $(seq 100); do [ -f b.flag ] && exit 0; sleep 0.1; done; "
                "exit 1' --workdir w1")
  (tmp_path / 'plan.txt').write_text('\n'.join([
      wait_for_b, 'touch b.flag; echo made b --workdir w2', "sh -c 'exit 3' --workdir w3",
      "sh -c 'exit 75' --workdir w4"]) + '\n')
  result = _sweep(tmp_path, '--kind', 'local', '--per-machine', '2')
  assert result.returncode == 1, result.stderr  # the third command fails
  records = json.loads((tmp_path / 'logs' / 'sweep.json').read_text())
  assert [r['status'] for r in records] == [
      'done', 'done', 'failed (exit 3)',
      'preempted (exit 75): checkpoint saved, run the sweep again to resume']
  assert [r['machine'] for r in records] == ['local'] * 4
  assert 'made b' in (tmp_path / 'logs' / '001-w2.log').read_text()
  wall = json.loads((tmp_path / 'w1' / 'wall_time.json').read_text())
  assert wall['status'] == 'done' and wall['attempts'] == 1 and wall['seconds'] > 0
  assert not (tmp_path / 'w2').exists()  # a workdir not visible here is left alone


def test_sweep_requires_machines_and_zone(tmp_path):
  assert _sweep(tmp_path, '--dry-run').returncode == 2
  assert _sweep(tmp_path, '--kind', 'tpu', '--machines', 'p', '--dry-run').returncode == 2


@pytest.mark.parametrize('script', ['tpu_pod.sh', 'multi_gpu.sh'])
def test_shell_scripts_print_help(script):
  result = _run(['bash', f'launch/{script}', '--help'])
  assert result.returncode == 0 and '--dry-run' in result.stdout
  assert 'set -e' not in result.stdout  # the comment header only


def test_device_bench_prints_help_and_refuses_an_unknown_flag(tmp_path):
  result = _run(['bash', 'launch/device_bench.sh', '--help'])
  assert result.returncode == 0 and 'launch/device_bench.sh [OUT_DIR]' in result.stdout
  assert 'set -uo' not in result.stdout
  result = _run(['bash', 'launch/device_bench.sh', '--steps', str(tmp_path / 'out')])
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.strip() == 'error: unknown flag --steps (see --help)'
  assert not (tmp_path / 'out').exists()


# ---- recbole_reference.py ---------------------------------------------------------------------

def _reference(*args):
  return _run([sys.executable, 'launch/recbole_reference.py', *args])


def test_recbole_reference_refuses_a_folder_without_the_inter_file(tmp_path):
  result = _reference('--data', str(tmp_path), '--out', str(tmp_path / 'out'))
  assert result.returncode == 2 and result.stdout == ''
  assert result.stderr.strip() == f'error: --data {tmp_path}: no {tmp_path.name}.inter there'
  assert not (tmp_path / 'out').exists()


def test_recbole_reference_never_overwrites_finished_results(tmp_path):
  data = tmp_path / 'ml-100k'
  data.mkdir()
  (data / 'ml-100k.inter').write_text('user_id:token\titem_id:token\ttimestamp:float\n')
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'results.json').write_text('{"kept": 1}\n')
  result = _reference('--data', str(data), '--out', str(out))
  assert result.returncode == 2 and 'already holds results.json' in result.stderr
  assert (out / 'results.json').read_text() == '{"kept": 1}\n'


def test_recbole_reference_uses_the_settings_of_issue_8(tmp_path):
  sys.path.insert(0, str(ROOT / 'launch'))
  try:
    import recbole_reference  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  args = recbole_reference.parse_args(['--data', str(tmp_path / 'ml-100k'), '--out', 'o'])
  config = recbole_reference.recbole_config(args, tmp_path / 'o')
  assert config['data_path'] == str(tmp_path) and args.seed == 2020 and config['epochs'] == 20
  assert {k: config[k] for k in ('hidden_size', 'inner_size', 'n_layers', 'n_heads',
                                 'hidden_dropout_prob', 'attn_dropout_prob', 'hidden_act',
                                 'loss_type', 'MAX_ITEM_LIST_LENGTH', 'train_batch_size',
                                 'learning_rate')} == {
      'hidden_size': 64, 'inner_size': 256, 'n_layers': 2, 'n_heads': 2,
      'hidden_dropout_prob': 0.5, 'attn_dropout_prob': 0.5, 'hidden_act': 'gelu',
      'loss_type': 'CE', 'MAX_ITEM_LIST_LENGTH': 50, 'train_batch_size': 256,
      'learning_rate': 1e-3}
  assert config['eval_args']['split'] == {'LS': 'valid_and_test'}
  assert config['eval_args']['mode'] == 'full' and config['train_neg_sample_args'] is None
