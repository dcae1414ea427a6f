# Everything (CI included) goes through these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
PORT_FILE := .mock.port

.PHONY: install lock run screenshot test check format bench clean system-deps shards warm

# The exact versions of everything `make` installs (the extras in EXTRAS), so that every
# machine gets the same environment; pyproject.toml keeps its ranges open for those who
# import the package. `make lock` renews it: the newest versions in those ranges, for every
# Python from 3.11 (markers where they differ), after which `make` installs them.
LOCK   := requirements.lock
EXTRAS := dev fast shared ray metrics

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pipeline needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r $(LOCK)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@$(BIN)/python -m pip check >/dev/null || { $(BIN)/python -m pip check; \
	  echo "make: $(LOCK) lacks what pyproject.toml asks for: make lock"; exit 1; }
	@touch $@

install: $(STAMP)

# (uv alone, at the lock's version: not the whole lock, which may lack what pyproject.toml
# gained, and so stop the install that make lock is there to mend)
$(BIN)/uv:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	uv=$$(sed -n 's/^\(uv==[^ ;]*\).*/\1/p' $(LOCK)); \
	  $(BIN)/python -m pip install --quiet --disable-pip-version-check "$${uv:-uv}"

lock: $(BIN)/uv
	$(BIN)/uv pip compile --quiet pyproject.toml $(addprefix --extra ,$(EXTRAS)) \
	  --universal --python-version 3.11 --upgrade --custom-compile-command "make lock" -o $(LOCK)

# The demo: the built-in mock, as a real endpoint can be (answers in 1 to 5 s, streamed; a limit
# of 780 requests a minute it never states, counted per second; 500s, dropped connections,
# malformed bodies and cut streams, a few percent in all; a prompt cache, as providers keep
# one, of prompts of 16 tokens or more), and jobs/demo.toml, 300 images to
# caption, run against it with the bar moving: some 30 s, every fault retried away. Its
# report.html shows the limit found, the retries and the latency over time.
DEMO_MOCK := --latency-ms 1000 --latency-max-ms 5000 --rpm 780 --wait-said none \
	--fail-rate 0.02 --drop-rate 0.01 --malformed-rate 0.01 --cut-rate 0.02 \
	--prefix-cache 64 --prefix-cache-min-tokens 16
run: $(STAMP)
	@rm -f $(PORT_FILE); rm -rf out/demo; \
	$(BIN)/pipeline mock --port 0 --port-file $(PORT_FILE) $(DEMO_MOCK) --quiet & mock=$$!; \
	trap 'kill $$mock 2>/dev/null; rm -f $(PORT_FILE)' EXIT; \
	for i in $$(seq 100); do [ -s $(PORT_FILE) ] && break; sleep 0.1; done; \
	url=http://127.0.0.1:$$(cat $(PORT_FILE))/v1; \
	echo "Mock endpoint at $$url: answers in 1 to 5 s, 780 requests a minute allowed (and not said), a few % of faults"; \
	echo "Running jobs/demo.toml against it: alt text for 300 images"; \
	$(BIN)/pipeline run jobs/demo.toml --base-url $$url --output out/demo; status=$$?; \
	echo "Open out/demo/report.html for the run over time in charts (report.md: the same totals as text)."; \
	exit $$status

# docs/report.png, the README's picture: the report of the demo `make run` just ran, drawn in
# headless Chromium by tests/screenshot.py (the code tests/test_report_browser.py checks).
screenshot: run system-deps
	$(BIN)/python -m tests.screenshot out/demo/report.html docs/report.png

# The nightly job as four shards on the built-in mock (600 requests a minute), one pace
# shared through a local redis-server, then merged into out/shards/.
shards: $(STAMP) system-deps
	@rm -rf out/shards; rm -f $(PORT_FILE); \
	$(BIN)/pipeline mock --port 0 --port-file $(PORT_FILE) --rpm 600 --latency-ms 200 --quiet & mock=$$!; \
	rport=$$($(BIN)/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	redis-server --port $$rport --bind 127.0.0.1 --save '' --appendonly no >/dev/null & redis=$$!; \
	trap 'kill $$mock $$redis 2>/dev/null; rm -f $(PORT_FILE)' EXIT; \
	for i in $$(seq 100); do [ -s $(PORT_FILE) ] && \
	  $(BIN)/python -c "import socket; socket.create_connection(('127.0.0.1', $$rport), 0.2)" 2>/dev/null && break; \
	  sleep 0.1; done; \
	url=http://127.0.0.1:$$(cat $(PORT_FILE))/v1; store=redis://127.0.0.1:$$rport/0; pids=""; \
	echo "Mock at $$url (600 requests a minute), shared limit in $$store: four shards of jobs/nightly.toml"; \
	for k in 1 2 3 4; do \
	  $(BIN)/pipeline run jobs/nightly.toml --base-url $$url --output out/shards --shard $$k/4 \
	    --shared-limit $$store --rpm 600 & pids="$$pids $$!"; \
	done; \
	status=0; for p in $$pids; do wait $$p || status=$$?; done; \
	[ $$status -eq 0 ] || exit $$status; \
	$(BIN)/pipeline merge out/shards

check: $(STAMP)
	$(BIN)/ruff format --check pipeline tests $(wildcard bench)
	$(BIN)/ruff check pipeline tests $(wildcard bench)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format pipeline tests $(wildcard bench)
	$(BIN)/ruff check --fix pipeline tests $(wildcard bench)

# Real parts the tests start on 127.0.0.1: redis-server (the shared limit). Installed with
# apt-get where we are root; elsewhere the command to run is named (the tests that need it
# skip, and fail when CI is set).
system-deps:
	@for need in redis-server:redis-server chromium:chromium; do \
	  cmd=$${need%%:*}; pkg=$${need##*:}; \
	  command -v $$cmd >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "make: installing $$pkg (apt-get)"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null; }; \
	  else \
	    echo "make: the tests need $$cmd: sudo apt-get install $$pkg (macOS: brew install $${pkg%-server})"; \
	  fi; \
	done

# The install and the checks beside system-deps (apt-get): neither waits for the other. Then
# three workers on two cores, a file each at a time (a module's fixtures stay in one worker),
# the longest files first (tests/conftest.py orders them; xdist's own order is by how many
# tests a file holds): more than half of these tests' time is waiting (a server's pace, a
# timeout, a batch's poll), not CPU (289 s of tests, 136 s of CPU), so a third worker takes
# 151 s down to about 110; then the tests marked `alone`, which measure a limit across many
# processes, on their own.
#
# Every pytest process rewrites the asserts of every test module it collects (about 4 s of CPU
# for ours), and keeps the result in tests/__pycache__ only where bytecode may be written:
# where PYTHONDONTWRITEBYTECODE is set (CI images often set it), each of the three workers and
# the `alone` phase did it all again, 6 s of CPU each where 2 would do. So the tests run with it
# unset, and one collection beside the checks writes that cache before the workers start.
test: export PYTHONDONTWRITEBYTECODE :=
test:
	@$(MAKE) --no-print-directory -j3 check system-deps warm
	$(BIN)/pytest -q -n 3 --dist loadfile --no-loadscope-reorder -m "not alone"
	$(BIN)/pytest -q -m alone

# The tests collected once, for the cache of their rewritten asserts (their run says any error).
warm: $(STAMP)
	@$(BIN)/pytest -q --collect-only -p no:cacheprovider >/dev/null 2>&1 || true

# Bench-only dependencies (openai SDK, psutil), into the same venv; the runtime needs none of them.
$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	@touch $@

# make bench [SCENARIOS=clean,rpm] [BENCH_ARGS="--requests 2000 --rate-requests 600 --lines 200000"]
# Scenarios: clean latency faults rpm tpm memory slow unstated bucket stall caption shards cluster killed batches prefix (all by default);
# figures in bench/out/results.json. BENCH_ARGS="--scale 0.1" shrinks the last four.
SCENARIOS ?=
BENCH_ARGS ?=
bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench $(SCENARIOS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
