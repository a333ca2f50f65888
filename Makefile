# README's two commands: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test test-fast test-qemu bench setup-demo setup-test

setup-demo:
	bash ci/setup demo

setup-test:
	bash ci/setup test

demo: setup-demo
	$(PY) ci/demo.py

# The whole suite: unit, integration over TLS, layer checks, then QEMU.
test: setup-test
	bash ci/test

# Everything but QEMU.
test-fast: setup-test
	bash ci/test --fast

test-qemu: setup-test
	bash ci/test --qemu-only

bench: setup-test
	$(PY) bench/run.py
