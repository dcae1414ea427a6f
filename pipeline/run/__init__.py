"""The run as a whole: what must hold before it sends (`preflight`), the task groups
(`runner`), whether it still sends and who is active (`control`), the progress bar
(`progress`)."""
