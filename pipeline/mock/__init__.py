"""The built-in OpenAI-compatible endpoint, for demos, tests and the benchmark: the server
(`server`), its answers (`answers`) and its limits (`limits`)."""
