"""One rank of tests/test_fast_distributed.py's stop tests: `peftlab train ARGS...` under torchrun, as `--gpus 2`
launches it, with one event on rank 0 only: `sigint@N` sends rank 0 a SIGINT after optimizer step N, `guard@N`
makes rank 0's health guard fail at step N. Every rank writes OUT/rank-R.json: its exit code and the last optimizer
step it ended, so the test sees that the other ranks stopped with rank 0, at its step and for its reason.

    python -m torch.distributed.run --standalone --nproc_per_node=2 fast_dp_stop_worker.py EVENT@N OUT ARGS...
"""

import json
import os
import signal
import sys
from pathlib import Path

from peftlab.cli import main
from peftlab.engines.hooks import TrainingHooks
from peftlab.errors import GuardFailure
from peftlab.watch.guard import HealthGuard

event, at = sys.argv[1].split("@")
out, rank = Path(sys.argv[2]), os.environ["RANK"]
last_step = 0
step_end = TrainingHooks.step_end


def step_end_and_event(self, step):
    global last_step
    step_end(self, step)
    last_step = step
    if rank == "0" and event == "sigint" and step == int(at):
        os.kill(os.getpid(), signal.SIGINT)


TrainingHooks.step_end = step_end_and_event
if rank == "0" and event == "guard":
    check_log = HealthGuard.check_log

    def failing_check_log(self, step, logs):
        if step == int(at):
            raise GuardFailure(f"step {step}: loss is nan (injected on rank 0 only)")
        check_log(self, step, logs)

    HealthGuard.check_log = failing_check_log
sys.argv = ["peftlab", *sys.argv[3:]]
try:
    main()
except SystemExit as exc:
    (out / f"rank-{rank}.json").write_text(json.dumps({"exit": exc.code, "last_step": last_step}))
    raise
