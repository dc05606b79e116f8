"""Problems: the built-in verifiable task generator and file / Hugging Face dataset loaders."""

from sgsd_fast.data.loaders import load_problems
from sgsd_fast.data.tasks import Problem, generate_problems

__all__ = ["Problem", "generate_problems", "load_problems"]
