"""Stop, resume, survive a crash: shared by every Trainer-based task (sft, classify, ...).

- interrupt: SIGINT/SIGTERM end training at the next step with a checkpoint (`TrainingInterrupted`).
- checkpoints: which checkpoint is complete, retention (last N + best), state carried across resumes.
- resume: reopen a run folder, check the recipe, pick the checkpoint, trim the log to it.
- oom: what to lower when training runs out of GPU memory.
"""

from peftlab.reliability.checkpoints import carried_state, checkpoint_args, latest_complete
from peftlab.reliability.interrupt import TrainingInterrupted, terminate_as_interrupt, train_resumable
from peftlab.reliability.resume import ResumePlan, plan_resume

__all__ = [
    "ResumePlan",
    "TrainingInterrupted",
    "carried_state",
    "checkpoint_args",
    "latest_complete",
    "plan_resume",
    "terminate_as_interrupt",
    "train_resumable",
]
