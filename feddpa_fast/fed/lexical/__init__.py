"""The lexical suite: eight real-text instruction tasks from Debian's WordNet and dictd packages
(``feddpa-fast data build-lexical``; docs/ARCHITECTURE.md §3). Real human-written text, but not
the paper's Flan data."""
from .lexical_tasks import LEXICAL_TASKS
from .sources import MissingSourceError, load_sources
from .suite import build_lexical, write_lexical

__all__ = ["LEXICAL_TASKS", "MissingSourceError", "build_lexical", "load_sources",
           "write_lexical"]
