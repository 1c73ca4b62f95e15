"""How many ONNX Runtime threads a request gets when the user does not say (``--threads`` left out, or
``Pipeline(..., threads=None)``).

Why not "all cores", ONNX Runtime's own default: an intra-op thread pool pays a fork/join (and spin-wait) on every
operator. The tiny demo decoder's matmuls are a few hundred thousand multiply-adds each, done in microseconds by one
core, so a second thread only adds the synchronisation; on a machine whose cores are busy with other work the
spinning threads also steal from each other. A 1B-class model's matmuls are hundreds of times larger and split well.

The rule (:func:`default_threads`): one thread when the decoder does fewer than :data:`SMALL_DECODER_PARAMS`
multiply-adds per generated token (attention projections + one expert's FFN + the LM head, from the model's config:
:func:`decoder_work`); otherwise the free cores: the physical cores this process may run on, less those other work keeps busy
(:func:`free_cores`), because at that size each extra core shortens the vision encoder, the prefill and the decode
steps. ``OMP_NUM_THREADS``, when set to a positive whole number, replaces the rule (capped at the physical cores),
as it does for PyTorch and NumPy, so a job scheduler's per-task thread limit holds here too. Inter-op threads stay at
one: sessions run their graphs sequentially (ONNX Runtime's default execution mode), so an inter-op pool would only idle, and a batch
of tiles is one call whose operators the intra-op pool splits.

Measured with ``rsvlm-edge infer --threads 1`` and ``--threads 2`` on an Intel Xeon (Sapphire Rapids, AVX512 +
AVX512-VNNI + AMX), 2 cores, 1 thread per core, ONNX Runtime 1.32, fp32 engines unless named; the machine was
shared with other jobs (load average 2 to 3.6), so each figure is the best of 3 runs, taken in alternation. The
middle rows are random-init exports of the tiny config widened (hidden 384 x 6 layers; 512 x 8; 1024 x 12), the
last two the random-init RSUniVLM-1B shape (``rsvlm-edge export --config rsunivlm-1b --random-init``); decode in
tokens/s:

===========================  ============  =================================  ==============  ===============
model                        MACs / token  what                               1 thread        2 threads
===========================  ============  =================================  ==============  ===============
tiny-demo                    3.8 M         50 AID tiles, cap, 16 tokens       58 tile/s       17 tile/s
tiny-demo (load 1-2)         3.8 M         200 AID tiles, cls                 75 tile/s       40 tile/s
tiny-demo-int8 (load 1-2)    3.8 M         200 AID tiles, cls                 112 tile/s      64 tile/s
hidden 384                   11.0 M        50 AID tiles, cap, 16 tokens       19.4 tile/s     8.6 tile/s
hidden 512                   26.2 M        50 AID tiles, cap, 16 tokens       6.9 tile/s      10.2 tile/s
hidden 1024                  139 M         one 384 px tile: vision / decode   677 ms, 26/s    514 ms, 38/s
rsunivlm-1b INT8 (weights)   494 M         one 384 px tile: vision / decode   4146 ms, 21/s   2784 ms, 36/s
rsunivlm-1b fp32             494 M         one 384 px tile: vision / decode   7216 ms, 8/s    4818 ms, 12/s
===========================  ============  =================================  ==============  ===============

So the line falls between 11 M and 26 M multiply-adds per token (:data:`SMALL_DECODER_PARAMS` = 20 M). From 26 M
up, two free cores give 1.3x to 1.7x; but the same runs also had two threads lose by up to 2.5x (hidden 512: 3.3
tile/s; hidden 1024, 20 tiles: 1.0 against 1.4 tile/s) whenever the other jobs held a core, which is why only idle
cores count (:func:`free_cores`). The issue that asked for this rule reported the small-model side on a 2-vCPU AMD
EPYC (AVX2): 200 tiny-demo tiles took 45.9 s at the old all-cores default and 11.3 s with one thread.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rsvlm_edge.config import ModelConfig
from rsvlm_edge.validate import available_cores, cpu_affinity

#: Below this many decoder multiply-adds per generated token, one thread is fastest (see the table above).
SMALL_DECODER_PARAMS = 20_000_000

#: Environment variable that, when set to a positive whole number, replaces the rule.
THREADS_ENV = "OMP_NUM_THREADS"

_SYS_CPU = Path("/sys/devices/system/cpu")

#: How long :func:`free_cores` watches the CPUs; only large models (those that may use more than one thread) wait.
IDLE_WINDOW_S = 0.2


def decoder_work(model: ModelConfig | Mapping[str, Any] | int) -> int:
    """Multiply-adds per generated token (weights touched: attention + one expert + LM head) of a config, a
    ``config.json`` / manifest ``model_config`` dict, or a count given directly."""
    from rsvlm_edge.bench.model_cost import decoder_params

    if isinstance(model, bool):
        raise TypeError(f"expected a ModelConfig, a config dict or a parameter count, got {model!r}")
    if isinstance(model, int):
        if model < 0:
            raise ValueError(f"a parameter count must be >= 0, got {model}")
        return model
    cfg = model if isinstance(model, ModelConfig) else ModelConfig.from_dict(dict(model))
    p = decoder_params(cfg)
    return p.attention + p.expert + (p.lm_head or p.embedding)


def physical_cores(cpus: set[int] | None = None) -> int:
    """Physical cores among the CPUs this process may run on (its affinity, which ``taskset``, cgroups' cpusets and
    job schedulers narrow). Two SMT siblings of one core count once: they share its vector units, so a second
    thread there contends rather than helps. Falls back to the CPU count where the topology is not readable."""
    if cpus is None:
        cpus = cpu_affinity()
        if cpus is None:
            return available_cores()
    cores = set()
    for cpu in cpus:
        topology = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:
            return max(1, len(cpus))
    return max(1, len(cores))


def idle_cpus(cpus: set[int], window_s: float = IDLE_WINDOW_S) -> float | None:
    """How many of ``cpus`` sat idle over the next ``window_s`` (the sum of their idle fractions in ``/proc/stat``;
    time stolen by the hypervisor counts as busy). None where ``/proc/stat`` is not readable (not Linux)."""
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(window_s)
    after = _cpu_times(cpus)
    if after is None:
        return None
    idle = 0.0
    for cpu, (idle0, total0) in before.items():
        idle1, total1 = after.get(cpu, (idle0, total0))
        idle += (idle1 - idle0) / (total1 - total0) if total1 > total0 else 1.0
    return idle


def free_cores(cpus: set[int] | None = None, window_s: float = IDLE_WINDOW_S) -> int:
    """Cores free to this process: its physical cores (:func:`physical_cores`), fewer when other work keeps some
    of its CPUs busy (:func:`idle_cpus`, rounded, at least 1). A fork/join thread pool runs at the pace of its
    slowest thread, so a thread on a busy core holds back all the others (see the table above)."""
    cpus = cpu_affinity() if cpus is None else cpus
    if cpus is None:
        return available_cores()
    cores = physical_cores(cpus)
    idle = idle_cpus(cpus, window_s)
    return cores if idle is None else max(1, min(cores, int(idle + 0.5)))


def _cpu_times(cpus: set[int]) -> dict[int, tuple[int, int]] | None:
    """cpu -> (idle + iowait jiffies, all jiffies) from ``/proc/stat``, for ``cpus``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    times = {}
    for line in lines:
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
            fields = [int(v) for v in rest.split()[:8]]
            times[int(name[3:])] = (fields[3] + fields[4], sum(fields))
    return times or None


def env_threads(env: Mapping[str, str] | None = None) -> int | None:
    """``OMP_NUM_THREADS`` as a positive whole number, or None when unset, empty or not one."""
    value = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


def default_threads(model: ModelConfig | Mapping[str, Any] | int, cores: int | None = None,
                    env: Mapping[str, str] | None = None) -> int:
    """Intra-op threads for ``model`` (a config, a config dict, or decoder multiply-adds per token) with ``cores``
    free cores (default: :func:`free_cores`, measured only for a large model): ``OMP_NUM_THREADS`` if set (at most
    the physical cores), else 1 for a small decoder and the free cores for a large one. The rule and its
    measurements are in this module's docstring."""
    if cores is not None and cores < 1:
        raise ValueError(f"cores must be >= 1, got {cores}")
    chosen = env_threads(env)
    if chosen is not None:
        return min(chosen, physical_cores() if cores is None else cores)
    if decoder_work(model) < SMALL_DECODER_PARAMS:
        return 1
    return free_cores() if cores is None else cores


def explain(model: ModelConfig | Mapping[str, Any] | int, threads: int, env: Mapping[str, str] | None = None) -> str:
    """Why :func:`default_threads` gave ``threads`` for ``model``, in one line (``-v`` output), without measuring
    the cores again."""
    value = env_threads(env)
    if value is not None:
        return f"{threads} (auto: {THREADS_ENV}={value})"
    work = decoder_work(model)
    if work < SMALL_DECODER_PARAMS:
        return f"{threads} (auto: small decoder, {work / 1e6:.1f} M multiply-adds per token; --threads N to override)"
    return (f"{threads} (auto: large decoder, {work / 1e6:.1f} M multiply-adds per token; {threads} of "
            f"{physical_cores()} cores free; --threads N to override)")


__all__ = ["default_threads", "decoder_work", "free_cores", "physical_cores", "idle_cpus", "env_threads", "explain",
           "SMALL_DECODER_PARAMS"]
