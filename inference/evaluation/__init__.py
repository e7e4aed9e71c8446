"""Evaluation: running methods, grading answers, comparing methods and their costs."""
