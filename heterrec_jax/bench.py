"""Benchmarks, one subcommand each.

    python -m heterrec_jax.bench data --input DIR [--max-len 200] [--n-step 3] \\
        [--batch-size 128] [--batches 200] [--warmup 10] [--window last|random] [--workers 0]

    python -m heterrec_jax.bench train --config FILE [--steps 10] [--warmup 2] [--settle 6] \\
        [--attention auto[,dense,blockwise]] [--block-items 32[,64]] [--max-len 128,256,512] \\
        [--dtypes float32,bfloat16] [--microbatches 1,4] [--profile] [--trace DIR] [key=value ...]

    python -m heterrec_jax.bench ceiling [--n 2048] [--repeats 5] [--dtypes float32,bfloat16] \\
        [--precisions default,highest] [--statistic best|median]

`data` times the training input pipeline (`data.pipeline.train_dataset`) on a prepared folder:
it draws `--warmup` batches, then times `--batches` more, and prints a human line then, last,
one JSON object (`windows_per_s`, `batches_per_s`, `seconds`, the settings). Pin it to one core
with `taskset -c 0` to measure the per-core rate.

`train` times the jitted, sharded train step of a config (its data: `data.path`, or the built-in
synthetic data prepared into a temporary folder) on two fixed batches, after compiling it and
`--warmup` untimed steps, in rounds of `--steps` steps until the step's host memory has reached
its steady size: the first round that takes no page faults, or not 10% fewer a step than the
round before while the process's peak resident memory grew by less than half of what it faulted
in (a heap that stays put, or an allocator that faults the same pages every step; not a heap
still growing, as one shared by several CPU devices does for tens of steps), at most 1 +
`--settle` rounds; the figures are the last round's, and `warmup_steps` in the JSON
counts the steps run before it. It prints, last, one JSON object with `compile_s` (lowering and
compiling the train step; served from JAX's persistent cache when `JAX_COMPILATION_CACHE_DIR`
is set and holds it, named in `compilation_cache`), `step_time_s`,
`sequences_per_s`, `tokens_per_s` (B x T x K tokens of the token level), `flops_per_step` (XLA's
cost analysis of the compiled step), `matmul_ceiling_flops_per_s` (a 2048 x 2048 float32 matmul
timed in the same run, best of 5), `fraction_of_ceiling` and `peak_memory_bytes` (arguments +
outputs + temporaries - donated aliases, from XLA's memory analysis of the compiled step; per
device), and,
from the process's resource usage over the timed steps, `minor_page_faults_per_step` and
`system_cpu_fraction` (kernel CPU time / all CPU time): on a CPU host, high values mean the
allocator hands the step's large buffers back to the kernel and faults them in again every step.
It adds `attention` (the causal blocks' attention, `layers.attention_impl`), `block_items`
(the blockwise attention's items per block, `--block-items`; null by default: each level's
`layers.block_items_for`, 32 items at the token level, 128 at a K = 1 item level),
`compute_dtype`, `xla_flops_per_step` (XLA's count of the timed program),
`dense_peak_memory_bytes` (the step compiled with the dense attention), `microbatches`
(`train.microbatches`: the step's batch taken in that many parts, one after the other),
`host_allocator` (`train.host_allocator` in effect: 'reuse' keeps the freed pages) and
`peak_resident_bytes` (the process's peak resident memory after the timed steps, compilation
included; in a sweep, of every run so far: what 'reuse' trades for its speed). XLA
counts a loop body once, so `flops_per_step` and `fraction_of_ceiling` are always those of the
dense, whole-batch program: comparable across attentions, block sizes and microbatches; and it
counts one device's part of a sharded program, so on several devices (`devices`; on a CPU host
`train.cpu_devices`) they are those of the same program on one device: the whole step's.

Comma-separated `--attention`, `--block-items`, `--max-len`, `--dtypes` and `--microbatches` run
every combination in one process (each run's JSON on its own line, then a table of step time and
peak memory per run, then one JSON object `{"benchmark": "train_sweep", "runs": [...]}`).
`--profile` adds `profile`: each component of the step compiled and timed alone
(`profile.py`), printed as a table. `--trace DIR` runs two more steps after the timed ones
under `jax.profiler.trace` and writes the trace (XPlane and a Chrome trace, for TensorBoard's
profile plugin or Perfetto) under DIR, one folder per run of a sweep (`run0`, `run1`, ...), and
names it in `trace_dir`; the timed steps are not traced, so the figures do not change.

`ceiling` times one `--n`^3 matmul per dtype and precision (`jax.lax.Precision`: 'default' lets
XLA use TF32 for float32 on a GPU, 'highest' does not), one untimed call then `--repeats` timed
ones, and prints a line each then one JSON object with `DTYPE_PRECISION_flops_per_s` per pair:
the rates a step's `fraction_of_ceiling` and MFU are read against (`train` times float32 at the
default precision, n = 2048, best of 5, in the step's own process).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import resource
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from heterrec_jax import host_allocator, layers, profile as profile_lib, run as run_lib, sharding
from heterrec_jax import train as train_lib
from heterrec_jax.config import DEFAULT_CONFIG, Config, ConfigError, apply_overrides, load_config
from heterrec_jax.data import pipeline
from heterrec_jax.data.dataset import Dataset, DatasetError

# `ceiling`: jax.lax matmul precisions ('default': the backend's own, TF32 on a GPU) and how the
# timed calls are summarised.
PRECISIONS = ('default', 'high', 'highest')
STATISTICS = ('best', 'median')


def bench_data(input_dir: str, *, max_len: int = 200, n_step: int = 3, batch_size: int = 128,
               batches: int = 200, warmup: int = 10, window: str = 'last', workers: int = 0,
               seed: int = 0) -> dict[str, Any]:
  """Training windows per second of the input pipeline on the folder `input_dir`."""
  if batches < 1 or warmup < 0:
    raise ConfigError(f'--batches={batches} must be >= 1 and --warmup={warmup} >= 0')
  dataset = Dataset.load(input_dir)
  ds = pipeline.train_dataset(dataset, max_len=max_len, horizon=n_step, batch_size=batch_size,
                              seed=seed, window=window, workers=workers)
  it = iter(ds)
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)
    seconds = time.perf_counter() - start
  finally:
    if workers:
      it.close()
  return {'benchmark': 'data', 'input': str(dataset.path), 'windows_per_s': batches * batch_size
          / seconds, 'batches_per_s': batches / seconds, 'seconds': seconds, 'batches': batches,
          'warmup': warmup, 'batch_size': batch_size, 'max_len': max_len, 'n_step': n_step,
          'window': window, 'workers': workers, 'n_sub': dataset.schema.n_sub}


def _run_data(args: argparse.Namespace) -> dict[str, Any]:
  result = bench_data(args.input, max_len=args.max_len, n_step=args.n_step,
                      batch_size=args.batch_size, batches=args.batches, warmup=args.warmup,
                      window=args.window, workers=args.workers, seed=args.seed)
  print(f'data: {result["windows_per_s"]:,.0f} training windows/s ({result["batches_per_s"]:,.1f} '
        f'batches of {args.batch_size} x {args.max_len}+{args.n_step} events/s, {args.window} '
        f'windows, {args.workers} workers) on {result["input"]}')
  return result


def _data_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser('data', help='training windows per second of the input pipeline')
  p.add_argument('--input', required=True, help='a prepared dataset folder')
  p.add_argument('--max-len', type=int, default=200, help='T, events per input')
  p.add_argument('--n-step', type=int, default=3, help='N_step; a window holds T + N_step')
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument('--batches', type=int, default=200, help='batches timed')
  p.add_argument('--warmup', type=int, default=10, help='batches drawn before timing')
  p.add_argument('--window', default='last', choices=pipeline.WINDOWS)
  p.add_argument('--workers', type=int, default=0, help='background worker processes')
  p.add_argument('--seed', type=int, default=0)


# ---- train ----------------------------------------------------------------------------------


def matmul_ceiling(n: int = 2048, repeats: int = 5, dtype: str = 'float32',
                   precision: str = 'default', statistic: str = 'best') -> float:
  """FLOP/s of one `n x n` matmul in `dtype` at `precision` (`PRECISIONS`; 'default' lets XLA
  use TF32 on a GPU) on the default device: the `statistic` ('best' or 'median') of `repeats`
  timed calls after one untimed call."""
  if precision not in PRECISIONS:
    raise ConfigError(f'precision {precision!r} must be one of {PRECISIONS}')
  if statistic not in STATISTICS:
    raise ConfigError(f'statistic {statistic!r} must be one of {STATISTICS}')
  if repeats < 1 or n < 1:
    raise ConfigError(f'--n={n} and --repeats={repeats} must be >= 1')
  try:
    dt = jnp.dtype(dtype)
  except TypeError:
    raise ConfigError(f'dtype {dtype!r} is not a dtype (e.g. float32, bfloat16)') from None
  a = jax.random.normal(jax.random.key(0), (n, n), dt)
  b = jax.random.normal(jax.random.key(1), (n, n), dt)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, precision=None if precision == 'default'
                                      else precision))
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  seconds = min(times) if statistic == 'best' else sorted(times)[len(times) // 2]
  return 2.0 * n ** 3 / seconds


def _run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
  """One matmul rate per (dtype, precision) of the command line, in one process."""
  result: dict[str, Any] = {'benchmark': 'ceiling', 'device': str(jax.devices()[0]), 'n': args.n,
                            'repeats': args.repeats, 'statistic': args.statistic}
  for dtype in args.dtypes:
    for precision in args.precisions:
      rate = matmul_ceiling(args.n, args.repeats, dtype, precision, args.statistic)
      print(f'{dtype} {precision}: {rate / 1e12:.3f} TFLOP/s ({args.n}^3 matmul, '
            f'{args.statistic} of {args.repeats})')
      result[f'{dtype}_{precision}_flops_per_s'] = rate
  return result


def _ceiling_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser('ceiling', help="the device's matmul rate per dtype and precision")
  p.add_argument('--n', type=int, default=2048, help='the square matmul size')
  p.add_argument('--repeats', type=int, default=5, help='timed calls')
  p.add_argument('--dtypes', type=_csv(str), default=['float32'],
                 help='comma-separated dtypes (e.g. float32,bfloat16)')
  p.add_argument('--precisions', type=_csv(str), default=['default'],
                 help='comma-separated matmul precisions: ' + ', '.join(PRECISIONS))
  p.add_argument('--statistic', default='best', choices=STATISTICS,
                 help='the best or the median of the timed calls')


def compiled_costs(step, state, batch) -> tuple[float | None, int | None]:
  """(FLOPs per step from XLA's cost analysis, peak bytes from its memory analysis)."""
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost['flops']) if cost and 'flops' in cost else None
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)
  return flops, peak


def bench_train(cfg: Config, workdir: pathlib.Path, steps: int = 10, warmup: int = 2,
                attention: str = 'auto', profile: bool = False,
                block_items: int | None = None,
                trace_dir: pathlib.Path | None = None, settle_rounds: int = 6) -> dict[str, Any]:
  """Times `steps` train steps of `cfg` after compiling the step and `warmup` untimed steps, in
  rounds until the page faults a step stop falling (`settle`: at most 1 + `settle_rounds`
  rounds, the last one reported), the causal blocks' attention traced as `attention`
  (`layers.ATTENTION_IMPLS`; the blockwise one over blocks of `block_items` items, None:
  `layers.block_items_for`). With `trace_dir`, two more steps run under
  `jax.profiler.trace(trace_dir)` after the timed ones."""
  if steps < 1 or warmup < 1 or settle_rounds < 0:
    raise ConfigError(f'--steps={steps} and --warmup={warmup} must be >= 1 and '
                      f'--settle={settle_rounds} >= 0')
  if attention not in layers.ATTENTION_IMPLS:
    raise ConfigError(f'--attention={attention!r} must be one of {layers.ATTENTION_IMPLS}')
  if block_items is not None and block_items < 1:
    raise ConfigError(f'--block-items={block_items} must be >= 1')
  allocator = host_allocator.configure(cfg.train.host_allocator)  # before JAX's backend starts
  sharding.configure_cpu_devices(cfg)
  dataset = run_lib.load_dataset(cfg, workdir, progress=False)
  mesh = sharding.make_mesh(cfg.mesh)
  run_lib.check_batch_sizes(cfg, mesh)
  tstate = run_lib.build_run(cfg, dataset, mesh)
  data_iter = train_lib.train_iterator(cfg, tstate)
  host_batches = [next(data_iter) for _ in range(2)]
  batches = [sharding.global_batch(b, tstate.mesh) for b in host_batches]
  with layers.attention_impl(attention, block_items):
    step = train_lib.make_train_step(tstate, batches[0])
    t_compile = time.perf_counter()
    xla_flops, peak = compiled_costs(step, tstate.state, batches[0])
    compile_s = time.perf_counter() - t_compile
  dense_flops, dense_peak = xla_flops, peak
  whole_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, microbatches=1))
  if attention != 'dense' or cfg.train.microbatches > 1:
    # XLA counts a loop body once: the FLOPs are the dense, whole-batch program's.
    whole = dataclasses.replace(tstate, cfg=whole_cfg)
    with layers.attention_impl('dense'):
      dense_flops, dense_peak = compiled_costs(train_lib.make_train_step(whole, batches[0]),
                                               tstate.state, batches[0])
  if mesh.size > 1:
    # A sharded program's count is one device's part (with what it repeats of the others'):
    # the FLOPs of the step are those of the same program on one device.
    one = run_lib.build_run(whole_cfg, dataset, sharding.make_mesh(
        dataclasses.replace(cfg.mesh, data=1, model=1), jax.devices()[:1]))
    one_batch = sharding.global_batch(host_batches[0], one.mesh)
    with layers.attention_impl('dense'):
      dense_flops, _ = compiled_costs(train_lib.make_train_step(one, one_batch), one.state,
                                      one_batch)
    del one
  with layers.attention_impl(attention, block_items):
    timed = _time_steps(step, tstate.state, batches, steps, warmup, settle_rounds)
    if trace_dir is not None:
      timed['state'] = _trace_steps(step, timed['state'], batches, trace_dir)
  ceiling = matmul_ceiling()
  b, t, k = cfg.train.batch_size, cfg.data.max_len, dataset.schema.n_kinds
  step_time, final_state = timed.pop('step_time_s'), timed.pop('state')
  result = {
      'benchmark': 'train', 'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
      'batch_size': b, 'max_len': t, 'tokens_per_item': k, 'compile_s': compile_s,
      'compilation_cache': jax.config.jax_compilation_cache_dir, 'step_time_s': step_time,
      'sequences_per_s': b / step_time, 'tokens_per_s': b * t * k / step_time,
      'flops_per_step': dense_flops, 'matmul_ceiling_flops_per_s': ceiling,
      'fraction_of_ceiling': dense_flops / step_time / ceiling if dense_flops else None,
      'peak_memory_bytes': peak, **timed, 'attention': attention, 'block_items': block_items,
      'compute_dtype': cfg.model.compute_dtype, 'microbatches': cfg.train.microbatches,
      'xla_flops_per_step': xla_flops,
      'dense_peak_memory_bytes': dense_peak, 'host_allocator': allocator}
  if trace_dir is not None:
    result['trace_dir'] = str(trace_dir)
  if profile:
    with layers.attention_impl(attention, block_items):
      result['profile'] = profile_lib.profile_step(
          cfg, tstate.model(final_state), batches[0], tstate.dataset.item_tokens,
          train_lib.training_log_freq(tstate.dataset))
  return result


def settle(run_round: Callable[[], tuple[float, bool]], first_faults: float,
           max_more: int) -> int:
  """How many rounds `run_round` (which times one and returns its page faults a step and
  whether the process's heap grew by most of what it faulted in) is called for after a warm-up
  that took `first_faults` a step: until a round takes none, or not 10% fewer than the round (or
  warm-up) before it without growing, i.e. until the process's heap has reached its steady
  size, whether that faults nothing a step ('reuse') or the same pages every step ('system'; a
  heap still growing at a steady rate, as 'reuse' does for a while on several CPU devices,
  faults new pages: it goes on); at most 1 + `max_more` rounds."""
  previous, rounds = first_faults, 0
  while True:
    faults, growing = run_round()
    rounds += 1
    if rounds > max_more or faults == 0 or (faults >= 0.9 * previous and not growing):
      return rounds
    previous = faults


def _time_steps(step, state, batches, steps: int, warmup: int,
                settle_rounds: int) -> dict[str, Any]:
  """`warmup` untimed steps, then rounds of `steps` timed steps until the page faults a step
  stop falling (`settle`, at most 1 + `settle_rounds` rounds). Of the last round: the mean step
  time and the process's page faults and kernel CPU share; the peak resident memory so far and
  `warmup_steps` (the steps run before the last round); 'state' is the final (donated-into)
  state."""
  faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  state, _ = _steps(step, state, batches, warmup)
  jax.block_until_ready(state)
  warmup_faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / warmup
  rss_unit = 1 if sys.platform == 'darwin' else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
  last: dict[str, Any] = {}

  def run_round() -> tuple[float, bool]:
    nonlocal state
    usage0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    state, aux = _steps(step, state, batches, steps)
    jax.block_until_ready((state, aux))
    step_time = (time.perf_counter() - t0) / steps
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    last.update({
        'step_time_s': step_time,
        'minor_page_faults_per_step': (usage1.ru_minflt - usage0.ru_minflt) / steps,
        'system_cpu_fraction': (usage1.ru_stime - usage0.ru_stime) / cpu if cpu else None,
        'peak_resident_bytes': usage1.ru_maxrss * rss_unit})
    faulted = (usage1.ru_minflt - usage0.ru_minflt) * resource.getpagesize()
    grown = (usage1.ru_maxrss - usage0.ru_maxrss) * rss_unit
    return last['minor_page_faults_per_step'], faulted > 0 and grown > faulted / 2

  rounds = settle(run_round, warmup_faults, settle_rounds)
  return {**last, 'warmup_steps': warmup + (rounds - 1) * steps, 'state': state}


def _steps(step, state, batches, n: int):
  """`n` steps alternating the two batches: (the state after them, the last step's aux)."""
  aux = None
  for i in range(n):
    state, aux = step(state, batches[i % 2])
  return state, aux


def _trace_steps(step, state, batches, trace_dir: pathlib.Path):
  """Two steps under `jax.profiler.trace(trace_dir)`; returns the state after them."""
  trace_dir.mkdir(parents=True, exist_ok=True)
  with jax.profiler.trace(str(trace_dir)):
    state, aux = _steps(step, state, batches, 2)
    jax.block_until_ready((state, aux))
  return state


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
  return lambda text: [kind(x) for x in text.split(',') if x]


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
  """One run per (attention, block items, max_len, dtype, microbatches) of the command line,
  in one process."""
  trace = pathlib.Path(args.trace) if args.trace else None
  if trace is not None and trace.exists() and not trace.is_dir():
    raise ConfigError(f'--trace {args.trace} is a file; give a folder for the trace')
  base = apply_overrides(load_config(args.config), args.overrides)
  settings = [(a, bi, t, d, m) for a in args.attention for bi in args.block_items
              for t in (args.max_len or [None]) for d in (args.dtypes or [None])
              for m in (args.microbatches or [None])]
  results = []
  with tempfile.TemporaryDirectory(prefix='heterrec-bench-') as tmp:
    for index, (attention, block_items, max_len, dtype, microbatches) in enumerate(settings):
      extra = ([f'data.max_len={max_len}'] if max_len else []) + (
          [f'model.compute_dtype={dtype}'] if dtype else []) + (
          [f'train.microbatches={microbatches}'] if microbatches else [])
      cfg = apply_overrides(base, extra)
      trace_dir = trace / f'run{index}' if trace and len(settings) > 1 else trace
      result = bench_train(cfg, pathlib.Path(tmp), steps=args.steps, warmup=args.warmup,
                           attention=attention, profile=args.profile, block_items=block_items,
                           trace_dir=trace_dir, settle_rounds=args.settle)
      results.append({'config': args.config, 'overrides': args.overrides + extra, **result})
      _print_train(results[-1])
      if len(settings) > 1:
        print(json.dumps(results[-1]))
  if len(results) == 1:
    return results[0]
  print(_sweep_table(results))
  return {'benchmark': 'train_sweep', 'runs': results}


def _print_train(result: dict[str, Any]) -> None:
  print(f'train ({result["attention"]} attention, {result["compute_dtype"]}, T = '
        f'{result["max_len"]}): {result["step_time_s"] * 1e3:.1f} ms/step, '
        f'{result["sequences_per_s"]:,.1f} sequences/s, {result["tokens_per_s"]:,.0f} tokens/s, '
        f'peak {result["peak_memory_bytes"] / 1e9:.3f} GB on {result["devices"]} '
        f'{result["platform"]} device(s)')
  if 'profile' in result:
    print(profile_lib.format_table(result['profile'], result['step_time_s']))


def _sweep_table(results: list[dict[str, Any]]) -> str:
  """One row per run; `x peak` is the peak memory over the previous row's of the same
  attention, block size, dtype and microbatches (a doubling of max_len when the sweep doubles
  it)."""
  lines = ['| attention | block items | dtype | microbatches | max_len | step s | peak GB | '
           'x peak | dense-path peak GB | fraction of ceiling | system CPU | page faults/step |',
           '| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  previous: dict[tuple[str, int, str, int], int] = {}
  for r in results:
    key = (r['attention'], r['block_items'], r['compute_dtype'], r['microbatches'])
    growth = (f'{r["peak_memory_bytes"] / previous[key]:.2f}' if key in previous else '')
    previous[key] = r['peak_memory_bytes']
    fmt = lambda key, spec: '' if r[key] is None else format(r[key], spec)
    block = 'default' if r['block_items'] is None else r['block_items']
    lines.append(f'| {r["attention"]} | {block} | {r["compute_dtype"]} | '
                 f'{r["microbatches"]} | '
                 f'{r["max_len"]} | {r["step_time_s"]:.3f} | {r["peak_memory_bytes"] / 1e9:.3f} | '
                 f'{growth} | {r["dense_peak_memory_bytes"] / 1e9:.3f} | '
                 f'{fmt("fraction_of_ceiling", ".3f")} | {fmt("system_cpu_fraction", ".3f")} | '
                 f'{fmt("minor_page_faults_per_step", ",.0f")} |')
  return '\n'.join(lines)


def _train_parser(sub: argparse._SubParsersAction) -> None:
  p = sub.add_parser('train', help='train-step time, throughput, FLOPs and memory of a config')
  p.add_argument('--config', default=DEFAULT_CONFIG, help='a config file')
  p.add_argument('--steps', type=int, default=10, help='steps timed')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after the compilation')
  p.add_argument('--settle', type=int, default=6, metavar='ROUNDS',
                 help='time at most this many more rounds of --steps steps while the page faults '
                      'a step keep falling (by 10%% or more) or the heap keeps growing, and '
                      'report the last round; 0: one round (default: 6)')
  p.add_argument('--attention', type=_csv(str), default=['auto'],
                 help='attention of the causal blocks, comma-separated to compare in one run: '
                      + ', '.join(layers.ATTENTION_IMPLS))
  p.add_argument('--block-items', type=_csv(int), default=[None],
                 help='items per block of the blockwise attention at every level, '
                      'comma-separated to compare (default: each level\'s, '
                      f'{layers.BLOCK_ITEMS} items and at least {layers.BLOCK_TOKENS} tokens)')
  p.add_argument('--max-len', type=_csv(int), default=None,
                 help='comma-separated data.max_len values to sweep (e.g. 128,256,512)')
  p.add_argument('--dtypes', type=_csv(str), default=None,
                 help='comma-separated model.compute_dtype values (e.g. float32,bfloat16)')
  p.add_argument('--microbatches', type=_csv(int), default=None,
                 help='comma-separated train.microbatches values (e.g. 1,4)')
  p.add_argument('--profile', action='store_true',
                 help='also time each component of the step alone (profile.py)')
  p.add_argument('--trace', default=None, metavar='DIR',
                 help='write a jax.profiler trace of two steps after the timed ones under DIR')
  p.add_argument('overrides', nargs='*', help='dotted overrides such as train.batch_size=8')


# Subcommand name -> (adds its parser, runs it and returns its JSON result).
COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], dict[str, Any]]]] = {
    'data': (_data_parser, _run_data),
    'train': (_train_parser, _run_train),
    'ceiling': (_ceiling_parser, _run_ceiling),
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m heterrec_jax.bench', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest='command', required=True)
  for add_parser, _ in COMMANDS.values():
    add_parser(sub)
  args = parser.parse_args(argv)
  try:
    result = COMMANDS[args.command][1](args)
  except (ConfigError, DatasetError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
