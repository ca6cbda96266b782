"""Where a train step's time goes: per-op profiles of a jitted JAX step and of a PyTorch step.

Both profilers report the same categories, so the two implementations can be read side by side:

  matmul          dense products (XLA dot / YNNPACK or oneDNN fusions around a dot; torch mm,
                  addmm, bmm, ...), with their FLOPs and achieved rate;
  elementwise     everything else that computes: norms, softmax, GELU, the loss, the optimizer;
  copy/transpose  layout changes and buffer copies;
  gather/scatter  embedding lookups, routing-row gathers and their gradients;
  unattributed    step wall time in which no op ran (dispatch, Python, thread hand-off).

Both also report minor page faults and kernel CPU seconds per step (``getrusage``): the zero-fill
of fresh buffers on first touch is kernel time spent inside ops.

JAX (``xla_profile``): the step runs under ``jax.profiler`` and the trace (an XSpace protobuf) is
read back. XLA's CPU runtime runs independent ops on several threads at once, so each instant of
wall time is shared equally among the ops running in it; category times then add up to the busy
wall time. An op's category and a matmul's FLOPs (2 x output size x contracted size) come from
the compiled HLO text. Reading the XSpace needs the protobuf module shipped with TensorFlow (a
dependency of seqio).

PyTorch (``torch_profile``): ``torch.profiler`` with FLOP counting; each op's self CPU time on the
calling thread (intra-op threads work inside it), so op times add up to the step's op time.
"""

from __future__ import annotations

import collections
import glob
import re
import resource
import tempfile
import time
from typing import Any, Callable

CATEGORIES = ("matmul", "elementwise", "copy/transpose", "gather/scatter", "unattributed")

# Trace events that are runtime bookkeeping, not ops.
_XLA_SKIP = ("ThunkExecutor", "end: ", "Threadpool", "SlinkyThreadPool")


def _dims(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x]


def hlo_ops(hlo_text: str) -> dict[str, dict[str, Any]]:
  """Per top-level HLO instruction name: its opcode, fusion kind, matmul FLOPs and source op."""
  comps: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m and not line.startswith(" "):
      current = m.group(1)
      comps[current] = []
    elif current is not None:
      comps[current].append(line)

  def dot_flops(lines: list[str], only: str | None = None) -> float:
    """FLOPs of the dots among ``lines`` (of the one dot ``only`` when given)."""
    shapes, flops = {}, 0.0
    for line in lines:
      d = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]", line)
      if d:
        shapes[d.group(1)] = _dims(d.group(2))
    for line in lines if only is None else [only]:
      m = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %[\w.\-]+\).*"
                    r"lhs_contracting_dims=\{([\d,]*)\}", line)
      if m and m.group(2) in shapes:
        out, lhs = _dims(m.group(1)), shapes[m.group(2)]
        size = 1
        for x in out:
          size *= x
        for c in _dims(m.group(3)):
          size *= lhs[c]
        flops += 2.0 * size
    return flops

  fused = set(re.findall(r"calls=%([\w.\-]+)", hlo_text))  # bodies of fusions: not run alone
  ops = {}
  for comp, lines in comps.items():
    if comp in fused:
      continue
    for line in lines:
      m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = \S+ ([\w\-]+)\(", line)
      if not m:
        continue
      name, opcode = m.group(1), m.group(2)
      calls = re.search(r"calls=%([\w.\-]+)", line)
      kind = re.search(r'"kind":"(\w+)"', line)
      meta = re.search(r'op_name="([^"]+)"', line)
      flops = dot_flops(comps.get(calls.group(1), [])) if calls else 0.0
      if opcode == "dot":
        flops = dot_flops(lines, only=line)
      ops[name] = dict(opcode=opcode, fusion=kind.group(1) if kind else "", flops=flops,
                       source=meta.group(1) if meta else "")
  return ops


def _xla_category(name: str, op: dict[str, Any] | None) -> str:
  if op is not None and op["flops"] > 0:
    return "matmul"
  if op is not None and op["opcode"] in ("dot", "convolution"):
    return "matmul"
  if "gather" in name or "scatter" in name:
    return "gather/scatter"
  if name.startswith("copy") or "transpose" in name or (op and op["opcode"] in ("copy",
                                                                                  "transpose")):
    return "copy/transpose"
  return "elementwise"


def parse_xspace(path: str, ops: dict[str, dict[str, Any]]) -> dict[str, Any]:
  """Wall-time-attributed seconds per category and matmul FLOPs, summed over the trace."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: PLC0415 - optional, heavy

  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  events = []
  for plane in space.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      for ev in line.events:
        name = plane.event_metadata[ev.metadata_id].name
        if name.startswith(_XLA_SKIP):
          continue
        start = line.timestamp_ns * 1000 + ev.offset_ps
        events.append((start, start + ev.duration_ps, name))
  points = sorted([(s, 1, i) for i, (s, _, _) in enumerate(events)]
                  + [(e, -1, i) for i, (_, e, _) in enumerate(events)])
  seconds = collections.Counter()
  per_op = collections.Counter()
  active: set[int] = set()
  last = None
  for t, delta, i in points:
    if active and last is not None:
      share = (t - last) / 1e12 / len(active)
      for j in active:
        seconds[_xla_category(events[j][2], ops.get(events[j][2]))] += share
        per_op[events[j][2]] += share
    if delta > 0:
      active.add(i)
    else:
      active.discard(i)
    last = t
  flops = sum(ops[n]["flops"] for _, _, n in events if n in ops)
  return dict(seconds=seconds, per_op=per_op, matmul_flops=flops)


def xla_profile(run: Callable[[int], None], hlo_text: str, steps: int = 3) -> dict[str, Any]:
  """Profile of ``steps`` calls of ``run(i)`` (one synchronised train step each).

  Returns per-step seconds by category (``categories``), the step's wall time, the matmul FLOPs
  per step and their rate, and the ten costliest ops outside matmuls.
  """
  import jax  # noqa: PLC0415

  ops = hlo_ops(hlo_text)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    wall, kernel = _run_steps(run, steps)
    jax.profiler.stop_trace()
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
      raise RuntimeError(f"jax.profiler wrote no trace under {d}")
    parsed = parse_xspace(files[0], ops)
  top = [(n, t, ops.get(n, {}).get("source", "")) for n, t in parsed["per_op"].most_common()
         if _xla_category(n, ops.get(n)) != "matmul"][:10]
  return _summary(steps, wall, kernel, parsed["seconds"], parsed["matmul_flops"], top)


# Attention kernels (scaled_dot_product_*) are matmul work too; torch counts no FLOPs for them,
# so the matmul rate is taken over the FLOP-counted products only.
_TORCH_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_mm",
                 "aten::matmul", "aten::linear", "aten::addbmm", "mkldnn",
                 "aten::_scaled_dot_product", "aten::scaled_dot_product")
_TORCH_FLOP_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
_TORCH_COPY = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy",
               "aten::transpose", "aten::t", "aten::permute", "aten::view", "aten::reshape",
               "aten::_reshape_alias", "aten::as_strided", "aten::expand", "aten::unsqueeze",
               "aten::squeeze", "aten::select", "aten::slice", "aten::unbind", "aten::split")
_TORCH_GATHER = ("aten::embedding", "aten::index", "aten::gather", "aten::scatter",
                 "aten::index_select", "aten::embedding_dense_backward", "aten::index_put",
                 "aten::index_add", "aten::take_along_dim")


def _torch_category(name: str) -> str:
  if name.startswith(_TORCH_MATMUL):
    return "matmul"
  if name.startswith(_TORCH_GATHER):
    return "gather/scatter"
  if name.startswith(_TORCH_COPY) or name in _TORCH_COPY:
    return "copy/transpose"
  return "elementwise"


def torch_profile(run: Callable[[int], None], steps: int = 3) -> dict[str, Any]:
  """The same summary as ``xla_profile`` for a PyTorch step, from ``torch.profiler``."""
  import torch  # noqa: PLC0415

  acts = [torch.profiler.ProfilerActivity.CPU]
  with torch.profiler.profile(activities=acts, with_flops=True) as prof:
    wall, kernel = _run_steps(run, steps)
  seconds = collections.Counter()
  per_op = collections.Counter()
  flops = flop_op_s = 0.0
  for ev in prof.key_averages():
    self_s = ev.self_cpu_time_total / 1e6
    if self_s <= 0:
      continue
    if ev.key.startswith(("Optimizer.", "ProfilerStep", "autograd::engine")):
      continue  # wrappers whose self time is Python / dispatch around their children
    cat = _torch_category(ev.key)
    seconds[cat] += self_s
    per_op[ev.key] += self_s
    if ev.key in _TORCH_FLOP_OPS:
      flops += float(ev.flops or 0)
      flop_op_s += self_s
  top = [(n, t, "") for n, t in per_op.most_common() if _torch_category(n) != "matmul"]
  out = _summary(steps, wall, kernel, seconds, flops, top[:10])
  out["matmul_flops_per_s"] = flops / flop_op_s if flop_op_s > 0 else None
  return out


def _run_steps(run: Callable[[int], None], steps: int) -> tuple[float, dict[str, float]]:
  """Runs ``steps`` steps; returns the wall time per step and the kernel's share per step.

  The kernel's share is minor page faults and CPU seconds in the kernel (all threads): fresh
  buffers are zero-filled by the kernel a 4 KiB page at a time on first touch, and that time
  lands inside whichever op touches them, so it is reported next to the categories.
  """
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  t0 = time.perf_counter()
  for i in range(steps):
    run(i)
  wall = (time.perf_counter() - t0) / steps
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  return wall, {"minor_faults": (r1.ru_minflt - r0.ru_minflt) / steps,
          "kernel_cpu_s": (r1.ru_stime - r0.ru_stime) / steps,
          "user_cpu_s": (r1.ru_utime - r0.ru_utime) / steps}


def _summary(steps: int, wall: float, kernel: dict[str, float], seconds: dict[str, float],
             matmul_flops: float, top: list[tuple[str, float, str]]) -> dict[str, Any]:
  """The per-step result from totals over ``steps`` steps (``seconds`` by category, matmul FLOPs,
  the costliest non-matmul ops); unattributed is the step's wall time no category covers."""
  cats = {c: seconds.get(c, 0.0) / steps for c in CATEGORIES[:-1]}
  cats["unattributed"] = max(wall - sum(cats.values()), 0.0)
  mm, flops = cats["matmul"], matmul_flops / steps
  return dict(step_s=wall, categories=cats, matmul_flops=flops,
              matmul_flops_per_s=flops / mm if mm > 0 else None,
              matmul_share=mm / wall if wall > 0 else None,
              top_non_matmul=[dict(op=n, s=t / steps, source=s[-80:]) for n, t, s in top],
              **kernel)
