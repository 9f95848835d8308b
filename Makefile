# Every target creates the virtualenv and installs what it needs on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint qemu demo bench man clean

# Installs, then says how to run the command (other targets install silently).
install: $(STAMP)
	@echo
	@echo "vfio-multifd is installed in $(BIN)/ (a virtualenv). To type it as vfio-multifd:"
	@echo "    source $(BIN)/activate    # in this shell; 'deactivate' undoes it"
	@echo "or  export PATH=\"$(CURDIR)/$(BIN):\$$PATH\""
	@echo "or run it by its path, $(BIN)/vfio-multifd; or install it for your user"
	@echo "with pipx install . (then it is in ~/.local/bin). Then try: vfio-multifd --version"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check vfio_multifd tests examples benchmarks tools
	$(BIN)/mypy vfio_multifd benchmarks tools

# QEMU 7.2 (apt-get install qemu-system-x86 when missing) and 10.0.2 (unpacked into
# .qemu/10.0) for tests/test_real_qemu.py; quick when both are there.
qemu:
	sh tests/qemu/get-qemu.sh >/dev/null

# Two pytest workers per core (pytest-xdist), tests stolen by whichever is idle: a third of
# the suite's time is a test waiting on a daemon, a VM, a timer or a peer, and a second
# worker per core uses it (one per core left the cores idle a third of the time).
# PYTHONDONTWRITEBYTECODE emptied: the suite starts some 300 Pythons, and each would
# compile again every module whose bytecode is not cached (up to 0.5 s of CPU each).
# compileall first: in a fresh clone the workers' first daemons would each compile it.
TEST_WORKERS ?= $(shell echo $$(( 2 * $$(nproc) )))
test: lint qemu
	$(BIN)/python -m compileall -q vfio_multifd tests benchmarks examples tools
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

demo: $(STAMP)
	$(BIN)/python examples/demo.py

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/downtime.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/scrape_cost.py
	$(BIN)/python benchmarks/record_cost.py
	$(BIN)/python benchmarks/real_qemu.py

# docs/vfio-multifd.1 from the parsers (committed: man ./docs/vfio-multifd.1 works in a
# fresh clone; a test fails when it no longer matches them).
man: $(STAMP)
	$(BIN)/python tools/make_man.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
