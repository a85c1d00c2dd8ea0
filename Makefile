# Quick start: `make demo` (whole record -> build -> serve -> swap demo), `make test` (the test suite).
PYTHON ?= python3
SHELL := /bin/bash

.PHONY: install demo test unit integration bench lint

install:
	@if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || ! command -v java >/dev/null; then \
	  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist $$(command -v java >/dev/null || echo openjdk-17-jre-headless); \
	fi
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .

demo: install
	$(PYTHON) tools/demo.py

test: install
	$(PYTHON) -m pytest -q tests

unit:
	$(PYTHON) -m pytest -q tests/unit

integration:
	$(PYTHON) -m pytest -q tests/integration

bench:
	$(PYTHON) tools/bench.py

lint:
	$(PYTHON) -m ruff check .
