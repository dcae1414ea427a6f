"""The built-in OpenAI-compatible endpoint, for demos, tests and the benchmark: the server
(`server`), its answers (`answers`), its limits (`limits`) and its
batch APIs (`batches`)."""
