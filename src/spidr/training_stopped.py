"""The exception a multi-stage command raises when one of its trainings stopped on a signal after saving its state.

``spidr train`` and ``spidr lm-train`` return exit status 3 for such a stop; the commands that run a training as
one stage of several (``demo``, ``learning-curve``, ``lm-study``) raise ``TrainingStoppedError`` instead, and the
command line turns it into the same status 3 with one line (a traceback read like a failure in a run's log).
"""

# The exit status of a command whose training stopped on a signal.
EXIT_STOPPED = 3
# The exit status of a command that Ctrl-C ended outside a training (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130


class TrainingStoppedError(Exception):
    """A training stopped before its end by a stop signal; its latest checkpoint is complete, and running the same
    command again resumes it."""
