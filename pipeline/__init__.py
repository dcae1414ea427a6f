"""Run large batches of chat-completion requests against any OpenAI-compatible endpoint.

summary = await pipeline.run(pipeline.settings_from(job_file, output="out/x"))
summary = pipeline.run_sync(settings)      # from code that is not async
"""

__version__ = "0.1.0"

from pipeline.errors import PipelineError, RunStopped, SettingsError
from pipeline.run.runner import run, run_sync
from pipeline.run.summary import Summary
from pipeline.settings import Settings
from pipeline.settings import build as settings_from

__all__ = [
    "PipelineError",
    "RunStopped",
    "Settings",
    "SettingsError",
    "Summary",
    "__version__",
    "run",
    "run_sync",
    "settings_from",
]
