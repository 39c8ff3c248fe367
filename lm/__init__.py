"""lmforge: turn a team's own text into a deployed language model, repeatably."""

__version__ = "0.1.0"
