"""The benchmark harness behind `make bench`: pipeline against a bare aiohttp loop and a naive
openai-SDK client, each in its own process, each against a fresh mock in another process.

inputs.py     the generated request files, and which ids a client's results hold
mock.py       one `pipeline mock` process and its /mock/stats counters
measure.py    one client process: wall, CPU (os.wait4), RSS sampled every 50 ms
clients/      the bare loop and the naive client, each run as `python -m bench.clients.X`
runs.py       one client run against one fresh mock: command lines and figures
scenarios.py  clean, latency, faults, rpm, tpm, memory
report.py     the tables, the ratios and the targets
"""
