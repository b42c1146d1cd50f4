"""FlopsMonitor's own cost per training step, on a user's own timm ViT in Lightning.

Two measures, side by side in one process (the job of timm_steps.py, one thread):

- its hooks' own time: every FlopsMonitor hook is timed inside the fit; per steady-state step
  (after the step whose FLOPs it counts by tracing) the summed hook time over the step time;
  this is exact even on a busy machine;
- end to end: Lightning with vs without FlopsMonitor, alternating rounds, median steps (noisy
  on a busy machine: a 1% effect needs an idle one).

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/flops_monitor_cost.py [--steps 30] [--rounds 5] [--clock wall|cpu]
"""

from __future__ import annotations

import statistics
import torch
from timm_steps import alternate, arguments, fit, now, ratio

from lit_eff.callbacks import FlopsMonitor

HOOKS = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")


class TimedFlopsMonitor(FlopsMonitor):
    """FlopsMonitor with its per-step hooks timed (seconds spent inside them, per step)."""

    def __init__(self) -> None:
        super().__init__()
        self.spent: list[float] = []
        self._now = 0.0
        for hook in HOOKS:
            setattr(self, hook, self._timed(getattr(self, hook)))

    def _timed(self, method):
        def run(*args, **kwargs):
            start = now()
            try:
                return method(*args, **kwargs)
            finally:
                self._now += now() - start
                if method.__name__ == "on_train_batch_end":
                    self.spent.append(self._now)
                    self._now = 0.0
        return run


def main() -> None:
    args = arguments(__doc__.split("\n")[0], steps=30, rounds=5)
    torch.set_num_threads(1)
    monitors: list[TimedFlopsMonitor] = []

    def timed(model):
        monitors.append(TimedFlopsMonitor())
        return [monitors[-1]]

    steps: list[float] = []
    variants = {
        "Lightning": lambda: fit(lambda model: [], args.steps),
        "Lightning + FlopsMonitor": lambda: fit(lambda model: [FlopsMonitor()], args.steps),
    }
    # (the timed monitor runs as a third variant, so its wrapper does not touch the end-to-end pair)
    variants["Lightning + FlopsMonitor (hooks timed)"] = lambda: steps.extend(got := fit(timed, args.steps)) or got
    t = alternate(variants, args.rounds)
    hook = statistics.median([s for m in monitors for s in m.spent[6:]])  # after warm-up and the traced step
    step = statistics.median(steps)
    print(f"  FlopsMonitor hooks: {hook * 1e6:.0f} us per step (median), step {step * 1e3:.2f} ms")
    ratio("FlopsMonitor hook time / step time", 1 + hook / step, "<= 1.01")
    print(f"  Lightning + FlopsMonitor / Lightning: x{t['Lightning + FlopsMonitor'] / t['Lightning']:.3f} "
          f"(medians over all steps), x{t.fastest('Lightning + FlopsMonitor') / t.fastest('Lightning'):.3f} "
          "(10th percentiles)")
    ratio("Lightning + FlopsMonitor / Lightning (end to end)", t.paired("Lightning + FlopsMonitor", "Lightning"),
          "<= 1.01")


if __name__ == "__main__":
    main()
