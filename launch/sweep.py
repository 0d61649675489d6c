#!/usr/bin/env python3
"""Fans the commands of a plan.txt out over machines: round-robin, N at a time per machine.

    python launch/sweep.py --plan OUT/plan.txt --kind ssh --machines gpu-a,gpu-b --per-machine 2
    python launch/sweep.py --plan OUT/plan.txt --kind tpu --machines pod-a,pod-b \\
        --zone us-central2-b
    python launch/sweep.py --plan OUT/plan.txt --kind local --per-machine 2
    python launch/sweep.py ... --dry-run      # print the commands it would run, run nothing

A plan is what `python -m heterrec_jax.experiments ... --plan-only` writes: one shell command per
line ('#' lines and blank lines are skipped). Command i (of those still to run) goes to machine
i mod M; each machine runs up to --per-machine commands at once.
  * kind ssh:   `ssh HOST 'cd REPO && . VENV/bin/activate && COMMAND'`
  * kind tpu:   `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command '...'`
                (the same, on every worker of the TPU VM: one multi-host run at a time per
                TPU, so keep --per-machine 1)
  * kind local: `bash -c COMMAND` here, in the current directory and Python environment.
Logs: LOGS/NNN-RUN.log per command (RUN: the basename of its --workdir) and LOGS/sweep.json
(machine, exit status and seconds of every command). A command whose --workdir holds a
results.json here is skipped (the runs of a sweep share a filesystem, or ran here); after a
command, its wall time goes to WORKDIR/wall_time.json when that folder is visible here.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import pathlib
import shlex
import subprocess
import sys
import threading
import time

# train's exit status after a preemption with its checkpoint saved (docs/failure.md).
EXIT_PREEMPTED = 75


@dataclasses.dataclass
class Job:
  """One command of the plan on its machine."""
  index: int  # its line among the commands of the plan (0-based)
  line: str  # the command, as written in the plan
  machine: str
  argv: list[str]  # what is executed here
  workdir: str | None  # its --workdir, if any
  status: str = 'pending'
  returncode: int | None = None
  seconds: float | None = None


def read_plan(path: pathlib.Path) -> list[str]:
  if not path.is_file():
    raise SystemExit(f'error: plan {path} does not exist (write one with python -m '
                     'heterrec_jax.experiments ... --plan-only)')
  lines = [line.strip() for line in path.read_text().splitlines()]
  return [line for line in lines if line and not line.startswith('#')]


def workdir_of(line: str) -> str | None:
  """The value of --workdir in a command, if it has one."""
  words = shlex.split(line)
  for i, word in enumerate(words):
    if word == '--workdir' and i + 1 < len(words):
      return words[i + 1]
    if word.startswith('--workdir='):
      return word.partition('=')[2]
  return None


def remote_command(line: str, kind: str, repo: str, venv: str) -> str:
  """The shell command the machine runs: in REPO with the venv activated (not for local)."""
  if kind == 'local':
    return line
  steps = [f'cd {shlex.quote(repo)}']
  if venv:
    steps.append(f'. {shlex.quote(venv)}/bin/activate')
  return ' && '.join(steps + [line])


def machine_argv(kind: str, machine: str, command: str, zone: str | None,
                 project: str | None) -> list[str]:
  """The local argv that runs `command` on `machine`."""
  if kind == 'local':
    return ['bash', '-c', command]
  if kind == 'ssh':
    return ['ssh', machine, command]
  argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', machine, '--zone', zone]
  if project:
    argv += ['--project', project]
  return argv + ['--worker=all', '--command', command]


def plan_jobs(lines: list[str], args: argparse.Namespace) -> list[Job]:
  """The jobs still to run (finished runs skipped), assigned to machines round-robin."""
  machines = args.machines
  todo = [(i, line) for i, line in enumerate(lines)
          if args.no_skip_done or not _done(workdir_of(line))]
  jobs = []
  for n, (i, line) in enumerate(todo):
    machine = machines[n % len(machines)]
    command = remote_command(line, args.kind, args.repo, args.venv)
    argv = machine_argv(args.kind, machine, command, args.zone, args.project)
    jobs.append(Job(i, line, machine, argv, workdir_of(line)))
  return jobs


def _done(workdir: str | None) -> bool:
  return workdir is not None and (pathlib.Path(workdir) / 'results.json').is_file()


class Runner:
  """Runs jobs, --per-machine at a time on each machine, and records them in sweep.json."""

  def __init__(self, jobs: list[Job], logs: pathlib.Path, per_machine: int):
    self.jobs, self.logs, self.per_machine = jobs, logs, per_machine
    self.lock = threading.Lock()
    self.queues = collections.defaultdict(collections.deque)
    for job in jobs:
      self.queues[job.machine].append(job)

  def log_path(self, job: Job) -> pathlib.Path:
    name = pathlib.Path(job.workdir).name if job.workdir else 'command'
    return self.logs / f'{job.index:03d}-{name}.log'

  def run(self) -> int:
    """Runs every job; returns the number that failed."""
    self.logs.mkdir(parents=True, exist_ok=True)
    threads = [threading.Thread(target=self._worker, args=(machine,))
               for machine in self.queues for _ in range(self.per_machine)]
    for thread in threads:
      thread.start()
    for thread in threads:
      thread.join()
    self._save()
    return sum(job.status != 'done' for job in self.jobs)

  def _worker(self, machine: str) -> None:
    while True:
      with self.lock:
        if not self.queues[machine]:
          return
        job = self.queues[machine].popleft()
        job.status = 'running'
      self._run_job(job)
      with self.lock:
        self._save()

  def _run_job(self, job: Job) -> None:
    start = time.perf_counter()
    with open(self.log_path(job), 'w', encoding='utf-8') as log:
      log.write(f'# {shlex.join(job.argv)}\n')
      log.flush()
      job.returncode = subprocess.run(job.argv, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, check=False).returncode
    job.seconds = time.perf_counter() - start
    job.status = ('done' if job.returncode == 0 else
                  'preempted (exit 75): checkpoint saved, run the sweep again to resume'
                  if job.returncode == EXIT_PREEMPTED else f'failed (exit {job.returncode})')
    print(f'{job.status}: {job.line} on {job.machine} ({job.seconds:.0f} s)', file=sys.stderr)
    _record_wall_time(job)

  def _save(self) -> None:
    records = [{'index': j.index, 'command': j.line, 'machine': j.machine, 'status': j.status,
                'returncode': j.returncode, 'seconds': j.seconds, 'log': str(self.log_path(j))}
               for j in self.jobs]
    (self.logs / 'sweep.json').write_text(json.dumps(records, indent=1) + '\n')


def _record_wall_time(job: Job) -> None:
  """Adds the command's seconds to WORKDIR/wall_time.json (read by heterrec_jax.experiments;
  a resumed run sums its attempts) when WORKDIR is visible here."""
  if job.workdir is None or not pathlib.Path(job.workdir).is_dir():
    return
  path = pathlib.Path(job.workdir) / 'wall_time.json'
  try:
    previous = json.loads(path.read_text())
  except (OSError, ValueError):
    previous = {}
  record = {'seconds': float(previous.get('seconds', 0.0)) + job.seconds, 'status': job.status,
            'attempts': int(previous.get('attempts', 0)) + 1, 'machine': job.machine}
  path.write_text(json.dumps(record, indent=1) + '\n')


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python launch/sweep.py', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--plan', required=True, help='a plan.txt: one command per line')
  parser.add_argument('--kind', default='ssh', choices=('ssh', 'tpu', 'local'),
                      help='how machines are reached (default: ssh)')
  parser.add_argument('--machines', default=None,
                      help='comma-separated ssh hosts or TPU VM names (local: labels, '
                           'default one)')
  parser.add_argument('--per-machine', type=int, default=1,
                      help='commands running at once on each machine (default: 1)')
  parser.add_argument('--zone', default=None, help='TPU zone (kind tpu)')
  parser.add_argument('--project', default=None, help='Google Cloud project (kind tpu)')
  parser.add_argument('--repo', default='heterrec_jax',
                      help='code folder on the machines, relative to the home directory '
                           '(default: heterrec_jax)')
  parser.add_argument('--venv', default='venv',
                      help='venv folder inside REPO, activated first ("" for none; default: venv)')
  parser.add_argument('--logs', default=None, help='log folder (default: PLAN_DIR/logs)')
  parser.add_argument('--no-skip-done', action='store_true',
                      help='also run commands whose WORKDIR/results.json exists here')
  parser.add_argument('--dry-run', action='store_true',
                      help='print the commands it would run, one per line, and run nothing')
  args = parser.parse_args(argv)
  if args.machines is None and args.kind != 'local':
    parser.error(f'--machines is required with --kind {args.kind}')
  if args.kind == 'tpu' and not args.zone:
    parser.error('--zone is required with --kind tpu')
  if args.per_machine < 1:
    parser.error(f'--per-machine={args.per_machine} must be >= 1')
  args.machines = [m for m in (args.machines or 'local').split(',') if m]
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  plan = pathlib.Path(args.plan)
  jobs = plan_jobs(read_plan(plan), args)
  if args.dry_run:
    for job in jobs:
      print(shlex.join(job.argv))
    return 0
  logs = pathlib.Path(args.logs) if args.logs else plan.parent / 'logs'
  failed = Runner(jobs, logs, args.per_machine).run()
  print(f'{len(jobs) - failed} of {len(jobs)} commands succeeded; logs in {logs}',
        file=sys.stderr)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
