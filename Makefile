# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# Spark 4 runs on Java 17 or 21; pin 17 so a newer JDK on the PATH is never picked up.
JAVA_HOME := $(firstword $(wildcard /usr/lib/jvm/java-17-openjdk-amd64 /usr/lib/jvm/java-17-openjdk /usr/lib/jvm/java-21-openjdk-amd64))
export JAVA_HOME
export PATH := $(JAVA_HOME)/bin:$(PATH)
# Spark's Python workers must run the venv's interpreter (the one with pandas and pyarrow).
export PYSPARK_PYTHON := $(abspath $(BIN))/python
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN))/python
export BI_JARS_DIR := $(abspath .cache/jars)

.PHONY: install jars demo test test-random bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# The Delta Lake jars come from Maven Central once; the marker makes later runs offline.
jars: $(VENV)/.installed
	$(BIN)/python -m jobs.local.delta_jars

install: $(VENV)/.installed jars

demo: install
	$(BIN)/python -m jobs.local.demo

test: install
	$(BIN)/python -m pytest -q

# The suite in a random order: the seed is printed; add --randomly-seed=<seed> to replay one order.
test-random: install
	$(BIN)/python -m pytest -q -p randomly

bench: install
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/throughput.py --whole-job
	$(BIN)/python benchmarks/llm_latency.py
	$(BIN)/python benchmarks/embeddings.py
	$(BIN)/python benchmarks/ratelimit.py
	$(BIN)/python benchmarks/endpoints.py

clean:
	rm -rf spark-warehouse mlruns .pytest_cache
