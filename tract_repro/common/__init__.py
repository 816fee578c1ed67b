"""What every layer shares: project errors and the command-line boundary, files, sample counts, per-sample random draws."""
