"""usage.json and report.md from the usage totals of every run into a folder."""
