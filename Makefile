# Everything (CI included) goes through these targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench
PORT_FILE := .mock.port

.PHONY: install run test check format bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pipeline needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,fast,images]'
	@touch $@

install: $(STAMP)

# Start the built-in mock endpoint, run the captioning sample against it, stop the mock.
run: $(STAMP)
	@rm -f $(PORT_FILE); rm -rf out/demo-caption; \
	$(BIN)/pipeline mock --port 0 --port-file $(PORT_FILE) --latency-ms 30 --jitter-ms 60 --quiet & mock=$$!; \
	trap 'kill $$mock 2>/dev/null; rm -f $(PORT_FILE)' EXIT; \
	for i in $$(seq 100); do [ -s $(PORT_FILE) ] && break; sleep 0.1; done; \
	url=http://127.0.0.1:$$(cat $(PORT_FILE))/v1; \
	echo "Mock endpoint at $$url; running jobs/caption.toml against it"; \
	$(BIN)/pipeline run jobs/caption.toml --base-url $$url --output out/demo-caption; status=$$?; \
	echo "Read out/demo-caption/report.md for the usage report."; \
	exit $$status

check: $(STAMP)
	$(BIN)/ruff format --check pipeline tests $(wildcard bench)
	$(BIN)/ruff check pipeline tests $(wildcard bench)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format pipeline tests $(wildcard bench)
	$(BIN)/ruff check --fix pipeline tests $(wildcard bench)

test: check
	$(BIN)/pytest -q

# Bench-only dependencies (openai SDK, psutil), into the same venv; the runtime needs none of them.
$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	@touch $@

# make bench [SCENARIOS=clean,rpm] [BENCH_ARGS="--requests 2000 --rate-requests 600 --lines 200000"]
# Scenarios: clean latency faults rpm tpm memory slow unstated bucket stall caption (all by default);
# figures in bench/out/results.json. BENCH_ARGS="--scale 0.1" shrinks the last four.
SCENARIOS ?=
BENCH_ARGS ?=
bench: $(STAMP) $(BENCH_STAMP)
	$(BIN)/python -m bench $(SCENARIOS) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
