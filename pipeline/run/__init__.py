"""The run as a whole: the task groups (`runner`), whether it still sends and who is active
(`control`), the progress bar (`progress`)."""
